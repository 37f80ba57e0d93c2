"""bitsandbytes skip keys from a stranger's checkpoint: transformers reads them as regexes; qplug matches
them in bounded time, with transformers' answers (issue 13, items 7-8)."""

from __future__ import annotations

import math
import re
import time

import pytest
from qplug_bitsandbytes import BitsAndBytesConfig
from qplug_bitsandbytes.plugin import _hf_skips

import qplug

NAMES = ["lm_head", "model.lm_head", "model.layers.0.mlp.down_proj", "model.layers.10.mlp", "model.embed_tokens"]
KEYS = ["lm_head", "mlp", "model.layers.1", r"model\.layers\.\d+\.mlp", "layers.0", "down", "head", "(", "[a-"]


def _transformers_rule(name: str, keys: list[str]) -> bool:
    """transformers' should_convert_module, negated, with Python's re (trusted keys only)."""
    for key in keys:
        if name.endswith(key):
            return True
        try:
            if re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", name):
                return True
        except re.error:
            continue
    return False


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", KEYS)
def test_skip_keys_match_as_transformers_matches_them(name, key):
    assert _hf_skips(name, [key]) == _transformers_rule(name, [key])


def test_an_exponential_skip_key_is_matched_in_linear_time():
    started = time.perf_counter()
    assert not _hf_skips("model.layers.0.self_attn.q_proj" * 10, ["(.|.)*Z", "(a|aa)*c"])
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("value", [math.inf, math.nan, 10**400])
def test_threshold_must_be_a_finite_number(value):
    with pytest.raises(qplug.QuantConfigError, match="llm_int8_threshold") as info:
        qplug.config_from_dict({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": value})
    assert info.value.field == "llm_int8_threshold" and len(str(info.value)) < 300


def test_infinity_is_never_written_back():
    cfg = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(qplug.QuantConfigError, match="finite"):
        cfg.llm_int8_threshold = math.inf
    assert "Infinity" not in cfg.to_json_string()


def test_invalid_re_skip_entry_is_refused():
    with pytest.raises(qplug.QuantConfigError, match="llm_int8_skip_modules"):
        BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["re:("])
