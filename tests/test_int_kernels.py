"""qplug.int_kernels: every kernel against the dequantize reference, on a layer that holds the plain form.

Tolerances are worst-case rounding bounds, not measured noise: for inputs ``x`` and reference weight
``W`` (float32), ``|y - x @ W.T| <= 2 eps (|x| @ (|W| + 16 s).T) + eps |y|`` elementwise, with ``eps``
the unit step of the compute dtype (2**-8 for bfloat16, 2**-10 float16, 2**-20 float32): the weight's
rounding costs ``eps |W|`` (tinygemm's bfloat16 ``scale`` and ``(8 - zero) * scale``: at most
``eps * 16 s``), float32 accumulation next to nothing, and the output is rounded once. In norm, the
error must also stay under ``1.25 eps`` relative (a bfloat16 matmul's is about ``eps / 2``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import qplug
from qplug import int_kernels, lut4, native
from qplug.int_kernels import IntWeight
from qplug.kernels import KernelLayer
from qplug.testing.cpu_paths import cpu_paths, forcing_cpu_path

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float32: 2.0**-20}
CPU_KERNELS = ("tinygemm-int4-cpu", "qplug-int4-cpu", "qplug-int8-cpu", "int8-weight-cpu", "dequant-blocked",
               "dequant-cached")
#: kernels that round the activations (checked against the rounded input's exact product instead)
INT8_ACTIVATION_KERNELS = tuple(k.name for k in int_kernels.KERNELS if k.rounds_inputs)


class PlainLinear(KernelLayer, nn.Module):
    """A quantized linear layer whose checkpoint tensors *are* the plain form (what a backend converts to)."""

    kernels = int_kernels.KERNELS

    def __init__(self, q, scale, zero, bits, group_size, perm=None, bias=None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size = bits, group_size
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("perm", perm)
        self.register_buffer("bias", bias)

    def int_weight(self):
        gs = self.in_features if self.group_size == -1 else self.group_size
        return IntWeight(self.q, self.scale, self.zero, self.bits, gs, self.perm)

    def float_weight(self, dtype):
        """Written out independently of int_kernels: W[:, perm[j]] = (q[:, j] - z[:, g(j)]) * s[:, g(j)]."""
        gs = self.in_features if self.group_size == -1 else self.group_size
        g = torch.arange(self.in_features, device=self.q.device) // gs
        w_run = (self.q.float() - self.zero.float()[:, g]) * self.scale.float()[:, g]
        if self.perm is None:
            return w_run.to(dtype)
        w = torch.empty_like(w_run)
        w[:, self.perm] = w_run
        return w.to(dtype)

    code_tensors = ("q",)

    def checkpoint_from_codes(self, q):
        return {"q": q if self.perm is None else q.index_select(1, self.perm).contiguous()}

    def forward(self, x):
        return self.run_kernel(x)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}"


def make_layer(out_f, in_f, bits, group_size, *, act_order=False, sym=False, bias=True, seed=0,
               scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    groups = -(-in_f // gs)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    if sym:
        zero = torch.full((out_f, groups), 2 ** (bits - 1), dtype=torch.int16)
    else:
        zero = torch.randint(0, 2**bits, (out_f, groups), generator=g).to(torch.int16)
    scale = (torch.rand(out_f, groups, generator=g) * 0.02 + 2e-3).to(scale_dtype)
    perm = torch.randperm(in_f, generator=g) if act_order else None
    b = (torch.randn(out_f, generator=g) * 0.1).half() if bias else None
    return PlainLinear(q, scale, zero, bits, group_size, perm, b)


def reference(layer, x):
    """float32 ``x @ W.T + b`` and the elementwise magnitude the rounding bound scales with."""
    w = layer.float_weight(torch.float32)
    xf = x.float()
    y = F.linear(xf, w, None if layer.bias is None else layer.bias.float())
    gs = layer.in_features if layer.group_size == -1 else layer.group_size
    g = torch.arange(layer.in_features) // gs
    s = layer.scale.float()[:, g]
    if layer.perm is not None:
        s_orig = torch.empty_like(s)
        s_orig[:, layer.perm] = s
        s = s_orig
    magnitude = xf.abs() @ (w.abs() + 16 * s).t()
    return y, magnitude


def assert_within_bound(layer, x, out, compute_dtype):
    y, magnitude = reference(layer, x)
    eps = EPS[compute_dtype]
    bound = 2 * eps * magnitude + eps * y.abs() + 1e-6
    excess = (out.float() - y).abs() - bound
    assert out.dtype == x.dtype and out.shape == y.shape
    assert bool((excess <= 0).all()), f"worst excess over the bound: {float(excess.max()):.3g}"
    # the elementwise bound is a worst case (sqrt(in_features) loose); errors add up like noise in norm
    error = float((out.float() - y).norm() / y.norm())
    assert error <= 1.25 * eps, f"norm-relative error {error:.3g}"


def run_on(layer, name, x):
    layer.kernel_request = name
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel == name
    return out


def compute_dtype(name, dtype):
    return torch.bfloat16 if name in ("tinygemm-int4-cpu", "int8-weight-cpu") else dtype


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    out_f=st.sampled_from([16, 32, 48, 64, 192]),  # whole blocks of torch's int4 packing from 64 (AVX-512)
    group_size=st.sampled_from([32, 64, 128, 256, -1]),
    groups=st.integers(1, 3),
    act_order=st.booleans(),
    sym=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    batch=st.one_of(st.integers(1, 8), st.integers(9, 64)),  # as often the GEMVs (decode) as the blocked path
    seed=st.integers(0, 2**16),
    isa=st.sampled_from(["portable", "avx2", "avx512"]),  # qplug's C paths: an AVX-512 CPU runs all three
)
def test_every_cpu_kernel_agrees_with_the_reference(bits, out_f, group_size, groups, act_order, sym, bias, dtype,
                                                    batch, seed, isa):
    assume(isa in cpu_paths())
    with forcing_cpu_path(isa):
        check_every_cpu_kernel(bits, out_f, group_size, groups, act_order, sym, bias, dtype, batch, seed)


def check_every_cpu_kernel(bits, out_f, group_size, groups, act_order, sym, bias, dtype, batch, seed):
    in_f = groups * (64 if group_size == -1 else group_size)
    layer = make_layer(out_f, in_f, bits, group_size, act_order=act_order, sym=sym, bias=bias, seed=seed)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ran = []
    for kernel in layer.kernels:
        if kernel.name in CPU_KERNELS and kernel.refuses(layer, x.device, dtype) is None:
            assert_within_bound(layer, x, run_on(layer, kernel.name, x), compute_dtype(kernel.name, dtype))
            ran.append(kernel.name)
    assert "dequant-blocked" in ran and "dequant-cached" in ran
    fast = {4: "tinygemm-int4-cpu", 8: "int8-weight-cpu"}.get(bits)
    if dtype == torch.bfloat16 and fast:
        assert fast in ran  # these shapes are all ones the fast kernels take
    if bits in (4, 8):
        assert f"qplug-int{bits}-cpu" in ran  # every float dtype, whole groups
    layer.kernel_request = None
    with torch.no_grad():
        layer(x)
    preferred = [k.name for k in layer.kernels if k.name in ran
                 and (k.passed_over is None or k.passed_over(layer, x.device, dtype) is None)]
    assert layer.kernel == preferred[0]  # automatic: the first that accepts and is not passed over


def int8_rounded_input(layer, x):
    """``x`` as the W4A8 GEMV multiplies it, written out independently: per 64 consecutive inputs in run-time
    order, ``round(x * 127 / amax) * amax / 127`` in float32 (``amax`` the block's largest ``|x|``)."""
    run = x.float() if layer.perm is None else x.float()[:, layer.perm]
    blocks = run.reshape(x.shape[0], -1, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    # tensor / tensor: IEEE division (torch computes ``127 / amax`` as ``127 * (1 / amax)``, one rounding more)
    q = (blocks * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0)).round().clamp(-127, 127)
    rounded = (q * (amax / 127)).reshape(run.shape)
    if layer.perm is None:
        return rounded
    out = torch.empty_like(rounded)
    out[:, layer.perm] = rounded
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_f=st.sampled_from([16, 24, 48, 192]),
    group_size=st.sampled_from([64, 128, 256, -1]),
    groups=st.integers(1, 3),
    act_order=st.booleans(),
    sym=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    batch=st.one_of(st.integers(1, 4), st.integers(9, 24)),
    seed=st.integers(0, 2**16),
    isa=st.sampled_from(["portable", "avx2", "avx512"]),
)
def test_the_w4a8_gemv_is_the_exact_product_with_the_int8_rounded_input(out_f, group_size, groups, act_order, sym,
                                                                         bias, dtype, batch, seed, isa):
    """Decode-sized batches: the weights are exact and only the input is rounded, so the output is the exact
    product with the rounded input within the float32 GEMV's bound. Prefill-sized ones run the exact path."""
    assume(isa in cpu_paths())
    in_f = groups * (64 if group_size == -1 else group_size)
    layer = make_layer(out_f, in_f, 4, group_size, act_order=act_order, sym=sym, bias=bias, seed=seed)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with forcing_cpu_path(isa):
        out = run_on(layer, "qplug-int4-w4a8-cpu", x)
    if batch <= 4:
        rounded = int8_rounded_input(layer, x)
        y, magnitude = reference(layer, rounded)
        eps = EPS[dtype]
        assert out.dtype == dtype
        assert bool(((out.float() - y).abs() <= 2 * EPS[torch.float32] * magnitude + eps * y.abs() + 1e-6).all())
        # and the rounding is what separates it from the float input's product: at most half a step of the
        # block's scale per input
        y_exact, _ = reference(layer, x)
        step = (rounded - x.float()).abs().amax()
        assert step <= x.float().abs().amax() / 254 * (1 + 1e-3)
        weight_l1 = float(layer.float_weight(torch.float32).abs().sum(1).max())
        error = float((out.float() - y_exact).abs().max())
        assert error <= float(step) * weight_l1 + 2 * eps * float(y.abs().max()) + 1e-5
    else:
        assert_within_bound(layer, x, out, dtype)


