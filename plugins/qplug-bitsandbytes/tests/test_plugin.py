"""The backend through qplug's public API, against transformers' bitsandbytes path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from bnb_testlib import HF_ALL, HF_WIDE, linear_names, logits, make_tiny_llama, state_dicts_equal
from qplug_bitsandbytes import BitsAndBytesConfig, modules

import qplug

params_all = pytest.mark.parametrize("fmt", list(HF_ALL), ids=list(HF_ALL))
params_wide = pytest.mark.parametrize("fmt", list(HF_WIDE), ids=list(HF_WIDE))


def qplug_config(hf_kwargs: dict) -> BitsAndBytesConfig:
    """The qplug config equal to ``transformers.BitsAndBytesConfig(**hf_kwargs)``, built from its JSON."""
    return qplug.config_from_dict(transformers.BitsAndBytesConfig(**hf_kwargs).to_dict())


# --- registration -------------------------------------------------------------------------


def test_backend_is_registered_with_alias_and_presets():
    assert "bitsandbytes" in qplug.available_backends()
    assert qplug.get_config_class("BnB") is BitsAndBytesConfig
    backend = qplug.get_plugin_manager().get_backend("bnb")
    assert set(backend.presets) == {"nf4", "fp4", "int8"}
    nf4 = BitsAndBytesConfig.from_dict(backend.presets["nf4"])
    assert (nf4.bnb_4bit_quant_type, nf4.bnb_4bit_use_double_quant, nf4.bnb_4bit_compute_dtype) == (
        "nf4", True, "bfloat16"
    )
    assert BitsAndBytesConfig.from_dict(backend.presets["int8"]).quantization_method() == "llm_int8"


def test_listing_backends_imports_neither_torch_nor_bitsandbytes():
    code = (
        "import sys, qplug; names = qplug.available_backends(); "
        "assert 'bitsandbytes' in names, names; "
        "qplug.get_config_class('bnb')(load_in_4bit=True); "
        "heavy = [m for m in ('torch', 'bitsandbytes') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_bitsandbytes_package_is_reported_with_pip_command(monkeypatch, fresh_model):
    import qplug.backend

    real = qplug.backend._installed_version
    monkeypatch.setattr(
        qplug.backend, "_installed_version", lambda dist: None if dist == "bitsandbytes" else real(dist)
    )
    with pytest.raises(qplug.BackendUnavailableError, match=r"pip install 'bitsandbytes>=0\.48'"):
        qplug.quantize(fresh_model, BitsAndBytesConfig(load_in_4bit=True))
    assert "bitsandbytes" not in qplug.available_backends()


def test_unimportable_bitsandbytes_is_reported_with_pip_command(monkeypatch, fresh_model):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # installed per metadata, import fails
    with pytest.raises(qplug.BackendUnavailableError, match=r"pip install 'bitsandbytes>=0\.48'") as info:
        qplug.quantize(fresh_model, BitsAndBytesConfig(load_in_8bit=True))
    assert info.value.install == "pip install 'bitsandbytes>=0.48'"
    assert all(type(m) is torch.nn.Linear for m in fresh_model.modules() if isinstance(m, torch.nn.Linear))


# --- quantize: same as transformers ----------------------------------------------------------


@pytest.mark.usefixtures("bnb_kernel")
@params_wide
def test_quantize_gives_transformers_modules_state_and_logits(fmt, fresh_model, hf_quantized, input_ids):
    hf = hf_quantized(**HF_WIDE[fmt])
    model = qplug.quantize(fresh_model, qplug_config(HF_WIDE[fmt]))

    for name in linear_names(hf):
        ours, theirs = model.get_submodule(name), hf.get_submodule(name)
        assert isinstance(ours, type(theirs)) and type(theirs) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    assert type(model.lm_head) is torch.nn.Linear
    assert state_dicts_equal(hf.state_dict(), model.state_dict()) == []
    assert torch.equal(logits(model, input_ids), logits(hf, input_ids))


def test_compute_dtype_is_honoured(fresh_model):
    qplug.quantize(fresh_model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16"))
    module = fresh_model.model.layers[0].mlp.down_proj
    assert module.compute_dtype is torch.bfloat16
    seen = {}

    def record(mod, args, out):
        seen["dtype"] = out.dtype

    module.register_forward_hook(record)
    logits(fresh_model, torch.zeros(1, 4, dtype=torch.long))
    assert seen["dtype"] is torch.float32  # computed in bf16, returned in the input's dtype


def test_skip_modules_add_to_the_default_skips(fresh_model):
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["mlp.down_proj"])
    qplug.quantize(fresh_model, config)
    assert type(fresh_model.lm_head) is torch.nn.Linear  # the head stays even with a user list
    for layer in fresh_model.model.layers:
        assert type(layer.mlp.down_proj) is torch.nn.Linear
        assert isinstance(layer.mlp.up_proj, bnb.nn.Linear4bit)


def test_bias_is_kept():
    model = make_tiny_llama(attention_bias=True, mlp_bias=True)
    bias = model.model.layers[0].self_attn.q_proj.bias
    qplug.quantize(model, BitsAndBytesConfig(load_in_4bit=True))
    assert model.model.layers[0].self_attn.q_proj.bias is bias


def test_quantizing_a_meta_model_is_refused_naming_the_module():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_tiny(), "num_hidden_layers": 1}))
    with pytest.raises(qplug.IncompatibleModelError, match=r"model\.layers\.0\.self_attn\.q_proj.*meta"):
        qplug.quantize(model, BitsAndBytesConfig(load_in_4bit=True))


def _tiny():
    from bnb_testlib import TINY

    return dict(TINY)


# --- checkpoints both ways --------------------------------------------------------------------


@pytest.mark.usefixtures("bnb_kernel")
@params_wide
def test_qplug_checkpoint_after_forward_loads_in_transformers(fmt, fresh_model, hf_quantized, input_ids, tmp_path):
    model = qplug.quantize(fresh_model, qplug_config(HF_WIDE[fmt]))
    expected = logits(model, input_ids)  # a forward first: bitsandbytes' own export breaks here
    qplug.save_quantized(model, tmp_path)

    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written == transformers.BitsAndBytesConfig(**HF_WIDE[fmt]).to_dict()
    reloaded = hf_quantized(tmp_path)
    assert torch.equal(logits(reloaded, input_ids), expected)


@pytest.mark.usefixtures("bnb_kernel")
@pytest.mark.parametrize(
    ("fmt", "with_model"),
    [(fmt, False) for fmt in HF_WIDE] + [("nf4-dq-bf16", True), ("int8", True)],
    ids=[f"{fmt}-from-config" for fmt in HF_WIDE] + ["nf4-dq-bf16-into-model", "int8-into-model"],
)
def test_transformers_checkpoint_loads_in_qplug(fmt, with_model, hf_quantized, input_ids, tmp_path):
    hf = hf_quantized(**HF_WIDE[fmt])
    hf.save_pretrained(tmp_path)  # before any forward, when transformers' export is right
    expected = logits(hf, input_ids)

    model = qplug.load_quantized(tmp_path, model=make_tiny_llama(seed=7) if with_model else None)

    assert qplug.quantized_config(model) == qplug_config(HF_WIDE[fmt])
    assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.usefixtures("bnb_kernel")
@pytest.mark.parametrize("fmt", ["nf4-dq-bf16", "int8"])
def test_quantize_on_load_matches_transformers(fmt, float_checkpoint, hf_quantized, input_ids):
    """Streaming a float checkpoint through the backend gives transformers' quantize-on-load model, bit for bit
    (qplug's CPU quantization kernels included)."""
    hf = hf_quantized(**HF_WIDE[fmt])
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}  # before a forward may repack it
    expected = logits(hf, input_ids)
    seen: list[str] = []

    model = qplug.load_quantized(float_checkpoint, quantization_config=qplug_config(HF_WIDE[fmt]),
                                 on_module=seen.append)

    assert seen == linear_names(make_tiny_llama())  # every decoder linear, one at a time
    assert state_dicts_equal(hf_state, model.state_dict()) == []
    assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.usefixtures("bnb_kernel")
