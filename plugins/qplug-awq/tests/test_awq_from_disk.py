"""AWQ from disk, block by block (issue 15, item 3): the same checkpoint as the whole-model path, byte for byte."""

import pytest
import torch

import qplug
from qplug.testing import example_tokens, load_float_model, tiny_llama

CONFIGS = {
    "gemm-g64": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
    "gemv-no-clip": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv",
                     "apply_clip": False},
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("awq-disk") / "float"
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


@pytest.mark.cuda
def test_blocks_calibrate_on_the_gpu(src, tmp_path):
    config = CONFIGS["gemm-g64"]
    qplug.quantize_checkpoint(src, tmp_path / "gpu", config, calibration=calibration(), device="cuda")
    qplug.quantize_checkpoint(src, tmp_path / "cpu", config, calibration=calibration())
    gpu, cpu = qplug.load_quantized(tmp_path / "gpu"), qplug.load_quantized(tmp_path / "cpu")
    tokens = example_tokens(cpu)
    with torch.no_grad():
        expected = cpu(tokens).logits.float()
        assert (gpu(tokens).logits.float() - expected).norm() / expected.norm() < 0.05
