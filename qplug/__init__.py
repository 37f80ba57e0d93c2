"""qplug: one config protocol, one set of hooks, any quantization backend.

Applications apply whatever ``quantization_config`` a checkpoint names::

    import qplug
    config = qplug.load_config("path/to/config.json")       # BitsAndBytesConfig, GPTQConfig, ...
    qplug.quantize(model, config)                            # the backend that owns the config runs
    qplug.save_quantized(model, "out/")
    model = qplug.load_quantized("out/")

Backends are plugins found through the ``qplug`` entry-point group; see :mod:`qplug.hookspecs`
for the hooks and the plugin-author guide in the docs. Importing qplug imports neither torch nor
any backend library.
"""

from qplug.api import (
    available_backends,
    check,
    config_from_dict,
    dequantize,
    get_config_class,
    load_config,
    load_quantized,
    quantize,
    quantized_config,
    register_plugin,
    save_quantized,
    unregister_plugin,
)
from qplug.backend import Backend
from qplug.config import QuantConfig
from qplug.conversion import convert
from qplug.disk_quantize import quantize_checkpoint
from qplug.errors import (
    BackendConflictError,
    BackendUnavailableError,
    CheckpointError,
    ConfigFileError,
    ConversionError,
    IncompatibleModelError,
    KernelUnavailableError,
    PlacementError,
    PluginError,
    QPlugError,
    QuantConfigError,
    UnknownBackendError,
)
from qplug.manager import get_plugin_manager
from qplug.markers import backend_hookimpl, hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendConflictError",
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigFileError",
    "ConversionError",
    "IncompatibleModelError",
    "KernelUnavailableError",
    "PlacementError",
    "PluginError",
    "QPlugError",
    "QuantConfig",
    "QuantConfigError",
    "UnknownBackendError",
    "__version__",
    "available_backends",
    "backend_hookimpl",
    "check",
    "config_from_dict",
    "convert",
    "dequantize",
    "get_config_class",
    "get_plugin_manager",
    "hookimpl",
    "kernel_report",
    "load_config",
    "load_quantized",
    "prepare_kernels",
    "quantize",
    "quantize_checkpoint",
    "quantized_config",
    "register_plugin",
    "save_quantized",
    "set_kernel",
    "unregister_plugin",
]


# The kernel functions import torch; load them on first use so `import qplug` stays torch-free.
_KERNEL_FUNCTIONS = ("kernel_report", "prepare_kernels", "set_kernel")


def __getattr__(name: str):
    if name in _KERNEL_FUNCTIONS:
        from qplug import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module 'qplug' has no attribute {name!r}")
