"""AWQ checkpoint tensor layouts: packing and unpacking, nothing else.

Every function here converts between the *unpacked* form that the rest of the
backend computes with and the *packed* tensors that AWQ checkpoints store.

Unpacked form (the orientation of ``nn.Linear.weight``)::

    iweight  int   [out, in]       quantized weights, 0 <= q < 2**bits
    izeros   int   [out, groups]   zero points, 0 <= z < 2**bits
    scales   float [out, groups]

and the real weight is ``w[o, i] = (iweight[o, i] - izeros[o, i // g]) * scales[o, i // g]``.

GEMM layout (autoawq ``WQLinear_GEMM``, transformers, vLLM)::

    qweight  int32 [in, out * bits / 32]      packed along the output dim
    qzeros   int32 [groups, out * bits / 32]  packed along the output dim
    scales   fp16  [groups, out]

Eight 4-bit values share one int32; value ``k`` of a pack sits at bits ``4*k``
and holds output column ``8*c + AWQ_ORDER[k]`` (the interleaving that the CUDA
kernel's dequantisation expects).

GEMV layout (autoawq ``WQLinear_GEMV``)::

    qweight  int32 [out, in * bits / 32]      packed along the input dim, in order
    qzeros   int32 [out, zeros_width]         packed along the group dim, in order
    scales   fp16  [out, zeros_width * 32 / bits]

where ``zeros_width`` is the number of groups rounded up to whole int32 words and
then to the kernel's alignment (see :func:`gemv_zeros_width`); padding is zero.
"""

from __future__ import annotations

import torch

from qplug.errors import CheckpointError

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "SUPPORTED_BITS",
    "PackingError",
    "dequantize_unpacked",
    "gemv_zeros_width",
    "pack_gemm",
    "pack_gemm_zeros",
    "pack_gemv",
    "pack_gemv_zeros",
    "unpack_gemm",
    "unpack_gemv",
]

#: position k of a GEMM pack holds output column AWQ_ORDER[k] of its group of eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: inverse permutation: output column j of a group of eight sits at position AWQ_REVERSE_ORDER[j]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
#: the layouts (and every AWQ kernel) are defined for 4-bit weights only
SUPPORTED_BITS = (4,)


class PackingError(CheckpointError):
    """A tensor does not have the shape, dtype or value range that an AWQ layout requires.

    A :class:`qplug.CheckpointError` (so also a ``ValueError``), like every other mis-shaped checkpoint tensor.
    """


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise PackingError(f"bits={bits!r}: AWQ layouts are defined for {list(SUPPORTED_BITS)} bits only")
    return 32 // bits


