"""Issue 13, item 5: a GPTQ checkpoint's statistics are checked when it loads, each failure naming the tensor."""

import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

import qplug

NAME = "llama-4bit-g32-actorder"
LAYER = "model.layers.0.mlp.up_proj"


def _tampered(tmp_path, change):
    directory = tmp_path / NAME
    shutil.copytree(FIXTURES / NAME, directory)
    path = next(directory.glob("*.safetensors"))
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _set(key, edit):
    def change(tensors):
        tensors[key] = edit(tensors[key].clone())
    return change


def _poke(value, at=0):
    def edit(t):
        t.view(-1)[at] = value
        return t
    return edit


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(f"{LAYER}.scales", _poke(float("nan"))), rf"'{LAYER}\.scales'.* NaN or infinite"),
        (_set(f"{LAYER}.scales", _poke(float("inf"), at=5)), rf"'{LAYER}\.scales'.* NaN or infinite"),
        (_set(f"{LAYER}.g_idx", _poke(-1)), rf"'{LAYER}\.g_idx'.* \[0, \d+\)"),
        (_set(f"{LAYER}.g_idx", _poke(10_000)), rf"'{LAYER}\.g_idx'.* \[0, \d+\)"),
        (_set(f"{LAYER}.g_idx", lambda t: t.long() + 2**32), rf"'{LAYER}\.g_idx'.* \[0, \d+\)"),
        (_set(f"{LAYER}.scales", lambda t: t.to(torch.int16)), rf"{LAYER}\.scales has dtype torch\.int16"),
    ],
    ids=["nan-scale", "inf-scale", "negative-g_idx", "g_idx-past-the-groups", "g_idx-wrapping-int32", "int-scales"],
)
def test_bad_statistics_are_refused_at_load_naming_the_tensor(tmp_path, change, message):
    with pytest.raises(qplug.CheckpointError, match=message):
        qplug.load_quantized(_tampered(tmp_path, change))
