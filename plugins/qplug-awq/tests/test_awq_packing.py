"""The GEMM and GEMV layouts, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qplug_awq.packing import (
    AWQ_ORDER,
    PackingError,
    dequantize_unpacked,
    gemv_zeros_width,
    pack_gemm,
    pack_gemv,
    unpack_gemm,
    unpack_gemv,
)


def _random(out_f: int, in_f: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    iweight = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int16)
    izeros = torch.randint(0, 16, (out_f, groups), generator=g, dtype=torch.int16)
    scales = torch.rand(out_f, groups, generator=g).half() + 0.01
    return iweight, izeros, scales


def test_gemm_word_holds_columns_in_awq_interleaved_order():
    # one input row, outputs 0..7 quantized to the values 0..7: nibble k must hold column AWQ_ORDER[k]
    iweight = torch.arange(8, dtype=torch.int16).view(8, 1)  # [out=8, in=1]
    izeros = torch.zeros(8, 1, dtype=torch.int16)
    qweight, _, _ = pack_gemm(iweight, izeros, torch.ones(8, 1))
    expected = sum(col << (4 * k) for k, col in enumerate(AWQ_ORDER))
    assert expected == 0x75316420
    assert qweight.shape == (1, 1) and qweight.dtype == torch.int32
    assert int(qweight) == expected


def test_gemm_top_nibble_sets_the_sign_bit():
    iweight = torch.full((8, 1), 15, dtype=torch.int16)
    qweight, _, _ = pack_gemm(iweight, torch.zeros(8, 1, dtype=torch.int16), torch.ones(8, 1))
    assert int(qweight) == -1  # 0xFFFFFFFF as int32
    assert torch.equal(unpack_gemm(qweight, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8).half())[0], iweight)


def test_gemv_word_holds_columns_in_order():
    iweight = torch.arange(128, dtype=torch.int16).remainder(16).view(1, 128)  # [out=1, in=128], one group
    qweight, qzeros, scales = pack_gemv(iweight, torch.zeros(1, 1, dtype=torch.int16), torch.ones(1, 1), 4)
    assert int(qweight[0, 0]) == 0x76543210 and int(qweight[0, 1]) == 0xFEDCBA98 - 2**32
    assert qzeros.shape == (1, 1) and scales.shape == (1, 8)


@pytest.mark.parametrize(
    ("in_features", "group_size", "width"),
    [(4096, 128, 4), (4096, 64, 8), (4096, 32, 16), (128, 128, 1), (256, 64, 2), (1024, 128, 1), (11008, 128, 11)],
)
def test_gemv_zeros_width_matches_autoawq_alignment(in_features, group_size, width):
    # autoawq: groups rounded up to words of 8, then to a multiple of 128 // group_size words
    assert gemv_zeros_width(in_features, group_size) == width


@settings(max_examples=25, deadline=None)
@given(
    out_words=st.integers(1, 6),
    groups=st.integers(1, 4),
    group_words=st.sampled_from([4, 8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_round_trips(out_words, groups, group_words, seed):
    out_f, in_f = 8 * out_words, 8 * group_words * groups
    iweight, izeros, scales = _random(out_f, in_f, groups, seed)
    for pack, unpack in (
        (pack_gemm, lambda q, z, s: unpack_gemm(q, z, s)),
        (pack_gemv, lambda q, z, s: unpack_gemv(q, z, s, in_f // groups)),
    ):
        q, z, s = pack(iweight, izeros, scales)
        w2, z2, s2 = unpack(q, z, s)
        assert torch.equal(w2, iweight) and torch.equal(z2, izeros) and torch.equal(s2, scales)


def test_gemm_shapes_are_the_checkpoint_shapes():
    iweight, izeros, scales = _random(256, 512, 4)
    q, z, s = pack_gemm(iweight, izeros, scales)
    assert (q.shape, z.shape, s.shape) == ((512, 32), (4, 32), (4, 256))
    assert (q.dtype, z.dtype, s.dtype) == (torch.int32, torch.int32, torch.float16)


def test_dequantize_subtracts_zero_then_scales_per_group():
    iweight = torch.tensor([[3, 5, 15, 0]], dtype=torch.int16)
    izeros = torch.tensor([[2, 8]], dtype=torch.int16)
    scales = torch.tensor([[0.5, 0.25]])
    w = dequantize_unpacked(iweight, izeros, scales)
    assert torch.equal(w, torch.tensor([[0.5, 1.5, 1.75, -2.0]]))


def test_gemv_refuses_group_sizes_autoawq_does_not_define():
    with pytest.raises(PackingError, match="group_size=16"):
        gemv_zeros_width(256, 16)


def test_errors_name_the_tensor():
    iweight, izeros, scales = _random(16, 64, 1)
    with pytest.raises(PackingError, match="iweight"):
        pack_gemm(iweight + 16, izeros, scales)
    with pytest.raises(PackingError, match="izeros"):
        pack_gemm(iweight, izeros - 17, scales)
    with pytest.raises(PackingError, match="bits=8"):
        pack_gemm(iweight, izeros, scales, bits=8)
    q, z, s = pack_gemm(iweight, izeros, scales)
    with pytest.raises(PackingError, match="qzeros"):
        unpack_gemm(q, z[:, :1], s)
    with pytest.raises(PackingError, match="int32"):
        unpack_gemm(q.long(), z, s)
    with pytest.raises(PackingError, match="scales"):
        unpack_gemv(*pack_gemv(iweight, izeros, scales)[:2], s, group_size=64)
