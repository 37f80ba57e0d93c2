"""`qplug inspect` on bitsandbytes checkpoints, whose statistics nest under the weight's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import qplug


def _qplug(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPLUG_")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"})
    return subprocess.run([sys.executable, "-m", "qplug", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def _inspect(*args) -> subprocess.CompletedProcess:
    return _qplug("inspect", *args)


@pytest.mark.parametrize("command", [["config"], ["config", "show"], ["quantize"], ["inspect"]])
def test_help_examples_name_what_first_party_plugins_install(command):
    """Copied from `--help` into a terminal, every backend or preset an example names exists (issue 17)."""
    help_text = _qplug(*command, "--help").stdout
    examples = [line.split() for line in help_text.split("examples:")[1].splitlines() if line.strip()]
    names = [ex[ex.index("show") + 1] for ex in examples if "show" in ex]
    names += [ex[ex.index("--method") + 1] for ex in examples if "--method" in ex]
    for name in names:
        proc = _qplug("config", "show", name)
        assert proc.returncode == 0, (name, proc.stderr)


@pytest.mark.parametrize("settings", [
    {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    {"load_in_8bit": True},
], ids=["nf4-dq", "int8"])
def test_inspect_groups_the_statistics_with_their_layer(float_checkpoint, tmp_path, settings):
    model = qplug.load_quantized(float_checkpoint, quantization_config={"quant_method": "bitsandbytes", **settings})
    qplug.save_quantized(model, tmp_path / "q")
    proc = _inspect(tmp_path / "q", "--json", "--source", float_checkpoint)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {row["module"]: row for row in report["modules"]}
    assert not [name for name in rows if ".weight" in name]  # no "module" named after a tensor
    q_proj = rows["model.layers.0.self_attn.q_proj"]
    kind = "Linear4bit" if settings.get("load_in_4bit") else "Linear8bitLt"
    assert q_proj["kind"] == kind and q_proj["shape"] == [128, 128]
    assert "weight" in q_proj["tensors"] and q_proj["kernel"]
    assert (4 < q_proj["bits"] < 5.5) if kind == "Linear4bit" else (8 < q_proj["bits"] < 9)
    assert 0 < q_proj["relative_error"] < 0.2
    assert report["totals"]["parameters"] < 2 * sum(p.numel() for p in model.parameters()) + 10**6
    table = _inspect(tmp_path / "q")
    assert table.returncode == 0, table.stderr
    assert "kernels for float32 inputs on the CPU:" in table.stdout


def test_private_keys_stay_in_the_file_and_out_of_what_a_person_reads(float_checkpoint, tmp_path):
    """transformers' ``_load_in_4bit``/``_load_in_8bit`` mirror public fields: written to config.json
    (transformers reads them), never shown by `config show`, `--diff` or inspect (issue 17)."""
    private = ("_load_in_4bit", "_load_in_8bit")
    model = qplug.load_quantized(float_checkpoint, quantization_config={"quant_method": "bitsandbytes",
                                                                        "load_in_4bit": True})
    qplug.save_quantized(model, tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert written["_load_in_4bit"] is True and written["_load_in_8bit"] is False

    shown = _qplug("config", "show", "bitsandbytes")
    preset = _qplug("config", "show", "nf4", "--diff", tmp_path / "q" / "config.json")
    diff = _qplug("config", "show", "bnb", "--diff", tmp_path / "q" / "config.json")
    table = _inspect(tmp_path / "q")
    report = _inspect(tmp_path / "q", "--json")
    for proc in (shown, preset, diff, table, report):
        assert proc.returncode == 0, proc.stderr
        assert not any(key in proc.stdout for key in private), proc.stdout
    assert json.loads(diff.stdout) == {"load_in_4bit": True, "quant_method": "bitsandbytes"}
    config_line = next(line for line in table.stdout.splitlines() if line.startswith("config: "))
    assert json.loads(config_line.removeprefix("config: ")) == {"load_in_4bit": True, "quant_method": "bitsandbytes"}
    assert "load_in_4bit" in json.loads(report.stdout)["config"]


@pytest.mark.parametrize(("data", "lines"), [
    ({"quant_method": "bnb", "load_in_4bit": True, "load_in_8bit": True, "bnb_4bit_quant_typ": "nf4"}, [
        "invalid bitsandbytes config",
        "  load_in_4bit: true given — load_in_4bit and load_in_8bit are both true; choose one (4-bit NF4/FP4 or "
        "8-bit LLM.int8)",
        '  note: unknown key "bnb_4bit_quant_typ" is kept as it is (did you mean "bnb_4bit_quant_type"?)',
    ]),
    ({"quant_method": "bitsandbyts", "load_in_4bit": True}, [
        "invalid config: no installed backend reads it",
        '  quant_method: "bitsandbyts" given — no installed backend has that name (did you mean "bitsandbytes"?). '
        "Backends: ",
    ]),
    ({"quant_method": "BNB", "load_in_4bit": "yes"}, [
        "invalid bitsandbytes config", '  load_in_4bit: "yes" given — expected true or false',
    ]),
    ({"quant_method": "bnb", "load_in_8bit": True}, ["valid bitsandbytes config"]),
], ids=["both-bits-and-typo", "misspelt-method", "alias-and-string", "alias-valid"])
def test_config_validate_speaks_of_bitsandbytes_by_its_name_and_in_json(tmp_path, data, lines):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data))
    proc = _qplug("config", "validate", path)
    assert proc.returncode == (0 if lines[0].startswith("valid") else 1), proc.stderr
    got = proc.stdout.splitlines()
    assert got[0] == f"{path}: {lines[0]}"
    assert len(got) == len(lines)
    for line, expected in zip(got[1:], lines[1:], strict=True):
        assert line.startswith(expected), line