def test_kernels_that_round_their_inputs_are_opt_in_and_say_so():
    assert INT8_ACTIVATION_KERNELS == ("qplug-int4-w4a8-cpu",)
    kernel = next(k for k in int_kernels.KERNELS if k.rounds_inputs)
    assert kernel.opt_in and "int8" in kernel.rounds_inputs
    with pytest.raises(ValueError, match="must be opt_in"):
        type(kernel)("rounding", refuses=kernel.refuses, prepare=kernel.prepare, forward=kernel.forward,
                     rounds_inputs="int8")


def test_the_w4a8_gemv_refuses_groups_it_cannot_scale():
    layer = make_layer(32, 128, 4, 32)
    qplug.set_kernel(layer, "qplug-int4-w4a8-cpu")
    with pytest.raises(qplug.KernelUnavailableError, match="groups of a multiple of 64 inputs"):
        layer(torch.randn(1, 128))
    qplug.set_kernel(layer, None)
    layer(torch.randn(1, 128))
    assert layer.kernel != "qplug-int4-w4a8-cpu"  # opt-in: never chosen by itself


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_the_tile_dequantizers_give_the_reference_values_on_every_isa(isa, monkeypatch):
    if isa not in cpu_paths():
        pytest.skip(f"this CPU has no {isa} path")
    monkeypatch.setenv(native.ISA_ENV_VAR, isa)
    gen = torch.Generator().manual_seed(3)
    n, k, group = 192, 256, 64
    # int8: (codes - zero) * scale in float32, rounded once, bit for bit (LLM.int8: no zero, one group a row)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scale, zero = torch.rand(n, k // group, generator=gen), torch.randint(-128, 128, (n, k // group)).float()
    for z, gs, s in ((zero, group, scale), (None, k, scale[:, :1].contiguous())):
        want = codes.float().view(n, -1, gs).sub(0 if z is None else z[:, :, None]).mul(s[:, :, None]).view(n, k)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.empty(40 * k, dtype=dtype)
            int_kernels.dequantize_int8_rows(codes, gs, s, z, 17, 40, out)  # rows 17..56
            assert torch.equal(out.view(40, k), want[17:57].to(dtype))
    # the values a one-step bfloat16 conversion would get wrong (denormals flushed, NaN): rounded as torch rounds
    # them, bit for bit, beside ordinary ones (a NaN stays NaN; torch's own paths differ in its payload)
    special = scale.clone()
    odd_values = torch.tensor([1e-40, float("nan"), -3e-39, float("inf")])
    special[17:57:3] = odd_values.repeat(4)[: len(range(17, 57, 3))][:, None]
    want = codes.float().view(n, -1, group).sub(zero[:, :, None]).mul(special[:, :, None]).view(n, k)
    out = torch.empty(40 * k, dtype=torch.bfloat16)
    int_kernels.dequantize_int8_rows(codes, group, special, zero, 17, 40, out)
    got, want = out.view(40, k), want[17:57].bfloat16()
    nan = want.isnan()
    assert 0 < int(nan.sum()) < nan.numel() and torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # torch's CPU int4 packing, transposed tiles: (q - 8) * scale + zero with torch's bfloat16 scales and zeros
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    w = IntWeight(q=q.byte(), scale=torch.rand(n, k // group, generator=gen),
                  zero=torch.randint(0, 16, (n, k // group)), group_size=group, bits=4)
    sz = int_kernels._tinygemm_scales_and_zeros(w, group)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    block = int_kernels._int4pack_cpu_tiles(n)
    assert block in (32, 64)  # torch's packing for the ISA it dispatches to (AVX-512: 64, AVX2: 32)
    s_, z_ = sz[..., 0].float().t().repeat_interleave(group, 1), sz[..., 1].float().t().repeat_interleave(group, 1)
    want = (q.float() - 8) * s_ + z_
    rows = 2 * block  # blocks 1 and 2
    out = torch.empty(k * rows, dtype=torch.float32)
    native.run_rows(native.CPU_KERNELS.get(), "qplug_dequant_int4pack", 1, 2, 1, native.ISAS[isa], packed.data_ptr(),
                    k, block, sz.data_ptr(), n, group, native.DTYPE_CODES[torch.float32], out.data_ptr(), rows, 1)
    # fma vs mul + add
    torch.testing.assert_close(out.view(k, rows).t(), want[block:3 * block], rtol=2**-23, atol=2**-20)


@pytest.mark.parametrize("n", [16, 48, 64, 96, 128, 320])  # whole blocks of 32 or 64 rows, and not
def test_the_int4_packing_qplug_builds_is_torchs_byte_for_byte(n):
    q = torch.randint(0, 16, (n, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)
    ours = int_kernels._int4pack_cpu(q)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)


@pytest.mark.parametrize("batch", [17, 40, 128])  # from 17 rows: tiles dequantized from torch's packing
def test_tinygemm_cpu_prefill_takes_tiles_of_its_own_packing(batch):
    layer = make_layer(128, 256, 4, 64, act_order=True, sym=False, seed=batch)
    x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(batch)).bfloat16()
    out = run_on(layer, "tinygemm-int4-cpu", x)
    assert_within_bound(layer, x, out, torch.bfloat16)
    assert int_kernels._int4pack_cpu_tiles(128) and batch > int_kernels._TINYGEMM_CPU_MAX_ROWS


def test_a_shorter_last_group_and_unusual_shapes_fall_back_correctly():
    torch.manual_seed(0)
    # in_features 320 with groups of 128 (two full, one of 64): tinygemm tiles it with groups of 64
    layer = make_layer(32, 320, 4, 128, act_order=True)
    x = torch.randn(5, 320).bfloat16()
    assert_within_bound(layer, x, run_on(layer, "tinygemm-int4-cpu", x), torch.bfloat16)
    assert_within_bound(layer, x, run_on(layer, "dequant-blocked", x), torch.bfloat16)
    odd = make_layer(24, 40, 3, 16)  # nothing but the dequantize kernels takes this
    x = torch.randn(3, 40)
    with torch.no_grad():
        out = odd(x)
    assert odd.kernel == "dequant-blocked"
    assert_within_bound(odd, x, out, torch.float32)


def test_error_is_that_of_a_bfloat16_matmul():
    torch.manual_seed(0)
    for bits, name in ((4, "tinygemm-int4-cpu"), (8, "int8-weight-cpu")):
        layer = make_layer(256, 1024, bits, 128, seed=bits)
        x = torch.randn(8, 1024).bfloat16()
        exact = F.linear(x.double(), layer.float_weight(torch.float32).double(), layer.bias.double())
        bf16 = F.linear(x, layer.float_weight(torch.bfloat16), layer.bias.bfloat16())

        def err(y, exact=exact):
            return float((y.double() - exact).norm() / exact.norm())

        # measured: tinygemm 1.6e-3, int8 1.6e-3, bf16 F.linear 2.3e-3 (mostly the output's rounding)
        assert err(run_on(layer, name, x)) <= 2 * err(bf16), name


@pytest.mark.parametrize("batch", [1, 8, 40])  # the op itself, and dequantized blocks from 16/32 tokens on
@pytest.mark.parametrize("group_size", [64, -1])
@pytest.mark.parametrize("sym", [True, False])  # asymmetric codes outside int8 around their zero: a correction
def test_int8_paths_and_zero_point_schemes(batch, group_size, sym):
    layer = make_layer(48, 256, 8, group_size, sym=sym, act_order=True, seed=batch)
    x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert_within_bound(layer, x, run_on(layer, "int8-weight-cpu", x), torch.bfloat16)
    assert (layer._kernel_state[2][2] is None) == sym  # the correction term only where it is needed


@pytest.mark.parametrize(
    ("kwargs", "dtype", "kernel", "reason"),
    [
        ({"out_f": 24, "in_f": 128, "bits": 4, "group_size": 128}, torch.bfloat16, "tinygemm-int4-cpu",
         "out_features=24 is not a multiple of 16"),
        ({"out_f": 32, "in_f": 128, "bits": 4, "group_size": 16}, torch.bfloat16, "tinygemm-int4-cpu",
         "group_size=16 with in_features=128: no multiple of 32 tiles it"),
        ({"out_f": 32, "in_f": 128, "bits": 4, "group_size": 128}, torch.float16, "tinygemm-int4-cpu",
         "bfloat16 inputs only"),
        ({"out_f": 32, "in_f": 128, "bits": 3, "group_size": 128}, torch.bfloat16, "tinygemm-int4-cpu",
         "4-bit weights only"),
        ({"out_f": 32, "in_f": 40, "bits": 8, "group_size": -1}, torch.bfloat16, "int8-weight-cpu",
         "must be multiples of 16"),
        ({"out_f": 32, "in_f": 128, "bits": 4, "group_size": 128}, torch.bfloat16, "tinygemm-int4-cuda",
         "CUDA only"),
    ],
)
def test_a_requested_kernel_that_refuses_says_why(kwargs, dtype, kernel, reason):
    layer = make_layer(**kwargs)
    qplug.set_kernel(layer, kernel)
    with pytest.raises(qplug.KernelUnavailableError, match=reason):
        layer(torch.randn(2, layer.in_features).to(dtype))
    qplug.set_kernel(layer, None)
    layer(torch.randn(2, layer.in_features).to(dtype))
    order = [k.name for k in layer.kernels]
    # automatically: passed over with its reason, or an earlier kernel took the layer
    assert f"not {kernel}: " in layer.kernel_reason or order.index(layer.kernel) < order.index(kernel)


@pytest.mark.parametrize("name", CPU_KERNELS + INT8_ACTIVATION_KERNELS)
def test_checkpoint_tensors_stay_byte_identical(name):
    layer = make_layer(32, 256, 8 if "int8" in name else 4, 64, act_order=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(3):
        run_on(layer, name, torch.randn(4, 256).bfloat16())
        layer.to(torch.device("cpu"))
    after = layer.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
    assert after.keys() == before.keys()


@pytest.mark.parametrize("name", CPU_KERNELS + INT8_ACTIVATION_KERNELS)
def test_input_gradients_come_from_the_dequantized_weight(name):
    layer = make_layer(32, 256, 8 if "int8" in name else 4, 64)
    qplug.set_kernel(layer, name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g).bfloat16().requires_grad_()
    grad_out = torch.randn(3, 32, generator=g).bfloat16()
    layer(x).backward(grad_out)
    assert layer.kernel == name
    expected = grad_out.float() @ layer.float_weight(torch.float32)
    assert float((x.grad.float() - expected).norm() / expected.norm()) < 1e-2  # a bfloat16 matmul


def test_blocked_layout_is_smaller_than_the_float_weight():
    layer = make_layer(64, 1024, 4, 128)
    layer.kernel_request = "dequant-blocked"
    with torch.no_grad():
        layer(torch.randn(1, 1024))
    codes = layer._kernel_state[2][0]
    assert codes.dtype == torch.uint8 and codes.numel() == 64 * 1024 // 2  # half a byte per 4-bit code


@pytest.mark.parametrize("name", ["tinygemm-int4-cpu", "qplug-int4-cpu", "qplug-int8-cpu", "int8-weight-cpu",
                                  "dequant-blocked", *INT8_ACTIVATION_KERNELS])
def test_a_layout_that_can_restore_the_codes_holds_them_once(name):
    layer = make_layer(32, 256, 8 if "int8" in name else 4, 64, act_order=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    run_on(layer, name, torch.randn(2, 256).bfloat16())
    assert "q" not in dict(layer.named_buffers()) and layer._released == ("q",)
    assert torch.equal(layer.q, before["q"])  # rebuilt on access, bit for bit
    assert list(layer.state_dict()) == list(before)  # in the order it was loaded
    layer.q = before["q"].flip(0).contiguous()  # assigning it back makes it the layer's own again
    assert layer._released == () and torch.equal(dict(layer.named_buffers())["q"], before["q"].flip(0))
    run_on(layer, name, torch.randn(2, 256).bfloat16())
    layer.load_state_dict(before)  # and so does loading
    assert torch.equal(layer.q, before["q"]) and layer._released == ()
    x = torch.ones(1, 256).bfloat16()
    assert torch.equal(run_on(layer, name, x), run_on(make_layer(32, 256, layer.bits, 64, act_order=True), name, x))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40).map(lambda r: 16 * r), cols=st.integers(1, 80).map(lambda c: 2 * c),
       seed=st.integers(0, 2**16))
def test_torchs_cpu_int4_packing_is_read_back_exactly(rows, cols, seed):
    q = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    unpacked = int_kernels._int4pack_cpu_unpack_with(int_kernels._int4pack_cpu_rows(rows), packed, rows, cols)
    assert torch.equal(unpacked, q.to(torch.uint8))


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_the_int4_packing_is_read_back_on_every_isa_torch_dispatches_to(isa):
    # torch packs in blocks of 64 rows on AVX-512, 32 on AVX2 and without vectors: each must read back
    script = (
        "import torch\nfrom qplug import int_kernels as k\n"
        "for n in (16, 48, 64, 80, 96, 304):\n"
        "    q = torch.randint(0, 16, (n, 96), dtype=torch.int32)\n"
        "    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)\n"
        "    assert torch.equal(k._int4pack_cpu_unpack_with(k._int4pack_cpu_rows(n), p, n, 96), q.byte()), n\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == isa


def test_plain_from_g_idx():
    g_idx = torch.arange(8) // 4
    assert int_kernels.plain_from_g_idx(g_idx, 4) is None
    shuffled = g_idx[torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])]
    perm = int_kernels.plain_from_g_idx(shuffled, 4)
    assert torch.equal(shuffled[perm], g_idx)
    with pytest.raises(ValueError, match="does not assign 4 input channels to each group"):
        int_kernels.plain_from_g_idx(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_tinygemm_cuda_agrees_with_the_reference(act_order, group_size):
    layer = make_layer(64, 512, 4, group_size, act_order=act_order).cuda()
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs sm80+")
    x = torch.randn(7, 512, device="cuda").bfloat16()
    out = run_on(layer, "tinygemm-int4-cuda", x).cpu()
    layer = layer.cpu()
    assert_within_bound(layer, x.cpu(), out, torch.bfloat16)


def _fresh_native_state(monkeypatch, cache_dir):
    """As if in a new process, with ``cache_dir`` as the kernel cache."""
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(cache_dir))
    monkeypatch.setattr(native.CPU_KERNELS, "_library", None)
    monkeypatch.setattr(native.CPU_KERNELS, "_unavailable", None)


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler")
def test_the_c_kernels_build_once_per_machine(monkeypatch, tmp_path):
    runs = []
    real = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda cmd, *a, **k: runs.append(cmd) or real(cmd, *a, **k))
    _fresh_native_state(monkeypatch, tmp_path)
    layer = make_layer(32, 256, 4, 64)
    run_on(layer, "qplug-int4-cpu", torch.randn(2, 256))
    assert len(runs) == 1 and len(list(tmp_path.glob("cpu_kernels-*.so"))) == 1
    _fresh_native_state(monkeypatch, tmp_path)  # "the next process" loads the cached library
    run_on(make_layer(32, 256, 4, 64), "qplug-int4-cpu", torch.randn(2, 256))
    assert len(runs) == 1 and native.CPU_KERNELS.unavailable_reason() is None


def test_without_a_compiler_the_c_kernels_refuse_and_the_layer_falls_back(monkeypatch, caplog, tmp_path):
    _fresh_native_state(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    layer = make_layer(32, 256, 4, 64)
    with caplog.at_level("WARNING", logger=native.__name__), torch.no_grad():
        layer(torch.randn(2, 256))
        layer.reset_kernel()
        layer(torch.randn(2, 256))
    assert layer.kernel == "dequant-blocked"
    assert "not qplug-int4-cpu: qplug's C kernels are unavailable (RuntimeError: no C compiler" in layer.kernel_reason
    assert caplog.text.count("qplug's CPU kernels unavailable") == 1  # one warning, one attempt


def test_a_forced_isa_the_cpu_lacks_is_a_refusal_that_names_it(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV_VAR, "sse9")
    layer = make_layer(32, 256, 4, 64)
    assert "QPLUG_ISA='sse9' is not one of" in layer.choose_kernel(torch.device("cpu"), torch.float32)[1]


def random_decode_case(g: torch.Generator, n: int, k: int, group: int, rows: int, gather: bool, bias: bool,
                       dtype: torch.dtype):
    """A random affine 4-bit weight (codes 0..15, a scale and zero point a group), input rows, an act-order
    permutation or None, a float32 bias or None."""
    weight = lut4.Lut4Weight(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=g), n, k, group,
                             torch.arange(16.0), absmax=torch.rand(n * k // group, generator=g),
                             zeros=torch.randint(0, 16, (n * k // group,), generator=g).float())
    x = torch.randn(rows, k, generator=g).to(dtype)
    perm = torch.randperm(k, generator=g) if gather else None
    return weight, x, perm, torch.randn(n, generator=g) if bias else None


@settings(max_examples=30, deadline=None)
@given(
    n=st.sampled_from([8, 40, 96]),
    blocks=st.integers(1, 4),
    blocksize=st.sampled_from([32, 64, 128]),
    rows=st.integers(1, 4),
    gather=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    out_dtype=st.sampled_from([None, torch.float32]),
    seed=st.integers(0, 2**16),
    isa=st.sampled_from(["portable", "avx2", "avx512"]),
)
def test_the_one_call_decode_path_is_the_stepwise_one_bit_for_bit(n, blocks, blocksize, rows, gather, bias, dtype,
                                                                  out_dtype, seed, isa):
    """lut4.decode (input conversion and gather, GEMV, float32 bias, one rounding, in one C call) against the
    same steps taken one by one: the GEMV's float32 output, the bias added in float32, torch's cast."""
    assume(isa in cpu_paths())
    g = torch.Generator().manual_seed(seed)
    k = blocks * blocksize
    weight, x, perm, b = random_decode_case(g, n, k, blocksize, rows, gather, bias, dtype)
    with forcing_cpu_path(isa):
        stepwise = lut4.matmul(weight, x, perm=perm)
        if b is not None:
            stepwise = stepwise + b
        stepwise = stepwise.to(out_dtype or dtype)
        fused = lut4.decode(weight, x, perm, b, out_dtype)
    assert fused is not None and fused.dtype == (out_dtype or dtype)
    assert torch.equal(fused, stepwise)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    groups=st.integers(1, 3),
    group=st.sampled_from([64, 128]),
    rows=st.integers(1, 4),
    gather=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
    isa=st.sampled_from(["portable", "avx2", "avx512"]),
)
def test_the_one_call_w4a8_decode_is_the_stepwise_one_bit_for_bit(n, groups, group, rows, gather, bias, dtype, seed,
                                                                   isa):
    """lut4.decode_int8_activations (the opt-in W4A8 kernel's decode in one C call) against its steps one by one:
    gemv_int8_activations' float32 output, the bias added in float32, torch's cast."""
    assume(isa in cpu_paths())
    g = torch.Generator().manual_seed(seed)
    k = groups * group
    weight, x, perm, b = random_decode_case(g, n, k, group, rows, gather, bias, dtype)
    with forcing_cpu_path(isa):
        stepwise = lut4.gemv_int8_activations(weight, x, perm)
        if b is not None:
            stepwise = stepwise + b
        fused = lut4.decode_int8_activations(weight, x, perm, b)
    assert fused is not None and fused.dtype == dtype
    assert torch.equal(fused, stepwise.to(dtype))


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler")
def test_a_build_without_openmp_splits_rows_on_its_own_threads_with_the_same_results(monkeypatch, tmp_path):
    layer = make_layer(64, 512, 4, 128, act_order=True)
    x = torch.randn(3, 512)
    threaded = run_on(layer, "qplug-int4-cpu", x)
    assert native.CPU_KERNELS.get().qplug_openmp() == 1  # the default build shares torch's OpenMP threads
    _fresh_native_state(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "_FLAG_SETS", (("-O3", "-ffp-contract=off"),))
    layer.reset_kernel()
    assert torch.equal(run_on(layer, "qplug-int4-cpu", x), threaded)
    assert native.CPU_KERNELS.get().qplug_openmp() == 0


def test_where_torch_runs_its_avx2_int4_path_qplug_int4_cpu_is_chosen_and_tinygemm_still_on_request():
    script = (
        "import sys, torch\nsys.path.insert(0, sys.argv[1])\nimport qplug\n"
        "from test_int_kernels import make_layer, run_on\n"
        "layer = make_layer(32, 256, 4, 64)\nx = torch.randn(2, 256).bfloat16()\n"
        "with torch.no_grad():\n    layer(x)\n"
        "print(layer.kernel, '|', layer.kernel_reason)\n"
        "run_on(layer, 'tinygemm-int4-cpu', x)\n"  # a request still gets it
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kernel, reason = done.stdout.strip().split(" | ")
    assert kernel == "qplug-int4-cpu"
    assert "not tinygemm-int4-cpu: torch runs its AVX2 int4 path here, measured slower" in reason
