"""autoawq's ``WQLinear_GEMM`` / ``WQLinear_GEMV`` as optional kernels behind :class:`AwqLinear`.

autoawq is used only where it really works: it must import, and a small probe layer
must produce the right numbers on the device in question. The probe matters because
with triton installed ``WQLinear_GEMM`` hands even CPU tensors to Triton kernels
(which fail), and ``WQLinear_GEMV`` needs autoawq's CUDA extension everywhere.

Kernel choice (``AwqLinear.kernel``, default from ``QPLUG_AWQ_KERNEL``):

``auto``
    autoawq's module on CUDA devices where its probe passes; qplug's own PyTorch path
    everywhere else. On the CPU autoawq's only path is dequantize + float16 matmul,
    which the PyTorch path does faster and in the input's precision.
``autoawq``
    autoawq's module wherever its probe passes; :class:`KernelUnavailableError` otherwise.
``torch``
    always qplug's own path.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["KERNELS", "KernelUnavailableError", "autoawq_importable", "default_kernel", "external_forward", "probe"]

KERNELS = ("auto", "autoawq", "torch")
_ENV = "QPLUG_AWQ_KERNEL"


class KernelUnavailableError(RuntimeError):
    """The kernel asked for cannot run here (autoawq missing, or failing its probe on the device)."""


def default_kernel() -> str:
    """The kernel ``QPLUG_AWQ_KERNEL`` names (``auto`` when unset)."""
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value not in KERNELS:
        raise ValueError(f"{_ENV}={value!r}: expected one of {', '.join(KERNELS)}")
    return value


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
def probe(version: str, device: str) -> str | None:
    """Run autoawq's ``version`` module on ``device`` once; ``None`` if it works, else why not."""
    if not autoawq_importable():
        return "autoawq is not installed (pip install 'qplug-awq[autoawq]')"
    from .linear import AwqLinear

    try:
        generator = torch.Generator().manual_seed(0)
        linear = nn.Linear(128, 64)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(64, 128, generator=generator))
        layer = AwqLinear.from_linear(linear, group_size=64, version=version).to(device)
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


def external_forward(layer: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """autoawq's forward for ``layer`` on ``device``, or ``None`` when qplug's own path should run."""
    kernel = layer.kernel or default_kernel()
    if kernel == "torch" or (kernel == "auto" and device.type == "cpu"):
        return None
    reason = probe(layer.version, str(device))
    if reason is not None:
        if kernel == "autoawq":
            raise KernelUnavailableError(f"{layer.extra_repr()}: kernel='autoawq' requested, but {reason}")
        return None
    return _wrap(layer)
