"""AWQ from disk, block by block (issue 15, item 3): the same checkpoint as the whole-model path, byte for byte."""

import pytest
import torch

import qplug
from qplug.testing import example_tokens, relative_error
from qplug.testing.block_path import (
    assert_block_path_matches_whole_model,
    assert_interrupted_run_resumes,
    calibration_ids,
    float_checkpoint,
)

CONFIGS = {
    "gemm-g64": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
    "gemv-no-clip": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv",
                     "apply_clip": False},
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return float_checkpoint(tmp_path_factory.mktemp("awq-disk") / "float")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_path_is_byte_identical_to_the_whole_model_path(src, tmp_path, name):
    assert_block_path_matches_whole_model(src, tmp_path, CONFIGS[name])


@pytest.mark.cuda
def test_blocks_calibrate_on_the_gpu(src, tmp_path):
    config = CONFIGS["gemm-g64"]
    qplug.quantize_checkpoint(src, tmp_path / "gpu", config, calibration=calibration_ids(), device="cuda")
    qplug.quantize_checkpoint(src, tmp_path / "cpu", config, calibration=calibration_ids())
    gpu, cpu = qplug.load_quantized(tmp_path / "gpu"), qplug.load_quantized(tmp_path / "cpu")
    tokens = example_tokens(cpu)
    with torch.no_grad():
        assert relative_error(gpu(tokens).logits.float(), cpu(tokens).logits.float()) < 0.05


def test_an_interrupted_run_resumes_after_its_last_finished_block(src, tmp_path):
    assert_interrupted_run_resumes(src, tmp_path, CONFIGS["gemm-g64"])
