"""AwqLinear on qplug.int_kernels: GEMM and GEMV packings, every group size, against its dequantize reference.

Norm-relative tolerances: bfloat16 1e-2 (tinygemm: a bfloat16 matmul), float16 2e-3, float32 1e-5;
a wrong nibble order or zero point is off by O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qplug_awq.linear import AwqLinear
from torch import nn
from torch.nn import functional as F

import qplug

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
CPU_KERNELS = ("tinygemm-int4-cpu", "qplug-int4-cpu", "dequant-blocked", "dequant-cached")
# what bfloat16 layers run on by default: torch's int4 kernel where it takes its AVX-512 path
BF16_INT4 = "tinygemm-int4-cpu" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "qplug-int4-cpu"


def awq_layer(in_f, out_f, group_size, version, zero_point=True, bias=True, seed=0):
    torch.manual_seed(seed)
    return AwqLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), group_size=group_size, version=version,
                                 zero_point=zero_point)


def relative_error(out, layer, x):
    bias = None if layer.bias is None else layer.bias.float()
    want = F.linear(x.float(), layer.float_weight(torch.float32), bias)
    return float((out.float() - want).norm() / want.norm())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.sampled_from(["gemm", "gemv"]),
    group_size=st.sampled_from([32, 64, 128, 256, -1]),
    zero_point=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_every_kernel_agrees_with_the_dequantize_reference(version, group_size, zero_point, bias, dtype, batch, seed):
    layer = awq_layer(512, 64, group_size, version, zero_point, bias, seed)
    x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ran = set()
    for name in CPU_KERNELS:
        kernel = next(k for k in layer.kernels if k.name == name)
        if kernel.refuses(layer, x.device, dtype) is None:
            qplug.set_kernel(layer, name)
            with torch.no_grad():
                out = layer(x)
            assert layer.kernel == name and out.dtype == dtype
            compute = torch.bfloat16 if name == "tinygemm-int4-cpu" else dtype
            assert relative_error(out, layer, x) < TOLERANCE[compute], name
            ran.add(name)
    assert ("tinygemm-int4-cpu" in ran) == (dtype == torch.bfloat16)
    qplug.set_kernel(layer, None)
    with torch.no_grad():
        layer(x)
    assert "qplug-int4-cpu" in ran  # any float dtype
    assert layer.kernel == (BF16_INT4 if dtype == torch.bfloat16 else "qplug-int4-cpu")
    assert layer.kernel_reason.startswith("not autoawq: ")


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_state_dict_after_forwards_and_moves_is_what_was_loaded(name, version):
    loaded = {k: v.clone() for k, v in awq_layer(256, 64, 64, version).state_dict().items()}
    layer = AwqLinear(256, 64, group_size=64, version=version, device="meta")
    layer.load_state_dict(loaded, assign=True)
    qplug.set_kernel(layer, name)
    dtypes = (torch.bfloat16,) if name == "tinygemm-int4-cpu" else (torch.bfloat16, torch.float32)
    for _ in range(2):
        with torch.no_grad():
            for dtype in dtypes:
                layer(torch.randn(3, 256, dtype=dtype))
        layer = copy.deepcopy(layer.to("cpu"))
    saved = layer.state_dict()
    assert saved.keys() == loaded.keys()
    for key, tensor in loaded.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key].view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_a_layer_holds_its_codes_once(version):
    layer = awq_layer(1024, 256, 128, version)
    checkpoint = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    for dtype in (torch.bfloat16, torch.float32):
        with torch.no_grad():
            layer(torch.randn(2, 1024, dtype=dtype))
        assert "qweight" not in dict(layer.named_buffers()), layer.kernel
        layout = [t for t in layer._kernel_state[2] if isinstance(t, torch.Tensor)]
        held = sum(t.numel() * t.element_size() for t in (*layer.buffers(), *layout))
        assert held <= 1.15 * checkpoint, (layer.kernel, held, checkpoint)  # the codes once, not twice


def test_half_inputs_run_in_their_own_dtype():
    layer = awq_layer(256, 64, 64, "gemm")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x.half())
    assert layer.kernel == "qplug-int4-cpu" and out.dtype == torch.float16
    # float32 weights and accumulation, the result rounded once to float16
    assert relative_error(out, layer, x.half()) < TOLERANCE[torch.float16]


def test_input_gradients():
    layer = awq_layer(256, 64, 64, "gemv")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g).bfloat16().requires_grad_()
    grad_out = torch.randn(3, 64, generator=g).bfloat16()
    layer(x).backward(grad_out)
    assert layer.kernel == BF16_INT4
    expected = grad_out.float() @ layer.float_weight(torch.float32)
    assert float((x.grad.float() - expected).norm() / expected.norm()) < 1e-2  # a bfloat16 matmul


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_tinygemm_cuda_agrees_with_the_reference(version):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs sm80+")
    layer = awq_layer(512, 128, 128, version)
    gpu = copy.deepcopy(layer).cuda()
    qplug.set_kernel(gpu, "tinygemm-int4-cuda")
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        out = gpu(x.cuda()).cpu()
    assert relative_error(out, layer, x) < TOLERANCE[torch.bfloat16]
