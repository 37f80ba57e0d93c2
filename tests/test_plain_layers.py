"""The plain form conversions go through: packed codes (``qplug.conversion.PackedCodes``) and a
``PlainLayer`` that keeps them packed until a target asks for them unpacked."""

from __future__ import annotations

import pytest
import torch

from qplug.conversion import PackedCodes, PlainLayer
from qplug.int_kernels import IntWeight
from qplug.testing.cpu_paths import cpu_paths


def _codes(bits, out_f=6, in_f=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_words_are_the_little_endian_bit_stream_of_each_row(bits):
    q = _codes(bits)
    packed = PackedCodes.pack(q, bits)
    assert packed.words.dtype == torch.int32 and tuple(packed.words.shape) == (6, 64 * bits // 32)
    # value k of a row sits in bits bits*k .. bits*k + bits - 1 of the row's words, lowest first
    words = packed.words.to(torch.int64) & 0xFFFFFFFF
    per = 32 // bits
    for k in range(64):
        field = (words[:, k // per] >> (bits * (k % per))) & ((1 << bits) - 1)
        assert torch.equal(field.to(torch.uint8), q[:, k]), k
    assert torch.equal(packed.unpack(), q)
    assert torch.equal(PackedCodes(packed.words.t().contiguous().t(), bits).unpack(), q)  # any strides


def test_codes_that_do_not_fit_are_refused():
    q = _codes(4)
    q[2, 5] = 16  # would overwrite its neighbour
    with pytest.raises(ValueError, match=r"\[0, 15\], got 16"):
        PackedCodes.pack(q, 4)
    with pytest.raises(ValueError, match="whole words"):
        PackedCodes.pack(_codes(4, in_f=12), 4)
    with pytest.raises(ValueError, match="3-bit"):
        PackedCodes(torch.zeros(2, 3, dtype=torch.int32), 3)


def _layer_parts(bits, out_f=6, in_f=64, group=16, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    scale = torch.rand(out_f, in_f // group, generator=gen).to(torch.bfloat16)
    zero = torch.randint(0, 1 << bits, (out_f, in_f // group), generator=gen, dtype=torch.int16)
    return scale, zero


@pytest.mark.parametrize("act_order", [False, True])
def test_a_packed_layer_unpacks_to_the_same_weight_as_one_read_unpacked(act_order):
    q = _codes(4)  # checkpoint column order
    scale, zero = _layer_parts(4)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3)) if act_order else None
    run_time = q if perm is None else q[:, perm]  # run-time column j is checkpoint column perm[j]
    unpacked = PlainLayer(IntWeight(run_time.contiguous(), scale, zero, 4, 16, perm), bias=None)
    packed = PlainLayer.from_packed(PackedCodes.pack(q, 4), scale, zero, 16, perm=perm)
    for layer in (unpacked, packed):
        assert layer.in_features == 64 and layer.out_features == 6 and layer.act_order is act_order
        codes, g_idx = layer.checkpoint_order()
        assert torch.equal(codes, q)
        if act_order:
            assert torch.equal(g_idx[perm].long(), torch.arange(64) // 16)
        else:
            assert g_idx is None
    assert torch.equal(packed.weight.q, unpacked.weight.q)
    assert packed.weight.perm is perm and packed.weight.group_size == 16
    assert torch.equal(unpacked.packed_codes().words, packed.packed_codes().words)


def test_a_packed_layer_is_checked_like_an_int_weight():
    q = _codes(4)
    scale, zero = _layer_parts(4)
    with pytest.raises(ValueError, match="zero has shape"):
        PlainLayer.from_packed(PackedCodes.pack(q, 4), scale, zero[:, :2], 16)
    with pytest.raises(ValueError, match="perm has shape"):
        PlainLayer.from_packed(PackedCodes.pack(q, 4), scale, zero, 16, perm=torch.arange(8))


def test_symmetric_zero_points_and_layouts_without_packed_words():
    q = _codes(4)
    scale, _ = _layer_parts(4)
    layer = PlainLayer.from_packed(PackedCodes.pack(q, 4), scale, torch.full((6, 4), 8, dtype=torch.int16), 16,
                                   channelwise=False)
    assert layer.symmetric and layer.group_size == 16
    three_bit = PlainLayer(IntWeight(_codes(3), scale, torch.full((6, 4), 4, dtype=torch.int16), 3, 16))
    assert three_bit.packed_codes() is None and three_bit.symmetric


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_points_handed_over_packed_read_as_the_unpacked_ones(bits):
    """Packed along the output rows ([groups, out] words, GPTQ's qzeros layout): the same zero points, the
    same symmetry, unpacked only when asked."""
    per_word = 32 // bits
    out_f = 2 * per_word
    q = torch.randint(0, 1 << bits, (out_f, 64), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    scale, zero = _layer_parts(bits, out_f=out_f)
    middle = torch.full_like(zero, 1 << (bits - 1))
    for zeros, symmetric in ((zero, False), (middle, True)):
        words = PackedCodes.pack(zeros.t().to(torch.uint8), bits)
        layer = PlainLayer.from_packed(PackedCodes.pack(q, bits), scale, words, 16)
        assert layer.packed_zeros() is words and layer.symmetric is symmetric
        layer.check_zeros_fit("layer", "gptq")
        assert torch.equal(layer.zero, zeros) and layer.zero.dtype == torch.int16
        assert torch.equal(layer.weight.zero, zeros)
    unpacked = PlainLayer.from_packed(PackedCodes.pack(q, bits), scale, zero, 16)
    assert unpacked.packed_zeros() is None


def test_packed_zero_points_of_the_wrong_shape_or_width_are_refused():
    q = _codes(4)
    scale, zero = _layer_parts(4, out_f=8)
    codes = PackedCodes.pack(torch.cat([q, q[:2]]), 4)
    with pytest.raises(ValueError, match="packed zero has shape"):
        PlainLayer.from_packed(codes, scale, PackedCodes.pack(zero.t()[:2].to(torch.uint8), 4), 16)
    with pytest.raises(ValueError, match="packed at 8 bits for 8 rows of 4-bit codes"):
        PlainLayer.from_packed(codes, scale, PackedCodes.pack(zero.t().to(torch.uint8), 8), 16)
    with pytest.raises(ValueError, match="whole words"):  # 6 rows fill no whole 4-bit word: padding fields
        PlainLayer.from_packed(PackedCodes.pack(q, 4), scale[:6], PackedCodes(torch.zeros(4, 1, dtype=torch.int32), 4),
                               16)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [(704, 64), (256, 88), (131, 45), (67, 129), (1, 4096), (4096, 1), (8, 8)])
def test_the_tiled_transpose_is_torchs_transposed_copy_bit_for_bit(isa, shape, monkeypatch):
    from qplug import native

    if isa not in cpu_paths():
        pytest.skip(f"this CPU (or build) does not run the {isa} path")
    monkeypatch.setenv(native.ISA_ENV_VAR, isa)
    gen = torch.Generator().manual_seed(sum(shape))
    words = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)
    for source in (words, words[:, 1:]):  # contiguous rows, and rows further apart than their length
        got = native.transposed(source)
        assert got.is_contiguous() and torch.equal(got, source.t().contiguous())
        # in place: the result takes the source's own memory where the source is contiguous
        owned = source.clone()
        got = native.transposed(owned, in_place=True)
        assert got.is_contiguous() and torch.equal(got, source.t().contiguous())
        assert got.data_ptr() == owned.data_ptr()
        if not source.is_contiguous():  # fresh memory, the source untouched
            want = source.t().contiguous()
            got = native.transposed(source, in_place=True)
            assert torch.equal(got, want) and torch.equal(source.t(), want) and got.data_ptr() != source.data_ptr()
    # any 4-byte dtype moves the same bits (NaN payloads included)
    floats = words.view(torch.float32)
    assert torch.equal(native.transposed(floats).view(torch.int32), words.t().contiguous())
    # an already transposed tensor comes back as the contiguous view, no copy
    assert native.transposed(words.t()).data_ptr() == words.data_ptr()


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [(5, 77), (3, 32), (1, 1), (64, 256)])
def test_nibbles_unpack_low_first_on_every_path(isa, shape, monkeypatch):
    from qplug import native

    if isa not in cpu_paths():
        pytest.skip(f"this CPU (or build) does not run the {isa} path")
    monkeypatch.setenv(native.ISA_ENV_VAR, isa)
    packed = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(shape[1]))
    want = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(shape[0], -1)
    assert torch.equal(native.unpacked_nibbles(packed), want)
    assert torch.equal(native.unpacked_nibbles(packed[:, 1:]), want[:, 2:])  # strided: torch's own path
    # in a given order (act-order's run-time columns), repeats and all, from both paths
    order = torch.randint(0, want.shape[1], (want.shape[1] + 3,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(native.unpacked_nibbles(packed, order), want[:, order])
    assert torch.equal(native.unpacked_nibbles(packed[:, 1:], order[order < want.shape[1] - 2]),
                       want[:, 2:][:, order[order < want.shape[1] - 2]])
    with pytest.raises(ValueError, match="outside its rows"):
        native.unpacked_nibbles(packed, torch.tensor([2 * shape[1]]))
    with pytest.raises(TypeError, match="uint8"):
        native.unpacked_nibbles(packed.to(torch.int16))


def test_gptq_words_are_the_transposed_words_of_the_same_codes():
    q = _codes(4, out_f=40, in_f=256)
    packed = PackedCodes.pack(q, 4)
    qweight = packed.transposed_words()  # GPTQ's layout: [in * bits / 32, out]
    assert qweight.is_contiguous() and torch.equal(qweight, packed.words.t())
    as_gptq = PackedCodes(qweight.t(), 4)  # how GPTQ hands its words over
    assert torch.equal(as_gptq.contiguous_words(), packed.words) and as_gptq.contiguous_words().is_contiguous()
    assert torch.equal(as_gptq.unpack(), q)
