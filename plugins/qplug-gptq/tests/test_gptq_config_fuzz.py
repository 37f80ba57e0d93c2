"""Hypothesis fuzz of GPTQ configs: mutated real configs, as dicts and as files (issue 13).

Nothing but a qplug.QPlugError may escape qplug.config_from_dict / qplug.load_config, each read is
bounded in time, and whatever loads writes standard JSON that reads back equal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from qplug.testing.fuzz import check_config_dict, check_config_text, mutated_configs, mutated_texts

FIXTURES = Path(__file__).parent / "fixtures"
SEEDS = [
    *(json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
      for name in ("llama-4bit-g32-actorder", "llama-3bit-g32-asym")),
    json.loads((FIXTURES / "llama-4bit-g32-actorder" / "quantize_config.json").read_text()),  # AutoGPTQ
    {  # GPTQModel
        "bits": 4, "group_size": 128, "desc_act": True, "sym": True, "lm_head": False, "quant_method": "gptq",
        "checkpoint_format": "gptq", "pack_dtype": "int32",
        "dynamic": {"-:model\\.layers\\.0\\.mlp\\..*": {}, "+:.*down_proj": {"bits": 8, "group_size": 32}},
        "meta": {"quantizer": ["gptqmodel:2.2.0"], "damp_percent": 0.05},
    },
    {  # transformers v5 / optimum
        "quant_method": "gptq", "bits": 4, "group_size": 128, "format": "gptq", "act_group_aware": True,
        "disable_exllama": True, "modules_to_not_convert": ["lm_head", "re:.*\\.gate$"], "dataset": "c4",
    },
]

# QPLUG_FUZZ_EXAMPLES=5000 for a longer hunt than CI runs.
FUZZ = settings(max_examples=int(os.environ.get("QPLUG_FUZZ_EXAMPLES", "250")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_every_seed_is_a_real_config():
    for seed in SEEDS:
        assert check_config_dict(seed) is not None, seed


@FUZZ
@given(data=mutated_configs(SEEDS))
def test_mutated_config_dicts(data):
    check_config_dict(data)


@FUZZ
@given(text=mutated_texts(SEEDS))
def test_mutated_config_files(scratch, text):
    check_config_text(text, scratch)
