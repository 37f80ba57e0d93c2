"""qplug.progress (one display for long work) and qplug.environment (one way to read switches)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ToyConfig, ToyPlugin

import qplug
from qplug import progress
from qplug.environment import env_flag, env_text
from qplug.manager import PluginManager
from qplug.testing import tiny_llama


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "qplug.progress"]


def test_off_a_terminal_a_task_logs_a_few_lines(caplog, monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="qplug.progress"):
        assert list(progress.track(range(100), "gptq", unit="blocks")) == list(range(100))
    lines = _lines(caplog)
    # the start, each quarter, the end: sparse, whatever the number of units
    assert lines[0].startswith("gptq: 0/100 blocks (") and lines[-1].startswith("gptq: 100/100 blocks done (")
    assert [line.split(" (")[0] for line in lines[1:-1]] == ["gptq: 25/100 blocks", "gptq: 50/100 blocks",
                                                            "gptq: 75/100 blocks"]


def test_one_switch_silences_it(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="qplug.progress"):
        monkeypatch.setenv(progress.ENV_VAR, "0")
        list(progress.track(range(4), "quiet"))
        assert _lines(caplog) == []
        with progress.enabled(True):  # the Python argument wins over the variable
            list(progress.track(range(4), "asked"))
        assert _lines(caplog)[0].startswith("asked: 0/4")
        monkeypatch.delenv(progress.ENV_VAR)
        caplog.clear()
        with progress.enabled(False):
            list(progress.track(range(4), "quiet"))
        assert _lines(caplog) == []


def test_quantize_save_and_load_report_progress_unless_told_not_to(int8_plugin, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    model = tiny_llama(seed=0)
    qplug.quantize(model, {"quant_method": "int8-weight"})
    with caplog.at_level(logging.INFO, logger="qplug.progress"):
        qplug.save_quantized(model, tmp_path / "q")
        qplug.load_quantized(tmp_path / "q", tiny_llama(seed=1))
        # quantize-on-load: one task counting the modules as they stream in
        float_dir = tmp_path / "float"
        tiny_llama(seed=0).save_pretrained(float_dir)
        qplug.load_quantized(float_dir, tiny_llama(seed=1), quantization_config={"quant_method": "int8-weight"})
    lines = _lines(caplog)
    assert any(line.startswith(f"saving {tmp_path / 'q'}: 3/3 steps done") for line in lines), lines
    assert any(line.startswith(f"reading {tmp_path / 'q'}: ") and " tensors done" in line for line in lines), lines
    assert any(line.startswith(f"quantizing {float_dir} on load: 14/14 modules done") for line in lines), lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qplug.progress"):
        qplug.save_quantized(model, tmp_path / "q2", progress=False)
        qplug.load_quantized(tmp_path / "q2", tiny_llama(seed=1), progress=False)
    assert _lines(caplog) == []


def test_on_a_terminal_a_live_bar_is_drawn(tmp_path):
    # stderr is a real pseudo-terminal: rich draws (and then clears) the bar; nothing is logged
    code = textwrap.dedent("""
        import logging, time
        logging.basicConfig(level=logging.INFO)
        from qplug import progress
        for _ in progress.track(range(3), "outer", unit="blocks"):
            for _ in progress.track(range(2), "inner", unit="modules"):
                time.sleep(0.05)
        print("finished", flush=True)
    """)
    leader, follower = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != progress.ENV_VAR}
    env.update(TERM="xterm", COLUMNS="100")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=follower, env=env,
                          timeout=120, check=False)
    os.close(follower)
    drawn = b""
    os.set_blocking(leader, False)
    try:
        while chunk := os.read(leader, 65536):
            drawn += chunk
    except (BlockingIOError, OSError):
        pass
    os.close(leader)
    assert proc.returncode == 0 and proc.stdout == b"finished\n"
    text = drawn.decode(errors="replace")
    assert "outer" in text and "inner" in text and "━" in text  # the bar itself
    assert "qplug.progress" not in text  # no log lines on a terminal


def test_environment_flags_read_one_way(monkeypatch):
    for word in ("1", "true", "YES", " on "):
        monkeypatch.setenv("QPLUG_SOME_SWITCH", word)
        assert env_flag("QPLUG_SOME_SWITCH") is True
    for word in ("0", "false", "No", "off"):
        monkeypatch.setenv("QPLUG_SOME_SWITCH", word)
        assert env_flag("QPLUG_SOME_SWITCH", default=True) is False
    monkeypatch.setenv("QPLUG_SOME_SWITCH", " ")
    assert env_flag("QPLUG_SOME_SWITCH", default=True) is True
    monkeypatch.setenv("QPLUG_SOME_SWITCH", "maybe")
    with pytest.raises(qplug.QuantConfigError, match=r"^QPLUG_SOME_SWITCH: 'maybe' given — .*1/true/yes/on"):
        env_flag("QPLUG_SOME_SWITCH")


def test_the_per_forward_environment_read_sees_every_change(monkeypatch):
    # env_text reads CPython's own mapping directly (the kernel switches, read on every forward): it must
    # agree with os.environ.get through sets, changes, non-ASCII values and removal
    monkeypatch.delenv("QPLUG_SOME_SWITCH", raising=False)
    assert env_text("QPLUG_SOME_SWITCH") == "" == os.environ.get("QPLUG_SOME_SWITCH", "")
    for value in ("avx2", "qplug-int4-cpu,bitsandbytes", "ünïcode", ""):
        monkeypatch.setenv("QPLUG_SOME_SWITCH", value)
        assert env_text("QPLUG_SOME_SWITCH") == value == os.environ.get("QPLUG_SOME_SWITCH")
    os.environ["QPLUG_SOME_SWITCH"] = "set directly"
    assert env_text("QPLUG_SOME_SWITCH") == "set directly"
    monkeypatch.delenv("QPLUG_SOME_SWITCH")
    assert env_text("QPLUG_SOME_SWITCH") == ""


@pytest.mark.parametrize(("value", "traced"), [("false", False), ("0", False), ("true", True), ("1", True)])
def test_trace_switch_means_what_it_says(monkeypatch, capsys, value, traced):
    monkeypatch.setenv("QPLUG_TRACE", value)
    manager = PluginManager(autoload=False)
    manager.register(ToyPlugin())
    manager.hook.validate(config=ToyConfig(), model=None)
    assert ("qplug trace: validate" in capsys.readouterr().err) is traced
