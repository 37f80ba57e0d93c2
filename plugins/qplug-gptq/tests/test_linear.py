"""GPTQLinear: buffers in checkpoint layout, forward, cache, loading on meta, errors."""

import pytest
import torch
from qplug_gptq import packing
from qplug_gptq.linear import GPTQLinear
from torch import nn
from torch.nn import functional as F

import qplug


def _random_layer(bits=4, inf=64, outf=32, gs=16, bias=True, fmt="gptq", seed=0, act_order=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (inf, outf), generator=g)
    z = torch.randint(0, 2**bits, (inf // gs if gs != -1 else 1, outf), generator=g)
    s = (torch.rand(z.shape, generator=g) * 0.05 + 0.01).half()
    g_idx = packing.default_g_idx(inf, gs)
    if act_order:
        g_idx = g_idx[torch.randperm(inf, generator=g)]
    b = torch.randn(outf, generator=g) if bias else None
    return GPTQLinear.from_integers(
        q, z, s, g_idx, bits=bits, group_size=gs, bias=b, checkpoint_format=fmt, sym=False
    ), (q, z, s, g_idx, b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_buffers_have_checkpoint_shapes_and_dtypes(bits):
    layer, _ = _random_layer(bits=bits, inf=64, outf=64, gs=32)
    assert layer.qweight.shape == (64 * bits // 32, 64) and layer.qweight.dtype == torch.int32
    assert layer.qzeros.shape == (2, 64 * bits // 32) and layer.qzeros.dtype == torch.int32
    assert layer.scales.shape == (2, 64) and layer.scales.dtype == torch.float16
    assert layer.g_idx.shape == (64,) and layer.g_idx.dtype == torch.int32
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_linear_with_the_dequantized_weight(dtype):
    layer, (q, z, s, g_idx, b) = _random_layer(act_order=True)
    w = (s.float()[g_idx.long()] * (q - z[g_idx.long()]).float()).t()
    x = torch.randn(3, 5, 64).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, 32)
    expected = F.linear(x.float(), w, b.half().float())
    # float32/float16: the weight rounded to dtype, summed in another order (act-order permutes the
    # inputs); bfloat16 runs tinygemm: a bfloat16 matmul's error
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * 4)


def test_layout_is_rebuilt_when_a_buffer_changes_in_place():
    layer, _ = _random_layer(bias=False)
    x = torch.randn(2, 64)
    first = layer(x)
    assert torch.equal(layer(x), first)
    layer.scales.mul_(2)
    assert torch.allclose(layer(x), 2 * first, rtol=1e-3, atol=1e-3)
    layer.cache_weight = True  # the old flag: now the opt-in dequant-cached kernel
    assert torch.allclose(layer(x), 2 * first, rtol=1e-3, atol=1e-3) and layer.kernel == "dequant-cached"
    layer.scales.mul_(0.5)
    assert torch.allclose(layer(x), first, rtol=1e-3, atol=1e-3)
    layer.cache_weight = False
    assert torch.allclose(layer(x), first, rtol=1e-3, atol=1e-3) and layer.kernel == "qplug-int4-cpu"


def test_meta_skeleton_loads_with_assign_and_without_g_idx():
    ref, _ = _random_layer(bits=4, gs=16, bias=True)
    sd = {k: v for k, v in ref.state_dict().items() if k != "g_idx"}  # old checkpoints omit g_idx
    empty = GPTQLinear(64, 32, bits=4, group_size=16, bias=True, sym=False, device="meta")
    assert empty.qweight.is_meta
    result = empty.load_state_dict(sd, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(b.is_meta for b in empty.buffers())
    x = torch.randn(4, 64)
    assert torch.equal(empty(x), ref(x))


def test_a_layer_loads_what_it_was_built_for_and_nothing_else():
    """The layer never adopts a tensor it was not built with: the loader sizes it from the checkpoint's
    tensor names (see test_plugin's bias test), so an unexpected bias here is an error."""
    ref, _ = _random_layer(bias=True)
    empty = GPTQLinear(64, 32, bits=4, group_size=16, bias=False, sym=False, device="meta")
    with pytest.raises(RuntimeError, match=r'Unexpected key.*"bias"'):
        empty.load_state_dict(ref.state_dict(), assign=True)


def test_wrong_shape_names_tensor_and_module():
    ref, _ = _random_layer(bits=4, gs=16)
    wrong = GPTQLinear(64, 32, bits=4, group_size=32, bias=True, sym=False)
    model = nn.Sequential(wrong)
    with pytest.raises(ValueError, match=r"0: tensor 0\.qzeros has shape \(4, 4\), expected \(2, 4\)"):
        model.load_state_dict({f"0.{k}": v for k, v in ref.state_dict().items()})


@pytest.mark.parametrize("labelled, written", [("gptq", "gptq_v2"), ("gptq_v2", "gptq")])
def test_mislabelled_zero_convention_is_refused(labelled, written):
    q = torch.randint(0, 16, (64, 32))
    zeros = torch.full((4, 32), 8)  # symmetric 4-bit zero point
    src = GPTQLinear.from_integers(
        q,
        zeros,
        torch.ones(4, 32).half(),
        packing.default_g_idx(64, 16),
        bits=4,
        group_size=16,
        checkpoint_format=written,
    )
    dst = GPTQLinear(64, 32, bits=4, group_size=16, bias=False, checkpoint_format=labelled, sym=True)
    with pytest.raises(qplug.CheckpointError, match=f"checkpoint_format={labelled!r}"):
        dst.load_state_dict(src.state_dict())
    ok = GPTQLinear(64, 32, bits=4, group_size=16, bias=False, checkpoint_format=written, sym=True)
    ok.load_state_dict(src.state_dict())
    assert torch.equal(ok.dequantize_weight(torch.float32), src.dequantize_weight(torch.float32))


def test_to_linear_gives_back_the_original_dtype():
    layer, _ = _random_layer()
    layer.weight_dtype = torch.bfloat16
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16
    assert torch.equal(lin.weight, layer.dequantize_weight(torch.bfloat16))
    assert torch.equal(lin.bias, layer.bias.to(torch.bfloat16))


def test_constructor_errors():
    with pytest.raises(ValueError, match="bits=5"):
        GPTQLinear(64, 32, bits=5, group_size=16)
    with pytest.raises(ValueError, match="in_features of GPTQLinear of size 48"):
        GPTQLinear(48, 32, bits=3, group_size=16)
    with pytest.raises(ValueError, match="group_size=0"):
        GPTQLinear(64, 32, bits=4, group_size=0)
    layer, _ = _random_layer()
    with pytest.raises(ValueError, match="expects 64"):
        layer(torch.randn(2, 63))
