"""Hypothesis fuzz of GPTQ configs: mutated real configs, as dicts and as files (issue 13).

Nothing but a qplug.QPlugError may escape qplug.config_from_dict / qplug.load_config, each read is
bounded in time, and whatever loads writes standard JSON that reads back equal.
"""

from __future__ import annotations

import json
from pathlib import Path

from qplug.testing.fuzz import ConfigFuzzTests

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

class TestConfigFuzz(ConfigFuzzTests):
    seeds = SEEDS
