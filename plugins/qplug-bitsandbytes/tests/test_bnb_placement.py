"""bitsandbytes layers and ``load_quantized(device_map=...)``: any device, but not the disk (named)."""

import pytest
import torch
from bnb_testlib import HF_ALL, logits, make_tiny_llama

import qplug


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_disk_offload_is_refused_by_name_and_a_cpu_map_loads(fmt, tmp_path, input_ids):
    import transformers

    model = qplug.quantize(make_tiny_llama(), qplug.config_from_dict(transformers.BitsAndBytesConfig(
        **HF_ALL[fmt]).to_dict()))
    qplug.save_quantized(model, tmp_path / "q")
    rest = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    layers = {f"model.layers.{i}": "disk" for i in range(model.config.num_hidden_layers)}
    with pytest.raises(qplug.PlacementError, match=r"model\.layers\.0\.\S+ \(Linear(4bit|8bitLt)\) cannot be "
                                                   r"offloaded to disk: .*map it to cpu or a GPU"):
        qplug.load_quantized(tmp_path / "q", device_map={**rest, **layers}, offload_folder=tmp_path / "off")
    placed = qplug.load_quantized(tmp_path / "q", device_map={**rest, **dict.fromkeys(layers, "cpu")})
    assert torch.equal(logits(placed, input_ids), logits(qplug.load_quantized(tmp_path / "q"), input_ids))
