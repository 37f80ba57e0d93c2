"""GPTQ from disk, block by block (issue 15, item 3): the same checkpoint as the whole-model path, byte for byte."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import qplug
from qplug.testing import example_tokens, load_float_model, relative_error, tiny_llama
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
    directory = tmp_path_factory.mktemp("gptq-disk") / "float"
    tiny_llama(seed=0, dtype=torch.bfloat16, num_hidden_layers=3).save_pretrained(directory)
    return directory


def calibration():
    return example_tokens(tiny_llama(), batch=4, length=32, seed=3)


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def whole_model(src, dst, config):
    model = load_float_model(src)
    qplug.quantize(model, config, calibration=calibration())
    qplug.save_quantized(model, dst)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_path_is_byte_identical_to_the_whole_model_path(src, tmp_path, name):
    model = whole_model(src, tmp_path / "whole", CONFIGS[name])
    qplug.quantize_checkpoint(src, tmp_path / "disk", CONFIGS[name], calibration=calibration())
    assert files(tmp_path / "disk") == files(tmp_path / "whole")
    tokens = example_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(qplug.load_quantized(tmp_path / "disk")(tokens).logits, model(tokens).logits,
                                   rtol=0, atol=0)


def test_the_command_calibrates_block_by_block(src, tmp_path):
    import json

    ids = tmp_path / "calibration.json"
    ids.write_text(json.dumps(calibration().tolist()))
    args = ("--method", "gptq-4bit", "--set", "group_size=32", "--calibration", ids)
    done = run_qplug("quantize", src, tmp_path / "disk", *args)
    assert done.returncode == 0, done.stderr
    assert "(read, quantized and written block by block)" in done.stdout
    assert "qplug: calibrating to disk: 3/3 blocks done" in done.stderr
    # a --dtype other than SRC's own loads the whole model first: the other path, in the same conditions
    whole = run_qplug("quantize", src, tmp_path / "whole", *args, "--dtype", "bfloat16")
    assert whole.returncode == 0, whole.stderr
    assert "(load " in whole.stdout
    assert files(tmp_path / "disk") == files(tmp_path / "whole")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_blocks_calibrate_on_the_gpu(src, tmp_path):
    config = CONFIGS["g32"]
    qplug.quantize_checkpoint(src, tmp_path / "gpu", config, calibration=calibration(), device="cuda")
    qplug.quantize_checkpoint(src, tmp_path / "cpu", config, calibration=calibration())
    gpu, cpu = qplug.load_quantized(tmp_path / "gpu"), qplug.load_quantized(tmp_path / "cpu")
    tokens = example_tokens(cpu)
    with torch.no_grad():
        assert relative_error(gpu(tokens).logits.float(), cpu(tokens).logits.float()) < 0.05


# A run that stops itself (SIGSTOP) once the first block is on disk, holding its staging directory.
PAUSED_RUN = """
import json, os, signal, sys
import qplug
from qplug.testing import example_tokens, tiny_llama
src, dst, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def pause(progress):
    if progress.module.startswith("model.layers.1."):
        os.kill(os.getpid(), signal.SIGSTOP)
calibration = example_tokens(tiny_llama(), batch=4, length=32, seed=3)
qplug.quantize_checkpoint(src, dst, config, calibration=calibration, on_module=pause)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's state from /proc; flock")
def test_a_killed_run_leaves_dst_whole_and_the_next_run_removes_its_staging(src, tmp_path):
    import json

    from qplug._io import ABANDONED_AFTER_SECONDS

    dst = tmp_path / "out"
    config = CONFIGS["g32"]
    qplug.quantize_checkpoint(src, dst, config, calibration=calibration())
    before = files(dst)
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
        qplug.quantize_checkpoint(src, dst, config, calibration=calibration())
        assert staging.is_dir()
        assert files(dst) == before
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert staging.is_dir() and files(dst) == before  # killed mid-run: DST whole, the staging left behind
    qplug.quantize_checkpoint(src, dst, config, calibration=calibration())  # restarts from the first block
    assert not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert files(dst) == before


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"
