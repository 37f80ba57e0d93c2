"""The checkpoint autoawq 0.2.9 made (tests/fixtures/tiny-llama-awq-g64), run without autoawq.

``reference.safetensors`` holds the logits autoawq's own ``WQLinear_GEMM`` modules gave on the
stored tokens (see scripts/make_fixture.py); qplug must reproduce them.
"""

from __future__ import annotations

import json

import pytest
import torch
from awq_testlib import FIXTURE, logits
from qplug_awq.config import AwqConfig
from qplug_awq.linear import AwqLinear
from safetensors.torch import load_file
from torch import nn

import qplug
from qplug.testing import relative_error

# autoawq runs this float16 model with float16 matmuls (dequantize, then fp16 @ fp16); qplug
# accumulates in float32 and rounds each layer's output to float16 once. Rounding at float16's
# unit roundoff (4.9e-4) in ~20 places compounds to ~2e-3 relative on the logits (measured:
# 1.6e-3). 1e-2 leaves room for other BLAS builds; a wrong nibble order or group gives >= 0.3.
FP16_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


def test_fixture_is_small_and_made_by_autoawq():
    sizes = {p.name: p.stat().st_size for p in FIXTURE.iterdir()}
    assert sum(sizes.values()) < 400_000, sizes
    config = json.loads((FIXTURE / "config.json").read_text())["quantization_config"]
    assert config == {"bits": 4, "group_size": 64, "modules_to_not_convert": None, "quant_method": "awq",
                      "version": "gemm", "zero_point": True}
    assert isinstance(qplug.load_config(FIXTURE / "config.json"), AwqConfig)


def test_loads_without_autoawq_and_reproduces_its_logits(reference):
    model = qplug.load_quantized(FIXTURE)
    assert isinstance(model.model.layers[1].mlp.down_proj, AwqLinear)
    assert type(model.lm_head) is nn.Linear
    assert next(model.parameters()).dtype == torch.float16
    error = relative_error(logits(model, reference["tokens"]), reference["logits"])
    assert error < FP16_TOLERANCE, error
    # float16 on the CPU: qplug's C kernels (tinygemm takes bfloat16 only)
    assert {info["kernel"] for info in qplug.kernel_report(model).values()} == {"qplug-int4-cpu"}


def test_float32_run_agrees_too(reference):
    model = qplug.load_quantized(FIXTURE).float()
    error = relative_error(logits(model, reference["tokens"]), reference["logits"])
    assert error < FP16_TOLERANCE, error


def test_state_dict_round_trips_bit_for_bit(tmp_path):
    model = qplug.load_quantized(FIXTURE)
    original = load_file(str(FIXTURE / "model.safetensors"))
    qplug.save_quantized(model, tmp_path / "again")
    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(saved) == set(original)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key


def test_dequantize_matches_the_quantized_model(reference):
    model = qplug.load_quantized(FIXTURE).float()
    before = logits(model, reference["tokens"])
    qplug.dequantize(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert relative_error(logits(model, reference["tokens"]), before) < 1e-5


def test_modules_to_not_convert_adds_to_the_defaults(tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    model = qplug.load_quantized(FIXTURE)
    # keep layer 1's MLP in float: write its dequantized weights, as a checkpoint with that skip list would have
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        prefix = f"model.layers.1.mlp.{name}"
        layer = model.get_submodule(prefix)
        for suffix in ("qweight", "qzeros", "scales"):
            del tensors[f"{prefix}.{suffix}"]
        tensors[f"{prefix}.weight"] = layer.dequantize(torch.float16).contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(ckpt / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["model.layers.1.mlp"]
    (ckpt / "config.json").write_text(json.dumps(config))
    loaded = qplug.load_quantized(ckpt)
    assert type(loaded.model.layers[1].mlp.up_proj) is nn.Linear
    assert type(loaded.lm_head) is nn.Linear  # the default skip (output head) still applies
    assert isinstance(loaded.model.layers[0].mlp.up_proj, AwqLinear)
    ids = torch.arange(16).view(1, 16)
    assert relative_error(logits(loaded, ids), logits(model, ids)) < FP16_TOLERANCE


def _with_quantization_config(tmp_path, **changes):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.mark.parametrize("version", ["exllama", "ipex", "GEMM"])
def test_kernel_versions_that_read_gemm_checkpoints_load_it(version, tmp_path, reference):
    model = qplug.load_quantized(_with_quantization_config(tmp_path, version=version))
    assert model.model.layers[0].mlp.up_proj.version == "gemm"
    assert relative_error(logits(model, reference["tokens"]), reference["logits"]) < FP16_TOLERANCE


def test_unsupported_layout_is_refused_before_loading(tmp_path):
    with pytest.raises(qplug.QuantConfigError, match="gemv_fast"):
        qplug.load_quantized(_with_quantization_config(tmp_path, version="gemv_fast"))


def test_group_size_mismatch_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.qzeros: shape \(2, 16\)"):
        qplug.load_quantized(_with_quantization_config(tmp_path, group_size=128))
