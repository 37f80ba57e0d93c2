"""Hypothesis fuzz of bitsandbytes configs: mutated real configs, as dicts and as files (issue 13).

Nothing but a qplug.QPlugError may escape qplug.config_from_dict / qplug.load_config, each read is
bounded in time, and whatever loads writes standard JSON that reads back equal.
"""

from __future__ import annotations

from qplug.testing.fuzz import ConfigFuzzTests

SEEDS = [
    {  # what transformers writes for NF4 with double quantization
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    },
    {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6,
     "llm_int8_skip_modules": ["lm_head", "model.layers.0.mlp"]},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},  # trimmed, no quant_method
]

class TestConfigFuzz(ConfigFuzzTests):
    seeds = SEEDS
