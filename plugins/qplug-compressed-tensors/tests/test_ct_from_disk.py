"""compressed-tensors GPTQ from disk, block by block (issue 15, item 3): the whole-model path's bytes."""

import pytest

import qplug
from qplug.testing.block_path import (
    assert_block_path_matches_whole_model,
    assert_interrupted_run_resumes,
    calibration_ids,
    checkpoint_files,
    float_checkpoint,
)


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
    return float_checkpoint(tmp_path_factory.mktemp("ct-disk") / "float")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_path_is_byte_identical_to_the_whole_model_path(src, tmp_path, name):
    assert_block_path_matches_whole_model(src, tmp_path, CONFIGS[name])


def test_calibration_is_what_picks_gptq_over_round_to_nearest(src, tmp_path):
    config = CONFIGS["w4a16-g64"]
    qplug.quantize_checkpoint(src, tmp_path / "rtn", config)
    qplug.save_quantized(qplug.load_quantized(src, quantization_config=config), tmp_path / "rtn-on-load")
    qplug.quantize_checkpoint(src, tmp_path / "gptq", config, calibration=calibration_ids())
    rtn = checkpoint_files(tmp_path / "rtn")
    assert rtn == checkpoint_files(tmp_path / "rtn-on-load")  # layer by layer, round-to-nearest
    assert checkpoint_files(tmp_path / "gptq")["model.safetensors"] != rtn["model.safetensors"]


def test_an_interrupted_run_resumes_after_its_last_finished_block(src, tmp_path):
    assert_interrupted_run_resumes(src, tmp_path, CONFIGS["w4a16-asym-actorder"])
