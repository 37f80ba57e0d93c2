"""AwqConfig: transformers' fields and JSON, autoawq's native keys, and what both transformers versions accept."""

from __future__ import annotations

import json

import attrs
import pytest
import transformers
from qplug_awq.config import AwqConfig

import qplug

# What transformers 4.57 writes for AwqConfig() and for a GEMV, symmetric, g64 config (verbatim).
V4_DEFAULT = json.loads(
    '{"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version": "gemm", '
    '"backend": "autoawq", "fuse_max_seq_len": null, "modules_to_not_convert": null, "exllama_config": null, '
    '"modules_to_fuse": null, "do_fuse": false}'
)
V4_GEMV = {**V4_DEFAULT, "group_size": 64, "zero_point": False, "version": "gemv"}
# What transformers 5.24 writes for AwqConfig(backend="marlin", group_size=64) (verbatim).
V5_MARLIN = json.loads(
    '{"zero_point": true, "modules_to_not_convert": null, "quant_method": "awq", "bits": 4, "tokenizer": null, '
    '"dataset": null, "group_size": 64, "damp_percent": 0.1, "desc_act": false, "act_group_aware": true, '
    '"sym": true, "true_sequential": true, "format": "gemm", "meta": null, "backend": "marlin", '
    '"model_seqlen": null, "block_name_to_quantize": null, "module_name_preceding_first_block": null, '
    '"batch_size": 1, "pad_token_id": null, "max_input_length": null, "cache_block_outputs": true, '
    '"modules_in_block_to_quantize": null, "version": "gemm"}'
)
# autoawq's quant_config.json (native keys, no quant_method) and its config.json section.
AUTOAWQ_NATIVE = {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM", "modules_to_not_convert": None}
AUTOAWQ_HF = {"bits": 4, "group_size": 64, "modules_to_not_convert": None, "quant_method": "awq",
              "version": "gemm", "zero_point": True}


def test_registered_with_alias_and_case_insensitive():
    assert qplug.get_config_class("AWQ") is AwqConfig
    assert qplug.get_config_class("autoawq") is AwqConfig
    assert "awq" in qplug.available_backends()


def test_defaults_are_transformers_v4_defaults():
    cfg = AwqConfig()
    for key, value in V4_DEFAULT.items():
        assert cfg.to_dict()[key] == value, key


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (V4_DEFAULT, {"group_size": 128, "version": "gemm", "backend": "autoawq"}),
        (V4_GEMV, {"group_size": 64, "version": "gemv", "zero_point": False}),
        (V5_MARLIN, {"group_size": 64, "version": "gemm", "backend": "marlin"}),
        (AUTOAWQ_HF, {"group_size": 64, "zero_point": True}),
    ],
    ids=["transformers-v4", "transformers-v4-gemv", "transformers-v5", "autoawq-config.json"],
)
def test_real_configs_load(data, expected):
    cfg = qplug.config_from_dict(data)
    assert isinstance(cfg, AwqConfig)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    assert qplug.config_from_dict(cfg.to_dict()) == cfg


def test_autoawq_native_keys_load_without_quant_method(tmp_path):
    path = tmp_path / "quant_config.json"
    path.write_text(json.dumps(AUTOAWQ_NATIVE))
    cfg = qplug.load_config(path)
    assert (cfg.bits, cfg.group_size, cfg.version, cfg.zero_point) == (4, 64, "gemm", True)
    assert cfg.autoawq_dict() == {**AUTOAWQ_NATIVE, "q_group_size": 64}


def test_conflicting_native_and_hf_keys_name_the_field():
    with pytest.raises(qplug.QuantConfigError, match="group_size"):
        qplug.config_from_dict({"quant_method": "awq", "group_size": 128, "q_group_size": 64})


def test_version_and_backend_are_case_insensitive():
    cfg = AwqConfig.from_dict({"version": "GEMV", "backend": "AutoAWQ"})
    assert (cfg.version, cfg.backend) == ("gemv", "autoawq")
    assert AwqConfig(version="AWQLinearVersion.GEMM").version == "gemm"


def test_v5_format_key_and_llm_awq_format_map_to_v4_spelling():
    assert AwqConfig.from_dict({"format": "gemv"}).version == "gemv"
    cfg = AwqConfig.from_dict({"version": "llm-awq", "format": "llm-awq", "backend": "auto"})
    assert (cfg.version, cfg.backend) == ("gemm", "llm-awq")


