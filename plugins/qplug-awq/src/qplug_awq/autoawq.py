"""autoawq's ``WQLinear_GEMM`` / ``WQLinear_GEMV`` as the ``autoawq`` kernel of :class:`AwqLinear`.

autoawq is used only where it really works: on a CUDA device, where it imports and a small probe
layer produces the right numbers. The probe matters because with triton installed ``WQLinear_GEMM``
hands even CPU tensors to Triton kernels (which fail), and ``WQLinear_GEMV`` needs autoawq's CUDA
extension everywhere. On the CPU autoawq's only path is dequantize + float16 matmul, which
qplug's own kernels do faster and in the input's precision, so the kernel refuses the CPU.

It is the first of :attr:`AwqLinear.kernels <qplug_awq.linear.AwqLinear.kernels>`; choose or avoid
it like any kernel: ``qplug.set_kernel(model, "autoawq")``, ``QPLUG_KERNEL=autoawq`` (or
``QPLUG_KERNEL=tinygemm-int4-cuda`` to pass it over). The former ``QPLUG_AWQ_KERNEL`` is gone.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from qplug.errors import KernelUnavailableError
from qplug.kernels import Kernel

__all__ = ["AUTOAWQ", "KernelUnavailableError", "autoawq_importable", "probe"]


def _import_modules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autoawq prints a deprecation notice on import
        from awq.modules.linear import WQLinear_GEMM, WQLinear_GEMV
    return {"gemm": WQLinear_GEMM, "gemv": WQLinear_GEMV}


@functools.cache
def autoawq_importable() -> bool:
    """Whether ``awq.modules.linear`` imports (autoawq installed and compatible with this torch)."""
    try:
        _import_modules()
    except Exception:
        return False
    return True


def _wrap(layer: nn.Module) -> nn.Module:
    """autoawq's module for ``layer`` (an AwqLinear), sharing its tensors (no copy)."""
    cls = _import_modules()[layer.version]
    with torch.device("meta"):
        ext = cls(layer.bits, layer.group_size, layer.in_features, layer.out_features, layer.bias is not None, "meta")
    ext.qweight, ext.qzeros, ext.scales = layer.qweight, layer.qzeros, layer.scales
    ext.bias = layer.bias
    return ext.eval()


@functools.cache
def probe(layer_class: type, version: str, device: str) -> str | None:
    """Run autoawq's ``version`` module on ``device`` once; ``None`` if it works, else why not.

    The probe layer is built with ``layer_class`` (:class:`~qplug_awq.linear.AwqLinear`, which lists
    this kernel), passed in so that this module never imports the one that imports it.
    """
    if not autoawq_importable():
        return "autoawq is not installed (pip install 'qplug-awq[autoawq]')"
    try:
        generator = torch.Generator().manual_seed(0)
        linear = nn.Linear(128, 64)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(64, 128, generator=generator))
        layer = layer_class.from_linear(linear, group_size=64, version=version).to(device)
        x = torch.randn(3, 128, generator=generator).to(device=device, dtype=torch.float16)
        with torch.no_grad():
            got = _wrap(layer)(x).float().reshape(3, 64)
            want = nn.functional.linear(x.float(), layer.dequantize().to(device), layer.bias.float())
        # fp16 matmul of 128 terms: relative error ~1e-3; a wrong kernel is off by O(1)
        err = float((got - want).norm() / want.norm())
        if not err < 2e-2:
            return f"autoawq's {version.upper()} module gives wrong results on {device} (relative error {err:.3g})"
    except Exception as exc:  # any failure means "not usable here"; the reason is reported
        return f"autoawq's {version.upper()} module fails on {device}: {type(exc).__name__}: {exc}"
    return None


def _refuses(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    if not autoawq_importable():
        return "autoawq is not installed (pip install 'qplug-awq[autoawq]')"
    if device.type != "cuda":
        return f"its kernels are CUDA kernels (inputs on {device}); on the CPU it only dequantizes to float16"
    return probe(type(layer), layer.version, str(device))


AUTOAWQ = Kernel(
    "autoawq",
    refuses=_refuses,
    prepare=lambda layer, device, dtype: _wrap(layer),
    # autoawq computes in float16 and may return a 3-D result
    forward=lambda layer, ext, x: ext(x).reshape(x.shape[0], layer.out_features).to(x.dtype),
    description="autoawq's WQLinear_GEMM/GEMV CUDA modules (float16), sharing the checkpoint tensors",
)
