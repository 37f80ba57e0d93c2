"""``qplug.convert``'s mechanism, with the example ``int8-weight`` backend (its two conversion hooks).

Every pair of the first-party formats (GPTQ, AWQ, compressed-tensors) is tested beside the plugin that
installs all three: ``plugins/qplug-compressed-tensors/tests/test_ct_convert.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ToyPlugin
from safetensors.torch import load_file, save_file

import qplug
from qplug.testing import example_tokens, tiny_llama


@pytest.fixture
def int8_checkpoint(int8_plugin, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "int8")
    (tmp_path / "int8" / "tokenizer_config.json").write_text("{}\n")
    (tmp_path / "int8" / "notes.txt").write_text("not a checkpoint file\n")
    return tmp_path / "int8"


class Watcher:
    """Another plugin taking part in every conversion: it sees each layer read and written."""

    def __init__(self):
        self.read, self.written = [], []

    @qplug.hookimpl(wrapper=True)
    def read_int_layer(self, name):
        layer = yield
        self.read.append((name, layer.weight.bits, layer.symmetric))
        return layer

    @qplug.hookimpl(wrapper=True)
    def write_int_layer(self, name):
        written = yield
        self.written.append((name, sorted(written.tensors)))
        return written


def test_a_checkpoint_converted_to_its_own_format_is_the_same_checkpoint(int8_checkpoint, tmp_path):
    watcher = Watcher()
    qplug.register_plugin(watcher)
    done = []
    out = qplug.convert(int8_checkpoint, tmp_path / "again", to="int8w", on_layer=done.append)
    assert len(done) == 14 and done[0] == "model.layers.0.self_attn.q_proj"
    assert [name for name, *_ in watcher.read] == done == [name for name, _ in watcher.written]
    assert watcher.read[0][1:] == (8, True)
    assert watcher.written[0][1] == ["weight", "weight_scale"]
    before, after = load_file(int8_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert qplug.load_config(out / "config.json") == qplug.load_config(int8_checkpoint / "config.json")
    assert (out / "tokenizer_config.json").read_text() == "{}\n"
    assert not (out / "notes.txt").exists()  # only the tokenizer and generation files travel
    model = qplug.load_quantized(out)
    with torch.no_grad():
        assert torch.equal(model(example_tokens(model)).logits,
                           qplug.load_quantized(int8_checkpoint)(example_tokens(model)).logits)


def test_requests_that_cannot_work_are_refused_before_any_work(int8_checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(qplug.QuantConfigError, match="compute_dtipe"):
        qplug.convert(int8_checkpoint, out, to="int8-weight", compute_dtipe="float16")
    with pytest.raises(qplug.QuantConfigError, match="max_shard_size"):
        qplug.convert(int8_checkpoint, out, to="int8-weight", max_shard_size="lots")
    with pytest.raises(qplug.ConversionError, match="onto itself"):
        qplug.convert(int8_checkpoint, int8_checkpoint, to="int8-weight")
    qplug.register_plugin(ToyPlugin())
    with pytest.raises(qplug.ConversionError, match=r"cannot write 'toy' layers: no installed plugin implements "
                                                    r"write_int_layer for ToyConfig \(qplug converts between: "
                                                    r".*int8-weight"):
        qplug.convert(int8_checkpoint, out, to="toy")
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    with pytest.raises(qplug.ConversionError, match="holds no quantization_config"):
        qplug.convert(tmp_path / "float", out, to="int8-weight")
    assert not out.exists()


def test_a_broken_layer_midway_leaves_an_existing_destination_whole(int8_checkpoint, tmp_path):
    dst = qplug.convert(int8_checkpoint, tmp_path / "dst", to="int8-weight")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    tensors = load_file(int8_checkpoint / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = torch.ones(256, 2)  # a second column: not this layer's
    save_file(tensors, int8_checkpoint / "model.safetensors", metadata={"format": "pt"})
    done = []
    with pytest.raises(qplug.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*weight_scale"):
        qplug.convert(int8_checkpoint, dst, to="int8-weight", on_layer=done.append)
    assert len(done) == 12  # layer 0, and layer 1 up to its up_proj, were converted and written first
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "int8"]  # no staging directory left behind


def test_the_callers_torch_thread_count_is_restored_after_a_conversion_or_a_failure(int8_checkpoint, tmp_path):
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        qplug.convert(int8_checkpoint, tmp_path / "dst", to="int8-weight",
                      on_layer=lambda name: seen.append(torch.get_num_threads()))
        assert set(seen) == {1} and torch.get_num_threads() == 2  # one thread while converting
        tensors = load_file(int8_checkpoint / "model.safetensors")
        tensors["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(256, 2)
        save_file(tensors, int8_checkpoint / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(qplug.CheckpointError, match="up_proj"):
            qplug.convert(int8_checkpoint, tmp_path / "other", to="int8-weight")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
