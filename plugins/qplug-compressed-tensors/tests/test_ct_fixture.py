"""Checkpoints made by the real producer, llm-compressor 0.14 (``fixtures/make_fixtures.py``): GPTQ W4A16,
round-to-nearest W8A16 per channel, AWQ W4A16 asymmetric (its scales folded into the norms).

qplug's logits must match the logits of compressed-tensors' own decompression (stored beside each
checkpoint) within 1e-2 max-abs, and saving the loaded model writes the bytes that were loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from qplug_compressed_tensors.linear import CompressedTensorsLinear
from safetensors.torch import load_file

import qplug

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["tiny-llama-gptq-w4a16", "tiny-llama-rtn-w8a16-channel", "tiny-llama-awq-w4a16-asym"]


def _reference(name):
    ref = load_file(FIXTURES / name / "reference.safetensors")
    return ref["input_ids"], ref["logits"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_the_librarys_decompression(name):
    ids, expected = _reference(name)
    model = qplug.load_quantized(FIXTURES / name)
    layers = [m for m in model.modules() if isinstance(m, CompressedTensorsLinear)]
    assert len(layers) == 14  # every projection of both blocks; lm_head ignored
    with torch.no_grad():
        exact = model.float()(ids).logits  # float32: every kernel sees the exact dequantized weights
    assert (exact - expected).abs().max() < 1e-2
    with torch.no_grad():
        fast = model.to(torch.bfloat16)(ids).logits.float()  # the bfloat16 kernels (tinygemm where it runs)
    rel = float((fast - expected).norm() / expected.norm())
    assert rel < 2e-2, rel


@pytest.mark.parametrize("name", NAMES)
def test_saving_after_forwards_writes_the_loaded_bytes(name, tmp_path):
    ids, _ = _reference(name)
    model = qplug.load_quantized(FIXTURES / name)
    with torch.no_grad():
        model(ids)
    qplug.save_quantized(model, tmp_path / "out")
    original = load_file(FIXTURES / name / "model.safetensors")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(original)
    for key, value in original.items():
        assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
