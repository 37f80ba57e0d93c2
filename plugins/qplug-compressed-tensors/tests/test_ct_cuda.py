"""On an NVIDIA GPU (skipped without one): the CUDA kernels run compressed-tensors layers and give the bytes back."""

from __future__ import annotations

import pytest
import torch
from qplug_compressed_tensors.config import Scheme
from qplug_compressed_tensors.linear import CompressedTensorsLinear
from qplug_compressed_tensors.quantize import rtn_integers

import qplug

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(("bits", "strategy", "symmetric"), [(4, "group", True), (4, "group", False),
                                                            (8, "channel", True)])
def test_cuda_kernels_match_the_dequantized_weight(bits, strategy, symmetric):
    scheme = Scheme(name="g", targets=("Linear",), format="pack-quantized", num_bits=bits, symmetric=symmetric,
                    strategy=strategy, group_size=128 if strategy == "group" else None)
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codes, scale, zero = rtn_integers(weight, scheme)
    layer = CompressedTensorsLinear.from_integers(codes, scale, zero, bits=bits, strategy=strategy,
                                                  group_size=scheme.group_size).cuda()
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ layer.dequantize_weight(torch.float32).t()
    y = layer(x).float()
    assert torch.allclose(y, expected, rtol=2e-2, atol=2e-2 * expected.abs().max())
    report = qplug.kernel_report(torch.nn.Sequential(layer))["0"]
    assert report["kernel"] == ("tinygemm-int4-cuda" if bits == 4 else "dequant-blocked"), report
    for key, value in saved.items():
        assert torch.equal(layer.state_dict()[key], value), key
