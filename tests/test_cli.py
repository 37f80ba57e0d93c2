"""The ``qplug`` command, driven for real: ``python -m qplug ...`` in a subprocess.

Only the example ``int8-weight`` backend takes part (installed as the ``qplug-int8`` distribution,
found through its entry point); other installed qplug plugins are blocked, so the output is the
same wherever the tests run. Commands that need torch are run once each and shared between tests
(module-scoped fixtures), to keep this file quick.

``docs/cli.md`` holds generated blocks (``<!-- qplug-cli: ARGS -->``); a test regenerates them and
fails when the page drifts. Refresh the page with ``QPLUG_REGENERATE_DOCS=1 pytest tests/test_cli.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS_PAGE = REPO / "docs" / "cli.md"
BACKEND = "int8-weight"
HEAVY_MODULES = {"torch", "transformers", "safetensors", "numpy", "bitsandbytes", "auto_gptq", "awq", "triton"}


def _int8_installed() -> bool:
    return any(ep.name == BACKEND for ep in metadata.entry_points(group="qplug"))


pytestmark = pytest.mark.skipif(
    not _int8_installed(), reason="the qplug-int8 example must be installed (pip install docs/examples/qplug-int8)"
)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment the command runs in: only the int8 example backend, a fixed width, no colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPLUG_")}
    others = sorted({ep.name for ep in metadata.entry_points(group="qplug")} - {BACKEND})
    if others:
        env["QPLUG_DISABLED_PLUGINS"] = ",".join(others)
    env.update({"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "PYTHONWARNINGS": "ignore", **extra})
    return env


def qplug(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
          python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *python_args, "-m", "qplug", *map(str, args)],
        capture_output=True, text=True, env=env or cli_env(), cwd=cwd, timeout=300,
    )


def start(*args: str) -> subprocess.Popen:
    """Start a slow command now; collect it later with :func:`finish` (commands overlap)."""
    return subprocess.Popen([sys.executable, "-m", "qplug", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line an error prints on stderr."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("qplug: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny float model directory, and the slow commands run once
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


FLAKY_PLUGIN = """
from typing import ClassVar

import attrs

import qplug
from qplug.config import QuantConfig


@attrs.define(kw_only=True)
class FlakyConfig(QuantConfig):
    quant_method: ClassVar[str] = "flaky"


@attrs.define(kw_only=True)
class NeedsLibConfig(QuantConfig):
    quant_method: ClassVar[str] = "needs-lib"


@qplug.hookimpl
def register_backends():
    return [qplug.Backend(name="flaky", config_class=FlakyConfig, presets={"flaky-1": {}}),
            qplug.Backend(name="needs-lib", config_class=NeedsLibConfig, requires=("no-such-package>=1",))]


@qplug.backend_hookimpl(FlakyConfig)
def replace_modules(config, model, module_names):
    raise RuntimeError("the flaky kernels\\nexploded")
