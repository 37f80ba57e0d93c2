"""GPTQ from disk, block by block (issue 15, item 3): the same checkpoint as the whole-model path, byte for byte."""

import os
import signal
import subprocess
import sys
import time

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


# A run that stops itself (SIGSTOP) once the first block is on disk, holding its staging directory.
PAUSED_RUN = """
import json, os, signal, sys
import qplug
from qplug.testing.block_path import calibration_ids
src, dst, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def pause(progress):
    if progress.module.startswith("model.layers.1."):
        os.kill(os.getpid(), signal.SIGSTOP)
qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids(), on_module=pause)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's state from /proc; flock")
def test_a_killed_run_leaves_dst_whole_and_the_next_run_removes_its_staging(src, tmp_path):
    import json

    from qplug._io import ABANDONED_AFTER_SECONDS

    dst = tmp_path / "out"
    config = CONFIGS["g32"]
    qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids())
    before = checkpoint_files(dst)
    child = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(src), str(dst), json.dumps(config)])
    try:
        deadline = time.monotonic() + 120
        while not _stopped(child.pid):
            assert child.poll() is None and time.monotonic() < deadline, "the run never reached block 1"
            time.sleep(0.1)
        (staging,) = tmp_path.glob(".out.*.partial")
        old = time.time() - 2 * ABANDONED_AFTER_SECONDS
        os.utime(staging, (old, old))
        # the paused writer still holds its staging directory: a second run leaves it alone
        qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids())
        assert staging.is_dir()
        assert checkpoint_files(dst) == before
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert staging.is_dir() and checkpoint_files(dst) == before  # killed mid-run: DST whole, the staging left behind
    qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids())  # restarts from the first block
    assert not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert checkpoint_files(dst) == before


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"
