"""Fast, byte-exact CPU quantization of a weight to LLM.int8 (what ``Int8Params`` does on ``.to(device)``).

bitsandbytes converts the weight to float16 and calls ``int8_vectorwise_quant``: per row, the
absolute maximum (``SCB``) and ``round(w * 127 / SCB)`` to int8 (``CB``), as eager torch
operations (200-550 M weights/s on two cores; this kernel 4-5 G). :func:`quantize_weight` does the same in one pass
of the C kernel ``qplug_int8_rowwise`` (``quantizers.c``; built as described in
:mod:`qplug_bitsandbytes._native`), over ranges of rows on ``torch.get_num_threads()`` threads.

It returns ``None`` -- and the caller uses bitsandbytes -- for anything but a 2-D CPU tensor of
float32/bfloat16/float16, where the kernel is unavailable, where ``QPLUG_BNB_FAST8BIT=0``, or when
a row's maximum is 0, inf or NaN (bitsandbytes' result there rests on float-to-int conversion of
NaN, which the kernel does not imitate).
"""

from __future__ import annotations

import torch

from qplug.environment import env_flag
from qplug.errors import KernelUnavailableError
from qplug_bitsandbytes import _native

__all__ = ["ENV_VAR", "fast_path_enabled", "quantize_weight"]

#: Set to ``0`` (or ``false``/``no``/``off``) to route every int8 quantization to bitsandbytes.
ENV_VAR = "QPLUG_BNB_FAST8BIT"
# Below this many weights per thread one thread does it all.
_WEIGHTS_PER_THREAD_MIN = 1 << 20


def fast_path_enabled() -> bool:
    """False when ``QPLUG_BNB_FAST8BIT`` is set to 0/false/no/off."""
    return env_flag(ENV_VAR, default=True)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(CB, SCB)``: int8 rows and their float32 absmax, the bytes bitsandbytes' ``Int8Params`` computes.

    ``None`` where the fast path does not apply (see the module docstring).
    """
    if not (
        fast_path_enabled()
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.dtype in _native.DTYPE_CODES
        and weight.numel() > 0
        and _native.library() is not None
    ):
        return None
    src = weight.detach().contiguous()
    rows, cols = src.shape
    CB = torch.empty(rows, cols, dtype=torch.int8)
    SCB = torch.empty(rows, dtype=torch.float32)
    kernel = _native.library().qplug_int8_rowwise
    args = (src.data_ptr(), _native.DTYPE_CODES[src.dtype])
    out = (cols, CB.data_ptr(), SCB.data_ptr())
    per_thread = max(1, _WEIGHTS_PER_THREAD_MIN // cols)
    status = _native.run_in_ranges(lambda first, count: kernel(*args, first, count, *out), rows, per_thread)
    if any(s < 0 for s in status):
        raise KernelUnavailableError(f"int8 kernel returned {status} for a {tuple(src.shape)} {src.dtype} weight")
    if any(status):  # rows with maximum 0, inf or NaN: bitsandbytes decides those bytes
        return None
    return CB, SCB
