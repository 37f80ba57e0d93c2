"""QPLUG_BNB_FAST4BIT=1: qplug.quantize and quantize-on-load take the compiled quantizer, same bytes."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch
from qplug_bitsandbytes import fast4bit

import qplug
from qplug.testing import tiny_llama

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_opt_in_fast_path_writes_the_library_bytes(monkeypatch, tmp_path):
    monkeypatch.delenv(fast4bit.ENV_VAR, raising=False)
    reference = _state(qplug.quantize(tiny_llama(seed=0, dtype=torch.bfloat16), NF4))

    calls = []
    original = F.quantize_4bit

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setenv(fast4bit.ENV_VAR, "1")
    # Cold, the first weights go through bitsandbytes while the kernel compiles in the background;
    # the bytes are the same either way (checked below). Warm, every weight takes the kernel.
    assert fast4bit.warm_up((torch.bfloat16,)) == {torch.bfloat16: True}
    monkeypatch.setattr(F, "quantize_4bit", counting)
    fast = _state(qplug.quantize(tiny_llama(seed=0, dtype=torch.bfloat16), NF4))
    assert fast4bit.fast_path_available(torch.bfloat16)
    assert calls == [], f"bitsandbytes quantized {len(calls)} weights; the compiled path should have"
    assert fast.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(fast[name], tensor), name

    monkeypatch.undo()  # bitsandbytes itself again: the streamed model must still match its bytes
    monkeypatch.setenv(fast4bit.ENV_VAR, "1")
    tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(tmp_path / "float")
    streamed = _state(qplug.load_quantized(tmp_path / "float", quantization_config=NF4))
    for name, tensor in reference.items():
        assert torch.equal(streamed[name], tensor), name


@pytest.mark.parametrize("value", ["", "0"])
def test_fast_path_is_off_unless_asked(monkeypatch, value):
    monkeypatch.setenv(fast4bit.ENV_VAR, value)
    calls = []
    original = F.quantize_4bit
    monkeypatch.setattr(F, "quantize_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))
    qplug.quantize(tiny_llama(seed=0, num_hidden_layers=1), NF4)
    assert len(calls) == 7  # every projection of the one layer went through bitsandbytes itself
