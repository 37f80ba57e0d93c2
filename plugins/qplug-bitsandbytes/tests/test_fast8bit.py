"""qplug_bitsandbytes.fast8bit against bitsandbytes' Int8Params quantization, byte for byte."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bnb_testlib import HAVE_CC
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qplug_bitsandbytes import fast8bit, modules

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

needs_kernels = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the kernels cannot be built here")


def library_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What bitsandbytes stores for ``weight`` (Int8Params moved to the CPU quantizes it)."""
    param = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    return param.CB, param.SCB


@st.composite
def weights(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows, cols = draw(st.integers(1, 300)), draw(st.integers(1, 700))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    exponent = draw(st.integers(-20, 12)) if dtype != torch.float16 else draw(st.integers(-12, 12))
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2.0**exponent
    kind = draw(st.sampled_from(("plain", "ties", "subnormal", "equal")))
    if kind == "ties":  # max 127 with halves: every other element lands on a rounding tie
        halves = torch.randint(-254, 255, (rows, cols), generator=g).double() / 2
        w = torch.where(torch.rand(rows, cols, generator=g) < 0.5, halves, w)
        w[:, 0] = 127.0
    elif kind == "subnormal":
        w = torch.randint(-5, 6, (rows, cols), generator=g).double() * torch.finfo(torch.float16).smallest_normal
        w[:, 0] = torch.finfo(torch.float16).smallest_normal  # no all-zero row
    elif kind == "equal":
        w[:] = float(torch.randn(1, generator=g)) or 1.0
    return w.to(dtype)


@needs_kernels
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights())
def test_bytes_equal_bitsandbytes(weight):
    expected = library_int8(weight)
    actual = fast8bit.quantize_weight(weight)
    if actual is None:  # only rows whose maximum bitsandbytes cannot scale by (0, inf, NaN)
        row_max = weight.to(torch.float16).float().abs().amax(dim=1)
        assert ((row_max == 0) | ~torch.isfinite(row_max)).any()
        return
    assert torch.equal(actual[0], expected[0]) and actual[0].dtype == torch.int8
    assert torch.equal(actual[1], expected[1]) and actual[1].dtype == torch.float32


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_weight_split_across_threads(dtype):
    weight = torch.randn(5632, 2048 + 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    actual, expected = fast8bit.quantize_weight(weight), library_int8(weight)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@needs_kernels
@pytest.mark.parametrize(
    "special", [0.0, float("inf"), float("nan"), 1e6], ids=["zero-row", "inf", "nan", "float16-overflow"]
)
def test_rows_bitsandbytes_must_decide_fall_back(special):
    weight = torch.randn(8, 64)
    if special == 0.0:
        weight[3] = 0.0
    else:
        weight[3, 5] = special
    assert fast8bit.quantize_weight(weight) is None
    module = modules.quantize_8bit(torch.nn.Linear(64, 8, bias=False).requires_grad_(False))
    module._set_weight_from_float(weight)  # the module then quantizes with bitsandbytes: same bytes
    expected = library_int8(weight)
    assert torch.equal(module.weight.CB, expected[0])
    torch.testing.assert_close(module.weight.SCB, expected[1], rtol=0, atol=0, equal_nan=True)


def test_other_inputs_are_left_to_bitsandbytes(monkeypatch):
    assert fast8bit.quantize_weight(torch.randn(4, 8, dtype=torch.float64)) is None
    assert fast8bit.quantize_weight(torch.randn(16)) is None
    assert fast8bit.quantize_weight(torch.empty(4, 8, device="meta")) is None
    monkeypatch.setenv(fast8bit.ENV_VAR, "0")
    assert fast8bit.quantize_weight(torch.randn(4, 8)) is None


@needs_kernels
def test_modules_use_it_and_match_bitsandbytes(monkeypatch):
    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16).requires_grad_(False)
    calls = []
    real = fast8bit.quantize_weight
    monkeypatch.setattr(fast8bit, "quantize_weight", lambda w: calls.append(w.shape) or real(w))
    ours = modules.quantize_8bit(linear)
    assert calls == [(96, 256)]
    monkeypatch.setenv(fast8bit.ENV_VAR, "0")
    theirs = modules.quantize_8bit(linear)
    assert torch.equal(ours.weight.data, theirs.weight.data)
    assert torch.equal(ours.weight.SCB, theirs.weight.SCB) and torch.equal(ours.weight.CB, theirs.weight.CB)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))
