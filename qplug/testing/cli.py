"""The ``qplug`` command driven as a user drives it, for any backend: a base class for its test suite.

Subclass :class:`CLITests` in your plugin's tests, naming a ``--method`` (:class:`CalibratingCLITests` for a
method that calibrates)::

    from qplug.testing.cli import CalibratingCLITests

    class TestGPTQAtTheTerminal(CalibratingCLITests):
        method = "gptq-4bit"

Every test runs ``python -m qplug`` in a subprocess, on a tiny seeded Llama saved with
transformers (no model hub): ``quantize`` (with calibration token ids when the backend calibrates),
then ``inspect`` and ``config validate`` on what it wrote. A backend that calibrates must also refuse
a missing ``--calibration`` before loading the model, say how to give a tokenizer for calibration
texts, and tokenize them with ``--tokenizer DIR`` or the tokenizer in SRC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

__all__ = ["CLITests", "CalibratingCLITests", "run_qplug"]

#: Words of the tiny calibration texts; the word-level tokenizer gives them ids below the tiny vocabulary.
WORDS = "the quick brown fox jumps over a lazy dog while every layer is quantized".split()


def run_qplug(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m qplug ARGS`` as a user runs it: no ``QPLUG_*`` settings, wide plain output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPLUG_")}
    env.update({"COLUMNS": "400", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"})
    return subprocess.run([sys.executable, "-m", "qplug", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def save_word_tokenizer(directory: Path) -> None:
    """A real word-level tokenizer (ids below the tiny Llama's vocabulary), saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


class CLITests:
    """``qplug quantize``, ``inspect`` and ``config validate`` for one backend, in subprocesses."""

    #: what ``--method`` is given (a backend name or alias, a preset, or BACKEND:PRESET)
    method: ClassVar[str]
    #: whether the method calibrates on sample inputs (``--calibration``)
    calibrates: ClassVar[bool] = False
    #: the start of the error a missing ``--calibration`` gives, naming the method (``"gptq (preset gptq-4bit)"``)
    label: ClassVar[str | None] = None
    #: a progress line ``quantize`` writes to stderr off a terminal (``"qplug: calibrating to disk: 2/2 blocks done"``)
    progress_line: ClassVar[str | None] = None

    @pytest.fixture
    def src(self, tmp_path: Path) -> Path:
        from qplug.testing import tiny_llama

        tiny_llama(seed=0).save_pretrained(tmp_path / "src")
        return tmp_path / "src"

    @pytest.fixture
    def unloadable_src(self, tmp_path: Path) -> Path:
        """A model directory whose weights are garbage: any error but a calibration one means it was loaded."""
        from qplug.testing import tiny_llama

        src = tmp_path / "unloadable"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(tiny_llama(seed=0).config.to_dict()))
        (src / "model.safetensors").write_bytes(b"not a safetensors file")
        return src

    def _calibration_ids(self, tmp_path: Path) -> list[str]:
        if not self.calibrates:
            return []
        ids = tmp_path / "calibration.json"
        ids.write_text(json.dumps([[(7 * i + j) % 200 + 1 for j in range(32)] for i in range(4)]))
        return ["--calibration", str(ids)]

    def test_quantize_then_inspect_and_validate_what_it_wrote(self, src: Path, tmp_path: Path) -> None:
        dst = tmp_path / "dst"
        done = run_qplug("quantize", src, dst, "--method", self.method, *self._calibration_ids(tmp_path))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"Quantized {src} → {dst} with ")
        assert "\r" not in done.stderr  # off a terminal, progress is log lines, never a redrawn bar
        if self.progress_line is not None:
            assert self.progress_line in done.stderr, done.stderr
        shown = run_qplug("inspect", dst, "--json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert report["load_error"] is None
        quantized = [m for m in report["modules"] if "kernel" in m]
        assert len(quantized) >= 7  # the decoder layers' projections, each with the kernel it runs
        assert all(m["bits"] < 16 and m["kind"] != "?" for m in quantized), quantized
        table = run_qplug("inspect", dst)
        assert table.returncode == 0 and quantized[0]["module"] in table.stdout, table.stderr
        checked = run_qplug("config", "validate", dst / "config.json")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"{dst / 'config.json'}: valid " in checked.stdout



class CalibratingCLITests(CLITests):
    """:class:`CLITests` for a method that calibrates: calibration mistakes are caught before the model loads,
    and calibration texts are tokenized with ``--tokenizer DIR`` or the tokenizer in SRC."""

    calibrates: ClassVar[bool] = True

    def test_missing_calibration_fails_before_the_model_loads(self, unloadable_src: Path, tmp_path: Path) -> None:
        from qplug.calibration import FILE_FORMATS

        proc = run_qplug("quantize", unloadable_src, tmp_path / "dst", "--method", self.method)
        assert proc.returncode == 1
        assert proc.stderr == (f"qplug: error: {self.label or self.method} calibrates on sample inputs: "
                               f"give them with --calibration FILE ({FILE_FORMATS})\n")

    def test_texts_without_a_tokenizer_say_how_to_give_one(self, unloadable_src: Path, tmp_path: Path) -> None:
        texts = tmp_path / "calib.txt"
        texts.write_text("the quick brown fox\na lazy dog\n")
        proc = run_qplug("quantize", unloadable_src, tmp_path / "dst", "--method", self.method, "--calibration", texts)
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"qplug: error: --calibration {texts} holds texts, and SRC {unloadable_src} "
                                      "has no tokenizer to turn them into token ids: pass --tokenizer DIR")
        assert "Config(" not in proc.stderr  # no Python advice at a terminal

    def test_texts_are_tokenized_with_srcs_tokenizer_or_tokenizer_dir(self, src: Path, tmp_path: Path) -> None:
        import qplug

        tok = tmp_path / "tok"
        save_word_tokenizer(tok)
        texts = tmp_path / "calib.txt"
        texts.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(4)) + "\n")
        given = run_qplug("quantize", src, tmp_path / "q1", "--method", self.method, "--calibration", texts,
                          "--tokenizer", tok)
        assert given.returncode == 0, given.stderr
        save_word_tokenizer(src)  # now SRC has one: no --tokenizer needed
        found = run_qplug("quantize", src, tmp_path / "q2", "--method", self.method, "--calibration", texts)
        assert found.returncode == 0, found.stderr
        first, second = qplug.load_quantized(tmp_path / "q1"), qplug.load_quantized(tmp_path / "q2")
        assert all((a == b).all() for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))
