"""Issue 13, item 5: bitsandbytes statistics are checked when a checkpoint loads, each failure naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qplug

LAYER = "model.layers.0.mlp.up_proj"
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
NF4_DQ = {**NF4, "bnb_4bit_use_double_quant": True}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def _checkpoint(fresh_model, tmp_path, config, key, edit):
    qplug.quantize(fresh_model, config)
    qplug.save_quantized(fresh_model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, path, metadata={"format": "pt"})
    return tmp_path / "ckpt"


def _poke(value):
    def edit(t):
        t.view(-1)[1] = value
        return t
    return edit


def _blob(text: str):
    return lambda t: torch.tensor(list(text.encode()), dtype=torch.uint8)


def _state(**changes):
    def edit(t):
        state = json.loads(bytes(t.tolist()).decode())
        state.update(changes)
        return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return edit


W = f"{LAYER}.weight"
QS = f"{W}.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize(
    ("config", "key", "edit", "message"),
    [
        (NF4, f"{W}.absmax", _poke(float("nan")), rf"'{W}\.absmax': 1 of \d+ values are NaN or infinite"),
        (NF4, f"{W}.absmax", lambda t: t.to(torch.int32), rf"'{W}\.absmax' is int32; expected a floating-point"),
        (NF4, f"{W}.quant_map", _poke(float("inf")), rf"'{W}\.quant_map': 1 of 16 values are NaN or infinite"),
        (NF4_DQ, f"{W}.nested_absmax", _poke(float("nan")), rf"'{W}\.nested_absmax': 1 of \d+ values are NaN"),
        (NF4_DQ, f"{W}.absmax", lambda t: t.float(), rf"'{W}\.absmax' is float32; expected uint8"),
        (NF4_DQ, QS, _state(nested_offset=float("nan")), "nested_offset nan is not a finite number"),
        (NF4, QS, _blob("[1, 2]"), r"quant_state\.bitsandbytes__nf4' is not a valid .* JSON list, not an object"),
        (NF4, QS, _blob('{"junk": 1}'), r"unknown keys \['junk'\]"),
        (NF4, QS, _state(dtype="no_such_dtype"), "dtype 'no_such_dtype' is not a floating-point torch dtype"),
        (NF4, QS, _state(shape=7), "shape 7 is not a list of sizes"),
        (INT8, f"{LAYER}.SCB", _poke(float("nan")), rf"'{LAYER}\.SCB': 1 of \d+ values are NaN or infinite"),
        (INT8, f"{LAYER}.SCB", lambda t: t.to(torch.int32), rf"'{LAYER}\.SCB' is int32; expected a floating-point"),
    ],
    ids=["nf4-nan-absmax", "nf4-int-absmax", "nf4-inf-quant-map", "dq-nan-nested-absmax", "dq-float-absmax",
         "dq-nan-offset", "junk-blob-list", "junk-blob-keys", "junk-blob-dtype", "junk-blob-shape",
         "int8-nan-scb", "int8-int-scb"],
)
def test_bad_statistics_are_refused_at_load_naming_the_tensor(fresh_model, tmp_path, config, key, edit, message):
    directory = _checkpoint(fresh_model, tmp_path, config, key, edit)
    with pytest.raises(qplug.CheckpointError, match=message):
        qplug.load_quantized(directory)