def test_unknown_keys_are_kept():
    cfg = qplug.config_from_dict({**V4_DEFAULT, "quantizer": "qplug-test", "extra": {"a": 1}})
    out = cfg.to_dict()
    assert out["quantizer"] == "qplug-test" and out["extra"] == {"a": 1}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bits": 5}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 12}, "group_size"),
        ({"version": "marlin"}, "version"),
        ({"backend": "ipex"}, "backend"),
        ({"zero_point": "yes"}, "zero_point"),
        ({"do_fuse": True}, "fuse_max_seq_len"),
        ({"do_fuse": True, "fuse_max_seq_len": 512, "modules_to_fuse": {"hidden_size": 8}}, "modules_to_fuse"),
        ({"version": "exllama", "exllama_config": {"version": 3}}, "exllama_config"),
        ({"damp_percent": 1.5}, "damp_percent"),
        ({"dataset": "pileval"}, "dataset"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(qplug.QuantConfigError) as info:
        qplug.config_from_dict({"quant_method": "awq", **data})
    assert field in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_do_fuse_follows_transformers_when_unset():
    fuse = {"hidden_size": 8, "num_attention_heads": 1, "num_key_value_heads": 1, "mlp": [], "attention": [],
            "layernorm": [], "use_alibi": False}
    cfg = AwqConfig.from_dict({"do_fuse": None, "modules_to_fuse": fuse, "fuse_max_seq_len": 64})
    assert cfg.do_fuse is True
    assert AwqConfig.from_dict({"do_fuse": None}).do_fuse is False


def test_evolve_revalidates():
    with pytest.raises(qplug.QuantConfigError, match="fuse_max_seq_len"):
        attrs.evolve(AwqConfig(), do_fuse=True)


def test_quantizing_needs_4_bits_and_a_stored_layout_but_loading_does_not():
    assert AwqConfig(bits=8).bits == 8  # loads (transformers accepts it)
    with pytest.raises(qplug.QuantConfigError, match="bits"):
        AwqConfig(bits=8).check_quantizable()
    with pytest.raises(qplug.QuantConfigError, match="version"):
        AwqConfig(version="exllama").check_quantizable()


@pytest.mark.parametrize(
    ("kwargs", "written", "kept"),
    [
        ({"backend": "auto"}, {"backend": "autoawq"}, {}),
        ({"version": "exllama"}, {"version": "gemm"}, {"qplug_version": "exllama"}),
        ({"version": "ipex"}, {"version": "gemm"}, {"qplug_version": "ipex"}),
        ({"backend": "marlin"}, {"backend": "autoawq"}, {"qplug_backend": "marlin"}),
    ],
)
def test_written_json_uses_spellings_both_transformers_accept(kwargs, written, kept):
    cfg = AwqConfig(**kwargs)
    out = cfg.to_dict()
    for key, value in {**written, **kept}.items():
        assert out[key] == value
    assert AwqConfig.from_dict(out) == cfg
    assert AwqConfig.from_dict(cfg.to_diff_dict()) == cfg


def _written_configs():
    return [AwqConfig(), AwqConfig(backend="auto"), AwqConfig(version="exllama"), AwqConfig(version="ipex"),
            AwqConfig(version="GEMV", group_size=64, zero_point=False), AwqConfig(backend="marlin"),
            AwqConfig(backend="llm-awq")]


def test_what_qplug_writes_loads_in_the_installed_transformers():
    major = int(transformers.__version__.split(".")[0])
    for cfg in _written_configs():
        if cfg.backend == "llm-awq" and major < 5:
            continue  # transformers v4 checks for a CUDA GPU of compute capability >= 8 for llm-awq
        loaded = transformers.AwqConfig.from_dict(json.loads(cfg.to_json_string()))
        version = getattr(loaded, "format", None) if major >= 5 else loaded.version
        version = getattr(version, "value", version)
        expected = "llm-awq" if (major >= 5 and cfg.backend == "llm-awq") else cfg.to_dict()["version"]
        assert str(version).lower() == expected, cfg
        assert loaded.group_size == cfg.group_size and loaded.zero_point == cfg.zero_point


def test_transformers_fields_and_defaults_are_all_present():
    theirs = transformers.AwqConfig().to_dict()
    ours = AwqConfig().to_dict()
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"transformers {transformers.__version__} writes keys AwqConfig lacks: {missing}"
    differing = {k: (ours[k], v) for k, v in theirs.items()
                 if k not in ("backend", "quant_method") and ours[k] != getattr(v, "value", v)}
    assert not differing
    assert theirs["backend"] in ("auto", "autoawq")  # v5's "auto" is written as its synonym "autoawq"


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    # the config is exported at the top level, as qplug_bitsandbytes and qplug_gptq export theirs
    code = ("import sys, qplug_awq.plugin; from qplug_awq import AwqConfig; "
            "print(AwqConfig is qplug_awq.config.AwqConfig, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True False"
