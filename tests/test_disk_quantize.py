"""Disk-to-disk quantization (issue 15, item 2) and the streaming shard writer beneath it and save_quantized."""

from __future__ import annotations

import contextlib
import itertools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import qplug
from qplug.checkpoint import CheckpointWeights
from qplug.disk_quantize import Progress
from qplug.safetensors_io import SafetensorsFile
from qplug.shards import ShardWriter, parse_size
from qplug.testing import example_tokens, tiny_llama

INT8 = {"quant_method": "int8-weight"}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def float_checkpoint(tmp_path):
    tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(tmp_path / "float")
    return tmp_path / "float"


# ------------------------------------------------------------------ the writer


def mixed_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "a.u8": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=generator),
        "b.bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "c.f32": torch.randn(3, generator=generator),
        "d.i64": torch.arange(3),
        "e.scalar": torch.tensor(2.5, dtype=torch.float16),
        "f.empty": torch.empty(0, 4),
        "g.bool": torch.tensor([True, False, True]),
        "h.strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
    }


@pytest.mark.parametrize("max_shard_size", [None, 40, "1KB"])
def test_shards_load_in_safetensors_and_in_our_strict_reader(tmp_path, max_shard_size):
    tensors = mixed_tensors()
    with ShardWriter(tmp_path, max_shard_size=max_shard_size, metadata={"format": "pt", "k": "v"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        written = writer.finish()
    shards = [p for p in written if p.suffix == ".safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no part files left
    loaded = {}
    for path in shards:
        from_library = load_file(path)  # views the bytes in place: every tensor must be aligned
        with SafetensorsFile(path) as ours:  # entries must tile the data exactly
            assert ours.metadata == {"format": "pt", "k": "v"}
            for name in ours.keys():
                assert torch.equal(ours.get_tensor(name), from_library[name])
        loaded.update(from_library)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    if max_shard_size == 40:
        assert len(shards) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert set(index["weight_map"]) == set(tensors)
        assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
        weights = CheckpointWeights(tmp_path, contextlib.ExitStack())
        assert sorted(weights.names()) == sorted(tensors)
    else:
        assert [p.name for p in shards] == ["model.safetensors"]


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(tmp_path):
    with ShardWriter(tmp_path, max_shard_size=100) as writer:
        writer.add("small", torch.zeros(10, dtype=torch.uint8))
        writer.add("big", torch.zeros(500, dtype=torch.uint8))
        writer.add("small2", torch.zeros(10, dtype=torch.uint8))
        writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {"small": "model-00001-of-00003.safetensors", "big": "model-00002-of-00003.safetensors",
                     "small2": "model-00003-of-00003.safetensors"}


def test_the_writer_refuses_what_it_cannot_write(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.add("x", torch.zeros(2))
        with pytest.raises(qplug.CheckpointError, match="'x' is written twice"):
            writer.add("x", torch.zeros(2))
        with pytest.raises(qplug.CheckpointError, match=r"'m'.*meta device"):
            writer.add("m", torch.empty(2, device="meta"))
        with pytest.raises(qplug.CheckpointError, match=r"'c'.*no dtype"):
            writer.add("c", torch.zeros(2, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []  # part files removed


@pytest.mark.parametrize(("text", "value"), [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("100", 100), (7, 7)])
def test_sizes_parse_like_transformers(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["5 parsecs", 0, -3, "", True, 1.5])
def test_a_bad_size_names_the_field(bad):
    with pytest.raises(qplug.QuantConfigError, match="max_shard_size"):
        parse_size(bad)


# ------------------------------------------------------------------ quantize_checkpoint


@pytest.mark.parametrize("max_shard_size", [None, "300KB"])
def test_disk_to_disk_is_byte_identical_to_quantize_on_load_then_save(int8_plugin, float_checkpoint, tmp_path,
                                                                      max_shard_size):
    loaded = qplug.load_quantized(float_checkpoint, quantization_config=INT8)
    qplug.save_quantized(loaded, tmp_path / "saved", max_shard_size=max_shard_size)
    progress = []
    qplug.quantize_checkpoint(float_checkpoint, tmp_path / "disk", INT8, max_shard_size=max_shard_size,
                              on_module=progress.append)
    assert files(tmp_path / "disk") == files(tmp_path / "saved")
    if max_shard_size is not None:
        assert "model.safetensors.index.json" in files(tmp_path / "disk")
    quantized = [n for n, m in loaded.named_modules() if type(m).__name__ == "Int8Linear"]
    assert [p.module for p in progress] == quantized
    assert [p.done for p in progress] == list(range(1, len(quantized) + 1))
    assert {p.total for p in progress} == {len(quantized)}
    assert all(a.bytes_written < b.bytes_written for a, b in itertools.pairwise(progress))
    tokens = example_tokens(loaded)
    assert torch.equal(logits(qplug.load_quantized(tmp_path / "disk"), tokens), logits(loaded, tokens))


def test_tied_embeddings_come_out_as_save_writes_them(int8_plugin, tmp_path):
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "float")
    loaded = qplug.load_quantized(tmp_path / "float", quantization_config=INT8)
    qplug.save_quantized(loaded, tmp_path / "saved")
    qplug.quantize_checkpoint(tmp_path / "float", tmp_path / "disk", INT8)
    assert files(tmp_path / "disk") == files(tmp_path / "saved")
    with SafetensorsFile(tmp_path / "disk" / "model.safetensors") as weights:
        assert json.loads(weights.metadata["qplug.tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
        assert "lm_head.weight" not in weights
    again = qplug.load_quantized(tmp_path / "disk")
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_skip_is_applied_and_recorded(int8_plugin, float_checkpoint, tmp_path):
    qplug.quantize_checkpoint(float_checkpoint, tmp_path / "disk", INT8, skip=["mlp.down_proj"])
    model = qplug.load_quantized(tmp_path / "disk")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"


def test_a_failure_midway_leaves_the_old_destination_whole(int8_plugin, float_checkpoint, tmp_path):
    target = tmp_path / "out"
    qplug.quantize_checkpoint(float_checkpoint, target, INT8, max_shard_size="200KB")
    (target / "tokenizer.json").write_text("{}")
    before = files(target)
    calls = []

    class Exploding:  # a plugin wrapping every backend's quantize_module, as a telemetry plugin would
        @qplug.hookimpl(wrapper=True)
        def quantize_module(self, name):
            calls.append(name)
            if len(calls) == 9:  # after a shard or more has been assembled in the staging directory
                raise RuntimeError("backend exploded on " + name)
            return (yield)

    exploding = Exploding()
    qplug.register_plugin(exploding)
    with pytest.raises(RuntimeError, match="backend exploded"):
        qplug.quantize_checkpoint(float_checkpoint, target, INT8, max_shard_size="200KB")
    assert len(calls) == 9
    assert files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "out"]  # no staging directory left
    qplug.unregister_plugin(exploding)
    qplug.quantize_checkpoint(float_checkpoint, target, INT8)  # a fresh run starts over and succeeds
    assert (target / "tokenizer.json").read_text() == "{}"
    assert "model.safetensors" in os.listdir(target)


def test_refusals_name_the_problem(int8_plugin, float_checkpoint, tmp_path):
    from helpers import ToyPlugin

    qplug.quantize_checkpoint(float_checkpoint, tmp_path / "q", INT8)
    with pytest.raises(qplug.QPlugError, match="already quantized"):
        qplug.quantize_checkpoint(tmp_path / "q", tmp_path / "q2", INT8)
    qplug.register_plugin(ToyPlugin())
    with pytest.raises(qplug.QPlugError, match="cannot quantize a checkpoint layer by layer"):
        qplug.quantize_checkpoint(float_checkpoint, tmp_path / "toy", {"quant_method": "toy"})
    with pytest.raises(qplug.QuantConfigError, match="max_shard_size"):
        qplug.quantize_checkpoint(float_checkpoint, tmp_path / "bad", INT8, max_shard_size="lots")
    assert not (tmp_path / "toy").exists() and not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    (lambda t: t.pop("model.norm.weight"), r"lacks tensors the model needs: model\.norm\.weight"),
    (lambda t: t.update({"stray.weight": torch.zeros(2)}), r"tensors the model does not: stray\.weight"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(int8_plugin, float_checkpoint,
                                                                              tmp_path, change, message):
    from safetensors.torch import save_file

    path = float_checkpoint / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(qplug.CheckpointError, match=message):
        qplug.quantize_checkpoint(float_checkpoint, tmp_path / "q", INT8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


def test_progress_is_a_named_record():
    assert Progress("m", 1, 2, 3)._asdict() == {"module": "m", "done": 1, "total": 2, "bytes_written": 3}
