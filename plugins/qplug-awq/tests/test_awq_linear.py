"""AwqLinear: the checkpoint tensors in autoawq's layout, and a forward that needs only torch."""

from __future__ import annotations

import pytest
import torch
from qplug_awq.linear import AwqLinear, set_weight_cache
from qplug_awq.packing import PackingError
from qplug_awq.quant import pseudo_quantize, quantize_weight
from torch import nn


def _linear(in_f=256, out_f=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("version", ["gemm", "gemv"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_matmul_with_the_dequantized_weight(version, group_size, bias):
    layer = AwqLinear.from_linear(_linear(bias=bias), group_size=group_size, version=version)
    x = torch.randn(2, 5, 256)
    expected = nn.functional.linear(x, layer.dequantize(), None if layer.bias is None else layer.bias.float())
    # float32 throughout; only the summation order differs (fused per-group sums): ~1e-6 relative
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.cache_weight = True
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_outputs_close_to_float(dtype):
    layer = AwqLinear.from_linear(_linear(), group_size=64)
    x = torch.randn(3, 256)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    expected = nn.functional.linear(x.to(dtype).float(), layer.dequantize(), layer.bias.float())
    # accumulation is float32; the only error is rounding the output to dtype (bf16: 2**-8 relative)
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-2)


def test_weight_cache_is_dropped_when_buffers_change():
    layer = AwqLinear.from_linear(_linear(), group_size=64)
    layer.cache_weight = True
    x = torch.randn(2, 256)
    first = layer(x)
    other = AwqLinear.from_linear(_linear(seed=1), group_size=64)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))
    assert not torch.allclose(first, layer(x))
    assert set_weight_cache(nn.Sequential(layer, other), False) == 2 and not layer.cache_weight
    layer(x)
    assert layer.kernel == "qplug-int4-cpu"


def test_quantization_error_is_at_most_half_a_step():
    w = torch.randn(64, 256)
    for zero_point in (True, False):
        iweight, izeros, scales = quantize_weight(w, 4, 64, zero_point)
        assert int(iweight.min()) >= 0 and int(iweight.max()) <= 15
        deq = (iweight.view(64, 4, 64) - izeros.view(64, 4, 1)) * scales.view(64, 4, 1)
        step = scales.view(64, 4, 1)
        err = (deq - w.view(64, 4, 64)).abs()
        # round to nearest: half a step, except where the symmetric grid's top (+7) clips the max (one step)
        bound = step * (0.5 if zero_point else 1.0) + 1e-6
        assert bool((err <= bound).all())
        assert torch.equal(deq.view(64, 256), pseudo_quantize(w, 4, 64, zero_point))
    _, izeros, _ = quantize_weight(w, 4, 64, False)
    assert bool((izeros == 8).all())  # symmetric weights are stored with the constant zero point 8


def test_state_dict_has_autoawq_names_shapes_and_dtypes():
    layer = AwqLinear.from_linear(_linear(), group_size=64)
    sd = layer.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == {
        "qweight": ((256, 16), torch.int32),
        "qzeros": ((4, 16), torch.int32),
        "scales": ((4, 128), torch.float16),
        "bias": ((128,), torch.float16),
    }
    gemv = AwqLinear.from_linear(_linear(), group_size=64, version="gemv").state_dict()
    assert {k: tuple(v.shape) for k, v in gemv.items()} == {
        "qweight": (128, 32), "qzeros": (128, 2), "scales": (128, 16), "bias": (128,)
    }


def test_meta_skeleton_loads_with_assign():
    source = AwqLinear.from_linear(_linear(), group_size=64)
    skeleton = AwqLinear(256, 128, group_size=64, device="meta")
    assert skeleton.qweight.is_meta
    skeleton.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 256)
    assert torch.equal(skeleton(x), source(x))


def test_mis_shaped_checkpoint_tensor_is_named():
    layer = AwqLinear(256, 128, group_size=128)
    bad = AwqLinear.from_linear(_linear(), group_size=64).state_dict()
    with pytest.raises(PackingError, match=r"qzeros: shape \(4, 16\).*\(2, 16\)"):
        layer.load_state_dict(bad)


def test_to_linear_gives_plain_linear_with_the_same_outputs():
    layer = AwqLinear.from_linear(_linear(), group_size=64)
    plain = layer.to_linear(torch.float32)
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32
    x = torch.randn(4, 256)
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 8}, "bits=8"),
        ({"version": "exllama"}, "version='exllama'"),
        ({"group_size": 48}, "group_size=48"),
    ],
)
def test_invalid_layers_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AwqLinear(256, 128, **kwargs)


def test_qplug_kernels_run_on_cpu_by_default():
    layer = AwqLinear.from_linear(_linear(), group_size=64)
    layer(torch.randn(1, 256, dtype=torch.bfloat16))
    # torch's int4 kernel where it takes its AVX-512 path, qplug's elsewhere
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert layer.kernel == ("tinygemm-int4-cpu" if avx512 else "qplug-int4-cpu")
    assert "not autoawq" in layer.kernel_reason
    layer(torch.randn(1, 256))
    assert layer.kernel == "qplug-int4-cpu" and "not tinygemm-int4-cpu: bfloat16 inputs only" in layer.kernel_reason


def test_kernel_choice_follows_the_environment(monkeypatch):
    layer = AwqLinear.from_linear(_linear(), group_size=64)
    monkeypatch.setenv("QPLUG_KERNEL", "dequant-cached")
    layer(torch.randn(1, 256))
    assert layer.kernel == "dequant-cached"
    with pytest.raises(ValueError, match="kernel='torch'"):
        AwqLinear(256, 128, kernel="torch")


def test_asking_for_autoawq_where_it_cannot_run_says_why():
    from awq_testlib import autoawq_importable

    import qplug

    layer = AwqLinear.from_linear(_linear(), group_size=64, version="gemv", kernel="autoawq")
    # without autoawq: the install command; with it, on the CPU: its kernels are CUDA kernels
    expected = "CUDA kernels" if autoawq_importable() else "pip install"
    with pytest.raises(qplug.KernelUnavailableError, match=expected):
        layer(torch.randn(1, 256))
