"""load_quantized(device_map=...): placement through accelerate, disk offload, and the errors before any read."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import qplug
from qplug.testing import example_tokens, tiny_llama

REST = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def checkpoint(int8_plugin, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "q")
    return tmp_path / "q", logits(model, example_tokens(model)), example_tokens(model)


def layer_names(directory):
    layers = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    return [f"model.layers.{i}" for i in range(layers)]


def every_other_layer_on_disk(layers):
    return {**REST, **{name: "disk" if i % 2 else "cpu" for i, name in enumerate(layers)}}


def test_a_dict_map_with_disk_offload_gives_identical_logits_and_keeps_those_layers_off_memory(checkpoint, tmp_path):
    directory, reference, tokens = checkpoint
    layers = layer_names(directory)
    device_map = every_other_layer_on_disk(layers)
    model = qplug.load_quantized(directory, device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.hf_device_map == device_map
    offloaded = dict(model.named_parameters()) | dict(model.named_buffers())
    on_disk = [n for n in offloaded if n.startswith(layers[1] + ".")]
    assert on_disk and all(offloaded[n].device.type == "meta" for n in on_disk)
    index = json.loads((tmp_path / "offload" / "index.json").read_text())
    assert set(on_disk) <= set(index)
    assert torch.equal(logits(model, tokens), reference)
    assert torch.equal(logits(model, tokens), reference)  # read back again, not kept


def test_auto_with_a_small_max_memory_offloads_to_disk_with_identical_logits(checkpoint, tmp_path):
    directory, reference, tokens = checkpoint
    model = qplug.load_quantized(directory, device_map="auto", max_memory={"cpu": 20_000},
                                 offload_folder=tmp_path / "offload")
    assert "disk" in model.hf_device_map.values()
    assert torch.equal(logits(model, tokens), reference)


def test_offloaded_layers_hold_nothing_between_forwards_and_run_under_inference_mode(checkpoint, tmp_path, caplog):
    # a kernel layout kept after the forward would be a resident copy of a layer meant to live on disk; and under
    # torch.inference_mode the tensors accelerate's hooks bring back inside the forward are inference tensors,
    # which keep no version counter (the layout's key read it: RuntimeError)
    from qplug.kernels import KernelLayer

    directory, reference, tokens = checkpoint
    layers = layer_names(directory)
    model = qplug.load_quantized(directory, device_map=every_other_layer_on_disk(layers),
                                 offload_folder=tmp_path / "offload")
    caplog.set_level(logging.INFO, logger="qplug.kernels")
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(model(tokens).logits, reference)
        for i, name in enumerate(layers):
            quantized = [m for m in model.get_submodule(name).modules() if isinstance(m, KernelLayer)]
            assert quantized
            for layer in quantized:
                assert layer.kernel is not None  # still reported
                held = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
                if i % 2:
                    assert layer._kernel_state[2] is None and all(t.device.type == "meta" for t in held)
                else:
                    assert layer._kernel_state[2] is not None
    quantized = sum(isinstance(m, KernelLayer) for m in model.modules())
    assert len([r for r in caplog.records if ": kernel " in r.getMessage()]) == quantized  # once a layer, not a forward


def test_a_model_with_layers_on_disk_saves_what_it_loaded(checkpoint, tmp_path):
    from safetensors.torch import load_file

    directory, reference, tokens = checkpoint
    model = qplug.load_quantized(directory, device_map=every_other_layer_on_disk(layer_names(directory)),
                                 offload_folder=tmp_path / "offload")
    assert torch.equal(logits(model, tokens), reference)
    qplug.save_quantized(model, tmp_path / "again")

    def tensors(path):
        return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}

    before, after = tensors(directory), tensors(tmp_path / "again")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_a_model_loaded_under_inference_mode_runs_inside_and_outside_it(checkpoint):
    directory, reference, tokens = checkpoint
    with torch.inference_mode():
        model = qplug.load_quantized(directory)
        assert torch.equal(model(tokens).logits, reference)
    assert torch.equal(logits(model, tokens), reference)


def test_one_device_moves_nothing_and_hooks_nothing(checkpoint):
    directory, reference, tokens = checkpoint
    model = qplug.load_quantized(directory, device_map="cpu")
    assert not hasattr(model, "hf_device_map")
    assert torch.equal(logits(model, tokens), reference)


@pytest.mark.parametrize(("device_map", "message"), [
    ("cuda:7", "'cuda:7' does not exist here"),
    ({**REST}, "places no device for .* tensor"),
    ({"": "cpu", "model.no_such_block": "cpu"}, "names modules the model does not have: model.no_such_block"),
    ({"": "disk"}, "offloads the whole model to disk: pass offload_folder"),
    ({"": "warp-drive"}, "'warp-drive' is not a device"),
    (3.5, "give one of auto, balanced"),
])
def test_a_map_that_cannot_be_applied_is_an_error_naming_what_is_wrong(checkpoint, device_map, message):
    directory, _, _ = checkpoint
    with pytest.raises(qplug.PlacementError, match=message):
        qplug.load_quantized(directory, device_map=device_map)


def test_a_layer_that_refuses_the_disk_is_named(checkpoint, tmp_path, monkeypatch):
    directory, _, _ = checkpoint
    from qplug.kernels import KernelLayer  # the example backend builds its layer class per call: patch the base

    monkeypatch.setattr(KernelLayer, "qplug_disk_offload_refusal", "its state lives elsewhere", raising=False)
    with pytest.raises(qplug.PlacementError, match=r"model\.layers\.1\.\w+\.\w+ \(Int8Linear\) cannot be offloaded "
                                                   r"to disk: its state lives elsewhere"):
        qplug.load_quantized(directory, device_map={**REST, "model.layers.0": "cpu", "model.layers.1": "disk"},
                             offload_folder=tmp_path / "offload")


def test_quantize_on_load_then_placed_equals_the_in_memory_model(int8_plugin, tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    in_memory = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    tokens = example_tokens(in_memory)
    layers = [f"model.layers.{i}" for i in range(in_memory.config.num_hidden_layers)]
    written = {}  # what the offload folder holds when each module is reported quantized

    def on_module(name):
        written[name] = {p.stem for p in (tmp_path / "offload").glob("*.dat")}

    placed = qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "int8-weight"},
                                  device_map={**REST, **dict.fromkeys(layers, "disk")},
                                  offload_folder=tmp_path / "offload", on_module=on_module)
    # each layer went to the offload folder as soon as it was quantized, not at the end
    assert written and all(f"{name}.weight" in files for name, files in written.items())
    held = dict(placed.named_parameters()) | dict(placed.named_buffers())
    assert all(t.device.type == "meta" for name, t in held.items() if name.startswith("model.layers."))
    index = json.loads((tmp_path / "offload" / "index.json").read_text())
    assert {name for name in held if name.startswith("model.layers.")} <= set(index)
    assert torch.equal(logits(placed, tokens), logits(in_memory, tokens))
    qplug.save_quantized(placed, tmp_path / "placed")
    qplug.save_quantized(in_memory, tmp_path / "in-memory")
    assert all((tmp_path / "placed" / f.name).read_bytes() == f.read_bytes()
               for f in (tmp_path / "in-memory").glob("*.safetensors"))


def test_quantize_on_load_refuses_the_disk_for_a_layer_that_cannot_go_there(int8_plugin, tmp_path, monkeypatch):
    from qplug.kernels import KernelLayer  # the example backend builds its layer class per call: patch the base

    monkeypatch.setattr(KernelLayer, "qplug_disk_offload_refusal", "its state is not all in tensors", raising=False)
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    layers = [f"model.layers.{i}" for i in range(2)]
    with pytest.raises(qplug.PlacementError, match=r"model\.layers\.0\.\w+\.\w+ \(Int8Linear\) cannot be offloaded "
                                                   r"to disk: its state is not all in tensors"):
        qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "int8-weight"},
                             device_map={**REST, **dict.fromkeys(layers, "disk")}, offload_folder=tmp_path / "offload")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("device_map", ["cuda:0", "auto"])
def test_cuda_placement(checkpoint, device_map):
    directory, reference, tokens = checkpoint
    model = qplug.load_quantized(directory, device_map=device_map)
    assert any(p.device.type == "cuda" for p in model.parameters()) or any(
        b.device.type == "cuda" for b in model.buffers())
    torch.testing.assert_close(logits(model, tokens.cuda()).cpu(), reference, rtol=1e-3, atol=1e-3)