@pytest.mark.parametrize("skip", [["mlp.down_proj"], []], ids=["list", "empty-list"])
def test_skip_list_checkpoint_keeps_head_float_in_transformers(skip, fresh_model, hf_quantized, input_ids, tmp_path):
    """transformers adds no default skips to a given list; qplug's saved list names the float head."""
    model = qplug.quantize(fresh_model, BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip))
    expected = logits(model, input_ids)
    qplug.save_quantized(model, tmp_path)

    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["llm_int8_skip_modules"] == [*skip, "lm_head"]
    reloaded = hf_quantized(tmp_path)
    assert type(reloaded.lm_head) is torch.nn.Linear
    assert torch.equal(logits(reloaded, input_ids), expected)
    assert torch.equal(logits(qplug.load_quantized(tmp_path), input_ids), expected)


@pytest.mark.usefixtures("bnb_kernel")
@pytest.mark.parametrize("skip", [["mlp.down_proj"], []], ids=["list", "empty-list"])
def test_transformers_checkpoint_with_quantized_head_loads(skip, hf_quantized, input_ids, tmp_path):
    """Given a skip list without the head, transformers quantizes the head; such checkpoints load."""
    hf = hf_quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
    assert isinstance(hf.lm_head, bnb.nn.Linear4bit)
    hf.save_pretrained(tmp_path)
    expected = logits(hf, input_ids)

    model = qplug.load_quantized(tmp_path)

    assert isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert torch.equal(logits(model, input_ids), expected)
    qplug.save_quantized(model, tmp_path / "again")  # and back: the quantized head stays quantized
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["llm_int8_skip_modules"] == skip
    assert torch.equal(logits(hf_quantized(tmp_path / "again"), input_ids), expected)


