"""Kernels for affine integer weights, shared by every backend that stores them (GPTQ, AWQ, ...).

A backend converts its packing to the **plain form**, :class:`IntWeight`::

    q      uint8 [out, in]      integer codes, 0 <= q < 2**bits, input columns in run-time order
    scale  float [out, groups]
    zero   int   [out, groups]  integer zero points
    w[o, i] = (q[o, i] - zero[o, i // group_size]) * scale[o, i // group_size]

plus an optional input permutation ``perm`` (GPTQ act-order: columns sorted by group, so groups
are contiguous; the kernels read ``x[:, perm]``). This module knows nothing about any packing.

A layer that uses these kernels is a :class:`~qplug.kernels.KernelLayer` with attributes
``in_features``, ``out_features``, ``bits``, ``group_size`` (``-1``: one group per row) and
``bias`` (tensor or ``None``), and a method ``int_weight() -> IntWeight`` (on the layer's device,
never modifying its checkpoint tensors). It lists the records below in its ``kernels``.

A layer may also name ``code_tensors`` (the checkpoint tensors that hold nothing but the codes, such
as GPTQ's ``qweight``) and implement ``checkpoint_from_codes(q) -> {name: tensor}``, the exact inverse
of how ``int_weight`` reads them (``q`` uint8 ``[out, in]`` in checkpoint column order). Every kernel
below but ``tinygemm-int4-cuda`` and ``dequant-cached`` can give the codes back from its layout, so
such a layer holds its codes once, in the kernel's packing (see :mod:`qplug.kernels`).

``tinygemm-int4-cpu``
    torch's ``_weight_int4pack_mm_for_cpu``: 4-bit, bfloat16 inputs (its float16/float32 paths are
    scalar loops 20-50x slower, and running float16 through bfloat16 would lose precision), output
    features a multiple of 16, a group size (in_features for ``-1``) that a multiple of 32 divides.
    Chosen automatically where torch runs its AVX-512 path (measured ~10% faster decode than
    ``qplug-int4-cpu`` there); passed over for ``qplug-int4-cpu`` elsewhere. Inputs of more than a
    few rows (prefill), for which torch's op is ~2x slower than a bfloat16 matmul, go through
    :func:`qplug.blocked.matmul` instead, dequantizing tiles of its packing with a C kernel.
``tinygemm-int4-cuda``
    torch's CUDA tinygemm ``_weight_int4pack_mm`` (sm80+, bfloat16 inputs), output features a multiple
    of 8, the same group sizes.
``qplug-int4-cpu``
    qplug's C kernels (:mod:`qplug.lut4`): 4-bit, float32/float16/bfloat16 inputs, whole groups per
    row; a GEMV accumulating in float32 over the exact float32 weights for a few input rows (decode),
    blocks dequantized by C and multiplied by torch's matmul for more (prefill).
``qplug-int8-cpu``
    qplug's C kernel for 8-bit weights, float32/float16/bfloat16 inputs, whole groups per row: a GEMV
    over the int8 codes with per-group scales and zero points in float32 for decode, blocks of rows
    dequantized and multiplied by torch's matmul for prefill.
``int8-weight-cpu``
    torch's ``_weight_int8pack_mm``: 8-bit, bfloat16 inputs, in_features and the group size multiples
    of 16; one call per group when there are several.
``dequant-blocked``
    any bits, shape, device and dtype: dequantizes a block of output rows at a time and multiplies,
    never holding the whole float weight. Its layout keeps 2/3/4-bit codes at half a byte each.
``qplug-int4-w4a8-cpu`` (opt-in)
    ``qplug-int4-cpu`` with a W4A8 GEMV for decode: the activations are rounded to int8 per block of 64
    inputs (scale ``max |x| / 127``) and multiplied by the 4-bit codes in integers (``vpmaddubsw``), the
    scales applied in float32. The weights are exact; the activations carry int8 rounding, so the result
    is that of the exact product with the rounded input (tested), not of the float input. Groups must
    be multiples of 64 inputs. Prefill runs ``qplug-int4-cpu``'s exact blocked path.
``dequant-cached`` (opt-in)
    keeps ``float_weight(dtype)``: a full-precision copy (``out * in * 2`` bytes in bf16/fp16, 4 in
    fp32), fastest for large batches where memory does not matter.

Precision: the tinygemm and int8 kernels accumulate in float32 and round the result to bfloat16
(tinygemm also holds ``scale`` and ``(8 - zero) * scale`` in bfloat16), so their error is that of a
bfloat16 matmul of the dequantized weight (measured: within 2x of ``F.linear`` on the bfloat16
weight). ``dequant-*`` compute the weight in float32, round it once to the input dtype and use
torch's matmul.
"""

from __future__ import annotations

import functools
import math

import attrs
import torch
from torch.nn import functional as F

from qplug import blocked, lut4, native
from qplug.errors import KernelUnavailableError
from qplug.kernels import Kernel

