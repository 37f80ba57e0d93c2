"""qplug.quantize and quantize-on-load take the compiled 4-bit quantizer by default, and write the library's bytes."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch
from bnb_testlib import HAVE_CC
from qplug_bitsandbytes import fast4bit

import qplug
from qplug.testing import tiny_llama

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _count_library_calls(monkeypatch):
    calls = []
    original = F.quantize_4bit
    monkeypatch.setattr(F, "quantize_4bit", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    return calls


def test_fast_path_is_the_default_and_writes_the_library_bytes(monkeypatch, tmp_path):
    if not HAVE_CC:
        pytest.skip("no C compiler: the kernels cannot be built here")
    assert fast4bit.fast_path_available(torch.bfloat16), fast4bit.unavailable_reason()
    monkeypatch.setenv(fast4bit.ENV_VAR, "0")
    reference = _state(qplug.quantize(tiny_llama(seed=0, dtype=torch.bfloat16), NF4))

    monkeypatch.delenv(fast4bit.ENV_VAR)
    calls = _count_library_calls(monkeypatch)
    fast = _state(qplug.quantize(tiny_llama(seed=0, dtype=torch.bfloat16), NF4))
    assert calls == [], f"bitsandbytes quantized {len(calls)} weights; the compiled path should have"
    assert fast.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(fast[name], tensor), name

    tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(tmp_path / "float")
    streamed = _state(qplug.load_quantized(tmp_path / "float", quantization_config=NF4))
    assert calls == []
    for name, tensor in reference.items():
        assert torch.equal(streamed[name], tensor), name


def test_env_var_turns_it_off(monkeypatch):
    monkeypatch.setenv(fast4bit.ENV_VAR, "0")
    calls = _count_library_calls(monkeypatch)
    qplug.quantize(tiny_llama(seed=0, num_hidden_layers=1), NF4)
    assert len(calls) == 7  # every projection of the one layer went through bitsandbytes itself
