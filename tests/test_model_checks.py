"""One refusal for every backend: no nn.Linear to quantize, integer input to a quantized layer (issue 13, item 15)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qplug
from qplug.testing import tiny_llama


def test_a_model_without_linear_layers_is_refused_in_the_core(int8_plugin):
    model = nn.Sequential(nn.Embedding(16, 8), nn.Conv1d(8, 8, 1))
    with pytest.raises(qplug.IncompatibleModelError, match=r"int8-weight: Sequential has no nn\.Linear"):
        qplug.quantize(model, {"quant_method": "int8-weight"})
    assert qplug.quantized_config(model) is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_kernel_layers_refuse_non_floating_input(int8_plugin, dtype):
    model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match=f"input of dtype {dtype}"):
        layer(torch.ones(1, layer.in_features, dtype=dtype))
    assert layer(torch.ones(1, layer.in_features)).dtype == torch.float32
