"""GPTQConfig: transformers' fields and JSON, configs written by other tools, validation."""

import json

import attrs
import pytest
import transformers
from conftest import FIXTURES
from qplug_gptq import GPTQConfig

import qplug

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# Values transformers fills in post_init (not defaults of the constructor): v4 turns
# use_exllama None into True and exllama_config None into {"version": 1}; v5 turns backend
# None into "auto" and adds act_group_aware.
DERIVED_BY_TRANSFORMERS = {"use_exllama", "exllama_config", "backend", "act_group_aware", "quant_method"}

# Real configs, as the tools wrote them (trimmed of nothing).
AUTOGPTQ_QUANTIZE_CONFIG_OLD = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.01,
    "desc_act": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}
OPTIMUM = {
    "bits": 4,
    "dataset": "c4",
    "group_size": 128,
    "damp_percent": 0.1,
    "desc_act": False,
    "sym": True,
    "true_sequential": True,
    "use_cuda_fp16": False,
    "model_seqlen": 2048,
    "block_name_to_quantize": "model.layers",
    "module_name_preceding_first_block": ["model.embed_tokens"],
    "batch_size": 1,
    "pad_token_id": None,
    "disable_exllama": True,
    "max_input_length": None,
    "quant_method": "gptq",
}
THEBLOKE_V4 = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.1,
    "desc_act": True,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
    "dataset": "alpaca-zh,alpaca-en",
}
GPTQMODEL = {
    "bits": 4,
    "dynamic": {"-:model\\.layers\\.0\\.mlp\\..*": {}, "+:.*down_proj": {"bits": 8, "group_size": 32}},
    "group_size": 128,
    "desc_act": True,
    "sym": True,
    "lm_head": False,
    "quant_method": "gptq",
    "checkpoint_format": "gptq",
    "pack_dtype": "int32",
    "meta": {
        "quantizer": ["gptqmodel:2.2.0"],
        "uri": "https://github.com/modelcloud/gptqmodel",
        "damp_percent": 0.05,
        "damp_auto_increment": 0.01,
        "static_groups": False,
        "true_sequential": True,
        "mse": 0.0,
    },
}
TRANSFORMERS_V5 = {
    "bits": 4,
    "tokenizer": None,
    "dataset": None,
    "group_size": 128,
    "damp_percent": 0.1,
    "desc_act": False,
    "act_group_aware": True,
    "sym": True,
    "true_sequential": True,
    "format": "gptq_v2",
    "checkpoint_format": "gptq_v2",
    "meta": None,
    "backend": "auto",
    "model_seqlen": None,
    "block_name_to_quantize": None,
    "module_name_preceding_first_block": None,
    "batch_size": 1,
    "pad_token_id": None,
    "max_input_length": None,
    "cache_block_outputs": True,
    "modules_in_block_to_quantize": None,
    "quant_method": "gptq",
}


def test_defaults_and_field_names_follow_transformers():
    hf = transformers.GPTQConfig(bits=4).to_dict()
    ours = GPTQConfig().to_dict()
    shared = set(hf) & set(ours)
    assert {
        "bits",
        "group_size",
        "damp_percent",
        "desc_act",
        "sym",
        "true_sequential",
        "dataset",
        "tokenizer",
        "model_seqlen",
        "block_name_to_quantize",
        "batch_size",
        "pad_token_id",
        "max_input_length",
        "cache_block_outputs",
        "modules_in_block_to_quantize",
        "checkpoint_format",
        "meta",
    } <= shared
    for key in shared - DERIVED_BY_TRANSFORMERS:
        assert ours[key] == hf[key], key
    assert set(hf) - set(ours) <= DERIVED_BY_TRANSFORMERS | {"format", "use_cuda_fp16"}


def test_what_transformers_writes_loads_and_round_trips():
    hf = transformers.GPTQConfig(bits=8, group_size=64, desc_act=True, sym=False, damp_percent=0.05).to_dict()
    cfg = qplug.config_from_dict(hf)
    assert isinstance(cfg, GPTQConfig)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.damp_percent) == (8, 64, True, False, 0.05)
    out = cfg.to_dict()
    for key, value in hf.items():
        assert out[key] == value, key


def test_what_qplug_writes_loads_in_transformers():
    ours = GPTQConfig(bits=3, group_size=32, desc_act=True, sym=False, checkpoint_format="gptq_v2").to_dict()
    hf = transformers.GPTQConfig.from_dict(json.loads(json.dumps(ours)))
    assert (hf.bits, hf.group_size, hf.desc_act, hf.sym) == (3, 32, True, False)
    fmt = hf.format if TRANSFORMERS_MAJOR >= 5 else hf.checkpoint_format
    assert fmt == "gptq_v2"


def test_autogptq_quantize_config_json_from_the_fixture_loads():
    path = FIXTURES / "llama-4bit-g32-actorder" / "quantize_config.json"
    cfg = qplug.load_config(path)
    assert isinstance(cfg, GPTQConfig) and (cfg.bits, cfg.group_size, cfg.desc_act) == (4, 32, True)
    assert cfg.to_dict()["model_file_base_name"] is None  # kept
    assert qplug.load_config(FIXTURES / "llama-3bit-g32-asym" / "config.json").sym is False


