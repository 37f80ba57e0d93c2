"""transformers 5 loads the AWQ checkpoints qplug saves, on the CPU, through GPTQModel.

transformers 5 reads AWQ checkpoints only with GPTQModel and accelerate installed, and GPTQModel 7.7
needs torch >= 2.14.1 — so these tests run in ``nox -s transformers_gptqmodel`` and are skipped only
where ``gptqmodel`` does not import. (transformers < 4.50 sends AWQ on a CPU to autoawq's IPEX
module, which needs intel_extension_for_pytorch: no build of it exists for torch 2.13.)
"""

from __future__ import annotations

import pytest
import torch
from awq_testlib import calibration, tokens
from qplug_awq.config import AwqConfig

import qplug
from qplug.testing import relative_error, tiny_llama

pytestmark = pytest.mark.gptqmodel

#: float16 logits of the same codes through two kernels: summation order and rounding only.
TOLERANCE = 5e-3


# GEMM only: GPTQModel 7.7 has no CPU module for the GEMV layout ("No valid quant linear").
@pytest.mark.parametrize("settings", [{"group_size": 64}, {"group_size": 128}], ids=["gemm-g64", "gemm-g128"])
def test_qplug_checkpoint_loads_in_transformers_v5(settings, tmp_path):
    import transformers

    model = qplug.quantize(tiny_llama(seed=0, dtype=torch.float16), AwqConfig(**settings), calibration=calibration())
    qplug.save_quantized(model, tmp_path)
    ids = tokens()
    with torch.no_grad():
        ours = model(ids).logits.float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16, device_map="cpu")
        layer = hf.model.layers[0].mlp.down_proj
        assert type(layer).__module__.startswith("gptqmodel."), type(layer)  # GPTQModel's module, not qplug's
        theirs = hf(ids).logits.float()
    assert relative_error(ours, theirs) < TOLERANCE
