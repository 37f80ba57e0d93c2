"""Whole models: what qplug saves loads in transformers (with compressed-tensors installed), quantize-on-load
streams to the same checkpoint as ``qplug.quantize``, groups pick their modules as compressed-tensors does."""

from __future__ import annotations

import pytest
import torch
import transformers
from qplug_compressed_tensors import CompressedTensorsConfig
from qplug_compressed_tensors.config import scheme_dict
from qplug_compressed_tensors.linear import CompressedTensorsLinear
from safetensors.torch import load_file

import qplug
from qplug.testing import example_tokens, tiny_llama


def _config(bits=4, **kw):
    return CompressedTensorsConfig(config_groups={"group_0": scheme_dict(bits, **kw)})


@pytest.mark.parametrize("kw", [
    {"bits": 4, "strategy": "group", "group_size": 64},
    {"bits": 8, "strategy": "channel"},
    {"bits": 4, "strategy": "tensor", "symmetric": False},
    {"bits": 8, "strategy": "group", "group_size": 128},
], ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_qplug_saves_loads_in_transformers(kw, dtype, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0, dtype=dtype), _config(**kw))
    tokens = example_tokens(model)
    qplug.save_quantized(model, tmp_path / "ckpt")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=dtype)
    with torch.no_grad():
        expected = theirs(tokens).logits.float()
        actual = model.float()(tokens).logits  # qplug in float32: the exact dequantized weights
    # transformers computes in `dtype` with weights the library decompressed in the scale's dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.03 * expected.abs().max()
    assert (actual - expected).abs().max() <= tolerance


def test_asymmetric_group_checkpoints_are_the_librarys_layout(tmp_path):
    """transformers 5 cannot load *any* asymmetric group/channel pack-quantized checkpoint (it allocates the
    zero points unpacked; llm-compressor issue 1618), so for these the layout is checked against the
    library's compressor (test_ct_packing) and the llm-compressor AWQ fixture (test_ct_fixture) instead.
    Here: the saved tensors are named and shaped as the library names and shapes them."""
    model = qplug.quantize(tiny_llama(seed=0), _config(4, symmetric=False, group_size=64))
    qplug.save_quantized(model, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj."  # [128, 256]
    assert saved[prefix + "weight_packed"].shape == (128, 256 // 8)
    assert saved[prefix + "weight_scale"].shape == (128, 256 // 64)
    assert saved[prefix + "weight_zero_point"].shape == (128 // 8, 256 // 64)
    assert saved[prefix + "weight_zero_point"].dtype == torch.int32
    assert saved[prefix + "weight_shape"].tolist() == [128, 256]


def test_quantize_on_load_streams_to_the_same_checkpoint(tmp_path):
    float_dir = tmp_path / "float"
    tiny_llama(seed=0).save_pretrained(float_dir)
    config = _config(4, symmetric=False, group_size=64)
    seen = []
    streamed = qplug.load_quantized(float_dir, quantization_config=config, on_module=seen.append)
    assert len(seen) == 14
    direct = qplug.quantize(tiny_llama(seed=0), config)
    for (name, a), (_, b) in zip(streamed.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_groups_choose_modules_as_compressed_tensors_does():
    """An exact name beats a pattern beats a class name; `ignore` wins; unmatched linears stay float."""
    groups = {
        "attn8": {**scheme_dict(8, strategy="channel"), "targets": ["re:.*self_attn"]},  # a prefix match (re.match)
        "one4": {**scheme_dict(4, group_size=64), "targets": ["model.layers.0.self_attn.q_proj"]},
        "mlp4": {**scheme_dict(4, group_size=64), "targets": ["re:.*mlp\\.(up|gate)_proj$"]},
    }
    config = CompressedTensorsConfig(config_groups=groups, ignore=["lm_head", "model.layers.1.mlp.up_proj"])
    model = qplug.quantize(tiny_llama(seed=0), config)
    kinds = {n: (m.bits, m.strategy) for n, m in model.named_modules() if isinstance(m, CompressedTensorsLinear)}
    assert kinds["model.layers.0.self_attn.q_proj"] == (4, "group")
    assert kinds["model.layers.1.self_attn.q_proj"] == (8, "channel")
    assert kinds["model.layers.0.self_attn.o_proj"] == (8, "channel")
    assert kinds["model.layers.0.mlp.up_proj"] == (4, "group")
    assert "model.layers.1.mlp.up_proj" not in kinds and "model.layers.0.mlp.down_proj" not in kinds
    assert type(model.get_submodule("model.layers.0.mlp.down_proj")) is torch.nn.Linear


def test_a_layer_the_groups_cannot_divide_is_refused_by_name():
    model = tiny_llama(seed=0)
    with pytest.raises(qplug.IncompatibleModelError, match=r"model\.layers\.0\.self_attn\.q_proj.*groups of 96"):
        qplug.quantize(model, _config(4, group_size=96))
