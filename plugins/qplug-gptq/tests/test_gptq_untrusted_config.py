"""GPTQModel's ``dynamic`` from a stranger's checkpoint: checked when read, matched in bounded time (issue 13)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qplug_gptq.config import GPTQConfig

import qplug

FIXTURE = Path(__file__).parent / "fixtures" / "llama-4bit-g32-actorder"
SLOW_KEY = "-:(.|.)*Z"  # exponential for Python's backtracking re on every module name


@pytest.mark.parametrize(
    ("overrides", "accepted"),
    [
        ({"bits": "abc"}, "bits of '+:.*mlp': expected an integer"),
        ({"bits": 5}, "bits of '+:.*mlp': expected one of 2, 3, 4, 8"),
        ({"group_size": 0}, "group_size of '+:.*mlp': expected -1"),
        ({"group_size": 10**100}, "group_size of '+:.*mlp'"),
        ({"sym": "yes"}, "sym of '+:.*mlp'"),
    ],
)
def test_bad_dynamic_overrides_fail_at_config_validation(overrides, accepted):
    with pytest.raises(qplug.QuantConfigError, match="dynamic") as info:
        qplug.config_from_dict({"quant_method": "gptq", "dynamic": {"+:.*mlp": overrides}})
    assert info.value.field == "dynamic" and accepted in info.value.accepted


@pytest.mark.parametrize(
    ("dynamic", "message"),
    [
        ({"+:(": {}}, "missing ')'"),
        ({"-:(?!x)": {}}, "unsupported group"),
        ({".*": 4}, "must be a JSON object"),
        (["+:.*"], "expected a JSON object"),
    ],
)
def test_bad_dynamic_keys_fail_at_config_validation(dynamic, message):
    with pytest.raises(qplug.QuantConfigError, match="dynamic") as info:
        qplug.config_from_dict({"quant_method": "gptq", "dynamic": dynamic})
    assert message in str(info.value)


def test_group_size_is_bounded():
    with pytest.raises(qplug.QuantConfigError, match="group_size"):
        GPTQConfig(group_size=10**100)


def test_dynamic_matching_keeps_gptqmodel_semantics_in_linear_time():
    cfg = GPTQConfig(extra_keys={"dynamic": {SLOW_KEY: {}, r"+:.*\.mlp\.down": {"bits": 8}, r"-:.*o_proj$": {}}})
    started = time.perf_counter()
    assert cfg.module_settings("model.layers.0.self_attn.q_proj" * 10)["bits"] == 4
    assert time.perf_counter() - started < 2
    assert cfg.module_settings("model.layers.3.mlp.down_proj")["bits"] == 8  # re.match: a prefix matches
    assert cfg.module_settings("model.layers.3.self_attn.o_proj") is None


def test_load_quantized_with_an_exponential_dynamic_key_is_quick(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {SLOW_KEY: {}}
    (ckpt / "config.json").write_text(json.dumps(config))
    # In a child process with a timeout: a backtracking matcher would hang in C, where no alarm reaches it.
    code = f"import qplug; m = qplug.load_quantized({str(ckpt)!r}); print(type(m.model.layers[0].mlp.up_proj).__name__)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("load_quantized ran for minutes on an exponential dynamic key")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "GPTQLinear"
