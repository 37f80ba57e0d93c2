"""BitsAndBytesConfig: transformers' fields, defaults and JSON, with stricter validation."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st
from qplug_bitsandbytes import BitsAndBytesConfig
from qplug_bitsandbytes.config import COMPUTE_DTYPES, QUANT_STORAGE_DTYPES

import qplug

# quantization_config blocks as real checkpoints carry them.
REAL_CONFIGS = {
    # transformers >= 4.39 (a QLoRA-style NF4 checkpoint)
    "nf4-current": {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    },
    # transformers 4.3x: no private keys, no quant storage
    "nf4-older": {
        "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    },
    "int8-skip": {
        "load_in_8bit": True, "llm_int8_threshold": 6.0, "llm_int8_skip_modules": ["lm_head", "mlp.gate"],
        "quant_method": "bitsandbytes",
    },
}


def hf(**kwargs) -> transformers.BitsAndBytesConfig:
    return transformers.BitsAndBytesConfig(**kwargs)


def test_defaults_and_json_are_transformers():
    ours, theirs = BitsAndBytesConfig(), hf()
    assert ours.to_dict() == theirs.to_dict()
    assert ours.quantization_method() is theirs.quantization_method() is None


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_checkpoint_configs_load_and_write_back_what_transformers_writes(name):
    data = REAL_CONFIGS[name]
    ours = qplug.config_from_dict(data)
    assert isinstance(ours, BitsAndBytesConfig)
    theirs = transformers.BitsAndBytesConfig.from_dict(dict(data))
    assert ours.to_dict() == theirs.to_dict()
    assert ours.quantization_method() == theirs.quantization_method()


def test_transformers_reads_what_qplug_writes():
    ours = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16",
                              llm_int8_skip_modules=["mlp.down_proj"])
    theirs = transformers.BitsAndBytesConfig.from_dict(json.loads(ours.to_json_string()))
    assert theirs.load_in_4bit and not theirs.load_in_8bit
    assert theirs.bnb_4bit_compute_dtype is torch.bfloat16
    assert theirs.llm_int8_skip_modules == ["mlp.down_proj"]
    assert theirs.to_dict() == ours.to_dict()


def test_diff_dict_is_transformers_plus_quant_method_without_the_private_mirrors():
    kwargs = dict(load_in_8bit=True, llm_int8_threshold=4.0)
    theirs = hf(**kwargs).to_diff_dict()
    assert theirs["_load_in_8bit"] is True  # transformers repeats the public field under a private key
    ours = BitsAndBytesConfig(**kwargs)
    assert ours.to_diff_dict() == {**{k: v for k, v in theirs.items() if not k.startswith("_")},
                                   "quant_method": "bitsandbytes"}
    assert qplug.config_from_dict(ours.to_diff_dict()) == ours
    assert {"_load_in_4bit", "_load_in_8bit"} <= set(ours.to_dict())  # the file transformers reads keeps them


@settings(max_examples=60, deadline=None)
@example(bits=None, threshold=6, skip=None, compute="float32", quant_type="fp4", double=False, storage="uint8",
         has_fp16=False)  # every field at transformers' default: its diff dict is empty (found by CI)
@given(
    bits=st.sampled_from([None, 4, 8]),
    threshold=st.one_of(st.integers(0, 20), st.floats(0, 20, allow_nan=False)),
    skip=st.one_of(st.none(), st.lists(st.sampled_from(["lm_head", "mlp.down_proj", "re:.*\\.o_proj"]),
                                       max_size=2)),
    compute=st.sampled_from(COMPUTE_DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double=st.booleans(),
    storage=st.sampled_from(QUANT_STORAGE_DTYPES),
    has_fp16=st.booleans(),
)
def test_any_valid_config_round_trips_through_transformers(bits, threshold, skip, compute, quant_type, double,
                                                           storage, has_fp16):
    kwargs = dict(load_in_4bit=bits == 4, load_in_8bit=bits == 8, llm_int8_threshold=float(threshold),
                  llm_int8_skip_modules=skip, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type=quant_type,
                  bnb_4bit_use_double_quant=double, bnb_4bit_quant_storage=storage,
                  llm_int8_has_fp16_weight=has_fp16)
    ours = BitsAndBytesConfig(**kwargs)
    theirs = transformers.BitsAndBytesConfig(**kwargs)
    assert ours.to_dict() == theirs.to_dict()
    assert qplug.config_from_dict(theirs.to_dict()) == ours
    diff = theirs.to_diff_dict()  # transformers' diff lacks quant_method: qplug recognises the keys
    if diff:
        assert qplug.config_from_dict(diff) == ours
    else:  # every field at its default: nothing to recognise, which must be said, not guessed
        with pytest.raises(qplug.UnknownBackendError, match="no 'quant_method'"):
            qplug.config_from_dict(diff)
    assert transformers.BitsAndBytesConfig.from_dict(ours.to_dict()).to_dict() == theirs.to_dict()


def test_int_threshold_is_accepted_as_float():
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6)
    assert config.llm_int8_threshold == 6.0 and isinstance(config.llm_int8_threshold, float)
    with pytest.raises(TypeError):  # transformers refuses it; qplug is kinder
        hf(load_in_8bit=True, llm_int8_threshold=6)


@pytest.mark.parametrize(
    ("given", "stored"),
    [(torch.bfloat16, "bfloat16"), ("torch.float16", "float16"), ("bf16", "bfloat16"), (None, "float32")],
)
def test_compute_dtype_spellings(given, stored):
    assert BitsAndBytesConfig(bnb_4bit_compute_dtype=given).bnb_4bit_compute_dtype == stored


@pytest.mark.parametrize(
    ("kwargs", "field", "value", "accepted"),
    [
        (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type", "'int4'", ["'fp4'", "'nf4'"]),
        (dict(bnb_4bit_compute_dtype="float8"), "bnb_4bit_compute_dtype", "'float8'",
         ["'float32'", "'bfloat16'", "'float16'"]),
        (dict(bnb_4bit_quant_storage="int4"), "bnb_4bit_quant_storage", "'int4'", ["'uint8'", "'bfloat16'"]),
        (dict(llm_int8_threshold=-1.0), "llm_int8_threshold", "-1.0", ["[0, inf]"]),
        (dict(llm_int8_threshold=True), "llm_int8_threshold", "True", ["a number"]),
        (dict(load_in_4bit="yes"), "load_in_4bit", "'yes'", ["true or false"]),
        (dict(llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules", "'lm_head'", ["a list of a string"]),
        (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit", "True", ["load_in_8bit", "choose one"]),
    ],
    ids=["quant-type", "compute-dtype", "storage", "negative-threshold", "bool-threshold", "flag", "skip-list",
         "both-modes"],
)
def test_invalid_values_name_field_value_and_accepted(kwargs, field, value, accepted):
    with pytest.raises(qplug.QuantConfigError) as info:
        BitsAndBytesConfig(**kwargs)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, TypeError)
    assert error.field == field
    message = str(error)
    assert f"BitsAndBytesConfig.{field}" in message and value in message
    for item in accepted:
        assert item in message


def test_evolve_revalidates():
    config = BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(qplug.QuantConfigError, match="bnb_4bit_quant_type"):
        attrs.evolve(config, bnb_4bit_quant_type="int4")
    with pytest.raises(qplug.QuantConfigError, match="choose one"):
        attrs.evolve(config, load_in_8bit=True)
    assert attrs.evolve(config, bnb_4bit_quant_type="NF4").bnb_4bit_quant_type == "nf4"


def test_neither_4_nor_8_bit_is_readable_but_not_quantizable():
    config = qplug.config_from_dict({"quant_method": "bitsandbytes"})
    with pytest.raises(qplug.QuantConfigError, match="neither 4 nor 8 bit") as info:
        config.check_quantizable()
    assert info.value.field == "load_in_4bit"
    with pytest.raises(qplug.QuantConfigError, match="neither 4 nor 8 bit"):
        qplug.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)


def test_private_keys_must_agree_with_public_ones():
    with pytest.raises(qplug.QuantConfigError, match="_load_in_8bit") as info:
        qplug.config_from_dict({"quant_method": "bitsandbytes", "load_in_8bit": False, "_load_in_8bit": True})
    assert info.value.field == "_load_in_8bit"
    only_private = qplug.config_from_dict({"quant_method": "bitsandbytes", "_load_in_4bit": True})
    assert only_private.load_in_4bit


def test_dict_without_quant_method_is_recognised():
    data = {k: v for k, v in REAL_CONFIGS["nf4-older"].items() if k != "quant_method"}
    assert isinstance(qplug.config_from_dict(data), BitsAndBytesConfig)


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    data = {**REAL_CONFIGS["nf4-current"], "bnb_future_option": {"x": 1}}
    config = qplug.config_from_dict(data)
    assert config.to_dict()["bnb_future_option"] == {"x": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": data}))
    assert qplug.load_config(path) == config


def test_alias_and_case_insensitive_quant_method():
    assert qplug.get_config_class("BNB") is BitsAndBytesConfig
    assert qplug.config_from_dict({"quant_method": "bnb", "load_in_8bit": True}).load_in_8bit
