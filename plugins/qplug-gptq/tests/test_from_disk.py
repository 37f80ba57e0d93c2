"""GPTQ from disk, block by block (issue 15, item 3): the same checkpoint as the whole-model path, byte for byte."""

import pytest
import torch

import qplug
from qplug.testing import example_tokens, relative_error
from qplug.testing.block_path import (
    assert_block_path_matches_whole_model,
    calibration_ids,
    checkpoint_files,
    float_checkpoint,
)
from qplug.testing.cli import run_qplug

CONFIGS = {
    "g32": {"quant_method": "gptq", "bits": 4, "group_size": 32},
    "act-order-static": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                         "static_groups": True, "batch_size": 2},
    "8bit-channel-groups-in-block": {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": False,
                                     "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj"],
                                                                      ["mlp.down_proj"]]},
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return float_checkpoint(tmp_path_factory.mktemp("gptq-disk") / "float")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_path_is_byte_identical_to_the_whole_model_path(src, tmp_path, name):
    assert_block_path_matches_whole_model(src, tmp_path, CONFIGS[name])


def test_the_command_calibrates_block_by_block(src, tmp_path):
    import json

    ids = tmp_path / "calibration.json"
    ids.write_text(json.dumps(calibration_ids().tolist()))
    args = ("--method", "gptq-4bit", "--set", "group_size=32", "--calibration", ids)
    done = run_qplug("quantize", src, tmp_path / "disk", *args)
    assert done.returncode == 0, done.stderr
    assert "(read, quantized and written block by block)" in done.stdout
    assert "qplug: calibrating to disk: 3/3 blocks done" in done.stderr
    # a --dtype other than SRC's own loads the whole model first: the other path, in the same conditions
    whole = run_qplug("quantize", src, tmp_path / "whole", *args, "--dtype", "bfloat16")
    assert whole.returncode == 0, whole.stderr
    assert "(load " in whole.stdout
    assert checkpoint_files(tmp_path / "disk") == checkpoint_files(tmp_path / "whole")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_blocks_calibrate_on_the_gpu(src, tmp_path):
    config = CONFIGS["g32"]
    qplug.quantize_checkpoint(src, tmp_path / "gpu", config, calibration=calibration_ids(), device="cuda")
    qplug.quantize_checkpoint(src, tmp_path / "cpu", config, calibration=calibration_ids())
    gpu, cpu = qplug.load_quantized(tmp_path / "gpu"), qplug.load_quantized(tmp_path / "cpu")
    tokens = example_tokens(cpu)
    with torch.no_grad():
        assert relative_error(gpu(tokens).logits.float(), cpu(tokens).logits.float()) < 0.05
