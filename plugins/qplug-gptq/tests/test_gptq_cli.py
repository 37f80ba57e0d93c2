"""`qplug quantize --method gptq-4bit` at a terminal: calibration mistakes are caught before the model loads.

qplug-awq's test_awq_cli.py asserts the very same messages for AWQ (issue 17, item 3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import qplug
from qplug.calibration import FILE_FORMATS
from qplug.testing import tiny_llama

METHOD, PRESET = "gptq", "gptq-4bit"
WORDS = "the quick brown fox jumps over a lazy dog while every layer is quantized".split()


def _qplug(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPLUG_")}
    env.update({"COLUMNS": "400", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"})
    return subprocess.run([sys.executable, "-m", "qplug", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def _save_tokenizer(directory):
    """A real word-level tokenizer (ids below the tiny Llama's vocabulary), saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


@pytest.fixture
def unloadable_src(tmp_path):
    """A model directory whose weights are garbage: any error but a calibration one means it was loaded."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_llama(seed=0).config.to_dict()))
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    return src


def test_missing_calibration_fails_before_the_model_loads(unloadable_src, tmp_path):
    proc = _qplug("quantize", unloadable_src, tmp_path / "dst", "--method", PRESET)
    assert proc.returncode == 1
    assert proc.stderr == (f"qplug: error: {METHOD} (preset {PRESET}) calibrates on sample inputs: "
                           f"give them with --calibration FILE ({FILE_FORMATS})\n")


def test_texts_without_a_tokenizer_say_how_to_give_one(unloadable_src, tmp_path):
    texts = tmp_path / "calib.txt"
    texts.write_text("the quick brown fox\na lazy dog\n")
    proc = _qplug("quantize", unloadable_src, tmp_path / "dst", "--method", PRESET, "--calibration", texts)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"qplug: error: --calibration {texts} holds texts, and SRC {unloadable_src} has "
                                  "no tokenizer to turn them into token ids: pass --tokenizer DIR")
    assert "GPTQConfig" not in proc.stderr  # no Python advice at a terminal


def test_texts_are_tokenized_with_srcs_tokenizer_or_tokenizer_dir(tmp_path):
    src, tok = tmp_path / "src", tmp_path / "tok"
    tiny_llama(seed=0).save_pretrained(src)
    _save_tokenizer(tok)
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(4)) + "\n")
    given = _qplug("quantize", src, tmp_path / "q1", "--method", PRESET, "--calibration", texts, "--tokenizer", tok)
    assert given.returncode == 0, given.stderr
    _save_tokenizer(src)  # now SRC has one: no --tokenizer needed
    found = _qplug("quantize", src, tmp_path / "q2", "--method", PRESET, "--calibration", texts)
    assert found.returncode == 0, found.stderr
    # off a terminal, progress is a few log lines on stderr, never a redrawn bar
    assert f"qplug: {METHOD}: 2/2 blocks done" in found.stderr and "\r" not in found.stderr
    first, second = qplug.load_quantized(tmp_path / "q1"), qplug.load_quantized(tmp_path / "q2")
    assert all((a == b).all() for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
