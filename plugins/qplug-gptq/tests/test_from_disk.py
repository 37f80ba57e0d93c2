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
    progress_lines,
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


def test_the_command_resumes_after_the_blocks_an_interrupted_run_finished(src, tmp_path, monkeypatch):
    import json

    from qplug.testing.block_path import Interrupted

    def stop(progress):
        if progress.module.startswith("model.layers.1."):
            raise Interrupted

    ids = tmp_path / "calibration.json"
    ids.write_text(json.dumps(calibration_ids().tolist()))
    args = ("--method", "gptq-4bit", "--set", "group_size=32", "--calibration", ids)
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32}  # what those arguments build
    # the command's torch threads, as this process's (conftest): the thread count changes GPTQ's bytes, so a
    # run with another one starts over
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    for restart, expect in ((False, "resuming after block 2 of 3"), (True, "(restart); starting from the first block")):
        with pytest.raises(Interrupted):
            qplug.quantize_checkpoint(src, tmp_path / "out", config, calibration=calibration_ids(), on_module=stop)
        done = run_qplug("quantize", src, tmp_path / "out", *args, *(("--restart",) if restart else ()))
        assert done.returncode == 0, done.stderr
        assert expect in done.stderr
        assert "21 quantized" in done.stdout  # the resumed blocks' modules counted too
        assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json", "out"]
    qplug.quantize_checkpoint(src, tmp_path / "ref", config, calibration=calibration_ids())
    written = checkpoint_files(tmp_path / "out")
    assert written.pop("generation_config.json")  # the command copies SRC's
    assert written == checkpoint_files(tmp_path / "ref")


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


# A run that stops itself (SIGSTOP) once its second block is on disk, holding its staging directory.
PAUSED_RUN = """
import json, os, signal, sys
import torch
import qplug
from qplug.testing.block_path import calibration_ids
src, dst, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))  # the test's: a run with another thread count starts over
def pause(progress):
    if progress.module.startswith("model.layers.1."):  # reported once block 1 is written
        os.kill(os.getpid(), signal.SIGSTOP)
qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids(), on_module=pause)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's state from /proc; flock")
def test_a_killed_run_leaves_dst_whole_and_the_next_run_resumes_after_its_last_block(src, tmp_path):
    import json

    from qplug._io import ABANDONED_AFTER_SECONDS
    from qplug.block_resume import resume_directory

    dst = tmp_path / "out"
    config = CONFIGS["g32"]
    qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids())
    before = checkpoint_files(dst)
    child = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(src), str(dst), json.dumps(config),
                              str(torch.get_num_threads())])
    try:
        deadline = time.monotonic() + 120
        while not _stopped(child.pid):
            assert child.poll() is None and time.monotonic() < deadline, "the run never reached block 1"
            time.sleep(0.1)
        (staging,) = tmp_path.glob(".out.*.partial")
        old = time.time() - 2 * ABANDONED_AFTER_SECONDS
        os.utime(staging, (old, old))
        # the paused writer still holds its staging and resume directories: a second run leaves them
        # alone, and starts from the first block
        with progress_lines() as lines:
            qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids())
        assert any("held by another run" in line for line in lines), lines
        assert staging.is_dir() and resume_directory(dst).is_dir()
        assert checkpoint_files(dst) == before
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert staging.is_dir() and checkpoint_files(dst) == before  # killed mid-run: DST whole, the staging left behind
    reported = []
    with progress_lines() as lines:
        qplug.quantize_checkpoint(src, dst, config, calibration=calibration_ids(),
                                  on_module=lambda p: reported.append(p.module))
    assert "resuming after block 2 of 3" in " ".join(lines), lines
    assert len(reported) == 21  # every module reported, the resumed blocks' too (the CLI counts them)
    assert not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging and resume state gone
    assert checkpoint_files(dst) == before


def test_a_rerun_with_other_inputs_or_restart_starts_over(src, tmp_path):
    from qplug.block_resume import resume_directory
    from qplug.testing.block_path import Interrupted

    def stop(progress):
        if progress.module.startswith("model.layers.1."):
            raise Interrupted

    config = CONFIGS["g32"]
    with pytest.raises(Interrupted):
        qplug.quantize_checkpoint(src, tmp_path / "out", config, calibration=calibration_ids(), on_module=stop)
    other = {**config, "damp_percent": 0.02}
    with pytest.raises(Interrupted), progress_lines() as lines:
        qplug.quantize_checkpoint(src, tmp_path / "out", other, calibration=calibration_ids(), on_module=stop)
    assert any("discarding the resume state" in line and "different config" in line for line in lines), lines
    with pytest.raises(Interrupted), progress_lines() as lines:
        qplug.quantize_checkpoint(src, tmp_path / "out", other, calibration=calibration_ids(), on_module=stop,
                                  restart=True)
    assert any("discarding the resume state" in line and "(restart)" in line for line in lines), lines
    with progress_lines() as lines:
        qplug.quantize_checkpoint(src, tmp_path / "out", other, calibration=calibration_ids(seed=5))
    assert any("different calibration" in line for line in lines), lines
    assert not any(line.startswith("resuming") for line in lines)
    qplug.quantize_checkpoint(src, tmp_path / "ref", other, calibration=calibration_ids(seed=5))
    assert checkpoint_files(tmp_path / "out") == checkpoint_files(tmp_path / "ref")
    assert not resume_directory(tmp_path / "out").exists()


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"
