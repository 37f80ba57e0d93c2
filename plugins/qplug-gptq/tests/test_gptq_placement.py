"""GPTQ layers under accelerate's disk offload (``load_quantized(device_map=...)``): the codes are buffers,
read back from the offload folder at each forward."""

import pytest
import torch
from conftest import FIXTURES

import qplug


@pytest.mark.parametrize("name", ["llama-4bit-g32-actorder", "llama-3bit-g32-asym"])
def test_disk_offloaded_gptq_layers_give_identical_logits(name, tmp_path):
    ids = torch.tensor([[1, 5, 9, 20, 3, 7]])
    with torch.no_grad():
        reference = qplug.load_quantized(FIXTURES / name)(ids).logits
    model = qplug.load_quantized(FIXTURES / name, device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
        "model.layers.0": "cpu", "model.layers.1": "disk"}, offload_folder=tmp_path)
    assert model.get_submodule("model.layers.1.mlp.up_proj").qweight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
        assert torch.equal(model(ids).logits, reference)
