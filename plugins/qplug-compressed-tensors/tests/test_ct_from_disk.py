"""compressed-tensors GPTQ from disk, block by block (issue 15, item 3): the whole-model path's bytes."""

import pytest
import torch

import qplug
from qplug.testing import example_tokens, load_float_model, tiny_llama


def scheme(**weights):
    return {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                           "group_size": 64, **weights}}}}


CONFIGS = {
    "w4a16-g64": scheme(),
    "w4a16-asym-actorder": scheme(symmetric=False, actorder="weight"),
    "w8a16-channel": scheme(num_bits=8, strategy="channel", group_size=None),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ct-disk") / "float"
    tiny_llama(seed=0, dtype=torch.bfloat16, num_hidden_layers=3).save_pretrained(directory)
    return directory


def calibration():
    return example_tokens(tiny_llama(), batch=4, length=32, seed=3)


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_path_is_byte_identical_to_the_whole_model_path(src, tmp_path, name):
    model = load_float_model(src)
    qplug.quantize(model, CONFIGS[name], calibration=calibration())
    qplug.save_quantized(model, tmp_path / "whole")
    qplug.quantize_checkpoint(src, tmp_path / "disk", CONFIGS[name], calibration=calibration())
    assert files(tmp_path / "disk") == files(tmp_path / "whole")
    tokens = example_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(qplug.load_quantized(tmp_path / "disk")(tokens).logits, model(tokens).logits,
                                   rtol=0, atol=0)


def test_calibration_is_what_picks_gptq_over_round_to_nearest(src, tmp_path):
    config = CONFIGS["w4a16-g64"]
    qplug.quantize_checkpoint(src, tmp_path / "rtn", config)
    qplug.save_quantized(qplug.load_quantized(src, quantization_config=config), tmp_path / "rtn-on-load")
    qplug.quantize_checkpoint(src, tmp_path / "gptq", config, calibration=calibration())
    assert files(tmp_path / "rtn") == files(tmp_path / "rtn-on-load")  # layer by layer, round-to-nearest
    assert files(tmp_path / "gptq")["model.safetensors"] != files(tmp_path / "rtn")["model.safetensors"]