"""


@pytest.fixture(scope="module")
def demo_run(workdir):
    """``qplug demo`` (with ``--plot`` when matplotlib is there), started early; it runs beside the others.

    Besides the int8 example, a third-party distribution brings a backend that fails and one whose
    library is missing.
    """
    from helpers import make_distribution

    site = make_distribution(workdir / "site", "qplug-flaky", "0.1.0", {"flaky_plugin": FLAKY_PLUGIN},
                             {"flaky": "flaky_plugin"})
    args = ["demo"]
    plot = workdir / "demo.png"
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(plot)]
    except ImportError:
        plot = None
    proc = subprocess.Popen([sys.executable, "-m", "qplug", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(PYTHONPATH=str(site)))
    yield lambda: (finish(proc), plot)
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def float_dir(workdir, demo_run) -> Path:
    from qplug.testing import tiny_llama

    path = workdir / "tiny"
    tiny_llama(seed=3).save_pretrained(path)
    (path / "special_tokens_map.json").write_text('{"bos_token": "<s>"}\n')
    return path


@pytest.fixture(scope="module")
def calibration_file(workdir) -> Path:
    path = workdir / "calib.json"
    path.write_text(json.dumps([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]))
    return path


@pytest.fixture(scope="module")
def quantized(workdir, float_dir, calibration_file):
    """``qplug quantize`` with a preset, --set, --skip and --calibration: (process, DST)."""
    dst = workdir / "out" / "tiny-int8"
    proc = qplug("quantize", float_dir, dst, "--method", f"{BACKEND}:int8w", "--set", "compute_dtype=float32",
                 "--set", 'modules_to_not_convert=["model.layers.1.mlp.up_proj"]',  # JSON value
                 "--skip", "model.layers.0.mlp.down_proj", "--calibration", calibration_file)
    assert proc.returncode == 0, proc.stderr
    return proc, dst




# --------------------------------------------------------------------------------------------
# qplug backends
# --------------------------------------------------------------------------------------------


def test_backends_table():
    proc = qplug("backends")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["backend", "status", "libraries", "presets"]
    at = next(i for i, line in enumerate(lines) if line.startswith(BACKEND))
    assert lines[at].split()[1:] == ["available", "torch", metadata.version("torch"), "int8w"]
    assert [line.strip() for line in lines[at + 1:at + 4]] == ["alias int8w", "from qplug-int8 1.0.0", "runs on cpu"]
    assert proc.stderr == ""


def test_backends_json():
    proc = qplug("backends", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    row = rows[BACKEND]
    assert row["status"] == "available"
    assert row["aliases"] == ["int8w"]
    assert (row["distribution"], row["version"]) == ("qplug-int8", "1.0.0")
    assert row["presets"] == {"int8w": {}}
    assert "torch" in row["libraries"] and row["devices"] == ["cpu"]


def test_backends_imports_no_torch_nor_backend_library():
    proc = qplug("backends", python_args=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "qplug" in imported  # the check itself works
    assert not imported & HEAVY_MODULES, sorted(imported & HEAVY_MODULES)


def test_backends_imports_only_what_listing_needs():
    """Cold start (issue 14): listing needs no PEP 508 parser, no logging, no emoji table, no file writer
    and none of the model-side modules; each of these was on the start-up path once."""
    proc = qplug("backends", python_args=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip()
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "qplug.cli.backends" in imported  # the check itself works
    unneeded = {"packaging.requirements", "packaging.markers", "rich._emoji_codes", "qplug._io", "qplug.measure",
                "qplug.checkpoint", "qplug.modules", "qplug.safetensors_io", "qplug.demo", "logging"}
    assert not imported & unneeded, sorted(imported & unneeded)


def test_backends_reports_blocked_and_broken_plugins(tmp_path):
    from helpers import make_distribution

    site = make_distribution(tmp_path, "qplug-broken", "0.3.0", {"broken_plugin": "import no_such_module\n"},
                             {"broken": "broken_plugin"})
    env = cli_env(PYTHONPATH=str(site))
    env["QPLUG_DISABLED_PLUGINS"] = ",".join(filter(None, [env.get("QPLUG_DISABLED_PLUGINS"), BACKEND]))
    proc = qplug("backends", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["broken"]["status"].startswith("failed to load: ModuleNotFoundError")
    assert rows["broken"]["distribution"] == "qplug-broken"
    assert rows[BACKEND]["status"] == "blocked"
    table = qplug("backends", env=env)
    assert "failed to load" in table.stdout and "blocked" in table.stdout


# --------------------------------------------------------------------------------------------
# qplug config show / validate
# --------------------------------------------------------------------------------------------


def test_config_show_defaults_by_name_alias_and_preset():
    outputs = [qplug("config", "show", name) for name in (BACKEND, "INT8W", f"{BACKEND}:int8w")]
    for proc in outputs:
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"bits": 8, "compute_dtype": "float32", "modules_to_not_convert": None,
                                           "quant_method": BACKEND}


def test_config_show_diff(tmp_path):
    given = tmp_path / "q.json"
    given.write_text(json.dumps({"quant_method": BACKEND, "compute_dtype": "bf16", "bits": 8}))
    proc = qplug("config", "show", BACKEND, "--diff", given)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"compute_dtype": "bfloat16", "quant_method": BACKEND}


def test_config_show_errors(tmp_path):
    proc = qplug("config", "show", "no-such-method")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "no backend or preset named 'no-such-method'" in line and BACKEND in line and "int8w" in line
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"quant_method": "no-such-method"}))
    proc = qplug("config", "show", BACKEND, "--diff", other)
    assert proc.returncode == 1
    assert "no-such-method" in error_line(proc)


@pytest.fixture
def config_files(tmp_path):
    files = {
        "good": {"quant_method": BACKEND, "compute_dtype": "bfloat16"},
        "bad": {"quant_method": BACKEND, "bits": 4, "compute_dtype": "int4", "modules_to_not_convert": ["lm_head"]},
        "typo": {"quant_method": BACKEND, "compute_dtyp": "float16"},
        "unknown": {"quant_method": "no-such-method", "bits": 4},
        "misspelt_method": {"quant_method": "int8-weigth", "bits": 8},
        "bad_and_typo": {"quant_method": "INT8W", "bits": True, "compute_dtyp": "float16"},
        "model": {"model_type": "llama", "quantization_config": {"quant_method": BACKEND}},
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    paths["not_json"] = tmp_path / "not.json"
    paths["not_json"].write_text("{quant_method: int8")
    paths["missing"] = tmp_path / "missing.json"
    return paths


def test_config_validate_valid(config_files):
    proc = qplug("config", "validate", config_files["good"], config_files["model"], config_files["typo"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{config_files['good']}: valid {BACKEND} config" in proc.stdout
    assert f"{config_files['model']}: valid {BACKEND} config" in proc.stdout
    assert 'note: unknown key "compute_dtyp" is kept as it is (did you mean "compute_dtype"?)' in proc.stdout


def test_config_validate_invalid_lists_every_problem(config_files):
    proc = qplug("config", "validate", config_files["good"], config_files["bad"])
    assert proc.returncode == 1
    assert f"{config_files['bad']}: invalid {BACKEND} config" in proc.stdout
    assert "  bits: 4 given — expected one of 8" in proc.stdout
    assert '  compute_dtype: "int4" given — expected one of "float32", "bfloat16", "float16"' in proc.stdout
    unknown = qplug("config", "validate", config_files["unknown"])
    assert unknown.returncode == 1
    assert unknown.stdout.splitlines()[:2] == [
        f"{config_files['unknown']}: invalid config: no installed backend reads it",
        f'  quant_method: "no-such-method" given — no installed backend has that name. Backends: {BACKEND} '
        "(see `qplug backends`)",
    ]


def test_config_validate_names_a_misspelt_method_and_suggests_the_right_one(config_files):
    proc = qplug("config", "validate", config_files["misspelt_method"])
    assert proc.returncode == 1
    header, problem = proc.stdout.splitlines()
    assert header == f"{config_files['misspelt_method']}: invalid config: no installed backend reads it"
    assert problem.startswith(f'  quant_method: "int8-weigth" given — no installed backend has that name '
                              f'(did you mean "{BACKEND}"?). Backends: {BACKEND}')
    report = json.loads(qplug("config", "validate", "--json", config_files["misspelt_method"]).stdout)[0]
    assert report["method"] is None and report["status"] == "invalid"


def test_config_validate_an_invalid_file_keeps_its_notes_and_speaks_json(config_files):
    """An alias is reported under the canonical name, values as JSON spells them, the typo note kept."""
    proc = qplug("config", "validate", config_files["bad_and_typo"])
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{config_files['bad_and_typo']}: invalid {BACKEND} config",
        "  bits: true given — expected an integer",
        '  note: unknown key "compute_dtyp" is kept as it is (did you mean "compute_dtype"?)',
    ]
    report = json.loads(qplug("config", "validate", "--json", config_files["bad_and_typo"]).stdout)[0]
    assert report["method"] == BACKEND
    assert report["notes"] == ['unknown key "compute_dtyp" is kept as it is (did you mean "compute_dtype"?)']


def test_config_validate_unreadable(config_files):
    proc = qplug("config", "validate", config_files["bad"], config_files["not_json"], config_files["missing"])
    assert proc.returncode == 2
    assert f"{config_files['not_json']}: unreadable: not valid JSON" in proc.stdout
    assert f"{config_files['missing']}: unreadable: cannot read" in proc.stdout
    as_json = qplug("config", "validate", "--json", config_files["good"], config_files["missing"])
    assert as_json.returncode == 2
    assert [r["status"] for r in json.loads(as_json.stdout)] == ["valid", "unreadable"]


# --------------------------------------------------------------------------------------------
# qplug quantize
# --------------------------------------------------------------------------------------------


def test_quantize_writes_a_loadable_checkpoint(quantized, float_dir):
    proc, dst = quantized
    out = proc.stdout
    assert f"with {BACKEND} (preset int8w)" in out
    assert "12 quantized, 3 skipped (output head: 1, skip patterns: 2)" in out
    assert re.search(r"size +1\.\d+ MiB → \d+\.\d KiB", out), out
    assert re.search(r"bits/param +8\.\d\d in the quantized layers", out), out
    assert re.search(r"time +[\d.]+ s \(load", out) and re.search(r"peak memory +[\d.]+ MiB", out), out
    assert re.search(r"copied +\S+json, \S+json", out) and "special_tokens_map.json" in out, out
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "special_tokens_map.json"]
    assert not [p for p in dst.parent.iterdir() if p.name != dst.name]  # no staging directory left behind
    qconfig = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qconfig["modules_to_not_convert"] == ["model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj"]

    import torch

    import qplug
    from qplug.testing import example_tokens, tiny_llama

    model = qplug.load_quantized(dst)
    reference = tiny_llama(seed=3)
    tokens = example_tokens(reference)
    with torch.no_grad():
        error = (model(tokens).logits - reference(tokens).logits).abs().max()
    assert error < 0.5
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_quantize_bad_input(tmp_path, float_dir, calibration_file):
    dst = tmp_path / "dst"
    cases = [
        (["quantize", tmp_path / "nowhere", dst, "--method", BACKEND], "no such directory"),
        (["quantize", tmp_path, dst, "--method", BACKEND], "no config.json"),
        (["quantize", float_dir, dst, "--method", "no-such-method"], "no backend or preset named 'no-such-method'"),
        (["quantize", float_dir, dst, "--method", BACKEND, "--set", "bitz=4"],
         "--set bitz: Int8WeightConfig has no field 'bitz' (did you mean 'bits'?); "
         "its fields: compute_dtype, modules_to_not_convert, bits"),
        (["quantize", float_dir, dst, "--method", BACKEND, "--set", "bits=4"], "bits: 4 given — expected one of 8"),
        (["quantize", float_dir, dst, "--method", BACKEND, "--set", "novalue"], "expected KEY=VALUE"),
        (["quantize", float_dir, dst], "--method NAME"),
        (["quantize", float_dir, float_dir, "--method", BACKEND], "DST must differ from SRC"),
        (["quantize", float_dir, tmp_path, "--method", BACKEND], "not a model checkpoint; refusing to replace it"),
        (["quantize", float_dir, dst, "--method", BACKEND, "--calibration", tmp_path / "none.json"], "no such file"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases.append((["quantize", float_dir, dst, "--config", bad_json], "not valid JSON"))
    cases.append((["quantize", float_dir, dst, "--method", BACKEND, "--calibration", bad_json], "not valid JSON"))
    # Unwritable DST: its parent is a file, which stops root too (chmod would not).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases.append((["quantize", float_dir, blocker / "dst", "--method", BACKEND], "is not a directory"))
    cases.append((["quantize", float_dir, blocker, "--method", BACKEND], "exists and is not a directory"))
    running = [(args, message, start(*args)) for args, message in cases]  # all at once: each is short
    for args, message, proc in running:
        proc = finish(proc)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert message in error_line(proc), (args, proc.stderr)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad.json"]


def test_set_values_are_json_when_they_parse():
    from qplug_int8.plugin import Int8WeightConfig

    from qplug.cli import CLIError, parse_set

    items = ["bits=8", "compute_dtype=bf16", 'modules_to_not_convert=["lm_head", "re:.*gate.*"]']
    assert parse_set(items, Int8WeightConfig) == {
        "bits": 8, "compute_dtype": "bf16", "modules_to_not_convert": ["lm_head", "re:.*gate.*"]}
    assert parse_set(["modules_to_not_convert=null", "compute_dtype="], Int8WeightConfig) == {
        "modules_to_not_convert": None, "compute_dtype": ""}
    with pytest.raises(CLIError, match="has no field 'quant_method'"):
        parse_set(["quant_method=gptq"], Int8WeightConfig)


def test_calibration_files_are_read_and_checked_before_the_model(tmp_path):
    import torch
    from safetensors.torch import save_file

    from qplug.calibration import Sample
    from qplug.cli import CLIError, load_calibration
    from qplug.errors import QuantConfigError

    def ids(samples):
        assert all(isinstance(s, Sample) for s in samples)
        return [s.input_ids.tolist() for s in samples]

    (tmp_path / "same.json").write_text("[[1, 2, 3], [4, 5, 6]]")
    assert ids(load_calibration(tmp_path / "same.json")) == [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "ragged.jsonl").write_text('[1, 2]\n\n{"input_ids": [3, 4, 5]}\n')
    assert ids(load_calibration(tmp_path / "ragged.jsonl")) == [[1, 2], [3, 4, 5]]
    save_file({"input_ids": torch.arange(8, dtype=torch.int32).reshape(2, 4)}, str(tmp_path / "ids.safetensors"))
    assert ids(load_calibration(tmp_path / "ids.safetensors")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # the same rules as qplug.quantize's, and the same error (a QPlugError: one line at the terminal)
    (tmp_path / "bad.json").write_text("[[1, 2], [3.5]]")
    with pytest.raises(QuantConfigError, match=r"^calibration\[1\]: torch\.float32 given — token ids must be"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(QuantConfigError, match=r"empty\.txt: no samples"):
        load_calibration(tmp_path / "empty.txt")
    # texts need a tokenizer: --tokenizer DIR, else SRC's; the message says which had none
    (tmp_path / "texts.txt").write_text("first sample\n\nsecond sample\n")
    with pytest.raises(CLIError, match=r"holds texts, and SRC .* has no tokenizer .*: pass --tokenizer DIR"):
        load_calibration(tmp_path / "texts.txt", src=tmp_path)
    with pytest.raises(CLIError, match=r"holds texts, and --tokenizer .* has no tokenizer"):
        load_calibration(tmp_path / "texts.txt", src=tmp_path, tokenizer_dir=tmp_path)


def test_debug_shows_the_traceback():
    proc = qplug("--debug", "config", "show", "no-such-method")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "CLIError: no backend or preset named 'no-such-method'" in proc.stderr
    after = qplug("config", "show", "no-such-method", "--debug")
    assert "Traceback (most recent call last)" in after.stderr


# --------------------------------------------------------------------------------------------
# qplug inspect
# --------------------------------------------------------------------------------------------


def test_inspect_table_with_weight_error(quantized, float_dir):
    _, dst = quantized
    proc = qplug("inspect", dst, "--source", float_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{dst}: {BACKEND} (qplug-int8 1.0.0)"
    assert lines[1].startswith("config: {") and "model.layers.0.mlp.down_proj" in lines[1]
    q_proj = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj"))
    fields = q_proj.split()
    assert fields[1:5] == ["Int8Linear", "128×128", "8.25", "16,896"]
    n_int8 = sum(line.split()[1:2] == ["Int8Linear"] for line in lines)
    assert f"kernels for float32 inputs on the CPU: int8pack-cpu ×{n_int8}" in proc.stdout  # the model's dtype
    relative = float(fields[5])
    assert 0 < relative < 0.02
    skipped = next(line for line in lines if line.startswith("model.layers.0.mlp.down_proj")).split()
    assert skipped[1:4] == ["Linear", "128×256", "32.00"] and len(skipped) == 5  # float: no kernel, no error
    assert re.search(r"^21 modules +361,088 params +\d+\.\d\d +[\d,]+", proc.stdout, re.MULTILINE), proc.stdout
    assert f"weight error vs {float_dir}: mean relative" in proc.stdout


def test_inspect_json_names_each_layers_kernel_and_why(quantized):
    _, dst = quantized
    proc = qplug("inspect", dst, "--json", "--dtype", "bfloat16", env={**cli_env(), "QPLUG_KERNEL": "dequant"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kernels_for"] == {"dtype": "bfloat16", "device": "cpu"}
    q_proj = next(row for row in report["modules"] if row["module"] == "model.layers.0.self_attn.q_proj")
    assert (q_proj["kernel"], q_proj["kernel_reason"]) == ("dequant", "requested (QPLUG_KERNEL)")
    proc = qplug("inspect", dst, env={**cli_env(), "QPLUG_KERNEL": "dequant"})
    q_proj = next(line for line in proc.stdout.splitlines() if line.startswith("model.layers.0.self_attn.q_proj"))
    assert q_proj.split()[1:] == ["Int8Linear", "128×128", "8.25", "16,896", "dequant"]
    assert re.search(r"^\d+ layer\(s\) run dequant: requested \(QPLUG_KERNEL\)$", proc.stdout, re.MULTILINE)


def test_inspect_json_without_the_backend(quantized, tmp_path):
    """A checkpoint of a backend that is not installed still shows shapes and bytes, from the headers."""
    import shutil

    _, dst = quantized
    copy = shutil.copytree(dst, tmp_path / "mystery")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "mystery"
    (copy / "config.json").write_text(json.dumps(config))
    proc = qplug("inspect", copy, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "qplug: warning: cannot load the model, so module kinds are unknown: no quantization backend named " \
           "'mystery'" in proc.stderr
    report = json.loads(proc.stdout)
    assert (report["method"], report["provider"]) == ("mystery", "backend not available")
    assert report["config"]["quant_method"] == "mystery" and report["config"]["compute_dtype"] == "float32"
    modules = {row["module"]: row for row in report["modules"]}
    assert modules["model.layers.1.mlp.gate_proj"]["kind"] == "?"
    assert modules["model.layers.1.mlp.gate_proj"]["shape"] == [256, 128]
    assert modules["model.layers.1.mlp.gate_proj"]["tensors"] == {"weight": "I8[256, 128]",
                                                                  "weight_scale": "F32[256, 1]"}
    assert modules["model.layers.1.mlp.gate_proj"]["bytes"] == 256 * 128 + 256 * 4
    assert report["totals"]["parameters"] == 361_088
    assert report["totals"]["bytes"] == sum(row["bytes"] for row in report["modules"])


def test_inspect_bad_input(tmp_path, float_dir):
    proc = qplug("inspect", tmp_path / "nowhere")
    assert proc.returncode == 1 and "no such directory" in error_line(proc)
    proc = qplug("inspect", float_dir)
    assert proc.returncode == 1 and "not quantized" in error_line(proc)


# --------------------------------------------------------------------------------------------
# qplug demo
# --------------------------------------------------------------------------------------------


def test_demo(demo_run):
    proc, plot = demo_run()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a backend failed; the others still ran
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("qplug demo — LlamaForCausalLM: 2 layers")
    header = next(line for line in lines if line.startswith("backend"))
    for column in ("preset", "bits/param", "size", "max err", "mean err", "forward", "round trip"):
        assert column in header
    row = next(line for line in lines if line.startswith(BACKEND)).split()
    _, preset, bits, size, unit, max_err, mean_err, forward, ms, round_trip = row
    assert (preset, bits, unit, ms, round_trip) == ("int8w", "8.22", "KiB", "ms", "OK")
    assert 0 < float(mean_err) <= float(max_err) < 1
    assert float(size) > 0 and float(forward) > 0
    assert next(line for line in lines if line.startswith("flaky")).split() == ["flaky", "flaky-1", "failed", "(1)"]
    assert "(1) flaky flaky-1: RuntimeError: the flaky kernels exploded" in lines
    needs = next(line for line in lines if line.startswith("needs-lib")).split()
    assert needs == ["needs-lib", "(defaults)", "unavailable", "(2)"]
    assert "(2) needs-lib (defaults): needs no-such-package>=1" in lines
    assert re.search(r"^1 run\(s\) OK, 1 failed, in [\d.]+ s$", proc.stdout, re.MULTILINE), proc.stdout
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_plot_without_matplotlib(tmp_path):
    # A matplotlib that cannot be imported, in front of any real one.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    proc = qplug("demo", "--plot", tmp_path / "x.png", env=cli_env(PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 1
    assert "--plot needs matplotlib" in error_line(proc) and "pip install 'qplug[plot]'" in proc.stderr
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# Help, usage errors and the docs page
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["backends"], ["config"], ["config", "show"], ["config", "validate"],
                                     ["quantize"], ["convert"], ["inspect"], ["demo"]])
def test_help_with_examples(command):
    proc = qplug(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: qplug")
    assert "examples:\n  qplug " in proc.stdout


def test_every_way_to_start_the_command_is_the_same_command():
    """The console script, ``python -m qplug`` and ``python -m qplug.cli`` run one parser (the CLI is a package)."""
    script = Path(sys.executable).with_name("qplug")
    if not script.is_file():
        pytest.skip("the qplug console script is not installed beside this interpreter")
    outputs = {
        "-m qplug": qplug("--help").stdout,
        "-m qplug.cli": subprocess.run([sys.executable, "-m", "qplug.cli", "--help"], capture_output=True,
                                       text=True, env=cli_env(), timeout=120).stdout,
        "script": subprocess.run([str(script), "--help"], capture_output=True, text=True, env=cli_env(),
                                 timeout=120).stdout,
    }
    assert outputs["-m qplug"].startswith("usage: qplug")
    assert outputs["-m qplug.cli"] == outputs["-m qplug"] == outputs["script"]
    for command in ("backends", "config", "quantize", "convert", "inspect", "demo"):
        assert f"    {command} " in outputs["script"]


def test_usage_errors():
    assert qplug().returncode == 2
    proc = qplug("quantize", "only-src")
    assert proc.returncode == 2 and "the following arguments are required: DST" in proc.stderr
    assert qplug("frobnicate").returncode == 2


_BLOCK = re.compile(r"<!-- qplug-cli: (?P<args>[^>]*?) -->\n```console\n(?P<body>.*?)```\n", re.DOTALL)


def _docs_output(args: str) -> str:
    """What ``qplug ARGS`` prints with exactly the int8 example registered (no other plugin, blocked or not)."""
    code = (
        "import sys, qplug\n"
        "from qplug_int8 import plugin\n"
        "qplug.register_plugin(plugin, name='int8-weight')\n"
        "from qplug.cli import main\n"
        f"sys.exit(main({args.split()!r}))\n"
    )
    env = cli_env(QPLUG_DISABLE_PLUGIN_AUTOLOAD="1", COLUMNS="100")
    env.pop("QPLUG_DISABLED_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode in (0, 1, 2), proc.stderr
    text = "".join(line.rstrip() + "\n" for line in proc.stdout.splitlines())
    return f"$ qplug {args}\n{text}"


def _normalize(text: str) -> str:
    # Library versions change with the environment; the page shows them as they were when written.
    text = "\n".join(" ".join(line.split()) for line in text.splitlines())
    return re.sub(r'(torch"?:? "?)[0-9][^\s",]*', r"\1VERSION", text)


def test_docs_page_shows_current_output():
    page = DOCS_PAGE.read_text(encoding="utf-8")
    blocks = list(_BLOCK.finditer(page))
    assert len(blocks) >= 3, "docs/cli.md lost its generated blocks"
    if os.environ.get("QPLUG_REGENERATE_DOCS"):
        page = _BLOCK.sub(lambda m: f"<!-- qplug-cli: {m['args']} -->\n```console\n{_docs_output(m['args'])}```\n",
                          page)
        DOCS_PAGE.write_text(page, encoding="utf-8")
        return
    for block in blocks:
        expected = _docs_output(block["args"])
        assert _normalize(block["body"]) == _normalize(expected), (
            f"docs/cli.md is out of date for `qplug {block['args']}`; run "
            "QPLUG_REGENERATE_DOCS=1 python -m pytest tests/test_cli.py -k docs\n" + expected
        )


def test_inspect_and_quantize_read_checkpoints_as_loading_does(tmp_path, float_dir):
    """The command finds and checks weight files with the core's reader, so it names the same faults."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "quantization_config": {"quant_method": BACKEND}}))
    (broken / "model.safetensors").write_bytes(b"abc")
    proc = qplug("inspect", broken)
    assert proc.returncode == 1
    truncated = f"{broken / 'model.safetensors'}: not a safetensors file (truncated: 3 bytes)"
    assert error_line(proc) == f"qplug: error: {truncated}"

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((float_dir / "config.json").read_text())
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    proc = qplug("quantize", sharded, tmp_path / "dst", "--method", BACKEND)
    assert proc.returncode == 1
    assert error_line(proc) == (f"qplug: error: SRC {sharded / 'model.safetensors.index.json'}: tensor 'w' is in "
                                f"'gone.safetensors', which is missing from {sharded}")
