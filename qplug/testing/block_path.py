"""Checks for a backend's ``calibrate_blocks`` (calibration block by block from disk): its checkpoint must be
byte for byte what the whole-model path (load, ``quantize``, ``save_quantized``) writes, and a run interrupted
part way must continue after its last finished block and write the same bytes. Needs transformers.

    from qplug.testing.block_path import (assert_block_path_matches_whole_model, assert_interrupted_run_resumes,
                                          float_checkpoint)

    def test_block_path(tmp_path):
        src = float_checkpoint(tmp_path / "float")
        assert_block_path_matches_whole_model(src, tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 32})
        assert_interrupted_run_resumes(src, tmp_path / "resume", {"quant_method": "gptq", "bits": 4})
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import qplug
from qplug.testing.models import example_tokens, load_float_model, tiny_llama

__all__ = ["Interrupted", "assert_block_path_matches_whole_model", "assert_interrupted_run_resumes",
           "calibration_ids", "checkpoint_files", "float_checkpoint", "progress_lines"]


def float_checkpoint(directory: Path, *, layers: int = 3, seed: int = 0) -> Path:
    """A seeded tiny bfloat16 Llama of ``layers`` blocks saved in ``directory`` (the SRC of a disk run)."""
    tiny_llama(seed=seed, dtype=torch.bfloat16, num_hidden_layers=layers).save_pretrained(directory)
    return directory


def calibration_ids(*, batch: int = 4, length: int = 32, seed: int = 3) -> torch.Tensor:
    """Seeded token ids that fit :func:`tiny_llama`'s vocabulary, as calibration data."""
    return example_tokens(tiny_llama(), batch=batch, length=length, seed=seed)


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    """Every file of a checkpoint directory by name, as bytes (what "byte for byte" compares)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def assert_block_path_matches_whole_model(src: Path, work: Path, config: Mapping[str, Any] | Any) -> torch.nn.Module:
    """Quantize ``src`` with ``config`` both ways under ``work`` (``whole/``, ``disk/``): the files must be
    identical and the disk checkpoint must load to the very logits of the model quantized in memory, which is
    returned."""
    model = load_float_model(src)
    qplug.quantize(model, config, calibration=calibration_ids())
    qplug.save_quantized(model, work / "whole")
    qplug.quantize_checkpoint(src, work / "disk", config, calibration=calibration_ids())
    assert checkpoint_files(work / "disk") == checkpoint_files(work / "whole")
    tokens = example_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(qplug.load_quantized(work / "disk")(tokens).logits, model(tokens).logits,
                                   rtol=0, atol=0)
    return model


class Interrupted(Exception):
    """What :func:`assert_interrupted_run_resumes` raises from ``on_module`` to stop a run part way."""


@contextlib.contextmanager
def progress_lines() -> Iterator[list[str]]:
    """Collect the lines qplug logs to ``qplug.progress`` (progress, and notes such as a run resuming)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("qplug.progress"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def assert_interrupted_run_resumes(src: Path, work: Path, config: Mapping[str, Any] | Any, *,
                                   calibration: Any = None, after_blocks: int = 2) -> None:
    """Stop a run into ``work/out`` once ``after_blocks`` blocks are on disk, then run it again: the rerun
    must say that it resumes after them, report every module as the uninterrupted run into ``work/ref``
    does, write the same bytes, and leave no resume state behind."""
    from qplug.block_resume import resume_directory

    calibration = calibration_ids() if calibration is None else calibration
    expected: list[str] = []
    qplug.quantize_checkpoint(src, work / "ref", config, calibration=calibration,
                              on_module=lambda p: expected.append(p.module))
    finished: set[str] = set()

    def stop(progress: Any) -> None:
        finished.add(re.match(r"(.*?\.\d+)\.", progress.module).group(1))
        if len(finished) == after_blocks:  # that block is on disk: stop before the next one starts
            raise Interrupted(progress.module)

    try:
        qplug.quantize_checkpoint(src, work / "out", config, calibration=calibration, on_module=stop)
    except Interrupted:
        pass
    else:
        raise AssertionError(f"the run never finished {after_blocks} blocks")
    assert not (work / "out").exists() and resume_directory(work / "out").is_dir()
    reported: list[str] = []
    with progress_lines() as lines:
        qplug.quantize_checkpoint(src, work / "out", config, calibration=calibration,
                                  on_module=lambda p: reported.append(p.module))
    assert any(line.startswith(f"resuming after block {after_blocks} of ") for line in lines), lines
    assert reported == expected
    assert checkpoint_files(work / "out") == checkpoint_files(work / "ref")
    assert not resume_directory(work / "out").exists()
