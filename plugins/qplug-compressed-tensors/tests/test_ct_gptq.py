"""Calibrated quantization: qplug-gptq's GPTQ makes compressed-tensors layers (an optional dependency)."""

from __future__ import annotations

import sys

import pytest
import torch
from qplug_compressed_tensors import CompressedTensorsConfig
from qplug_compressed_tensors.config import scheme_dict

import qplug
from qplug.testing import relative_error, tiny_llama


def _config(**kw):
    return CompressedTensorsConfig(config_groups={"group_0": scheme_dict(4, group_size=64, **kw)})


@pytest.mark.parametrize("kw", [{}, {"symmetric": False}], ids=["symmetric", "asymmetric"])
def test_gptq_beats_round_to_nearest_on_the_calibration_distribution(kw):
    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(5))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = tiny_llama(seed=0)(held_out).logits
        rtn = qplug.quantize(tiny_llama(seed=0), _config(**kw))(held_out).logits
        gptq = qplug.quantize(tiny_llama(seed=0), _config(**kw), calibration=tokens)(held_out).logits
    # random weights and tokens hold little for GPTQ to use: measured 0.291 against 0.298 (asymmetric, g64)
    assert relative_error(gptq, expected) < relative_error(rtn, expected)


def test_weight_activation_order_stores_no_g_idx(tmp_path):
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    group = scheme_dict(4, group_size=64)
    group["weights"]["actorder"] = "weight"
    model = qplug.quantize(tiny_llama(seed=0), CompressedTensorsConfig(config_groups={"group_0": group}),
                           calibration=tokens)
    assert not any(name.endswith("weight_g_idx") for name in model.state_dict())


def test_without_qplug_gptq_calibration_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "qplug_gptq.algorithm", None)  # as if qplug-gptq were not installed
    tokens = torch.randint(0, 256, (2, 16))
    with pytest.raises(qplug.BackendUnavailableError, match=r"qplug-compressed-tensors\[gptq\]"):
        qplug.quantize(tiny_llama(seed=0), _config(), calibration=tokens)


def test_gptq_refuses_one_scale_per_tensor():
    tokens = torch.randint(0, 256, (2, 16))
    config = CompressedTensorsConfig(config_groups={"group_0": scheme_dict(4, strategy="tensor")})
    with pytest.raises(qplug.IncompatibleModelError, match="not one per tensor"):
        qplug.quantize(tiny_llama(seed=0), config, calibration=tokens)
