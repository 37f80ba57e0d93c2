"""Hypothesis fuzz of the core's configs (a toy and the int8-weight example): mutated real configs (issue 13).

Nothing but a qplug.QPlugError may escape qplug.config_from_dict / qplug.load_config, each read is
bounded in time, and whatever loads writes standard JSON that reads back equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ToyPlugin
from hypothesis import HealthCheck, given, settings

import qplug
from qplug.testing.fuzz import check_config_dict, check_config_text, mutated_configs, mutated_texts

SEEDS = [
    {"quant_method": "toy", "bits": 4, "damp": 0.1, "kind": "nf4", "compute_dtype": "bfloat16",
     "skip_modules": ["lm_head", "re:.*\\.q_proj"], "options": {"a": [1, 2]}},
    {"toy_bit": 2, "kind": "nf4"},  # no quant_method: inferred
    {"quant_method": "int8-weight", "compute_dtype": "float32", "modules_to_not_convert": ["lm_head"]},
]


@pytest.fixture(autouse=True)
def backends(int8_plugin):
    if "toy" not in qplug.get_plugin_manager().backend_names():
        qplug.register_plugin(ToyPlugin(), name="toy-plugin")


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