__all__ = [
    "CACHE_WEIGHT_SWITCH",
    "DEQUANT_BLOCKED",
    "DEQUANT_CACHED",
    "INT8_WEIGHT_CPU",
    "KERNELS",
    "QPLUG_INT4_CPU",
    "QPLUG_INT8_CPU",
    "TINYGEMM_INT4_CPU",
    "TINYGEMM_INT4_CUDA",
    "IntWeight",
    "dequantize",
    "dequantize_int8_rows",
    "int8_blocked_matmul",
    "plain_from_g_idx",
]

_TINYGEMM_GROUPS = (256, 128, 64, 32)
# from this many tokens on (per channel, grouped), int8-weight-cpu dequantizes blocks instead: measured crossovers
_INT8_DEQUANT_TOKENS = (32, 16)
_BLOCK_ELEMENTS = 1 << 20  # dequantized elements per block (4 MiB of float32): fewer, larger ops


@attrs.frozen(eq=False)
class IntWeight:
    """A plain affine integer weight (see the module docstring)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None

    def __attrs_post_init__(self) -> None:
        out_f, in_f = self.q.shape
        groups = math.ceil(in_f / self.group_size)
        if self.q.dtype != torch.uint8:
            raise TypeError(f"IntWeight.q must be uint8, got {self.q.dtype}")
        for name in ("scale", "zero"):
            shape = tuple(getattr(self, name).shape)
            if shape != (out_f, groups):
                raise ValueError(f"IntWeight.{name} has shape {shape}, expected {(out_f, groups)} "
                                 f"for q {tuple(self.q.shape)} and group_size={self.group_size}")
        if self.perm is not None and tuple(self.perm.shape) != (in_f,):
            raise ValueError(f"IntWeight.perm has shape {tuple(self.perm.shape)}, expected {(in_f,)}")


def plain_from_g_idx(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The input permutation that makes ``g_idx``'s groups contiguous, ``None`` when they already are.

    :raises ValueError: ``g_idx`` does not put ``group_size`` channels in each group (the last may be
        shorter), so no permutation makes it contiguous.
    """
    n = g_idx.numel()
    gs = n if group_size == -1 else group_size
    default = torch.arange(n, device=g_idx.device) // gs
    g = g_idx.long()
    if torch.equal(g, default):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], default):
        raise ValueError(f"g_idx does not assign {gs} input channels to each group")
    return perm


