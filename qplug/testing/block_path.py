"""Checks for a backend's ``calibrate_blocks`` (calibration block by block from disk): its checkpoint must be
byte for byte what the whole-model path (load, ``quantize``, ``save_quantized``) writes. Needs transformers.

    from qplug.testing.block_path import assert_block_path_matches_whole_model, float_checkpoint

    def test_block_path(tmp_path):
        src = float_checkpoint(tmp_path / "float")
        assert_block_path_matches_whole_model(src, tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 32})
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import qplug
from qplug.testing.models import example_tokens, load_float_model, tiny_llama

__all__ = ["assert_block_path_matches_whole_model", "calibration_ids", "checkpoint_files", "float_checkpoint"]


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
