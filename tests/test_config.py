"""The config protocol: construction, validation, (de)serialisation, unknown keys, inference."""

from __future__ import annotations

import json

import attrs
import pytest
from helpers import ToyConfig, ToyPlugin
from hypothesis import given, settings
from hypothesis import strategies as st

import qplug
from qplug.config import to_float


@pytest.fixture
def toy():
    qplug.register_plugin(ToyPlugin(), name="toy-plugin")


def test_defaults_and_dtype_names(toy):
    import torch

    cfg = ToyConfig(compute_dtype=torch.bfloat16, damp=1 / 2, kind=" FP4 ")
    assert cfg.compute_dtype == "bfloat16" and cfg.kind == "fp4"
    assert ToyConfig(compute_dtype="torch.bfloat16").compute_dtype == "bfloat16"
    assert cfg.to_dict()["compute_dtype"] == "bfloat16"


def test_int_accepted_for_float_but_bool_is_not(toy):
    assert to_float(6) == 6.0 and isinstance(to_float(6), float)
    assert to_float(True) is True and to_float("6") == "6"  # left for the validator to reject
    with pytest.raises(qplug.QuantConfigError):
        ToyConfig(damp=0)
    with pytest.raises(qplug.QuantConfigError, match="bits"):
        ToyConfig(bits=True)


@pytest.mark.parametrize(
    ("changes", "field", "accepted"),
    [
        ({"bits": 3}, "bits", "one of 2, 4, 8"),
        ({"bits": "4"}, "bits", "an integer"),
        ({"damp": 1.0}, "damp", "(0, 1)"),
        ({"kind": "int4"}, "kind", "'nf4', 'fp4'"),
        ({"compute_dtype": "float17"}, "compute_dtype", "'float32', 'bfloat16'"),
        ({"skip_modules": "lm_head"}, "skip_modules", "a list of a string"),
        ({"bits": 2, "kind": "fp4"}, "kind", "fp4 needs bits >= 4"),
    ],
)
def test_errors_name_field_value_and_accepted(toy, changes, field, accepted):
    with pytest.raises(qplug.QuantConfigError) as info:
        ToyConfig(**changes)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, TypeError)
    assert error.field == field
    assert f"ToyConfig.{field}" in str(error) and accepted in str(error)
    assert repr(changes.get(field, changes.get("kind")))[:10] in str(error)


def test_evolve_and_setattr_revalidate(toy):
    cfg = ToyConfig()
    with pytest.raises(qplug.QuantConfigError, match="bits"):
        attrs.evolve(cfg, bits=5)
    with pytest.raises(qplug.QuantConfigError, match="kind"):
        cfg.kind = "int4"
    assert attrs.evolve(cfg, bits=8).bits == 8


def test_to_dict_diff_dict_and_json(toy, tmp_path):
    cfg = ToyConfig(bits=8, skip_modules=("a", "b"))
    full = cfg.to_dict()
    assert full == {"bits": 8, "damp": 0.1, "kind": "nf4", "compute_dtype": "float32",
                    "skip_modules": ["a", "b"], "options": None, "quant_method": "toy"}
    assert cfg.to_diff_dict() == {"bits": 8, "skip_modules": ["a", "b"], "quant_method": "toy"}
    assert ToyConfig().to_diff_dict() == {"quant_method": "toy"}
    assert json.loads(cfg.to_json_string()) == full
    cfg.to_json_file(tmp_path / "q.json")
    assert ToyConfig.from_json_file(tmp_path / "q.json") == cfg
    assert qplug.config_from_dict(cfg.to_diff_dict()) == cfg


def test_unknown_keys_are_kept_written_back_and_reported_once(toy, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="qplug")
    data = {"quant_method": "toy", "bits": 8, "future_key": {"x": 1}}
    cfg = qplug.config_from_dict(data)
    assert cfg.extra_keys == {"future_key": {"x": 1}}
    assert cfg.to_dict()["future_key"] == {"x": 1}
    assert cfg.to_diff_dict()["future_key"] == {"x": 1}
    qplug.config_from_dict(data)
    assert sum("future_key" in r.getMessage() for r in caplog.records) == 1


def test_dispatch_by_name_alias_and_inference(toy):
    assert qplug.get_config_class("toy") is ToyConfig
    assert qplug.get_config_class("  toy-ALIAS ") is ToyConfig
    assert type(qplug.config_from_dict({"quant_method": "TOY", "bits": 2})) is ToyConfig
    assert qplug.config_from_dict({"quant_method": "toy-alias"}).bits == 4
    assert qplug.config_from_dict({"toy_bit": 8}).bits == 8  # inferred: ToyConfig recognises toy_bit


def test_inference_failure_lists_backends(toy):
    with pytest.raises(qplug.UnknownBackendError, match="quant_method") as info:
        qplug.config_from_dict({"bits": 4})
    assert "toy" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_unknown_quant_method(toy):
    with pytest.raises(qplug.UnknownBackendError) as info:
        qplug.config_from_dict({"quant_method": "toyy"})
    assert "'toy'" in str(info.value) and "Registered backends" in str(info.value)


def test_wrong_quant_method_for_class(toy):
    with pytest.raises(qplug.QuantConfigError, match="quant_method"):
        ToyConfig.from_dict({"quant_method": "gptq"})


def test_load_config_bare_whole_and_bad_files(toy, tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"quant_method": "toy", "bits": 8}))
    whole = tmp_path / "config.json"
    whole.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "toy"}}))
    assert qplug.load_config(bare).bits == 8 and qplug.load_config(whole).bits == 4
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"model_type": "llama"}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, message in [(plain, "without a quantization_config"), (broken, "not valid JSON"),
                          (tmp_path / "missing.json", "cannot read")]:
        with pytest.raises(qplug.ConfigFileError, match=message):
            qplug.load_config(path)


def test_with_skips_adds_and_records(toy):
    cfg = ToyConfig(skip_modules=["a"]).with_skips(["b", "a"])
    assert cfg.skip_patterns() == ["a", "b"]


# -- property: nothing but QuantConfigError / UnknownBackendError escapes config_from_dict -----------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["bits", "damp", "kind", "compute_dtype", "skip_modules", "options", "toy_bit",
                               "extra_keys", "quant_method", "_private", "compute_dtype"])
config_dicts = st.dictionaries(field_names | st.text(max_size=8), json_values, max_size=6)
methods = st.sampled_from(["toy", "TOY-alias", "int8-weight", "nope", 3, None, ["toy"]])


@settings(max_examples=300, deadline=None)
@given(data=config_dicts, method=methods)
def test_config_from_dict_raises_only_config_errors(data, method):
    if "toy" not in qplug.get_plugin_manager().backend_names():
        qplug.register_plugin(ToyPlugin(), name="toy-plugin")
    if method is not None:
        data = {**data, "quant_method": method}
    try:
        cfg = qplug.config_from_dict(data)
    except (qplug.QuantConfigError, qplug.UnknownBackendError):
        return
    # Whatever loads must write back what it read and load again to the same config.
    assert qplug.config_from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())


@settings(max_examples=100, deadline=None)
@given(value=json_values)
def test_config_from_dict_rejects_non_objects(value):
    if isinstance(value, dict):
        return
    with pytest.raises(qplug.QuantConfigError):
        qplug.config_from_dict(value)
