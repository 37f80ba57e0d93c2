"""transformers 5 loads the GPTQ checkpoints qplug saves, on the CPU, through GPTQModel.

transformers 5 reads GPTQ checkpoints only with optimum and GPTQModel installed, and GPTQModel 7.7
needs torch >= 2.14.1 — so these tests run in ``nox -s transformers_gptqmodel`` and are skipped only
where ``gptqmodel`` does not import. (transformers < 4.50 loads them through optimum 1.24 and
auto-gptq 0.7.1 instead: ``test_qplug_checkpoint_loads_in_transformers_v4`` in
test_against_autogptq.py, ``nox -s gptq_autogptq``.)
"""

from __future__ import annotations

import pytest
import torch
from qplug_gptq import GPTQConfig

import qplug
from qplug.testing import example_tokens, relative_error, tiny_llama

pytestmark = pytest.mark.gptqmodel

#: float16 logits of the same codes through two kernels: summation order and rounding only.
TOLERANCE = 5e-3


def calibration(samples: int = 16, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4, "group_size": 64, "desc_act": False, "sym": True},
        {"bits": 4, "group_size": 64, "desc_act": True, "sym": True},
        {"bits": 4, "group_size": 128, "desc_act": False, "sym": False},
    ],
    ids=["sym", "act-order", "asym"],
)
def test_qplug_checkpoint_loads_in_transformers_v5(settings, tmp_path):
    import transformers

    model = qplug.quantize(tiny_llama(seed=0, dtype=torch.float16), GPTQConfig(**settings), calibration=calibration())
    qplug.save_quantized(model, tmp_path)
    ids = example_tokens(model)
    with torch.no_grad():
        ours = model(ids).logits.float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16, device_map="cpu")
        layer = hf.model.layers[0].mlp.down_proj
        assert type(layer).__module__.startswith("gptqmodel."), type(layer)  # GPTQModel's module, not qplug's
        theirs = hf(ids).logits.float()
    assert relative_error(ours, theirs) < TOLERANCE
