"""Fast, byte-exact CPU replacement for ``bitsandbytes.functional.quantize_4bit``.

bitsandbytes quantizes CPU tensors to NF4/FP4 with an eager torch kernel (the
``bitsandbytes::quantize_4bit`` "default" implementation): absmax per block, scale,
``torch.bucketize`` against the 15 midpoints of the code book, then nibble packing -- six or
seven passes over the tensor with large temporaries, about 65 M weights/s on two cores.

:func:`quantize_4bit` does the elementwise part in one pass of a small C kernel
(``quantizers.c``, beside this file; its comment gives the arithmetic and why the bytes are the
same) and leaves the rest to bitsandbytes:

* the trailing partial block (``numel % blocksize`` elements), the double quantization of absmax
  (``compress_statistics=True``) and the ``QuantState`` are bitsandbytes' own calls;
* blocks holding NaN get their absmax from eager torch, so even the NaN bits match.

The kernel is built once per machine (see :mod:`qplug_bitsandbytes._native`); calls then cost
nothing extra whatever the tensor shape. Independent ranges of blocks run on
``torch.get_num_threads()`` threads. Whenever the fast path cannot be used (no compiler, a failed
build, a non-CPU tensor, another dtype, a blocksize bitsandbytes does not offer, tensors smaller
than two blocks, ``out``/``absmax`` arguments, or ``QPLUG_BNB_FAST4BIT=0``) the call goes to
``bitsandbytes.functional.quantize_4bit`` unchanged.
"""

from __future__ import annotations

import torch

from qplug.environment import env_flag
from qplug.errors import KernelUnavailableError
from qplug_bitsandbytes import _native

__all__ = ["ENV_VAR", "fast_path_available", "fast_path_enabled", "quantize_4bit", "unavailable_reason", "warm_up"]

#: Set to ``0`` (or ``false``/``no``/``off``) to route every call to bitsandbytes.
ENV_VAR = "QPLUG_BNB_FAST4BIT"
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_QUANT_TYPES = ("nf4", "fp4")
_MIN_BLOCKS = 2
# Below this many blocks one thread does it all: a hand-off to the pool costs more than it saves.
_BLOCKS_PER_THREAD_MIN = 2048

_tables: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}


def fast_path_enabled() -> bool:
    """False when ``QPLUG_BNB_FAST4BIT`` is set to 0/false/no/off."""
    return env_flag(ENV_VAR, default=True)


def fast_path_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether CPU tensors of ``dtype`` take the compiled kernel (builds it on first call)."""
    return fast_path_enabled() and dtype in _native.DTYPE_CODES and _native.library() is not None


def unavailable_reason() -> str | None:
    """Why the kernel could not be built or loaded in this process (``None`` if it was, or was not tried)."""
    return _native.unavailable_reason()


def warm_up(dtypes=tuple(_native.DTYPE_CODES)) -> dict[torch.dtype, bool]:
    """Build (or load from the disk cache) the kernel now; returns dtype -> fast path available."""
    return {dtype: fast_path_available(dtype) for dtype in dtypes}


def _quant_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(15 sorted midpoints, order[j+1] - order[j], order[15]) from bitsandbytes' own code book."""
    tables = _tables.get(quant_type)
    if tables is None:
        try:  # the bounds/order bitsandbytes' CPU kernel uses
            from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

            bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        except ImportError:  # same computation, should the private helper move
            from bitsandbytes.functional import get_4bit_type

            code = get_4bit_type(quant_type, device="cpu")
            order = torch.argsort(code)
            bounds = (code[order[:-1]] + code[order[1:]]) / 2
        order = order.to(torch.int32)
        tables = (bounds.to(torch.float32).contiguous(), (order[1:] - order[:-1]).contiguous(), int(order[15]))
        _tables[quant_type] = tables
    return tables


def _fast_path_applies(A, blocksize, quant_type) -> bool:
    return (
        type(A) is torch.Tensor
        and A.device.type == "cpu"
        and A.layout == torch.strided
        and blocksize in _BLOCKSIZES
        and quant_type in _QUANT_TYPES
        and A.numel() // blocksize >= _MIN_BLOCKS
        and fast_path_available(A.dtype)
    )


def _run_kernel(flat: torch.Tensor, blocks: int, blocksize: int, quant_type: str):
    """Packed codes and absmax of the ``blocks`` full blocks of contiguous ``flat``."""
    bounds, deltas, top = _quant_tables(quant_type)
    packed = torch.empty(blocks * blocksize // 2, dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    kernel = _native.library().qplug_quantize_4bit
    src, dtype = flat.data_ptr(), _native.DTYPE_CODES[flat.dtype]
    tables = (bounds.data_ptr(), deltas.data_ptr(), top, packed.data_ptr(), absmax.data_ptr())
    status = _native.run_in_ranges(
        lambda first, count: kernel(src, dtype, first, count, blocksize, *tables), blocks, _BLOCKS_PER_THREAD_MIN
    )
    if any(status):
        raise KernelUnavailableError(f"4-bit kernel returned {status} for blocksize {blocksize}, dtype {flat.dtype}")

    nan_blocks = absmax.isnan()
    if nan_blocks.any():  # keep the NaN bits eager torch produces (the kernel writes a canonical NaN)
        rows = nan_blocks.nonzero().squeeze(1)
        absmax[rows] = flat[: blocks * blocksize].view(blocks, blocksize)[rows].float().abs().max(dim=-1)[0]
    return packed, absmax


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int | None = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
    *,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """Drop-in for ``bitsandbytes.functional.quantize_4bit`` (same results, bit for bit); fast on CPU.

    Returns ``(packed, QuantState)`` exactly as bitsandbytes does. Note the argument order of this
    signature: pass ``absmax``/``out`` (bitsandbytes' deprecated buffers) by keyword; they route the
    call to bitsandbytes.
    """
    import bitsandbytes.functional as F

    if blocksize is None:
        blocksize = 64
    if absmax is not None or out is not None or not _fast_path_applies(A, blocksize, quant_type):
        return F.quantize_4bit(
            A,
            absmax=absmax,
            out=out,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )

    flat = A.detach().contiguous().reshape(-1)
    n = flat.numel()
    blocks = n // blocksize
    packed, _absmax = _run_kernel(flat, blocks, blocksize, quant_type)

    full = blocks * blocksize
    if full < n:  # trailing partial block: bitsandbytes' own kernel on just those elements
        tail_packed, tail_absmax = torch.ops.bitsandbytes.quantize_4bit.default(
            flat[full:], blocksize, quant_type, torch.uint8
        )
        packed = torch.cat([packed, tail_packed.reshape(-1)])
        _absmax = torch.cat([_absmax, tail_absmax])
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:  # bitsandbytes' layout for other storage dtypes (and its errors)
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)

    # From here on: bitsandbytes.functional.quantize_4bit's own construction of the state.
    nested = {}
    if compress_statistics:
        offset = _absmax.mean()
        _absmax, state2 = F.quantize_blockwise(_absmax - offset, blocksize=256)
        nested = dict(offset=offset, state2=state2)
    code = F.get_4bit_type(quant_type, device=A.device)
    state = F.QuantState(
        absmax=_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type, **nested
    )
    return packed, state
