"""Packing of GPTQ integers into int32 words: layout, round trips, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qplug_gptq import packing


def test_4bit_layout_is_little_endian_nibbles():
    vals = torch.arange(1, 9).reshape(8, 1)  # values 1..8 along the packed dimension
    word = packing.pack(vals, 4, dim=0)
    assert word.shape == (1, 1)
    assert int(word) & 0xFFFFFFFF == 0x87654321


def test_8bit_and_2bit_layout():
    assert int(packing.pack(torch.tensor([[1], [2], [3], [255]]), 8)) == 0xFF030201 - 2**32
    vals = torch.tensor([3] + [0] * 15).reshape(16, 1)
    assert int(packing.pack(vals, 2)) == 3


def test_3bit_values_straddle_word_boundaries():
    # value 10 sits at stream bits 30..32 and value 21 at bits 63..65
    vals = torch.zeros(32, 1, dtype=torch.int64)
    vals[10] = 0b111
    vals[21] = 0b101
    words = packing.pack(vals, 3, dim=0).flatten().tolist()
    as_u32 = [w & 0xFFFFFFFF for w in words]
    assert as_u32[0] == 0b11 << 30
    assert as_u32[1] == (0b1 | (0b1 << 31))
    assert as_u32[2] == 0b10
    assert torch.equal(packing.unpack(packing.pack(vals, 3), 3).long(), vals)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    runs=st.integers(1, 4),
    cols=st.integers(1, 5),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(bits, runs, cols, dim, seed):
    n = runs * packing.run_length(bits)
    g = torch.Generator().manual_seed(seed)
    shape = (n, cols) if dim == 0 else (cols, n)
    vals = torch.randint(0, 2**bits, shape, generator=g)
    packed = packing.pack(vals, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == n * bits // 32
    assert torch.equal(packing.unpack(packed, bits, dim=dim), vals.to(torch.int32))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_round_trip_including_zero(bits, fmt):
    zeros = torch.arange(0, 2**bits).repeat(64)[: 2 * 32 * 8].reshape(2, -1)[:, : 32 * 4]
    stored = packing.pack_qzeros(zeros, bits, fmt)
    assert torch.equal(packing.unpack_qzeros(stored, bits, fmt).long(), zeros)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_points_given_packed_give_the_same_qzeros(bits, fmt):
    """Another format's packed zero points (PackedCodes of [groups, out], here a transposed view as
    compressed-tensors' weight_zero_point is) become the qzeros the unpacked ones give, bit for bit."""
    from qplug.plain_layers import PackedCodes

    zeros = torch.randint(0, 2**bits, (3, 64), generator=torch.Generator().manual_seed(bits))
    zeros[0] = torch.arange(64) % 2**bits  # 0, which v1 wraps around
    zeros[1, 0] = 2**bits - 1
    stored_by_rows = PackedCodes.pack(zeros.to(torch.uint8), bits).words.t().contiguous()  # [out words, groups]
    packed = PackedCodes(stored_by_rows.t(), bits)
    qzeros = packing.pack_qzeros(packed, bits, fmt)
    assert qzeros.is_contiguous() and qzeros.data_ptr() != stored_by_rows.data_ptr()
    assert torch.equal(qzeros, packing.pack_qzeros(zeros, bits, fmt))
    assert torch.equal(stored_by_rows, PackedCodes.pack(zeros.to(torch.uint8), bits).words.t())  # left as it was


def test_v1_stores_zero_minus_one_v2_the_zero():
    zeros = torch.full((1, 8), 8)
    assert int(packing.pack_qzeros(zeros, 4, "gptq")) == 0x77777777
    assert int(packing.pack_qzeros(zeros, 4, "gptq_v2")) == 0x88888888 - 2**32


def test_dequantize_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    bits, inf, outf, gs = 4, 64, 32, 16
    q = torch.randint(0, 16, (inf, outf), generator=g)
    z = torch.randint(0, 16, (inf // gs, outf), generator=g)
    s = torch.rand(inf // gs, outf, generator=g).half()
    g_idx = torch.randperm(inf, generator=g).int() // gs  # act-order style permuted groups
    w = packing.dequantize_weight(packing.pack_qweight(q, bits), packing.pack_qzeros(z, bits), s, g_idx, bits)
    expected = torch.empty(outf, inf)
    for i in range(inf):
        gi = int(g_idx[i])
        expected[:, i] = s[gi].float() * (q[i] - z[gi]).float()
    assert torch.equal(w, expected)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        packing.pack(torch.tensor([[16]] * 8), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack(torch.zeros(16, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="bits=5"):
        packing.pack(torch.zeros(8, 1, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="int32"):
        packing.unpack(torch.zeros(1, 1, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="integer"):
        packing.pack(torch.zeros(8, 1), 4)
    with pytest.raises(ValueError, match="checkpoint_format"):
        packing.pack_qzeros(torch.zeros(1, 8, dtype=torch.long), 4, "gptq_v3")


def test_default_g_idx():
    assert packing.default_g_idx(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert packing.default_g_idx(4, -1).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_zeros_packed_from_bytes_are_the_bit_stream(bits, fmt):
    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (3, 64), generator=gen, dtype=torch.int16)
    assert torch.equal(packing.pack_qzeros(zeros, bits, fmt),
                       packing.pack(packing.zeros_to_stored(zeros, bits, fmt), bits, dim=1))
    if fmt == "gptq_v2":
        with pytest.raises(ValueError, match="must lie in"):
            packing.pack_qzeros(zeros + 2**bits, bits, fmt)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_layer_from_packed_codes_is_the_layer_from_integers(bits):
    """``qweight`` is the packed codes' words transposed: both constructors write the same tensors."""
    from qplug_gptq.linear import GPTQLinear

    from qplug.conversion import PackedCodes

    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (32, 64), generator=gen, dtype=torch.uint8)  # [out, in]
    zeros = torch.randint(0, 2**bits, (4, 32), generator=gen)
    scales = torch.rand(4, 32, generator=gen, dtype=torch.float16)
    g_idx = packing.default_g_idx(64, 16)
    for fmt in ("gptq", "gptq_v2"):
        common = {"group_size": 16, "checkpoint_format": fmt, "sym": False}
        ours = GPTQLinear.from_packed(PackedCodes.pack(q, bits), zeros, scales, g_idx, **common).state_dict()
        theirs = GPTQLinear.from_integers(q.t(), zeros, scales, g_idx, bits=bits, **common).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
