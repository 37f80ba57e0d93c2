"""Hypothesis fuzz of the core's configs (a toy and the int8-weight example): mutated real configs (issue 13).

Nothing but a qplug.QPlugError may escape qplug.config_from_dict / qplug.load_config, each read is
bounded in time, and whatever loads writes standard JSON that reads back equal.
"""

from __future__ import annotations

import pytest
from helpers import ToyPlugin

import qplug
from qplug.testing.fuzz import ConfigFuzzTests

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


class TestConfigFuzz(ConfigFuzzTests):
    seeds = SEEDS
