"""qplug.quantize_checkpoint with bitsandbytes: the same bytes as quantize-on-load + save, each module freed."""

from __future__ import annotations

import pytest
import torch
import transformers
from bnb_testlib import HF_WIDE, logits, make_tiny_llama

import qplug
from qplug import disk_quantize


def config(fmt: str):
    return qplug.config_from_dict(transformers.BitsAndBytesConfig(**HF_WIDE[fmt]).to_dict())


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny Llama saved in bfloat16 with tied embeddings, as real checkpoints often are."""
    path = tmp_path_factory.mktemp("bf16")
    make_tiny_llama(tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", list(HF_WIDE))
@pytest.mark.parametrize("max_shard_size", [None, "100KB"])
def test_disk_to_disk_equals_quantize_on_load_then_save(bf16_checkpoint, tmp_path, fmt, max_shard_size, input_ids):
    loaded = qplug.load_quantized(bf16_checkpoint, quantization_config=config(fmt))
    qplug.save_quantized(loaded, tmp_path / "saved", max_shard_size=max_shard_size)
    qplug.quantize_checkpoint(bf16_checkpoint, tmp_path / "disk", config(fmt), max_shard_size=max_shard_size)
    assert files(tmp_path / "disk") == files(tmp_path / "saved")
    assert ("model.safetensors.index.json" in files(tmp_path / "disk")) == (max_shard_size is not None)
    again = qplug.load_quantized(tmp_path / "disk")
    assert torch.equal(logits(again, input_ids), logits(loaded, input_ids))


def held_by(quant_state):
    """The tensors a bitsandbytes QuantState keeps (its nested state's included)."""
    if quant_state is None:
        return []
    found = [v for v in vars(quant_state).values() if isinstance(v, torch.Tensor)]
    return found + held_by(getattr(quant_state, "state2", None))


def test_each_quantized_module_is_freed_once_written(bf16_checkpoint, tmp_path, monkeypatch):
    """Only the module being written holds real tensors: the quantized model never accumulates."""
    import bitsandbytes as bnb

    seen = []
    real = disk_quantize._produce

    def watching(model, plan, source, quantize_one, on_module):
        def check(progress):
            real_tensors = [
                name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
                for t in [*m.parameters(), *m.buffers(), *held_by(m.quant_state)] if t.device.type != "meta"
            ]
            seen.append((progress.module, real_tensors))
            if on_module is not None:
                on_module(progress)

        return real(model, plan, source, quantize_one, check)

    monkeypatch.setattr(disk_quantize, "_produce", watching)
    qplug.quantize_checkpoint(bf16_checkpoint, tmp_path / "disk", config("nf4-dq-bf16"))
    assert len(seen) > 4
    assert all(real_tensors == [] for _, real_tensors in seen), seen
