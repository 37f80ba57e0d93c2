"""The gptq backend through qplug's public API: registration, quantizing, saving, loading."""

import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from qplug_gptq import GPTQConfig, packing
from qplug_gptq.linear import GPTQLinear
from torch import nn

import qplug
from qplug.testing import example_tokens, relative_error, tiny_llama


def _cal(model, n=4, length=32):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_entry_point_and_registration():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="qplug")}
    assert eps["gptq"] == "qplug_gptq.plugin"
    assert "gptq" in qplug.available_backends()
    assert qplug.get_config_class("GPTQ") is GPTQConfig


def test_plugin_module_imports_neither_torch_nor_autogptq():
    heavy = "('torch', 'auto_gptq', 'transformers')"
    code = f"import sys, qplug_gptq.plugin; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_true_sequential_groups_follow_the_block():
    from qplug_gptq.algorithm import _sequential_groups

    model = tiny_llama(seed=0)
    captured = []
    h = model.model.layers[0].register_forward_pre_hook(lambda m, a, k: captured.append((a, k)), with_kwargs=True)
    model(example_tokens(model))
    h.remove()
    block = model.model.layers[0]
    names = [f"model.layers.0.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    groups, dense = _sequential_groups(
        block, names, "model.layers.0", lambda limit=None: [block(*a, **k) for a, k in captured[:limit]]
    )
    short = [sorted(n.rsplit(".", 1)[-1] for n in g) for g in groups]
    assert short == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert dense  # each Linear called once: a group's passes may stop at its last layer

    down = block.mlp.down_proj
    block.mlp.register_forward_hook(
        lambda m, args, out: (down(out.new_zeros(*out.shape[:-1], down.in_features)), out)[1]
    )
    _, dense = _sequential_groups(
        block, names, "model.layers.0", lambda limit=None: [block(*a, **k) for a, k in captured[:limit]]
    )
    assert not dense  # down_proj called twice: a pass stopped at its first call would miss the second input


def test_passes_stopped_at_a_groups_last_layer_change_nothing():
    """True-sequential groups found in the block stop each Hessian pass at the group's last layer; the
    same groups given as modules_in_block_to_quantize run every pass to the end. Same tensors."""
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    states = []
    for given in (None, groups):
        model = tiny_llama(seed=0)
        calls: list[int] = []
        hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda *_, _c=calls: _c.append(1))
        qplug.quantize(model, GPTQConfig(bits=4, group_size=32, desc_act=True, modules_in_block_to_quantize=given),
                       calibration=_cal(model))
        hook.remove()
        states.append((model.state_dict(), len(calls)))
    (stopped, stopped_calls), (full, full_calls) = states
    assert stopped_calls < full_calls  # the first really stopped early
    assert stopped.keys() == full.keys()
    assert all(torch.equal(stopped[k], full[k]) for k in full)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_save_load_round_trip_in_both_zero_conventions(fmt, tmp_path):
    model = tiny_llama(seed=0)
    ids = example_tokens(model)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64, checkpoint_format=fmt), calibration=_cal(model))
    expected = _logits(model, ids)
    qplug.save_quantized(model, tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert data["checkpoint_format"] == data["format"] == fmt
    from safetensors.torch import load_file

    qzeros = load_file(str(tmp_path / "ckpt" / "model.safetensors"))["model.layers.0.self_attn.q_proj.qzeros"]
    assert (packing.unpack(qzeros, 4, dim=1) == (8 if fmt == "gptq_v2" else 7)).all()
    assert torch.equal(_logits(qplug.load_quantized(tmp_path / "ckpt"), ids), expected)
    # auto-gptq reads v1 only, through quantize_config.json, written inside the same atomic save
    autogptq_config = tmp_path / "ckpt" / "quantize_config.json"
    if fmt == "gptq":
        assert json.loads(autogptq_config.read_text()) == qplug.quantized_config(model).to_autogptq_dict()
    else:
        assert not autogptq_config.exists()


def test_quantize_config_json_follows_the_format_of_each_save(tmp_path):
    model = tiny_llama(seed=0)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64), calibration=_cal(model))
    qplug.save_quantized(model, tmp_path)
    assert json.loads((tmp_path / "quantize_config.json").read_text())["bits"] == 4
    qplug.dequantize(model)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64, checkpoint_format="gptq_v2"), calibration=_cal(model))
    qplug.save_quantized(model, tmp_path)  # over the v1 checkpoint: its quantize_config.json must not stay
    assert not (tmp_path / "quantize_config.json").exists()


