"""Converting checkpoints between compressed-tensors, GPTQ and AWQ: the same integers repacked, never re-quantized.

Each supported pair, both directions: the converted checkpoint's dequantized weights equal the source's bit for
bit (so logits agree to the kernels' own tolerance), and converting back writes the source's bytes.
"""

from __future__ import annotations

import pytest
import torch
from qplug_compressed_tensors import CompressedTensorsConfig
from qplug_compressed_tensors.config import scheme_dict
from safetensors.torch import load_file

import qplug
from qplug import ConversionError, convert
from qplug.testing import example_tokens, tiny_llama


def _ct(tmp_path, bits=4, dtype=torch.float16, **kw):
    model = qplug.quantize(tiny_llama(seed=0, dtype=dtype),
                           CompressedTensorsConfig(config_groups={"group_0": scheme_dict(bits, **kw)}))
    qplug.save_quantized(model, tmp_path / "ct")
    return tmp_path / "ct"


def _weights(model):
    return {n: m.float_weight(torch.float32) for n, m in model.named_modules() if hasattr(m, "int_weight")}


def _same_model(a_dir, b_dir):
    a, b = qplug.load_quantized(a_dir), qplug.load_quantized(b_dir)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) == 14
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    tokens = example_tokens(a)
    with torch.no_grad():
        la, lb = a.float()(tokens).logits, b.float()(tokens).logits
    assert (la - lb).abs().max() <= 1e-4 * la.abs().max()


def _same_bytes(a_dir, b_dir):
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("to", "kw"), [
    ("gptq", {"bits": 4, "group_size": 64}),
    ("gptq", {"bits": 4, "group_size": 64, "symmetric": False}),
    ("gptq", {"bits": 8, "strategy": "channel"}),
    ("awq", {"bits": 4, "group_size": 64, "symmetric": False}),
    ("awq", {"bits": 4, "group_size": 128}),
])
def test_compressed_tensors_to_another_format_and_back(tmp_path, to, kw):
    source = _ct(tmp_path, **kw)
    convert(source, tmp_path / to, to=to)
    assert qplug.load_config(tmp_path / to / "config.json").quant_method == to
    _same_model(source, tmp_path / to)
    convert(tmp_path / to, tmp_path / "back", to="ct")
    _same_bytes(source, tmp_path / "back")
    assert qplug.load_config(tmp_path / "back" / "config.json") == qplug.load_config(source / "config.json")


def test_gptq_to_awq_through_the_same_integers(tmp_path):
    source = _ct(tmp_path, 4, group_size=64, symmetric=False)
    convert(source, tmp_path / "gptq", to="gptq")
    convert(tmp_path / "gptq", tmp_path / "awq", to="awq")
    _same_model(tmp_path / "gptq", tmp_path / "awq")


@pytest.mark.parametrize(("kw", "to", "why"), [
    ({"bits": 8, "strategy": "channel"}, "awq", "8-bit weights"),
    ({"bits": 4, "group_size": 64, "dtype": torch.float32}, "awq", "fit float16"),
])
def test_what_the_target_cannot_hold_is_refused_by_name(tmp_path, kw, to, why):
    source = _ct(tmp_path, **kw)
    with pytest.raises(ConversionError, match=rf"model\.layers\.0\.\S+ to {to}: .*{why}"):
        convert(source, tmp_path / to, to=to)
    assert not (tmp_path / to).exists()


def test_act_order_gptq_stays_gptq(tmp_path):
    from qplug_gptq import GPTQConfig

    model = tiny_llama(seed=0, dtype=torch.float16)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64, desc_act=True), calibration=tokens)
    qplug.save_quantized(model, tmp_path / "gptq")
    with pytest.raises(ConversionError, match="act-order g_idx"):
        convert(tmp_path / "gptq", tmp_path / "ct", to="compressed-tensors")
    convert(tmp_path / "gptq", tmp_path / "again", to="gptq")  # GPTQ to GPTQ keeps g_idx
    _same_model(tmp_path / "gptq", tmp_path / "again")
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == \
           load_file(tmp_path / "gptq" / "model.safetensors").keys()
