"""Hypothesis fuzz of AWQ configs: mutated real configs, as dicts and as files (issue 13).

Nothing but a qplug.QPlugError may escape qplug.config_from_dict / qplug.load_config, each read is
bounded in time, and whatever loads writes standard JSON that reads back equal.
"""

from __future__ import annotations

import json
from pathlib import Path

from qplug.testing.fuzz import ConfigFuzzTests

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

class TestConfigFuzz(ConfigFuzzTests):
    seeds = SEEDS