def _check_range(name: str, t: torch.Tensor, bits: int) -> None:
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise PackingError(f"{name}: expected an integer tensor, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 2**bits):
        raise PackingError(
            f"{name}: values must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
            f"found [{int(t.min())}, {int(t.max())}]"
        )


def _pack_last(values: torch.Tensor, bits: int, order: tuple[int, ...] | None) -> torch.Tensor:
    """Pack groups of ``32 // bits`` values along the last dim into int32 words."""
    per_word = 32 // bits
    *lead, n = values.shape
    if n % per_word:
        raise PackingError(f"cannot pack a last dimension of {n} values into words of {per_word}")
    v = values.to(torch.int64).reshape(*lead, n // per_word, per_word)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)
    words = (v << shifts).sum(dim=-1)
    # words lie in [0, 2**32); reinterpret the top bit as the int32 sign bit
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_last(words: torch.Tensor, bits: int, order: tuple[int, ...] | None) -> torch.Tensor:
    """Inverse of :func:`_pack_last`: int32 words -> int16 values, ``32 // bits`` per word."""
    if words.dtype != torch.int32:
        raise PackingError(f"packed tensors must be int32, got {words.dtype}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    v = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    if order is not None:
        # position k holds column order[k]; gather column j from position inverse[j]
        inverse = [0] * len(order)
        for k, j in enumerate(order):
            inverse[j] = k
        v = v[..., inverse]
    return v.reshape(*words.shape[:-1], -1).to(torch.int16)


def pack_gemm(
    iweight: torch.Tensor, izeros: torch.Tensor, scales: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack unpacked ``[out, in]`` / ``[out, groups]`` tensors into the GEMM layout.

    :returns: ``(qweight, qzeros, scales)`` as AWQ GEMM checkpoints store them.
    """
    _check_bits(bits)
    out_features, in_features = iweight.shape
    if izeros.shape != scales.shape or izeros.shape[0] != out_features:
        raise PackingError(
            f"izeros {tuple(izeros.shape)} and scales {tuple(scales.shape)} must both be [out={out_features}, groups]"
        )
    if in_features % izeros.shape[1]:
        raise PackingError(f"in_features={in_features} is not a multiple of the {izeros.shape[1]} groups")
    _check_range("iweight", iweight, bits)
    qweight = _pack_last(iweight.t(), bits, AWQ_ORDER)
    return (qweight.contiguous(), *pack_gemm_zeros(izeros, scales, bits))


def pack_gemm_zeros(izeros: torch.Tensor, scales: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``izeros``/``scales`` ``[out, groups]`` -> the GEMM layout's ``(qzeros, scales)``."""
    _check_bits(bits)
    _check_range("izeros", izeros, bits)
    qzeros = _pack_last(izeros.t(), bits, AWQ_ORDER)
    return qzeros.contiguous(), scales.t().to(torch.float16).contiguous()


def unpack_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack GEMM-layout tensors into ``(iweight [out, in], izeros [out, groups], scales [out, groups])``."""
    per_word = _check_bits(bits)
    in_features, out_words = qweight.shape
    groups, out_features = scales.shape
    if out_words * per_word != out_features:
        raise PackingError(
            f"qweight {tuple(qweight.shape)} packs {out_words * per_word} outputs, "
            f"but scales {tuple(scales.shape)} has {out_features}"
        )
    if tuple(qzeros.shape) != (groups, out_words):
        raise PackingError(f"qzeros {tuple(qzeros.shape)} must be [groups={groups}, {out_words}]")
    if groups == 0 or in_features % groups:
        raise PackingError(f"in_features={in_features} is not a multiple of the {groups} groups")
    iweight = _unpack_last(qweight, bits, AWQ_ORDER).t()
    izeros = _unpack_last(qzeros, bits, AWQ_ORDER).t()
    return iweight, izeros, scales.t()


def gemv_zeros_width(in_features: int, group_size: int, bits: int = 4) -> int:
    """Width (in int32 words) of the GEMV ``qzeros``; ``scales`` has ``32 // bits`` times as many columns.

    The number of groups is rounded up to whole words, then to a multiple of
    ``128 // group_size`` words for group sizes 32 and 64 (the kernel's alignment);
    autoawq defines no other group size below 128.
    """
    per_word = _check_bits(bits)
    if group_size <= 0 or in_features % group_size:
        raise PackingError(f"group_size={group_size} must divide in_features={in_features}")
    if group_size >= 128:
        multiplier = 1
    elif group_size in (32, 64):
        multiplier = 128 // group_size
    else:
        raise PackingError(f"group_size={group_size}: the GEMV layout is defined for group sizes 32, 64 and >= 128")
    words = -(-(in_features // group_size) // per_word)
    return -(-words // multiplier) * multiplier


def pack_gemv(
    iweight: torch.Tensor, izeros: torch.Tensor, scales: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack unpacked tensors into the GEMV layout (``qweight [out, in / 8]``, padded zeros and scales)."""
    _check_bits(bits)
    out_features, in_features = iweight.shape
    if izeros.shape != scales.shape or izeros.shape[0] != out_features:
        raise PackingError(
            f"izeros {tuple(izeros.shape)} and scales {tuple(scales.shape)} must both be [out={out_features}, groups]"
        )
    groups = izeros.shape[1]
    if in_features % groups:
        raise PackingError(f"in_features={in_features} is not a multiple of the {groups} groups")
    _check_range("iweight", iweight, bits)
    qweight = _pack_last(iweight, bits, None)
    return (qweight.contiguous(), *pack_gemv_zeros(izeros, scales, in_features, bits))


def pack_gemv_zeros(izeros: torch.Tensor, scales: torch.Tensor, in_features: int,
                    bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``izeros``/``scales`` ``[out, groups]`` -> the GEMV layout's padded ``(qzeros, scales)``."""
    per_word = _check_bits(bits)
    _check_range("izeros", izeros, bits)
    out_features, groups = izeros.shape
    width = gemv_zeros_width(in_features, in_features // groups, bits)
    padded_zeros = torch.zeros(out_features, width * per_word, dtype=torch.int64, device=izeros.device)
    padded_zeros[:, :groups] = izeros
    padded_scales = torch.zeros(out_features, width * per_word, dtype=torch.float16, device=scales.device)
    padded_scales[:, :groups] = scales.to(torch.float16)
    return _pack_last(padded_zeros, bits, None).contiguous(), padded_scales


def unpack_gemv(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack GEMV-layout tensors, dropping the padding."""
    per_word = _check_bits(bits)
    out_features, in_words = qweight.shape
    in_features = in_words * per_word
    width = gemv_zeros_width(in_features, group_size, bits)
    if tuple(qzeros.shape) != (out_features, width):
        raise PackingError(f"qzeros {tuple(qzeros.shape)} must be [out={out_features}, {width}] for GEMV")
    if tuple(scales.shape) != (out_features, width * per_word):
        raise PackingError(f"scales {tuple(scales.shape)} must be [out={out_features}, {width * per_word}] for GEMV")
    groups = in_features // group_size
    iweight = _unpack_last(qweight, bits, None)
    izeros = _unpack_last(qzeros, bits, None)[:, :groups]
    return iweight, izeros, scales[:, :groups]


def dequantize_unpacked(
    iweight: torch.Tensor, izeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(iweight - izeros) * scales`` with groups expanded; returns ``[out, in]`` in ``dtype``.

    The integer difference is exact; one rounding happens in the product, as in
    autoawq's fp16 dequantisation when ``dtype`` is float16.
    """
    out_features, in_features = iweight.shape
    groups = scales.shape[1]
    g = in_features // groups
    diff = (iweight.view(out_features, groups, g) - izeros.view(out_features, groups, 1).to(iweight.dtype)).to(dtype)
    return (diff * scales.to(dtype).view(out_features, groups, 1)).view(out_features, in_features)
