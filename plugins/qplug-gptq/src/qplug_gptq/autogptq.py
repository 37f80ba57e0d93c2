"""Optional use of auto-gptq (0.7.1) quantized linear modules.

auto-gptq is archived upstream; it imports only with ``transformers<4.50`` and
``peft<0.11``, and its prebuilt CUDA extensions do not load with current torch, in which
case its modules compute with their own PyTorch fallback. The checkpoint layout is the
same as ours (``gptq`` v1), so a :class:`~qplug_gptq.linear.GPTQLinear` converts to an
auto-gptq ``QuantLinear`` by copying buffers.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn

from qplug.errors import IncompatibleModelError

from . import packing

logger = logging.getLogger("qplug.gptq")


@functools.lru_cache(maxsize=1)
def import_error() -> str | None:
    """``None`` when auto-gptq imports here, else why it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("auto_gptq").setLevel(logging.ERROR)
            import auto_gptq  # noqa: F401
            from auto_gptq.utils.import_utils import dynamically_import_QuantLinear  # noqa: F401
    except Exception as exc:  # ImportError, or a failure inside its import chain (wrong transformers)
        return f"{type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    return import_error() is None


def compiled_kernels_load() -> bool:
    """Whether auto-gptq's compiled CUDA kernels load (they do not with current torch)."""
    if not available():
        return False
    from auto_gptq.nn_modules.qlinear import qlinear_cuda

    return bool(getattr(qlinear_cuda, "_autogptq_cuda_available", False))


def quant_linear_class(bits: int, group_size: int, desc_act: bool) -> type[nn.Module]:
    """The QuantLinear auto-gptq itself picks for these settings (cuda / cuda_old; no exllama, marlin, triton)."""
    from auto_gptq.utils.import_utils import dynamically_import_QuantLinear

    return dynamically_import_QuantLinear(
        use_triton=False,
        desc_act=desc_act,
        group_size=group_size,
        bits=bits,
        disable_exllama=True,
        disable_exllamav2=True,
        disable_marlin=True,
    )


def is_autogptq_module(module: nn.Module) -> bool:
    return any(c.__module__.startswith("auto_gptq.nn_modules.qlinear") for c in type(module).__mro__)


def empty_module(
    in_features: int, out_features: int, *, bits: int, group_size: int, desc_act: bool, bias: bool
) -> nn.Module:
    """An auto-gptq QuantLinear ready for ``load_state_dict`` (its buffers are on the CPU)."""
    cls = quant_linear_class(bits, group_size, desc_act)
    module = cls(bits, group_size, in_features, out_features, bias, weight_dtype=torch.float16)
    module.kernel = f"auto-gptq:{cls.QUANT_TYPE}"  # what `qplug inspect` and the benchmarks show
    return module


def from_gptq_linear(module, desc_act: bool) -> nn.Module:
    """Copy a v1 :class:`GPTQLinear`'s tensors into an auto-gptq QuantLinear."""
    if module.checkpoint_format != "gptq":
        raise IncompatibleModelError(
            f"auto-gptq reads checkpoint_format 'gptq' only, this layer is {module.checkpoint_format!r}"
        )
    out = empty_module(
        module.in_features,
        module.out_features,
        bits=module.bits,
        group_size=module.group_size,
        desc_act=desc_act,
        bias=module.bias is not None,
    )
    out.qweight = module.qweight.clone()
    out.qzeros = module.qzeros.clone()
    out.scales = module.scales.to(torch.float16).clone()
    out.g_idx = module.g_idx.clone()
    if module.bias is not None:
        out.bias = module.bias.to(torch.float16).clone()
    return out.to(module.qweight.device)


def to_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """Dequantize an auto-gptq QuantLinear to a plain ``nn.Linear``."""
    w = packing.dequantize_weight(
        module.qweight, module.qzeros, module.scales, module.g_idx, module.bits, "gptq", dtype=dtype
    )
    lin = nn.Linear(module.infeatures, module.outfeatures, bias=module.bias is not None, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return lin
