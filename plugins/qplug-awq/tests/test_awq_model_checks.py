"""AWQ refuses a model whose decoder blocks it cannot find (the refusals every backend shares are in the
contract kit, qplug.testing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qplug

CONFIGS = [{"quant_method": "awq", "bits": 4, "group_size": 32}]


def _calibration():
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(5))


def test_a_model_without_blocks_is_an_incompatible_model():
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Linear(32, 64))
    with pytest.raises(qplug.IncompatibleModelError, match="no list of blocks"):
        qplug.quantize(model, CONFIGS[0], calibration=_calibration())
