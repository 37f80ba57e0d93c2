"""Configs from strangers: patterns checked at validation, no raw exceptions, bounded work (issue 13, items 7-8)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import ToyConfig, ToyPlugin, run_python

import qplug
from qplug.modules import name_matches, select_modules
from qplug.testing import tiny_llama

SLOW_REGEX = "re:(.|.)*Z"  # exponential for a backtracking matcher on any name without a Z


@pytest.fixture
def toy():
    qplug.register_plugin(ToyPlugin(), name="toy-plugin")


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging for minutes) when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise AssertionError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- item 7: regexes are compiled at validation and matched in bounded time -------------------------


@pytest.mark.parametrize("pattern", ["re:(", "re:[a-", "re:(?<=x)y", r"re:(a)\1"])
def test_invalid_skip_regex_is_a_config_error_naming_the_field(toy, pattern):
    with pytest.raises(qplug.QuantConfigError, match="skip_modules") as info:
        qplug.config_from_dict({"quant_method": "toy", "skip_modules": ["lm_head", pattern]})
    assert info.value.field == "skip_modules" and info.value.value == pattern
    with pytest.raises(qplug.QuantConfigError, match="skip_modules"):
        ToyConfig().with_skips([pattern])
    with pytest.raises(qplug.QuantConfigError, match="skip"):
        name_matches("lm_head", pattern)


def test_exponential_skip_regex_is_matched_in_linear_time():
    model = tiny_llama()
    with deadline(10):  # (an alarm cannot interrupt Python's re, which would hang here instead)
        selection = select_modules(model, [SLOW_REGEX, "re:(a*)*b"], warn_unmatched=False)
        assert selection.unmatched_patterns == [SLOW_REGEX, "re:(a*)*b"]
        assert not name_matches("model.layers.0.self_attn.q_proj" * 10, SLOW_REGEX)


def test_load_quantized_with_an_exponential_skip_regex_is_quick(int8_plugin, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["modules_to_not_convert"] = [SLOW_REGEX]
    config_path.write_text(json.dumps(config))
    # In a child process with a timeout: a backtracking matcher would hang in C, where no alarm reaches it.
    code = f"""
    import sys, qplug
    sys.path.insert(0, {str(int8_plugin.__file__).rsplit("/qplug_int8/", 1)[0]!r})
    from qplug_int8 import plugin
    if "int8-weight" not in qplug.get_plugin_manager().backend_names():
        qplug.register_plugin(plugin)
    loaded = qplug.load_quantized({str(tmp_path / "ckpt")!r})
    print(qplug.quantized_config(loaded).modules_to_not_convert)
    """
    started = time.perf_counter()
    try:
        proc = run_python(code, env={"PYTHONWARNINGS": "ignore"}, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("load_quantized ran for minutes on an exponential skip regex")
    assert proc.stdout.strip() == repr([SLOW_REGEX])
    assert time.perf_counter() - started < 120


def test_config_validate_reports_a_bad_regex(tmp_path):
    path = tmp_path / "quantization_config.json"
    path.write_text(json.dumps({"quant_method": "int8-weight", "modules_to_not_convert": ["re:(q|k_proj"]}))
    env = {"QPLUG_DISABLED_PLUGINS": "qplug-bitsandbytes,qplug-gptq,qplug-awq", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "qplug", "config", "validate", str(path)], capture_output=True,
                          text=True, env={**_environ(), **env}, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{path}: invalid int8-weight config" in proc.stdout
    assert 'modules_to_not_convert: "re:(q|k_proj" given' in proc.stdout  # spelled as in the JSON file
    assert "missing ')'" in proc.stdout


def _environ():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("QPLUG_")}


# -- item 8: other config gaps --------------------------------------------------------------------


def test_deeply_nested_json_is_a_config_error(toy, tmp_path):
    deep = inner = {}
    for _ in range(100_000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(qplug.QuantConfigError, match="nested more than"):
        qplug.config_from_dict({"quant_method": "toy", "options": deep})
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(qplug.QuantConfigError, match="options"):
        qplug.config_from_dict({"quant_method": "toy", "options": cyclic})
    path = tmp_path / "deep.json"
    path.write_text('{"quant_method": "toy", "options": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(qplug.ConfigFileError, match="nested too deeply"):
        qplug.load_config(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architectures": 5}, "architectures: 5 given"),
        ({"architectures": [["LlamaForCausalLM"]]}, "architectures"),
        ({"architectures": ["not a class"]}, "architectures"),
        ({"model_type": ["llama"]}, "model_type: ['llama'] given"),
        ({"model_type": 7}, "model_type"),
    ],
)
def test_model_config_fields_of_the_wrong_type_are_config_errors(toy, tmp_path, fields, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **fields, "quantization_config": {"quant_method": "toy"}}))
    with pytest.raises(qplug.ConfigFileError, match=re.escape(message)):
        qplug.load_config(path)
    from qplug.config import check_model_config

    with pytest.raises(qplug.ConfigFileError, match=re.escape(message)):
        check_model_config({"model_type": "llama", **fields})
    check_model_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize("fields", [{"architectures": 5}, {"architectures": ["pipeline"]}, {"model_type": ["llama"]}])
def test_load_quantized_refuses_model_config_fields_of_the_wrong_type(int8_plugin, tmp_path, fields):
    model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **fields}))
    with pytest.raises(qplug.ConfigFileError, match=next(iter(fields))):
        qplug.load_quantized(tmp_path / "ckpt")


def test_load_quantized_refuses_a_deeply_nested_config_json(int8_plugin, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(config_path.read_text()[:-2] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    try:
        qplug.load_quantized(tmp_path / "ckpt")
    except qplug.ConfigFileError as exc:
        assert "nested too deeply" in str(exc)
    except Exception as exc:  # not chained: formatting a RecursionError's traceback takes pytest a minute
        raise AssertionError(f"raw {type(exc).__name__}: {str(exc)[:100]}") from None
    else:
        raise AssertionError("a 100k-deep config.json loaded")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_anywhere(toy, value):
    with pytest.raises(qplug.QuantConfigError, match="damp") as info:
        qplug.config_from_dict({"quant_method": "toy", "damp": value})
    assert info.value.field == "damp"
    with pytest.raises(qplug.QuantConfigError, match="extra_setting"):
        qplug.config_from_dict({"quant_method": "toy", "extra_setting": {"threshold": value}})


def test_huge_integers_name_the_field_and_keep_the_message_short(toy):
    data = {"quant_method": "toy", "damp": 10**400, "skip_modules": ["x" * 50] * 1000}
    with pytest.raises(qplug.QuantConfigError) as info:
        qplug.config_from_dict(data)
    assert info.value.field == "damp"
    assert len(str(info.value)) < 400


def test_config_errors_never_dump_the_input(toy, monkeypatch):
    def boom(cls, data):
        raise RuntimeError("normalize failed")

    monkeypatch.setattr(ToyConfig, "normalize_dict", classmethod(boom))
    with pytest.raises(qplug.QuantConfigError, match="RuntimeError: normalize failed") as info:
        qplug.config_from_dict({"quant_method": "toy", "payload": "y" * 10_000})
    assert "yyyy" not in str(info.value)


def test_a_bare_string_skip_is_one_pattern(int8_plugin):
    cfg = qplug.config_from_dict({"quant_method": "int8-weight"})
    assert cfg.with_skips("model.layers.0").skip_patterns() == ["model.layers.0"]
    model = qplug.quantize(tiny_llama(seed=0), cfg, skip="model.layers.0")
    assert qplug.quantized_config(model).modules_to_not_convert == ["model.layers.0"]
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"
    assert type(model.model.layers[1].mlp.up_proj).__name__ != "Linear"
    assert select_modules(tiny_llama(), "model", warn_unmatched=False).names == []


def test_bounded_time_for_a_large_flat_config(toy):
    started = time.perf_counter()
    with pytest.raises(qplug.QuantConfigError):
        qplug.config_from_dict({"quant_method": "toy", "skip_modules": [1] * 1_000_000})
    assert time.perf_counter() - started < 10


def test_kept_keys_given_directly_must_be_json_too(toy):
    with pytest.raises(qplug.QuantConfigError, match="threshold"):
        ToyConfig(extra_keys={"threshold": math.inf})
    assert "NaN" not in ToyConfig(extra_keys={"threshold": 1.5}).to_json_string()
