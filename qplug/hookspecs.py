"""The hooks a qplug plugin implements.

A plugin is any module or object with functions marked by :data:`qplug.hookimpl` whose names
match the specifications below. Backends mark their implementations with
:func:`qplug.backend_hookimpl`, which makes them answer only for their own config class; other
plugins (a policy, telemetry, packaging) may implement the same hooks for every backend, and
``wrapper=True`` implementations see every call's result or exception.

Implementations may accept fewer arguments than a specification lists, so new arguments can be
added later without breaking plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

    from qplug.backend import Backend
    from qplug.config import QuantConfig

PROJECT = "qplug"

# The spec marker is private: plugin authors only ever need ``qplug.hookimpl`` (see qplug.markers).
_hookspec = pluggy.HookspecMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@_hookspec
def register_backends() -> Iterable[Backend]:
    """Declare the backends this plugin provides.

    Called once, when the plugin is registered. Every implementation runs; the records are
    collected into the name and alias table, where two providers of one name are an error.
    Keep the module that implements this hook light: import your backend's library inside the
    other hooks, so listing backends stays fast and an unavailable library is reported, not raised.

    :return: the :class:`~qplug.Backend` records of this plugin's backends.

    Example::

        @qplug.hookimpl
        def register_backends():
            return [qplug.Backend(name="int8-weight", config_class=Int8Config,
                                  requires=("torch>=2.1",), presets={"int8w": {}})]
    """


# --------------------------------------------------------------------------------------------
# Operations on a model
# --------------------------------------------------------------------------------------------


@_hookspec
def validate(config: QuantConfig, model: torch.nn.Module | None) -> None:
    """Check that ``config`` can be applied to ``model``; raise to veto.

    Called by :func:`qplug.quantize` and :func:`qplug.load_quantized` before any module is
    replaced. Every implementation runs (this is not a ``firstresult`` hook): the owning backend
    checks shapes and module kinds, and any other plugin may enforce a policy.

    :param config: the validated config about to be applied.
    :param model: the model (on the meta device when loading a checkpoint), or ``None`` when only
        the config is being checked.
    :return: nothing; raise :class:`~qplug.QuantConfigError` or
        :class:`~qplug.IncompatibleModelError` naming the field or the module at fault.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def validate(config, model):
            if model is not None and not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
                raise qplug.IncompatibleModelError("int8-weight: the model has no nn.Linear to quantize")
    """


@_hookspec(firstresult=True)
def replace_modules(
    config: QuantConfig,
    model: torch.nn.Module,
    module_names: list[str],
    calibration: Any,
    prequantized: bool,
) -> list[str] | None:
    """Swap the selected modules of ``model`` for the backend's quantized modules, in place.

    Called by :func:`qplug.quantize` (``prequantized=False``: quantize the existing float weights)
    and :func:`qplug.load_quantized` (``prequantized=True``: ``model`` is a skeleton, its weights
    on the meta device; create empty quantized modules that
    ``model.load_state_dict(tensors, assign=True)`` then fills). Stops at first non-None result:
    only the backend that owns ``config`` answers.

    :param config: the backend's config.
    :param model: the model to change in place.
    :param module_names: dotted names of the ``nn.Linear`` modules to replace; the core has already
        removed the output head and every skipped pattern.
    :param calibration: calibration data for methods that need it (token tensors, or texts), else ``None``.
    :param prequantized: whether the weights come later from a quantized checkpoint.
    :return: the names of the modules replaced.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def replace_modules(config, model, module_names, prequantized):
            for name in module_names:
                linear = qplug.modules.get_submodule(model, name)
                qplug.modules.set_submodule(model, name, Int8Linear.from_linear(linear, empty=prequantized))
            return module_names
    """


@_hookspec(firstresult=True)
def dequantize(config: QuantConfig, model: torch.nn.Module) -> list[str] | None:
    """Turn the backend's quantized modules of ``model`` back into plain ``nn.Linear`` modules.

    Called by :func:`qplug.dequantize`. Stops at first non-None result: only the backend that
    owns ``config`` answers.

    :param config: the config the model was quantized with.
    :param model: the quantized model, changed in place.
    :return: the names of the modules turned back to floating point.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def dequantize(config, model):
            names = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
            for name in names:
                qplug.modules.set_submodule(model, name, qplug.modules.get_submodule(model, name).to_linear())
            return names
    """


@_hookspec(firstresult=True)
def serialize(config: QuantConfig, model: torch.nn.Module | None) -> dict[str, Any] | None:
    """Return the JSON object written as ``quantization_config`` in the checkpoint's ``config.json``.

    Called by :func:`qplug.save_quantized`. Stops at first non-None result: the owning backend
    answers; a ``wrapper=True`` implementation may add keys to the result (e.g. provenance).

    :param config: the config the model was quantized with.
    :param model: the quantized model (``None`` when only the config is written).
    :return: a JSON-serialisable dict that includes ``quant_method``.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def serialize(config, model):
            return config.to_dict()
    """
