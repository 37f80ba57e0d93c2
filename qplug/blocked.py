"""Blocked dequantize-and-multiply: ``x @ W.T`` for a weight that exists only in its compressed form.

The many-row (prefill) path of qplug's CPU kernels (:mod:`qplug.lut4`, :mod:`qplug.int_kernels`, and
the bitsandbytes backend's int8 kernel). A C kernel dequantizes a tile of output rows into a buffer
reused by every layer, and torch's matmul (oneDNN) multiplies it, tile after tile, so the full float
weight never exists. The cost over a float matmul is the dequantization, a few tenths of a nanosecond a
weight with the SIMD dequantizers (measured on a Zen 5 core: a 5632x2048 4-bit layer in 1.5 ms against
its 128-token bfloat16 matmul's 8-9 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from qplug import native

__all__ = ["TILE_BYTES", "TILE_ELEMENTS", "matmul", "matmul_dtype"]

#: Bytes per tile: 4M weights in bfloat16, 2M in float32. Measured on 128-token prompts at TinyLlama
#: widths (Zen 5, 2 threads): bfloat16 tiles of 512K-1M weights made oneDNN's matmuls 10-40% slower than
#: one over the whole layer, 4M ones were not; float32 (AVX2) showed no consistent difference from 512K
#: to 4M, so its tiles stay at the same 8 MiB (the buffer is resident memory).
TILE_BYTES = 8 << 20
#: The largest tile, in weights (bfloat16).
TILE_ELEMENTS = TILE_BYTES // 2

_scratch = threading.local()


def matmul_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The tiles' dtype: bfloat16 where the input or the layer's declared compute dtype is bfloat16 and the
    CPU has bfloat16 dot products; float32 otherwise (bfloat16 and float16 matmuls without hardware support
    are several times slower than float32)."""
    wants_bf16 = torch.bfloat16 in (dtype, compute_dtype)
    return torch.bfloat16 if wants_bf16 and native.native_bf16_matmul() else torch.float32


def _buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One tile buffer per thread and dtype, shared by every layer (one per layer would add megabytes each)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def matmul(x: torch.Tensor, n: int, k: int, fill: Callable[[int, int, torch.Tensor], None], dtype: torch.dtype, *,
           unit: int = 1, transposed: bool = False) -> torch.Tensor:
    """``x @ W.T`` (``[m, n]`` in ``dtype``) for ``W`` ``[n, k]`` produced tile by tile.

    :param x: ``[m, k]``, already in ``dtype``.
    :param fill: ``fill(first, count, out)`` writes rows ``[first, first + count)`` of ``W`` into ``out``
        (``dtype``, contiguous): as ``[count, k]``, or as ``W^T``'s ``[k, count]`` when ``transposed``.
    :param unit: tiles start and end on multiples of this many rows (a packing's block of rows).
    """
    elements = TILE_BYTES // dtype.itemsize
    rows = min(n, max(unit, elements // max(k, 1) // unit * unit))
    buf = _buffer(dtype, rows * k)
    out = torch.empty(x.shape[0], n, dtype=dtype)
    for first in range(0, n, rows):
        count = min(rows, n - first)
        tile = buf[: count * k]
        fill(first, count, tile)
        out[:, first:first + count] = x @ (tile.view(k, count) if transposed else tile.view(count, k).T)
    return out
