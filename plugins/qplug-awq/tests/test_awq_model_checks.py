"""Models and inputs a quantized layer cannot take are refused as every backend refuses them (issue 13, item 15)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qplug
from qplug.testing import tiny_llama

CONFIGS = [{"quant_method": "awq", "bits": 4, "group_size": 32}]


class NoLinear(nn.Module):
    """Embeddings and a convolution, but no nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.conv = nn.Conv1d(32, 32, 1)

    def forward(self, ids):
        return self.conv(self.embed(ids).transpose(1, 2))


def _calibration():
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("config", CONFIGS)
def test_a_model_without_linear_layers_is_an_incompatible_model(config):
    model = NoLinear()
    with pytest.raises(qplug.IncompatibleModelError, match=r"NoLinear has no nn\.Linear layer to quantize"):
        qplug.quantize(model, config, calibration=_calibration())
    assert qplug.quantized_config(model) is None


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_refused_as_nn_linear_refuses_it(config, dtype):
    model = qplug.quantize(tiny_llama(seed=0), config, calibration=_calibration())
    layer = model.model.layers[0].mlp.up_proj
    x = torch.ones(2, layer.in_features, dtype=dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(layer.in_features, layer.out_features)(x)
    with pytest.raises(RuntimeError, match=f"input of dtype {dtype}.*floating-point input"):
        layer(x)


def test_a_model_without_blocks_is_an_incompatible_model():
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Linear(32, 64))
    with pytest.raises(qplug.IncompatibleModelError, match="no list of blocks"):
        qplug.quantize(model, CONFIGS[0], calibration=_calibration())
