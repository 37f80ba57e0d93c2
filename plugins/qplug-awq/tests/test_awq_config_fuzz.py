"""Hypothesis fuzz of AWQ configs: mutated real configs, as dicts and as files (issue 13).

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
    json.loads((FIXTURES / "tiny-llama-awq-g64" / "config.json").read_text())["quantization_config"],
    {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM", "modules_to_not_convert": None},
    {  # transformers v5
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm", "format": "gemm",
        "backend": "auto", "do_fuse": False, "modules_to_not_convert": ["lm_head"], "desc_act": False,
        "damp_percent": 0.1, "exllama_config": {"version": 2},
    },
    {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "exllama", "exllama_config": {"version": 1},
     "do_fuse": True, "fuse_max_seq_len": 512},
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
