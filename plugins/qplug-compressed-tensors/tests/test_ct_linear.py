"""``CompressedTensorsLinear`` on every shared kernel: outputs match the dequantized reference, the checkpoint
tensors come back bit for bit after forwards, and act-order (``weight_g_idx``) checkpoints run."""

from __future__ import annotations

import pytest
import torch
from qplug_compressed_tensors.config import Scheme
from qplug_compressed_tensors.linear import CompressedTensorsLinear
from qplug_compressed_tensors.quantize import rtn_integers
from torch.nn import functional as F

import qplug
from qplug.errors import CheckpointError


def _layer(bits=4, strategy="group", symmetric=True, fmt="pack-quantized", out=64, in_f=128, group=64, seed=0,
           dtype=torch.float32):
    scheme = Scheme(name="g", targets=("Linear",), format=fmt, num_bits=bits, symmetric=symmetric, strategy=strategy,
                    group_size=group if strategy == "group" else None)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, in_f, generator=gen).to(dtype)
    codes, scale, zero = rtn_integers(weight, scheme)
    bias = torch.randn(out, generator=gen).to(dtype)
    return CompressedTensorsLinear.from_integers(codes, scale, zero, bits=bits, strategy=strategy,
                                                 group_size=scheme.group_size, format=fmt, bias=bias)


_PACK = "pack-quantized"
_CASES = [
    (4, "group", True, _PACK), (4, "group", False, _PACK), (4, "channel", False, _PACK), (4, "tensor", False, _PACK),
    (8, "channel", True, _PACK), (8, "group", False, _PACK), (8, "tensor", True, "int-quantized"),
    (4, "group", False, "naive-quantized"),
]


@pytest.mark.parametrize(("bits", "strategy", "symmetric", "fmt"), _CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_the_dequantized_weight_and_gives_the_bytes_back(bits, strategy, symmetric, fmt, dtype):
    layer = _layer(bits, strategy, symmetric, fmt, dtype=dtype)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = F.linear(x.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
    ran = []
    for kernel in layer.kernels:
        if kernel.rounds_inputs is not None or kernel.refuses(layer, torch.device("cpu"), dtype) is not None:
            continue  # exactness is what this checks (the int8-activation kernel has its own test)
        qplug.set_kernel(torch.nn.Sequential(layer), kernel.name)
        for rows in (1, 40):  # decode and prefill paths
            xr = x.reshape(-1, layer.in_features)[:1] if rows == 1 else torch.randn(rows, layer.in_features).to(dtype)
            ref = F.linear(xr.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
            got = layer(xr).float()
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max()), kernel.name
        got = layer(x).float()
        assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max())
        ran.append(kernel.name)
        state = layer.state_dict()
        assert list(state) == list(saved), kernel.name
        for key, value in saved.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), (kernel.name, key)
    assert "dequant-blocked" in ran and len(ran) >= 3, ran


def test_act_order_g_idx_checkpoint_runs_and_saves_back():
    """A checkpoint of an older release: weight_g_idx assigns input columns to groups out of order."""
    out_f, in_f, group = 32, 128, 32
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    scale = torch.rand(out_f, in_f // group, generator=gen) + 0.1
    zero = torch.randint(0, 16, (out_f, in_f // group), generator=gen, dtype=torch.int16)
    g_idx = (torch.randperm(in_f, generator=gen) // group).to(torch.int32)
    layer = CompressedTensorsLinear.from_integers(codes, scale, zero, bits=4, strategy="group", group_size=group,
                                                  g_idx=g_idx)
    assert "weight_g_idx" in layer.state_dict()
    g = g_idx.long()
    expected_weight = (codes.float() - zero.float()[:, g]) * scale[:, g]  # each column's own group, by hand
    assert torch.equal(layer.dequantize_weight(torch.float32), expected_weight)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, in_f, generator=gen)
    for name in ("qplug-int4-cpu", "dequant-blocked"):
        qplug.set_kernel(torch.nn.Sequential(layer), name)
        assert torch.allclose(layer(x), x @ expected_weight.t(), atol=1e-4, rtol=1e-4), name
        for key, value in saved.items():
            assert torch.equal(layer.state_dict()[key], value), (name, key)
    # loaded from the checkpoint tensors into an empty layer, it is the same layer
    empty = CompressedTensorsLinear(in_f, out_f, bits=4, strategy="group", group_size=group, symmetric=False,
                                    g_idx=True, device="meta")
    empty.load_state_dict(saved, assign=True)
    qplug.set_kernel(torch.nn.Sequential(empty), "dequant-blocked")
    assert torch.equal(empty(x), layer(x))


def test_a_g_idx_that_cannot_be_made_contiguous_is_refused():
    layer = CompressedTensorsLinear(64, 16, bits=4, strategy="group", group_size=32, g_idx=True, device="meta")
    state = {"weight_packed": torch.zeros(16, 8, dtype=torch.int32), "weight_scale": torch.ones(16, 2),
             "weight_shape": torch.tensor([16, 64]), "weight_g_idx": torch.zeros(64, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="weight_g_idx"):
        layer.load_state_dict(state, assign=True)
