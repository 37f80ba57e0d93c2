"""Issue 13, item 5: an AWQ checkpoint's scales are checked when it loads, each failure naming the tensor."""

import shutil

import pytest
import torch
from awq_testlib import FIXTURE
from safetensors.torch import load_file, save_file

import qplug

LAYER = "model.layers.0.mlp.up_proj"


def _poke(value):
    def edit(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t
    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_poke(float("nan")), rf"tensor '{LAYER}\.scales': 1 of \d+ values are NaN or infinite"),
        (_poke(float("-inf")), rf"tensor '{LAYER}\.scales': 1 of \d+ values are NaN or infinite"),
        (lambda t: t.to(torch.int16), rf"tensor '{LAYER}\.scales' is int16; expected a floating-point dtype"),
    ],
    ids=["nan", "inf", "integer"],
)
def test_bad_scales_are_refused_at_load_naming_the_tensor(tmp_path, edit, message):
    directory = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, directory)
    tensors = load_file(directory / "model.safetensors")
    tensors[f"{LAYER}.scales"] = edit(tensors[f"{LAYER}.scales"])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qplug.CheckpointError, match=message):
        qplug.load_quantized(directory)
