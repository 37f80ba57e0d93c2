"""Checkpoints made by auto-gptq itself (committed fixtures) load and run without auto-gptq.

The reference logits beside each checkpoint were computed by auto-gptq 0.7.1's own
QuantLinear modules (see ``*.provenance.json`` and ``autogptq_ref.py``).
"""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from qplug_gptq.linear import GPTQLinear
from safetensors.torch import load_file

import qplug
from qplug.testing import relative_error

NAMES = ["llama-4bit-g32-actorder", "llama-3bit-g32-asym"]

# qplug dequantizes to exactly the float16 weights auto-gptq uses (test_against_autogptq checks
# bit equality); what remains is float16 rounding in matmuls and attention, whose kernels and
# summation order differ between the transformers/torch releases that made and read the
# fixture. Measured: 1.1e-3 relative. A wrong zero point or group mapping gives > 5e-2.
TOLERANCE = 5e-3


def _reference(name):
    ref = load_file(str(FIXTURES / f"{name}.reference.safetensors"))
    return ref["input_ids"], ref["logits"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", NAMES)
def test_autogptq_checkpoint_reproduces_autogptq_logits(name):
    ids, expected = _reference(name)
    model = qplug.load_quantized(FIXTURES / name)
    kinds = {type(m) for m in model.modules()}
    assert GPTQLinear in kinds
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.bias is not None and not q_proj.bias.any()  # auto-gptq's all-zero bias, adopted
    error = relative_error(_logits(model, ids), expected)
    assert error < TOLERANCE, error


@pytest.mark.parametrize("name", NAMES)
def test_dequantized_model_gives_the_same_logits(name):
    ids, expected = _reference(name)
    model = qplug.dequantize(qplug.load_quantized(FIXTURES / name))
    assert not any(isinstance(m, GPTQLinear) for m in model.modules())
    assert relative_error(_logits(model, ids), expected) < TOLERANCE


def _relabelled(tmp_path, name, fmt):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = fmt
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_symmetric_checkpoint_labelled_v2_is_refused(tmp_path):
    d = _relabelled(tmp_path, "llama-4bit-g32-actorder", "gptq_v2")
    with pytest.raises(qplug.CheckpointError, match=r"model\.layers\.0\.self_attn\.\w_proj: qzeros all store 7"):
        qplug.load_quantized(d)


def test_wrong_zero_convention_would_not_pass_the_tolerance(tmp_path):
    # Asymmetric zeros cannot be told apart from the file alone, so a mislabel loads; this shows
    # the logit comparison above is sharp enough to catch an off-by-one zero point.
    ids, expected = _reference("llama-3bit-g32-asym")
    model = qplug.load_quantized(_relabelled(tmp_path, "llama-3bit-g32-asym", "gptq_v2"))
    assert relative_error(_logits(model, ids), expected) > 10 * TOLERANCE


def test_loads_into_a_given_model(tmp_path):
    from autogptq_ref import seeded_llama

    name = "llama-3bit-g32-asym"
    ids, expected = _reference(name)
    model = qplug.load_quantized(FIXTURES / name, model=seeded_llama(seed=3, dtype=torch.float16))
    assert relative_error(_logits(model, ids), expected) < TOLERANCE


def test_saves_back_and_reloads_identically(tmp_path):
    name = "llama-4bit-g32-actorder"
    ids, _ = _reference(name)
    model = qplug.load_quantized(FIXTURES / name)
    before = _logits(model, ids)
    qplug.save_quantized(model, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["desc_act"] is True and saved["model_file_base_name"] is None
    assert torch.equal(_logits(qplug.load_quantized(tmp_path / "again"), ids), before)
