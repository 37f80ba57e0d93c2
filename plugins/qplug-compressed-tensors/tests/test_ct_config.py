"""``CompressedTensorsConfig``: real configs write back exactly, the library parses the groups, schemes qplug
cannot run are refused by name with the reason, and listing backends imports neither torch nor the library."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from qplug_compressed_tensors import CompressedTensorsConfig

import qplug
from qplug.testing.fuzz import ConfigFuzzTests

FIXTURES = Path(__file__).parent / "fixtures"


def _args(bits=4, *, symmetric=True, strategy="group", group_size=128, type="int", **more):
    return {"num_bits": bits, "type": type, "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            **more}


#: as llm-compressor releases of 2024-2025 wrote W4A16 checkpoints (every key, sparsity_config and version beside)
W4A16_2024 = {
    "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                  "weights": _args(4)}},
    "format": "pack-quantized", "global_compression_ratio": 1.89, "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
    "version": "0.7.1",
}
#: act-order "group" (weight_g_idx), asymmetric, a preset-name group and a regex ignore
W4A16_ACTORDER = {
    "config_groups": {
        "group_0": {"input_activations": None, "output_activations": None, "targets": ["re:.*mlp.*"],
                    "weights": _args(4, symmetric=False, actorder="group")},
        "W8A16": ["re:.*self_attn.*"],
    },
    "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head", "re:.*layers.0.mlp.down_proj"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}
FP8_DYNAMIC = {
    "config_groups": {"group_0": {
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                              "strategy": "token", "dynamic": True, "actorder": None},
        "output_activations": None, "targets": ["Linear"], "weights": _args(8, type="float", strategy="channel",
                                                                           group_size=None)}},
    "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed",
}


def _fixture_configs():
    return [json.loads(p.read_text())["quantization_config"] for p in sorted(FIXTURES.glob("*/config.json"))]


@pytest.mark.parametrize("data", [W4A16_2024, W4A16_ACTORDER, FP8_DYNAMIC, *_fixture_configs()])
def test_real_configs_write_back_exactly(data):
    config = qplug.config_from_dict(copy.deepcopy(data))
    assert isinstance(config, CompressedTensorsConfig)
    assert config.to_dict() == data
    assert json.loads(config.to_json_string()) == data


def test_the_library_reads_what_qplug_writes():
    from compressed_tensors.quantization import QuantizationConfig

    backend = qplug.get_plugin_manager().get_backend("ct")
    for preset, settings in backend.presets.items():
        config = CompressedTensorsConfig(**settings)
        ours = config.schemes()[0]
        theirs = QuantizationConfig.model_validate(config.to_dict()).config_groups["group_0"].weights
        assert (ours.num_bits, ours.symmetric, ours.strategy, ours.group_size) == \
               (theirs.num_bits, theirs.symmetric, theirs.strategy, theirs.group_size), preset
        config.check_quantizable()


def test_preset_names_and_act_order_groups_are_read():
    schemes = {s.name: s for s in qplug.config_from_dict(W4A16_ACTORDER).schemes()}
    assert schemes["W8A16"].num_bits == 8 and schemes["W8A16"].group_size == 128  # the library's preset
    assert schemes["group_0"].has_g_idx and not schemes["group_0"].symmetric


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"config_groups": FP8_DYNAMIC["config_groups"]}, "config_groups", "activations too"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": _args(4, type="float", strategy="tensor_group",
                                                                          group_size=16)}}},
     "config_groups", "floats"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": _args(3)}}}, "config_groups", "3-bit"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": _args(
        8, strategy="block", group_size=None, block_structure=[128, 128])}}}, "config_groups", "strategy 'block'"),
    ({"format": "marlin-24"}, "config_groups", "format 'marlin-24'"),
    ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}, "sparsity_config",
     "sparsity"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "kv_cache_scheme", "KV cache"),
    ({"transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "transform_config", "transforms"),
    ({"quantization_status": "frozen"}, "quantization_status", "float"),
])
def test_schemes_qplug_cannot_run_are_refused_by_name(change, field, reason):
    config = qplug.config_from_dict({**W4A16_2024, **change})  # reading never fails: the config is valid
    with pytest.raises(qplug.QuantConfigError, match=reason) as info:
        qplug.get_plugin_manager().hook.validate(config=config, model=None)
    assert field in str(info.value)
    if field == "config_groups":
        assert "group_0" in str(info.value)


def test_qplug_backends_lists_what_is_refused_and_why():
    listing = subprocess.run([sys.executable, "-m", "qplug", "backends", "--json"], capture_output=True, text=True,
                             check=True).stdout
    refuses = next(row for row in json.loads(listing) if row["name"] == "compressed-tensors")["refuses"]
    for what, why in (("FP8", "float weights"), ("W8A8", "activation quantization"), ("sparse", "sparsity"),
                      ("kv_cache_scheme", "KV cache"), ("transform_config", "transforms")):
        assert any(what in key and why in reason for key, reason in refuses.items()), (what, refuses)
    table = subprocess.run([sys.executable, "-m", "qplug", "backends"], capture_output=True, text=True,
                           check=True).stdout
    assert "refuses FP8, NVFP4, MXFP4 weights" in table


def test_act_order_group_is_loaded_but_not_made():
    config = qplug.config_from_dict(W4A16_ACTORDER)
    config.check_loadable()
    with pytest.raises(qplug.QuantConfigError, match="actorder"):
        config.check_quantizable()


def test_the_library_rejecting_a_group_is_a_config_error_naming_it():
    bad = {**W4A16_2024, "config_groups": {"mine": {"targets": ["Linear"],
                                                    "weights": _args(4, strategy="token", dynamic=False)}}}
    config = qplug.config_from_dict(bad)
    with pytest.raises(qplug.QuantConfigError, match="mine"):
        config.schemes()
    with pytest.raises(qplug.QuantConfigError, match="preset"):
        qplug.config_from_dict({**W4A16_2024, "config_groups": {"W9A16": ["Linear"]}}).schemes()


def test_listing_backends_imports_neither_torch_nor_the_library():
    code = ("import sys, qplug; qplug.available_backends(); qplug.get_config_class('ct')().to_dict(); "
            "print(sorted(m for m in ('torch', 'compressed_tensors', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class TestConfigFuzz(ConfigFuzzTests):
    seeds = (W4A16_2024, W4A16_ACTORDER, FP8_DYNAMIC, CompressedTensorsConfig().to_dict())
