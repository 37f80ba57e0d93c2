"""Packing of GPTQ integer tensors into the int32 checkpoint layout, and back.

The GPTQ checkpoint format (AutoGPTQ, GPTQModel, optimum, transformers) stores

* ``qweight``: int32 ``[in_features * bits / 32, out_features]``, packed along the
  *input* dimension;
* ``qzeros``:  int32 ``[n_groups, out_features * bits / 32]``, packed along the
  *output* dimension;
* ``scales``:  float ``[n_groups, out_features]``;
* ``g_idx``:   int32 ``[in_features]``, the group of each input channel.

For every bit width the packed words are one little-endian bit stream: value ``k``
of a run occupies bits ``bits*k .. bits*k + bits - 1`` of the stream, word ``w``
holding stream bits ``32*w .. 32*w + 31``.  For 2, 4 and 8 bits each word holds
``32 / bits`` whole values; for 3 bits a run of 32 values fills three words and two
values straddle a word boundary (value 10 and value 21).  This is the layout
AutoGPTQ's ``pack`` writes, expressed once for all widths.

Zero points: ``checkpoint_format="gptq"`` (v1) stores ``zero - 1``; ``"gptq_v2"``
stores the zero itself.  :func:`zeros_from_stored` / :func:`zeros_to_stored`
convert, modulo ``2**bits``: a zero point of 0 is stored in v1 as all ones, and an
all-ones field reads back as 0.  That makes our v1 files lossless, and it is how
AutoGPTQ's ``cuda_old`` kernel (the one transformers and optimum pick without
act-order) reads them.  AutoGPTQ's ``pack`` writes such a zero as the int -1, whose
sign bits overwrite every higher field of the word: that corrupts the file itself,
and no reader can recover it (the well-known reason ``gptq_v2`` exists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qplug.errors import IncompatibleModelError

if TYPE_CHECKING:
    from qplug.plain_layers import PackedCodes

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise IncompatibleModelError(f"bits={bits!r} is not supported; accepted values: {list(SUPPORTED_BITS)}")


def run_length(bits: int) -> int:
    """Number of values in the smallest run that fills whole int32 words."""
    check_bits(bits)
    return 32 if bits == 3 else 32 // bits


def packed_length(n: int, bits: int, what: str = "dimension") -> int:
    """Packed size of a dimension of ``n`` values; raises when ``n`` does not pack evenly."""
    run = run_length(bits)
    if n % run:
        raise IncompatibleModelError(
            f"{what} of size {n} cannot be packed at {bits} bits: it must be a multiple of {run}"
        )
    return n * bits // 32


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each value of a run: (word index within the run, bit shift within that word)."""
    offsets = torch.arange(run_length(bits), device=device, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned ``bits``-wide integers along ``dim`` into int32 words.

    ``values`` must hold integers in ``[0, 2**bits)``; anything else raises, since a
    value out of range would silently corrupt its neighbours.
    """
    check_bits(bits)
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise TypeError(f"pack expects an integer tensor, got {values.dtype}")
    v = values.movedim(dim, 0).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(
            f"values to pack at {bits} bits must lie in [0, {2**bits - 1}], got range [{int(v.min())}, {int(v.max())}]"
        )
    n = v.shape[0]
    n_words = packed_length(n, bits)
    run = run_length(bits)
    rest = v.shape[1:]
    v = v.reshape(n // run, run, *rest)
    word, shift = _layout(bits, v.device)
    view = (1, run) + (1,) * len(rest)
    low = v << shift.view(view)  # bits that land in `word` (upper ones cut by the mask)
    spill = shift + bits > 32  # values straddling into the next word (3-bit only)
    out = torch.zeros((n // run, run * bits // 32, *rest), dtype=torch.int64, device=v.device)
    out.index_add_(1, word, low & 0xFFFFFFFF)
    if bool(spill.any()):
        idx = spill.nonzero().flatten()
        high = v[:, idx] >> (32 - shift[idx]).view((1, -1) + (1,) * len(rest))
        out.index_add_(1, word[idx] + 1, high)
    out = out.reshape(n_words, *rest)
    return _to_int32(out).movedim(0, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> unsigned integers (int32) along ``dim``."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed GPTQ tensors are int32, got {packed.dtype}")
    w = packed.movedim(dim, 0)
    rest = w.shape[1:]
    if bits == 3:
        if w.shape[0] % 3:
            raise ValueError(f"3-bit packed dimension of size {w.shape[0]} is not a multiple of 3")
        words = w.to(torch.int64) & 0xFFFFFFFF
        words = words.reshape(w.shape[0] // 3, 3, *rest)
        run = 32
        word, shift = _layout(bits, w.device)
        lo = words[:, word] >> shift.view((1, -1) + (1,) * len(rest))
        spill = (shift + bits > 32).nonzero().flatten()
        if spill.numel():
            nxt = words[:, word[spill] + 1] << (32 - shift[spill]).view((1, -1) + (1,) * len(rest))
            lo[:, spill] |= nxt
        vals = (lo & 0x7).reshape(w.shape[0] // 3 * run, *rest)
        return vals.to(torch.int32).movedim(0, dim).contiguous()
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=w.device, dtype=torch.int32)
    vals = (w.unsqueeze(1) >> shifts.view((1, per) + (1,) * len(rest))) & (2**bits - 1)
    return vals.reshape(w.shape[0] * per, *rest).movedim(0, dim).contiguous()


def pack_qweight(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``[in, out]`` integers -> ``qweight`` int32 ``[in*bits/32, out]``."""
    return pack(intweight, bits, dim=0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` -> ``[in, out]`` integers."""
    return unpack(qweight, bits, dim=0)


def zeros_to_stored(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Integer zero points -> the values a checkpoint of ``checkpoint_format`` stores.

    v1 stores ``zero - 1`` modulo ``2**bits`` (a zero of 0 is written as all ones, not
    as a negative number whose sign bits would spill into its neighbours).
    """
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; accepted values: {list(FORMATS)}")
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        z = (z - 1) % (2**bits)
    return z


def zeros_from_stored(stored: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Unpacked stored zero points -> the integer zero points used to dequantize."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; accepted values: {list(FORMATS)}")
    return (stored + 1) % (2**bits) if checkpoint_format == "gptq" else stored


def pack_qzeros(zeros: torch.Tensor | PackedCodes, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """``[groups, out]`` integer zero points -> ``qzeros`` int32 ``[groups, out*bits/32]``.

    ``zeros`` may come packed already (:class:`qplug.plain_layers.PackedCodes` of ``[groups, out]``, another
    format's stored words): then only the checkpoint format's convention is applied, field by field.
    """
    from qplug.plain_layers import PackedCodes

    if isinstance(zeros, PackedCodes):
        return _qzeros_from_words(zeros, bits, checkpoint_format)
    if bits not in PackedCodes.BITS or zeros.dtype.is_floating_point or zeros.shape[-1] % (32 // bits):
        return pack(zeros_to_stored(zeros, bits, checkpoint_format), bits, dim=1)
    # 2, 4 and 8 bits: whole fields per byte, packed from bytes (the same words as the bit stream, a few
    # times faster than its int64 passes)
    if checkpoint_format == "gptq":
        stored = (zeros.to(torch.int16) - 1) & (2**bits - 1)  # modulo 2**bits, as zeros_to_stored
    elif checkpoint_format == "gptq_v2":
        low, high = torch.aminmax(zeros) if zeros.numel() else (0, 0)
        if int(low) < 0 or int(high) >= 2**bits:
            raise ValueError(f"values to pack at {bits} bits must lie in [0, {2**bits - 1}], "
                             f"got range [{int(low)}, {int(high)}]")
        stored = zeros
    else:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; accepted values: {list(FORMATS)}")
    return PackedCodes.pack(stored.to(torch.uint8), bits).words


def _qzeros_from_words(zeros: PackedCodes, bits: int, checkpoint_format: str) -> torch.Tensor:
    """:func:`pack_qzeros` of packed zero points: the same words (``gptq_v2``), or each field minus one modulo
    ``2**bits`` (``gptq``), computed byte by byte (fields of 2, 4 and 8 bits never straddle a byte)."""
    if zeros.bits != bits:
        raise ValueError(f"{zeros.bits}-bit packed zero points for {bits}-bit qzeros")
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; accepted values: {list(FORMATS)}")
    words = zeros.contiguous_words()
    if checkpoint_format == "gptq_v2":
        return words.clone() if words is zeros.words else words  # never the source's own tensor
    data = words.reshape(-1).view(torch.uint8)
    if bits == 8:
        stored = data - 1  # uint8 wraps: modulo 256
    else:
        mask = 2**bits - 1
        stored = torch.zeros_like(data)
        for k in range(8 // bits):
            stored |= ((((data >> (bits * k)) & mask) + mask) & mask) << (bits * k)  # + (2**bits - 1): minus one
    return stored.view(torch.int32).view(words.shape)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """``qzeros`` -> ``[groups, out]`` integer zero points (the convention applied)."""
    return zeros_from_stored(unpack(qzeros, bits, dim=1), bits, checkpoint_format)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``g_idx`` of a checkpoint without act-order: channel ``i`` is in group ``i // group_size``."""
    if torch.device(device or "cpu").type == "meta":  # a skeleton's: no values, and meta division is slow
        return torch.empty(in_features, dtype=torch.int32, device="meta")
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // gs


def dequantize_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize to a ``[out, in]`` weight (the ``nn.Linear`` layout) of ``dtype``.

    ``W[i, j] = scales[g, j] * (q[i, j] - zero[g, j])`` with ``g = g_idx[i]``.  The
    product is formed in float32 (exact for fp16 scales times integers below 2**9)
    and rounded once to ``dtype``.  When ``g_idx`` is the plain ``i // group_size``
    order (no act-order), groups are broadcast instead of gathered per row.
    """
    q = unpack_qweight(qweight, bits)
    z = unpack_qzeros(qzeros, bits, checkpoint_format)
    n_in, n_groups = q.shape[0], z.shape[0]
    gs = n_in // n_groups if n_groups and n_in % n_groups == 0 else 0
    if gs and torch.equal(g_idx, default_g_idx(n_in, gs, device=g_idx.device).to(g_idx.dtype)):
        # transpose the codes as bytes (a quarter of the traffic), then work in [out, in] order
        n_out = q.shape[1]
        qt = q.to(torch.uint8).t().contiguous().view(n_out, n_groups, gs)
        w = qt.float().sub_(z.t().float().unsqueeze(2)).mul_(scales.t().float().unsqueeze(2))
        return w.view(n_out, n_in).to(dtype)
    else:
        g = g_idx.long()
        w = scales.float()[g] * (q - z[g]).float()
    return w.t().to(dtype).contiguous()