@params_all
def test_save_after_forward_load_gives_same_logits(fmt, fresh_model, input_ids, tmp_path):
    model = qplug.quantize(fresh_model, qplug_config(HF_WIDE[fmt]))
    expected = logits(model, input_ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qplug.save_quantized(model, tmp_path)
    assert state_dicts_equal(before, model.state_dict()) == []  # saving changed nothing

    loaded = qplug.load_quantized(tmp_path)

    assert torch.equal(logits(loaded, input_ids), expected)
    assert torch.equal(logits(model, input_ids), expected)


def test_checkpoint_with_a_missing_quant_state_tensor_names_the_module(fresh_model, tmp_path):
    from safetensors.torch import load_file, save_file

    qplug.save_quantized(qplug.quantize(fresh_model, BitsAndBytesConfig(load_in_4bit=True)), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(qplug.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*weight\.absmax"):
        qplug.load_quantized(tmp_path)


def test_checkpoint_config_without_4_or_8_bit_is_refused(fresh_model, tmp_path):
    qplug.save_quantized(qplug.quantize(fresh_model, BitsAndBytesConfig(load_in_8bit=True)), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"].update(load_in_8bit=False, _load_in_8bit=False)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(qplug.QuantConfigError, match="neither 4 nor 8 bit"):
        qplug.load_quantized(tmp_path)


# --- dequantize -------------------------------------------------------------------------------


@params_all
def test_dequantize_equals_bitsandbytes_dequantization(fmt, fresh_model, hf_quantized, input_ids):
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    hf = hf_quantized(**HF_WIDE[fmt])
    expected = {
        name: dequantize_bnb_weight(hf.get_submodule(name).weight, getattr(hf.get_submodule(name), "state", None))
        for name in linear_names(hf)
    }
    model = qplug.quantize(fresh_model, qplug_config(HF_WIDE[fmt]))
    logits(model, input_ids)  # after a forward (4-bit repacked on AVX512-BF16 CPUs)

    qplug.dequantize(model)

    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert type(module) is torch.nn.Linear
        assert torch.equal(module.weight, weight.to(module.weight.dtype)), name
    assert not model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    assert qplug.quantized_config(model) is None


# --- storage ----------------------------------------------------------------------------------


def test_nf4_double_quant_stores_4_127_bits_per_parameter():
    """4 bits + one 8-bit scale per 64 + one 32-bit scale per 64*256, on a model of realistic width.

    Measured on everything the checkpoint stores for each quantized weight (data, scales,
    nested scales, both quant maps and the packed quant-state record).
    """
    model = make_tiny_llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=1,
                            num_attention_heads=8, num_key_value_heads=8)
    qplug.quantize(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    params = sum(m.in_features * m.out_features for m in quantized)
    assert params == 4 * 1024 * 1024 + 3 * 1024 * 2816
    expected = 4 + 8 / 64 + 32 / (64 * 256)  # 4.12695...

    # The part that grows with the weight: 4-bit data, 8-bit scales, float32 scales of the scales.
    per_weight = 0
    for module in quantized:
        sd = module.state_dict()
        per_weight += sum(sd[k].numel() * sd[k].element_size() * 8
                          for k in ("weight", "weight.absmax", "weight.nested_absmax"))
    assert per_weight / params == pytest.approx(expected, rel=1e-9)
    # Everything stored: plus per-layer constants (quant maps, the packed quant-state record),
    # about 10 kbit per layer, 0.005 bit per parameter at this width.
    bits, counted = modules.quantized_bits(quantized)
    assert counted == params
    assert bits / params == pytest.approx(expected, abs=0.01)
    # Without double quantization the scales are float32: exactly 4 + 32/64 = 4.5 per weight.
    plain = make_tiny_llama()
    qplug.quantize(plain, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    plain_modules = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    stored = sum(m.state_dict()[k].numel() * m.state_dict()[k].element_size() * 8
                 for m in plain_modules for k in ("weight", "weight.absmax"))
    assert stored / sum(m.in_features * m.out_features for m in plain_modules) == 4.5
    assert not any("weight.nested_absmax" in m.state_dict() for m in plain_modules)


# --- QLoRA ------------------------------------------------------------------------------------


def test_qlora_one_step_changes_only_adapter_weights(fresh_model, input_ids):
    model = qplug.quantize(fresh_model, BitsAndBytesConfig.from_dict(
        qplug.get_plugin_manager().get_backend("bnb").presets["nf4"]))
    logits(model, input_ids)  # an inference forward first: training must still work after it
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, peft.tuners.lora.bnb.Linear4bit)  # peft's QLoRA layer, not the generic one

    before = {k: v.clone() for k, v in model.state_dict().items()}  # quant state included
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()

    changed = set(state_dicts_equal(before, model.state_dict()))
    assert changed  # the step did something ...
    assert changed <= trainable  # ... to adapter weights only (lora_B: lora_A's gradient is 0 at step one)
    assert any("lora_B" in n for n in changed)
    assert any(k.endswith("q_proj.base_layer.weight.absmax") for k in before)  # 4-bit state was compared


def test_peft_merge_after_inference_sees_canonical_weights_once_moved(input_ids):
    """peft's merge reads ``weight.data``/``quant_state`` directly; after a CPU inference forward
    those hold bitsandbytes' repacked layout. ``model.to(device)`` restores the canonical layout
    exactly (our modules' ``_apply``), after which merging gives what it gives without a forward."""
    merged = []
    for infer_first in (False, True):
        model = qplug.quantize(make_tiny_llama(), BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        torch.manual_seed(5)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, lora).eval()
        if infer_first:
            logits(model, input_ids)
            model.to("cpu")
        with pytest.warns(UserWarning, match="rounding errors"):
            merged.append(logits(model.merge_and_unload(), input_ids))
    assert torch.equal(merged[0], merged[1])


def test_int8_cast_notice_is_logged_once_not_per_layer(monkeypatch, caplog):
    # bitsandbytes' own int8 forward logs "MatMul8bitLt: inputs will be cast ..." on every layer of
    # every float32 forward (28 lines for two forwards of this model); once is enough.
    monkeypatch.setenv("QPLUG_KERNEL", "bitsandbytes")
    model = make_tiny_llama()
    qplug.quantize(model, BitsAndBytesConfig(load_in_8bit=True))
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    for once in logging.getLogger("bitsandbytes.autograd._functions").filters:
        if isinstance(once, modules._OnceFilter):
            once._seen.clear()  # as in a fresh process, whatever ran before in this one
    with caplog.at_level("WARNING", logger="bitsandbytes"), torch.no_grad():
        model(ids)
        model(ids)
    notices = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(notices) == 1
    # the notice is only filtered, not lost: other messages of that logger pass
    logging.getLogger("bitsandbytes.autograd._functions").warning("another notice")
    assert caplog.records[-1].getMessage() == "another notice"