def test_old_autogptq_config_without_quant_method_is_recognised():
    cfg = qplug.config_from_dict(AUTOGPTQ_QUANTIZE_CONFIG_OLD)
    assert isinstance(cfg, GPTQConfig) and cfg.damp_percent == 0.01
    assert cfg.to_dict()["model_file_base_name"] == "model"
    assert GPTQConfig.from_dict({"w_bit": 4, "q_group_size": 64, "desc_act": False}).group_size == 64


def test_optimum_disable_exllama_becomes_use_exllama():
    cfg = qplug.config_from_dict(OPTIMUM)
    assert cfg.use_exllama is False and cfg.dataset == "c4" and cfg.block_name_to_quantize == "model.layers"


def test_real_dataset_values_load_but_cannot_quantize():
    cfg = qplug.config_from_dict(THEBLOKE_V4)
    assert cfg.dataset == "alpaca-zh,alpaca-en"
    with pytest.raises(qplug.QuantConfigError, match="dataset"):
        cfg.check_quantizable()


def test_gptqmodel_dynamic_lm_head_and_meta():
    cfg = qplug.config_from_dict(GPTQMODEL)
    assert cfg.meta["quantizer"] == ["gptqmodel:2.2.0"]
    assert cfg.to_dict()["pack_dtype"] == "int32" and cfg.to_dict()["dynamic"] == GPTQMODEL["dynamic"]
    assert cfg.module_settings("model.layers.0.mlp.up_proj") is None
    assert cfg.module_settings("model.layers.1.mlp.down_proj") == {
        "bits": 8,
        "group_size": 32,
        "sym": True,
        "desc_act": True,
    }
    assert cfg.module_settings("model.layers.1.self_attn.q_proj")["bits"] == 4
    assert not cfg.quantizes_lm_head


def test_transformers_v5_format_keys():
    cfg = qplug.config_from_dict(TRANSFORMERS_V5)
    assert cfg.checkpoint_format == "gptq_v2"
    out = cfg.to_dict()
    assert out["format"] == out["checkpoint_format"] == "gptq_v2"
    assert out["act_group_aware"] is True  # kept, written back
    assert (
        qplug.config_from_dict({"quant_method": "gptq", "bits": 4, "format": "GPTQ_V2"}).checkpoint_format == "gptq_v2"
    )
    with pytest.raises(qplug.QuantConfigError, match="checkpoint_format"):
        qplug.config_from_dict({"quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq_v2"})


def test_marlin_configs_load_but_are_refused_for_loading_tensors():
    cfg = qplug.config_from_dict({**AUTOGPTQ_QUANTIZE_CONFIG_OLD, "is_marlin_format": True})
    assert cfg.checkpoint_format == "marlin"
    with pytest.raises(qplug.QuantConfigError, match=r"checkpoint_format.*'gptq', 'gptq_v2'"):
        cfg.check_loadable()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"bits": 5}, "bits"),
        ({"bits": True}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"damp_percent": 0}, "damp_percent"),
        ({"damp_percent": 1.0}, "damp_percent"),
        ({"desc_act": "yes"}, "desc_act"),
        ({"exllama_config": {"version": 3}}, "exllama_config"),
        ({"modules_in_block_to_quantize": ["q_proj"]}, "modules_in_block_to_quantize"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(qplug.QuantConfigError, match=field) as info:
        qplug.config_from_dict({"quant_method": "gptq", **changes})
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_static_groups_without_groups_loads_as_autogptq_treats_it():
    # auto-gptq quantizes such a config per channel (its static groups loop is empty); so do we
    assert GPTQConfig.from_dict({"bits": 4, "group_size": -1, "static_groups": True, "desc_act": False}).static_groups


def test_evolve_revalidates_and_unknown_keys_survive():
    cfg = qplug.config_from_dict({"quant_method": "gptq", "bits": 8, "my_tool_version": "1.2"})
    with pytest.raises(qplug.QuantConfigError, match="bits"):
        attrs.evolve(cfg, bits=6)
    assert attrs.evolve(cfg, desc_act=True).to_dict()["my_tool_version"] == "1.2"


def test_diff_dict_and_json_file(tmp_path):
    cfg = GPTQConfig(bits=8, desc_act=True)
    assert cfg.to_diff_dict() == {"bits": 8, "desc_act": True, "quant_method": "gptq"}
    cfg.to_json_file(tmp_path / "q.json")
    assert GPTQConfig.from_json_file(tmp_path / "q.json") == cfg


def test_tokenizer_object_is_written_as_its_name():
    class Tok:
        name_or_path = "/models/tok"

        def __call__(self, text):
            raise AssertionError

    assert GPTQConfig(tokenizer=Tok()).to_dict()["tokenizer"] == "/models/tok"


def test_quantize_only_checks():
    GPTQConfig(dataset=["a text"], tokenizer="some/path").check_quantizable()
    with pytest.raises(qplug.QuantConfigError, match="tokenizer"):
        GPTQConfig(dataset=["a text"]).check_quantizable()
    with pytest.raises(qplug.QuantConfigError, match="dataset"):
        GPTQConfig(dataset=["ok", 3]).check_quantizable()