def dequantize(w: IntWeight, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
    """``(q - zero) * scale`` for ``rows`` (all by default), in run-time column order, in ``dtype``.

    Formed in float32 (exact products of small integers and half-precision scales) and rounded once.
    """
    rows = rows or slice(None)
    q, s, z = w.q[rows], w.scale[rows].float(), w.zero[rows].float()
    n, k = q.shape
    gs = w.group_size
    if k % gs == 0:
        out = q.view(n, k // gs, gs).float().sub_(z.unsqueeze(2)).mul_(s.unsqueeze(2)).view(n, k)
    else:  # a shorter last group
        out = (q.float() - z.repeat_interleave(gs, 1)[:, :k]) * s.repeat_interleave(gs, 1)[:, :k]
    return out.to(dtype)


def _permuted(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return x if perm is None else x.index_select(1, perm)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)


def _bias(layer, dtype: torch.dtype) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.detach().to(dtype=dtype, copy=True)


def _group(layer) -> int:
    return layer.in_features if layer.group_size == -1 else layer.group_size


def _tinygemm_group(layer) -> int | None:
    """The largest group tinygemm accepts that tiles the layer's groups exactly (scales repeated)."""
    common = math.gcd(_group(layer), layer.in_features)
    return next((t for t in _TINYGEMM_GROUPS if common % t == 0), None)


def _tinygemm_scales_and_zeros(w: IntWeight, tiny: int) -> torch.Tensor:
    """``[in / tiny, out, 2]`` bfloat16: tinygemm's ``w = (q - 8) * s + z_f``, so ``z_f = (8 - zero) * s``."""
    in_f = w.q.shape[1]
    repeat = w.group_size // tiny  # tiny divides the group size
    s = w.scale.float().repeat_interleave(repeat, 1)[:, : in_f // tiny]
    z = w.zero.float().repeat_interleave(repeat, 1)[:, : in_f // tiny]
    return torch.stack((s, (8 - z) * s), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def _refuse_common(layer, dtype: torch.dtype, bits: int) -> str | None:
    if layer.bits != bits:
        return f"{bits}-bit weights only (this layer has {layer.bits})"
    if dtype != torch.bfloat16:
        # float16 would run at bfloat16 precision; float16/float32 take torch's scalar loop (~20-50x slower)
        return f"bfloat16 inputs only (got {dtype})"
    return None


def _code_tensors(layer) -> tuple[str, ...]:
    return tuple(getattr(layer, "code_tensors", ())) if hasattr(layer, "checkpoint_from_codes") else ()


def _restorer(codes_of):
    """``Kernel.restore`` from ``codes_of(layout) -> (q in run-time column order, perm)``."""

    def restore(layer, layout):
        q, perm = codes_of(layout)
        if perm is not None:  # back to checkpoint column order
            plain = torch.empty_like(q)
            plain[:, perm] = q
            q = plain
        return layer.checkpoint_from_codes(q)

    return restore


# ---------------------------------------------------------------------------------- tinygemm, CPU
def _tinygemm_cpu_refuses(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"CPU only (inputs on {device})"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    why = _refuse_common(layer, dtype, 4)
    if why:
        return why
    if layer.out_features % 16:
        return f"out_features={layer.out_features} is not a multiple of 16"
    if _tinygemm_group(layer) is None:
        return f"group_size={layer.group_size} with in_features={layer.in_features}: no multiple of 32 tiles it"
    return None


def _tinygemm_cpu_prepare(layer, device, dtype):
    w = layer.int_weight()
    tiny = _tinygemm_group(layer)
    packed = _int4pack_cpu(w.q)
    return packed, tiny, _tinygemm_scales_and_zeros(w, tiny), w.perm, _bias(layer, torch.bfloat16)


def _int4pack_cpu(q: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 packing (``_convert_weight_to_int4pack_for_cpu``, 8 inner k-tiles) of uint8 codes
    ``[n, k]``, bit for bit.

    Where :func:`_int4pack_cpu_tiles` knows the layout (whole blocks, low nibbles the first half of a block's
    rows), the bytes are put together here: one OR of the two halves and one transposing copy, against torch's
    packer, which also wants the codes as int32 (4 bytes each). The 1.1B GPTQ model's layouts took 4.0 s to
    build at its first forward, 1.2 s of it torch's packer and most of 0.8 s the int32 copies (Zen 4)."""
    n, k = q.shape
    block = _int4pack_cpu_tiles(n)
    if not block or k % 2:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)
    halves = q.contiguous().view(n // block, 2, block // 2, k)
    return (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


# Above this many input rows the tiles of qplug.blocked beat torch's op (measured on a 5632x2048 layer, Zen 5,
# 2 threads: 2.5 vs 3.0 ms at 16 rows, 4.9 vs 4.0 at 32, 19 vs 9.6 at 128).
_TINYGEMM_CPU_MAX_ROWS = 16


def _tinygemm_cpu_forward(layer, layout, x):
    packed, tiny, sz, perm, bias = layout
    # a decode step is ~18 us of torch's op on a 256x2048 layer: the no-op casts and the ISA lookup (about
    # 1 us each) are skipped where they do nothing
    xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
    xb = _permuted(xb, perm).contiguous()
    name = native.isa()[0] if xb.shape[0] > _TINYGEMM_CPU_MAX_ROWS else None
    if name is not None and _int4pack_cpu_tiles(sz.shape[1]):
        y = _int4pack_cpu_blocked(xb, packed, tiny, sz, native.ISAS[name])
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, tiny, sz)
    y = _add_bias(y, bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _int4pack_cpu_tiles(n: int) -> int:
    """The rows per block of torch's CPU int4 packing of ``n`` rows when qplug's C kernel reads it (whole
    blocks, low nibbles the first half of a block's rows, high nibbles the second), else 0."""
    block, lo, hi, tail_lo, _ = _int4pack_cpu_rows(n)
    if tail_lo is not None or block not in (32, 64):
        return 0
    half = torch.arange(block // 2)
    return block if torch.equal(lo, half) and torch.equal(hi, half + block // 2) else 0


_INT4PACK_WEIGHTS_PER_THREAD = 1 << 16


def _int4pack_cpu_blocked(xb: torch.Tensor, packed: torch.Tensor, tiny: int, sz: torch.Tensor,
                          isa_code: int) -> torch.Tensor:
    n, k = sz.shape[1], xb.shape[1]
    block = _int4pack_cpu_tiles(n)
    dtype = blocked.matmul_dtype(torch.bfloat16)
    lib = native.CPU_KERNELS.get()

    def fill(first: int, count: int, out: torch.Tensor) -> None:  # W^T [k, count]
        native.run_rows(lib, "qplug_dequant_int4pack", first // block, count // block,
                        max(1, _INT4PACK_WEIGHTS_PER_THREAD // (block * k)), isa_code, packed.data_ptr(), k, block,
                        sz.data_ptr(), n, tiny, native.DTYPE_CODES[dtype], out.data_ptr(), count, first // block)

    return blocked.matmul(xb.to(dtype), n, k, fill, dtype, unit=block, transposed=True)


@functools.lru_cache(maxsize=256)
def _int4pack_cpu_rows(n: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Where torch's CPU int4 packing puts each of ``n`` rows: ``(block, lo, hi, tail_lo, tail_hi)``.

    The packing (which depends on the ISA torch dispatches to) tiles the rows in blocks of ``block``;
    block ``b`` holds, for each input column ``k``, ``block / 2`` bytes whose low nibbles belong to rows
    ``b * block + lo`` and high nibbles to rows ``b * block + hi`` (``tail_*`` for a shorter last block).
    Read off the packing itself: a probe whose two columns spell each row's index, then checked on
    random codes, so a torch that packs differently fails here rather than restoring wrong bytes.
    """
    index = torch.arange(n, dtype=torch.int32)
    probe = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.stack((index & 15, index >> 4 & 15), 1), 8)
    flat = probe.reshape(-1).long()
    check = torch.randint(0, 16, (n, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    packed_check = torch.ops.aten._convert_weight_to_int4pack_for_cpu(check, 8)
    for block in (64, 32, 16, 128):
        maps = []
        for start in range(0, n, block) if n > block else (0,):
            rows = min(block, n - start)
            k0, k1 = flat[start : start + rows // 2], flat[start + rows // 2 : start + rows]
            lo = ((k0 & 15 | (k1 & 15) << 4) - start) % 256
            hi = ((k0 >> 4 | (k1 >> 4) << 4) - start) % 256
            maps.append((lo, hi))
        if not all(torch.equal(torch.cat(m).sort().values, torch.arange(len(m[0]) * 2)) for m in maps):
            continue  # not this block size: the probe's rows do not fall in place
        full = n // block
        layout = (block, *maps[0], *(maps[-1] if n % block else (None, None)))
        if all(torch.equal(m[0], maps[0][0]) and torch.equal(m[1], maps[0][1]) for m in maps[:full]) and \
                torch.equal(_int4pack_cpu_unpack_with(layout, packed_check, n, 4), check.to(torch.uint8)):
            return layout
    raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout qplug cannot read back")


def _int4pack_cpu_unpack_with(layout, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    block, lo, hi, tail_lo, tail_hi = layout
    flat = packed.reshape(-1)
    q = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    full = n // block if n >= block else 0
    for rows_done, count, rows, (lo_, hi_) in (
        (0, full, block, (lo, hi)),
        (full * block, 1 if n % block or not full else 0, n - full * block, (tail_lo, tail_hi)),
    ):
        if not count or lo_ is None:
            continue
        b = flat[rows_done * k // 2 : (rows_done + count * rows) * k // 2].view(count, k, rows // 2)
        qv = q[rows_done : rows_done + count * rows].view(count, rows, k)
        qv[:, lo_, :] = (b & 15).transpose(1, 2)
        qv[:, hi_, :] = (b >> 4).transpose(1, 2)
    return q


def _tinygemm_cpu_codes(layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    packed, _, sz, perm, _ = layout
    n, k = sz.shape[1], packed.shape[-1] * 2
    return _int4pack_cpu_unpack_with(_int4pack_cpu_rows(n), packed, n, k), perm


def _tinygemm_cpu_passed_over(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    # Measured on the TinyLlama-shaped GPTQ model: torch's AVX-512 path decodes ~10% faster than qplug-int4-cpu
    # (Zen 5); its AVX2 path is slower (Zen 3, AVX2 only: 109 against 86 ms/token).
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" or QPLUG_INT4_CPU.refuses(layer, device, dtype) is not None:
        return None
    return f"torch runs its {capability} int4 path here, measured slower than qplug-int4-cpu"


TINYGEMM_INT4_CPU = Kernel(
    "tinygemm-int4-cpu",
    refuses=_tinygemm_cpu_refuses,
    prepare=_tinygemm_cpu_prepare,
    forward=_tinygemm_cpu_forward,
    description="torch's int4 CPU matmul (bfloat16)",
    passed_over=_tinygemm_cpu_passed_over,
    releases=_code_tensors,
    restore=_restorer(_tinygemm_cpu_codes),
)


# --------------------------------------------------------------------------------- tinygemm, CUDA
def _tinygemm_cuda_refuses(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"CUDA only (inputs on {device})"
    if torch.version.hip:
        return "not on ROCm (its tile layout differs and is untested here)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"needs compute capability 8.0+ (this GPU has {torch.cuda.get_device_capability(device)})"
    why = _refuse_common(layer, dtype, 4)
    if why:
        return why
    if layer.out_features % 8:
        return f"out_features={layer.out_features} is not a multiple of 8"
    if _tinygemm_group(layer) is None:
        return f"group_size={layer.group_size} with in_features={layer.in_features}: no multiple of 32 tiles it"
    return None


def _tinygemm_cuda_prepare(layer, device, dtype):
    w = layer.int_weight()
    tiny = _tinygemm_group(layer)
    in_f = w.q.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if in_f % (16 * t) == 0)  # in_f % 32 == 0 holds
    nibbles = (w.q[:, ::2] << 4 | w.q[:, 1::2]).contiguous()  # [out, in / 2]: first value high
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
    return packed, tiny, _tinygemm_scales_and_zeros(w, tiny), w.perm, _bias(layer, torch.bfloat16)


def _tinygemm_cuda_forward(layer, layout, x):
    packed, tiny, sz, perm, bias = layout
    xb = _permuted(x.to(torch.bfloat16), perm).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(xb, packed, tiny, sz)
    return _add_bias(y, bias).to(x.dtype)


TINYGEMM_INT4_CUDA = Kernel(
    "tinygemm-int4-cuda",
    refuses=_tinygemm_cuda_refuses,
    prepare=_tinygemm_cuda_prepare,
    forward=_tinygemm_cuda_forward,
    description="torch's tinygemm int4 CUDA matmul (sm80+, bfloat16)",
)


# --------------------------------------------------------------------------- 4-bit code book, CPU
_AFFINE_CODE = torch.arange(16, dtype=torch.float32)  # an affine integer weight is the code book 0..15 with zeros


def _lut4_refuses(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if layer.bits != 4:
        return f"4-bit weights only (this layer has {layer.bits})"
    if layer.in_features % 2 or layer.in_features % _group(layer):
        return f"in_features={layer.in_features} must be even and hold whole groups of {_group(layer)}"
    return lut4.refuses(device, dtype)


def _lut4_prepare(layer, device, dtype):
    w = layer.int_weight()
    n, k = w.q.shape
    codes = (w.q[:, 0::2] << 4 | w.q[:, 1::2]).contiguous()  # element 2j in the high nibble
    weight = lut4.Lut4Weight(codes, n, k, w.group_size, _AFFINE_CODE, absmax=w.scale.float().contiguous(),
                             zeros=w.zero.float().contiguous())
    return weight, w.perm, _bias(layer, torch.float32)


def _lut4_forward(layer, layout, x):
    weight, perm, bias = layout
    x = x.contiguous()
    y = lut4.decode(weight, x, perm, bias)  # decode shapes: one C call
    if y is not None:
        return y
    y = lut4.matmul(weight, x, perm=perm)
    if bias is not None:  # in float32, so that the result is rounded to x's dtype once
        y = y.float().add_(bias)
    return y.to(x.dtype)


def _lut4_codes(layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, perm, _ = layout
    codes = weight.packed.view(weight.n, weight.k // 2)
    return torch.stack((codes >> 4, codes & 15), dim=-1).reshape(weight.n, weight.k), perm


QPLUG_INT4_CPU = Kernel(
    "qplug-int4-cpu",
    refuses=_lut4_refuses,
    prepare=_lut4_prepare,
    forward=_lut4_forward,
    description="qplug's C 4-bit kernels (GEMV for decode, blocked dequantize + matmul for prefill; any float dtype)",
    releases=_code_tensors,
    restore=_restorer(_lut4_codes),
)


# ------------------------------------------------- 4-bit weights x int8-rounded activations, CPU (opt-in)
def _w4a8_refuses(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    why = _lut4_refuses(layer, device, dtype)
    if why is None and _group(layer) % lut4.INT8_ACTIVATION_BLOCK:
        why = f"groups of a multiple of {lut4.INT8_ACTIVATION_BLOCK} inputs (this layer's: {_group(layer)})"
    return why


def _w4a8_forward(layer, layout, x):
    weight, perm, bias = layout
    if x.shape[0] > lut4.GEMV_MAX_ROWS[native.isa()[0]]:  # prefill: the exact blocked path of qplug-int4-cpu
        return _lut4_forward(layer, layout, x)
    x = x.contiguous()
    y = lut4.decode_int8_activations(weight, x, perm, bias)  # one C call (builds with OpenMP)
    if y is not None:
        return y
    y = lut4.gemv_int8_activations(weight, x, perm)
    if bias is not None:
        y = y.add_(bias)
    return y.to(x.dtype)


QPLUG_INT4_W4A8_CPU = Kernel(
    "qplug-int4-w4a8-cpu",
    refuses=_w4a8_refuses,
    prepare=_lut4_prepare,
    forward=_w4a8_forward,
    description="qplug's C 4-bit GEMV on int8-rounded activations (decode; prefill as qplug-int4-cpu): "
                "faster where the float GEMV is compute-bound, less exact: opt-in",
    releases=_code_tensors,
    restore=_restorer(_lut4_codes),
    opt_in=True,
    rounds_inputs=f"decode inputs rounded to int8 per {lut4.INT8_ACTIVATION_BLOCK}",
)


# ---------------------------------------------------------------------------- 8-bit, qplug's C, CPU
_INT8_WEIGHTS_PER_THREAD = 1 << 16


def dequantize_int8_rows(codes: torch.Tensor, group: int, scale: torch.Tensor, zero: torch.Tensor | None, first: int,
                         count: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``[first, first + count)`` of int8 ``codes`` ``[n, k]`` as ``(codes - zero) * scale`` in float32
    (per-group ``scale``/``zero`` ``[n, k / group]`` float32, ``zero`` ``None`` for none), rounded once to
    ``out``'s dtype, into ``out`` (``count * k`` elements), by qplug's C kernel."""
    k = codes.shape[1]
    name = native.isa()[0]
    if name is None:
        raise KernelUnavailableError(f"qplug's CPU kernels are unavailable: {native.isa()[1]}")
    native.run_rows(native.CPU_KERNELS.get(), "qplug_dequant_int8", first, count,
                    max(1, _INT8_WEIGHTS_PER_THREAD // k), native.ISAS[name], codes.data_ptr(), k, group,
                    scale.data_ptr(), None if zero is None else zero.data_ptr(), native.DTYPE_CODES[out.dtype],
                    out.data_ptr(), first)
    return out


def int8_blocked_matmul(x: torch.Tensor, codes: torch.Tensor, group: int, scale: torch.Tensor,
                         zero: torch.Tensor | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W.T`` for int8 ``codes`` (see :func:`dequantize_int8_rows`), tile by tile
    (:func:`qplug.blocked.matmul`)."""
    dtype = blocked.matmul_dtype(x.dtype, compute_dtype)
    n, k = codes.shape
    return blocked.matmul(x.to(dtype).contiguous(), n, k,
                          lambda first, count, out: dequantize_int8_rows(codes, group, scale, zero, first, count, out),
                          dtype)

_Q8_ROWS_PER_THREAD_WEIGHTS = 1 << 18  # below this many weights a thread, one thread does the GEMV


def _q8_refuses(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if layer.bits != 8:
        return f"8-bit weights only (this layer has {layer.bits})"
    if layer.in_features % _group(layer):
        return f"in_features={layer.in_features} must hold whole groups of {_group(layer)}"
    return lut4.refuses(device, dtype)


def _q8_prepare(layer, device, dtype):
    w = layer.int_weight()
    # [out, in]; w = (codes - zero) * scale. q - 128 as int8 is q's bit pattern with the top bit flipped: one
    # pass over the bytes (three int16 passes took most of an 8-bit layout's build)
    codes = (w.q ^ 0x80).view(torch.int8).contiguous()
    zero = (w.zero.float() - 128).contiguous()
    return codes, w.scale.float().contiguous(), zero, w.group_size, w.perm, _bias(layer, torch.float32)


def _q8_forward(layer, layout, x):
    codes, scale, zero, gs, perm, bias = layout
    n, k = codes.shape
    groups = k // gs
    m = x.shape[0]
    name, _ = native.isa()
    if m <= lut4.GEMV_MAX_ROWS[name] and native.openmp():  # decode: one C call (see lut4.decode)
        x = x.contiguous()
        out = torch.empty(m, n, dtype=x.dtype)
        status = native.CPU_KERNELS.get().qplug_linear_int8_grouped(
            native.ISAS[name], native.threads_for(n, max(1, _Q8_ROWS_PER_THREAD_WEIGHTS // k)), codes.data_ptr(),
            scale.data_ptr(), zero.data_ptr(), gs, n, k, x.data_ptr(), native.DTYPE_CODES[x.dtype], m,
            None if perm is None else perm.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
            native.DTYPE_CODES[x.dtype])
        if status:
            raise RuntimeError(f"qplug_linear_int8_grouped returned {status}")
        return out
    xp = _permuted(x, perm)
    if m <= lut4.GEMV_MAX_ROWS[name]:  # decode without OpenMP: the GEMV on qplug's threads, float32 throughout
        xf = xp.to(torch.float32).contiguous()
        xsum = xf.view(m, groups, gs).sum(-1).contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        status = native.run_parallel(native.CPU_KERNELS.get(), "qplug_gemv_int8_grouped", n,
                                     max(1, _Q8_ROWS_PER_THREAD_WEIGHTS // k), native.ISAS[name], xf.data_ptr(), m, k,
                                     codes.data_ptr(), gs, scale.data_ptr(), zero.data_ptr(), xsum.data_ptr(),
                                     out.data_ptr(), n, inline_first=True)
        if any(status):
            raise RuntimeError(f"qplug_gemv_int8_grouped returned {status}")
        y = out
    else:  # prefill: tiles of rows dequantized by C and multiplied in the matmul dtype
        y = int8_blocked_matmul(xp, codes, gs, scale, zero)
    if bias is not None:  # in float32, so that the result is rounded to x's dtype once
        y = y.float().add_(bias)
    return y.to(x.dtype)


def _q8_codes(layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (layout[0].to(torch.int16) + 128).to(torch.uint8), layout[4]


QPLUG_INT8_CPU = Kernel(
    "qplug-int8-cpu",
    refuses=_q8_refuses,
    prepare=_q8_prepare,
    forward=_q8_forward,
    description="qplug's C grouped int8 GEMV for decode, blocked dequantize + matmul for prefill (any float dtype)",
    releases=_code_tensors,
    restore=_restorer(_q8_codes),
)


# ---------------------------------------------------------------------------------------- int8, CPU
def _int8_refuses(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"CPU only (inputs on {device})"
    why = _refuse_common(layer, dtype, 8)
    if why:
        return why
    gs = _group(layer)
    if layer.in_features % 16 or gs % 16 or layer.in_features % gs:
        # torch's kernel reads out of bounds (or is wrong) for K not a multiple of 16
        return f"in_features={layer.in_features} and group_size={layer.group_size} must be multiples of 16"
    return None


def _int8_prepare(layer, device, dtype):
    w = layer.int_weight()
    out_f = w.q.shape[0]
    groups = w.scale.shape[1]
    q = w.q.to(torch.int16)
    zero = w.zero.to(torch.int16)
    # codes relative to the zero point when they fit int8 (always for symmetric weights), else to 128
    # and a correction term:  out = sum_g s_g * (x_g @ (q_g - o)^T) - sum_g s_g * (z_g - o) * sum(x_g)
    rel = q.view(out_f, groups, -1) - zero.unsqueeze(2)
    if int(rel.min()) >= -128 and int(rel.max()) <= 127:
        offset, correction, base = rel, None, zero.t().unsqueeze(2).contiguous()  # base: what q is relative to
    else:
        offset = q.view(out_f, groups, -1) - 128
        correction = (w.scale.float() * (zero.float() - 128)).t().contiguous()  # [groups, out]
        base = None  # 128
    codes = offset.to(torch.int8).transpose(0, 1).contiguous()  # [groups, out, gs]
    scale = w.scale.float().t().contiguous()  # [groups, out]
    ones = torch.ones(out_f, dtype=torch.bfloat16, device=device)
    return codes, scale, correction, ones, w.perm, _bias(layer, torch.float32), base


def _int8_codes(layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    codes, _, _, _, perm, _, base = layout
    q = codes.to(torch.int16).add_(128 if base is None else base)  # [groups, out, gs]
    return q.transpose(0, 1).reshape(codes.shape[1], -1).to(torch.uint8), perm


def _int8_forward(layer, layout, x):
    codes, scale, correction, ones, perm, bias, _ = layout
    groups, out_f, gs = codes.shape
    xb = _permuted(x.to(torch.bfloat16), perm)
    n = xb.shape[0]
    if n >= _INT8_DEQUANT_TOKENS[groups > 1]:
        return _int8_dequant_forward(layout, xb).to(x.dtype)
    xg = xb.reshape(n, groups, gs).transpose(0, 1).contiguous()  # [groups, n, gs]
    out = torch.zeros(n, out_f, dtype=torch.float32, device=x.device) if bias is None else bias.repeat(n, 1)
    for g in range(groups):  # the op takes one scale per output row: one call per group
        out.addcmul_(torch.ops.aten._weight_int8pack_mm(xg[g], codes[g], ones), scale[g])
    if correction is not None:
        out.sub_(xg.float().sum(-1).t() @ correction)
    return out.to(x.dtype)


def _int8_dequant_forward(layout, xb):
    """Many tokens: bfloat16 blocks of the weight from the int8 codes and torch's matmul (oneDNN) beat the op."""
    codes, scale, correction, _, _, bias, _ = layout
    groups, out_f, gs = codes.shape
    out = torch.empty(xb.shape[0], out_f, dtype=torch.bfloat16, device=xb.device)
    rows = max(16, _BLOCK_ELEMENTS // (groups * gs) // 16 * 16)
    for start in range(0, out_f, rows):
        block = slice(start, min(start + rows, out_f))
        w = codes[:, block].float().mul_(scale[:, block, None])
        if correction is not None:
            w.sub_(correction[:, block, None])
        w = w.transpose(0, 1).reshape(-1, groups * gs).to(torch.bfloat16)
        out[:, block] = F.linear(xb, w)
    return out if bias is None else out.add_(bias)


INT8_WEIGHT_CPU = Kernel(
    "int8-weight-cpu",
    refuses=_int8_refuses,
    prepare=_int8_prepare,
    forward=_int8_forward,
    description="torch's int8 weight-only CPU matmul, one call per group (bfloat16)",
    releases=_code_tensors,
    restore=_restorer(_int8_codes),
)


# ------------------------------------------------------------------------------ dequantize, blocked
def _halves(w: IntWeight) -> tuple[slice, slice, int] | None:
    """Scale/zero columns and group size of each half of the input, when both halves hold whole groups."""
    in_f, groups = w.q.shape[1], w.scale.shape[1]
    half = in_f // 2
    if in_f % 2:
        return None
    if groups == 1:
        return slice(0, 1), slice(0, 1), half
    if half % w.group_size == 0:
        return slice(0, half // w.group_size), slice(half // w.group_size, groups), w.group_size
    return None


def _blocked_prepare(layer, device, dtype):
    w = layer.int_weight()
    in_f = w.q.shape[1]
    halves = _halves(w) if w.bits <= 4 else None
    if halves is not None:
        # 2/3/4-bit: column j in the low nibble, j + in/2 in the high one: unpacking is two cheap byte ops and
        # the halves multiply separately (no interleaving copy)
        half = in_f // 2
        codes = (w.q[:, :half] | w.q[:, half:] << 4).contiguous()
    elif w.bits <= 4:
        codes = _nibbles(w.q)
    else:
        codes = w.q
    # a GPU pays per launch, not per cache miss: blocks of 16M elements (64 MiB of float32) there
    elements = _BLOCK_ELEMENTS if device.type == "cpu" else _BLOCK_ELEMENTS << 4
    rows = max(16, elements // in_f // 16 * 16)
    return codes, halves, w.bits <= 4, w.scale, w.zero, w.group_size, w.bits, in_f, rows, w.perm, _bias(layer, dtype)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] codes below 16 -> [n, ceil(k/2)]: two per byte, low nibble first."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | q[:, 1::2] << 4).contiguous()


def _blocked_codes(layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    codes, halves, packed, _, _, _, _, in_f, _, perm, _ = layout
    if halves is not None:
        return torch.cat((codes & 15, codes >> 4), dim=1), perm
    if packed:
        return native.unpacked_nibbles(codes)[:, :in_f].contiguous(), perm
    return codes.clone(), perm


def _blocked_forward(layer, layout, x):
    codes, halves, packed, scale, zero, gs, bits, in_f, rows, perm, bias = layout
    out_f = codes.shape[0]
    xp = _permuted(x, perm)
    out = torch.empty(x.shape[0], out_f, dtype=x.dtype, device=x.device)
    if halves is not None:
        lo_cols, hi_cols, half_gs = halves
    for start in range(0, out_f, rows):
        block = slice(start, min(start + rows, out_f))
        c = codes[block]
        if halves is not None:
            s, z = scale[block], zero[block]
            lo = dequantize(IntWeight(c & 15, s[:, lo_cols], z[:, lo_cols], bits, half_gs), x.dtype)
            hi = dequantize(IntWeight(c >> 4, s[:, hi_cols], z[:, hi_cols], bits, half_gs), x.dtype)
            w = torch.cat((lo, hi), dim=1)  # one matmul, bias included: the result is rounded once
        else:
            q = native.unpacked_nibbles(c)[:, :in_f] if packed else c
            w = dequantize(IntWeight(q, scale[block], zero[block], bits, gs), x.dtype)
        out[:, block] = F.linear(xp, w, None if bias is None else bias[block])
    return out


DEQUANT_BLOCKED = Kernel(
    "dequant-blocked",
    refuses=lambda layer, device, dtype: None if dtype.is_floating_point else f"floating-point inputs only ({dtype})",
    prepare=_blocked_prepare,
    forward=_blocked_forward,
    description="dequantize a block of output rows at a time and multiply (any bits, shape, device, dtype)",
    releases=_code_tensors,
    restore=_restorer(_blocked_codes),
)


# ------------------------------------------------------------------------------- dequantize, cached
def _cached_prepare(layer, device, dtype):
    return layer.float_weight(dtype).contiguous(), _bias(layer, dtype)


DEQUANT_CACHED = Kernel(
    "dequant-cached",
    refuses=lambda layer, device, dtype: None if dtype.is_floating_point else f"floating-point inputs only ({dtype})",
    prepare=_cached_prepare,
    forward=lambda layer, layout, x: F.linear(x, layout[0], layout[1]),
    description="keeps a full-precision copy of the weight (out * in * dtype bytes): opt-in",
    opt_in=True,
)


def _cache_weight_get(layer) -> bool:
    """Whether this layer runs on ``dequant-cached`` (a full-precision copy of its weight)."""
    return layer.kernel_request == DEQUANT_CACHED.name


def _cache_weight_set(layer, enabled: bool) -> None:
    if enabled:
        layer.kernel_request = DEQUANT_CACHED.name
    elif layer.kernel_request == DEQUANT_CACHED.name:
        layer.kernel_request = None
    layer.reset_kernel()


#: ``layer.cache_weight = True/False`` as a request for (or against) ``dequant-cached``; a layer class
#: that used to cache its float weight assigns this property to keep that switch working.
CACHE_WEIGHT_SWITCH = property(_cache_weight_get, _cache_weight_set)


#: Every kernel above, most preferred first: what a layer holding affine integer weights declares
#: (``kernels = int_kernels.KERNELS``, or a backend's own kernel in front of them).
KERNELS = (
    TINYGEMM_INT4_CUDA,
    TINYGEMM_INT4_CPU,
    QPLUG_INT4_CPU,
    QPLUG_INT8_CPU,
    INT8_WEIGHT_CPU,
    DEQUANT_BLOCKED,
    QPLUG_INT4_W4A8_CPU,
    DEQUANT_CACHED,
)