def test_a_checkpoint_bias_the_float_layer_lacked_is_loaded(tmp_path):
    """AutoGPTQ writes a bias for every quantized layer (zeros where Llama has none): the empty layer
    is sized from the checkpoint's tensor names, not from the skeleton."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama(seed=0)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64), calibration=_cal(model))
    qplug.save_quantized(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.full((128,), 0.25, dtype=torch.float16)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = qplug.load_quantized(tmp_path, tiny_llama(seed=1))
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias, torch.full((128,), 0.25, dtype=torch.float16))
    assert loaded.model.layers[0].self_attn.k_proj.bias is None


def test_calibration_texts_with_a_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over a lazy dog while GPTQ quantizes every layer of this model".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    texts = [" ".join(words[i:] + words[:i]) for i in range(6)]
    model = tiny_llama(seed=0)
    qplug.quantize(model, GPTQConfig(bits=8, group_size=64, dataset=texts, tokenizer=tokenizer))
    assert isinstance(model.model.layers[1].mlp.down_proj, GPTQLinear)
    other = tiny_llama(seed=0)
    qplug.quantize(other, GPTQConfig(bits=8, group_size=64, tokenizer=tokenizer), calibration=texts)
    ids = example_tokens(model)
    assert torch.equal(_logits(model, ids), _logits(other, ids))


def test_gptqmodel_dynamic_per_module_bits_and_exclusions(tmp_path):
    cfg = qplug.config_from_dict(
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 64,
            "dynamic": {"-:.*\\.o_proj$": {}, "+:.*down_proj": {"bits": 8}},
        }
    )
    model = tiny_llama(seed=0)
    ids = example_tokens(model)
    qplug.quantize(model, cfg, calibration=_cal(model))
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert model.model.layers[0].mlp.down_proj.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 4
    expected = _logits(model, ids)
    qplug.save_quantized(model, tmp_path / "ckpt")
    assert torch.equal(_logits(qplug.load_quantized(tmp_path / "ckpt"), ids), expected)


def test_bfloat16_model():
    model = tiny_llama(seed=0, dtype=torch.bfloat16)
    ids = example_tokens(model)
    expected = _logits(model, ids)
    qplug.quantize(model, GPTQConfig(bits=8, group_size=64), calibration=_cal(model))
    assert model.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16
    assert relative_error(_logits(model, ids), expected) < 0.05


def test_unpackable_shapes_name_the_module_and_can_be_skipped():
    model = tiny_llama(seed=0, intermediate_size=200)  # 200 is not a multiple of 32 (3-bit runs)
    config = GPTQConfig(bits=3, group_size=64)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with pytest.raises(qplug.IncompatibleModelError, match=r"model\.layers\.0\.mlp\.gate_proj.*out_features=200"):
        qplug.get_plugin_manager().hook.validate(config=config, model=model, module_names=names)  # validate says it
    with pytest.raises(qplug.IncompatibleModelError, match=r"model\.layers\.0\.mlp\.gate_proj.*out_features=200"):
        qplug.quantize(model, config, calibration=_cal(model))
    assert not any(isinstance(m, GPTQLinear) for m in model.modules())  # refused before anything changed
    model = tiny_llama(seed=0, intermediate_size=200)
    qplug.quantize(model, GPTQConfig(bits=3, group_size=64), calibration=_cal(model), skip=["mlp"])
    assert isinstance(model.model.layers[0].self_attn.q_proj, GPTQLinear)


def test_calibration_is_required_and_never_downloaded():
    model = tiny_llama(seed=0)
    with pytest.raises(qplug.QuantConfigError, match=r"^calibration: None given — gptq calibrates on sample inputs"):
        qplug.quantize(model, GPTQConfig())
    # a named dataset would be downloaded: it does not count as calibration data
    with pytest.raises(qplug.QuantConfigError, match=r"^calibration: None given — gptq calibrates on sample inputs"):
        qplug.quantize(model, GPTQConfig(dataset="c4"))
    assert all(type(m) is not GPTQLinear for m in model.modules())


def test_kernel_variable_is_checked(monkeypatch):
    monkeypatch.setenv("QPLUG_GPTQ_KERNEL", "cutlass")
    model = tiny_llama(seed=0)
    with pytest.raises(qplug.QuantConfigError, match=r"QPLUG_GPTQ_KERNEL.*auto, torch, auto-gptq"):
        qplug.quantize(model, GPTQConfig(), calibration=_cal(model))


def test_forcing_the_autogptq_kernel(monkeypatch):
    """With auto-gptq: its modules are used. Without: the error says what to install."""
    from qplug_gptq import autogptq

    monkeypatch.setenv("QPLUG_GPTQ_KERNEL", "auto-gptq")
    model = tiny_llama(seed=0, dtype=torch.float16)
    if autogptq.available():
        qplug.quantize(model, GPTQConfig(group_size=64), calibration=_cal(model))
        assert autogptq.is_autogptq_module(model.model.layers[0].mlp.up_proj)
    else:
        with pytest.raises(qplug.BackendUnavailableError, match=r"pip install auto-gptq==0\.7\.1"):
            qplug.quantize(model, GPTQConfig(group_size=64), calibration=_cal(model))


def test_dequantize_restores_plain_linear_in_the_model_dtype():
    model = tiny_llama(seed=0)
    ids = example_tokens(model)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64, desc_act=True), calibration=_cal(model))
    before = _logits(model, ids)
    qplug.dequantize(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    assert relative_error(_logits(model, ids), before) < 1e-3


def test_gptqmodel_checkpoint_with_quantized_lm_head_loads(tmp_path):
    """GPTQModel's ``"lm_head": true``: the head is quantized too, and loading must expect it."""
    from qplug_gptq.algorithm import LayerGPTQ
    from safetensors.torch import load_file, save_file

    model = tiny_llama(seed=0)
    ids = example_tokens(model)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64), calibration=_cal(model))
    # quantize the head as GPTQModel would (inputs: the final hidden states)
    head = LayerGPTQ(model.lm_head.weight.data, "lm_head")
    h = model.lm_head.register_forward_hook(lambda m, args, out: head.add_batch(args[0]))
    model(_cal(model))
    h.remove()
    r = head.quantize(bits=4, group_size=64)
    qhead = GPTQLinear.from_integers(r.intweight, r.zeros, r.scales.half(), r.g_idx, bits=4, group_size=64)
    qplug.save_quantized(model, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del tensors["lm_head.weight"]
    tensors.update({f"lm_head.{k}": v for k, v in qhead.state_dict().items()})
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"]["lm_head"] = True
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))

    loaded = qplug.load_quantized(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, GPTQLinear)
    model.lm_head = qhead
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
