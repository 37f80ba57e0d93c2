"""``qplug.convert`` between GPTQ v1/v2, AWQ GEMM/GEMV and compressed-tensors pack-quantized.

The checkpoints are real: a tiny seeded Llama quantized by qplug's own compressed-tensors RTN (and, for
act-order, qplug's GPTQ), saved, then converted. For each scheme, each format made from the base holds the
same weights bit for bit (and logits within the kernels' tolerance) once loaded with ``load_quantized``;
then every ordered pair of formats is converted and must write exactly the bytes and config that format's
own checkpoint has, which makes the conversions lossless in both directions.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from qplug_compressed_tensors import CompressedTensorsConfig
from qplug_compressed_tensors.config import scheme_dict

import qplug
from qplug import ConversionError, convert
from qplug.cli import main
from qplug.testing import example_tokens, tiny_llama

#: the target formats: (backend, options)
FORMATS = {
    "gptq": ("gptq", {}),
    "gptq_v2": ("gptq", {"checkpoint_format": "gptq_v2"}),
    "awq_gemm": ("awq", {}),
    "awq_gemv": ("awq", {"version": "gemv"}),
    "ct": ("ct", {}),
}

#: the base checkpoints (compressed-tensors RTN) and the formats that hold each
SCHEMES = {
    "asym-group": ({"num_bits": 4, "symmetric": False, "group_size": 64}, list(FORMATS)),
    "sym-channel": ({"num_bits": 4, "strategy": "channel"}, list(FORMATS)),
    "int8-channel": ({"num_bits": 8, "strategy": "channel"}, ["gptq", "gptq_v2", "ct"]),
}


def _quantized_ct(directory, *, dtype=torch.float16, groups=None, **scheme):
    config = CompressedTensorsConfig(config_groups=groups or {"group_0": scheme_dict(**scheme)})
    qplug.save_quantized(qplug.quantize(tiny_llama(seed=0, dtype=dtype), config), directory)
    return directory


def _weights(directory):
    model = qplug.load_quantized(directory)
    weights = {n: m.float_weight(torch.float32) for n, m in model.named_modules() if hasattr(m, "int_weight")}
    with torch.no_grad():
        logits = model.float()(example_tokens(model)).logits
    return weights, logits


def _tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


class Formats:
    """Each scheme's base checkpoint and, made on first use, its conversion to each format."""

    def __init__(self, root):
        self.root = root
        self.made = {}
        self.reference = {}

    def base(self, scheme):
        if scheme not in self.made:
            self.made[scheme] = _quantized_ct(self.root / scheme, **SCHEMES[scheme][0])
            (self.made[scheme] / "generation_config.json").write_text('{"do_sample": false}\n')
            self.reference[scheme] = _weights(self.made[scheme])
        return self.made[scheme]

    def get(self, scheme, fmt):
        key = (scheme, fmt)
        if key not in self.made:
            to, options = FORMATS[fmt]
            self.made[key] = convert(self.base(scheme), self.root / f"{scheme}-{fmt}", to=to, **options)
        return self.made[key]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return Formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize(("scheme", "fmt"), [(s, f) for s, (_, fs) in SCHEMES.items() for f in fs])
def test_each_format_holds_the_same_weights(formats, scheme, fmt):
    converted = formats.get(scheme, fmt)
    to, options = FORMATS[fmt]
    config = qplug.load_config(converted / "config.json")
    assert config.quant_method == qplug.get_plugin_manager().get_backend(to).name
    assert all(getattr(config, k) == v for k, v in options.items())
    weights, logits = _weights(converted)
    reference, reference_logits = formats.reference[scheme]
    assert weights.keys() == reference.keys() and len(weights) == 14
    for name in weights:
        assert torch.equal(weights[name], reference[name]), name
    assert (logits - reference_logits).abs().max() <= 1e-4 * reference_logits.abs().max()
    assert (converted / "generation_config.json").read_text() == '{"do_sample": false}\n'
    if fmt == "ct":  # compressed-tensors to itself: the checkpoint qplug saved, byte for byte
        assert json.loads((converted / "config.json").read_text()) == \
               json.loads((formats.base(scheme) / "config.json").read_text())
        _same_tensors(formats.base(scheme), converted)


def _same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize(("scheme", "a", "b"), [(s, a, b) for s, (_, fs) in SCHEMES.items()
                                                for a in fs for b in fs if a != b])
def test_every_pair_converts_both_ways_to_the_same_checkpoint(formats, tmp_path, scheme, a, b):
    """A -> B writes the tensors and config that B made from the base has: every pair, both directions."""
    to, options = FORMATS[b]
    out = convert(formats.get(scheme, a), tmp_path / b, to=to, **options)
    _same_tensors(formats.get(scheme, b), out)
    assert qplug.load_config(out / "config.json") == qplug.load_config(formats.get(scheme, b) / "config.json")


@pytest.fixture(scope="module")
def act_order(tmp_path_factory):
    from qplug_gptq import GPTQConfig

    model = tiny_llama(seed=0, dtype=torch.float16)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64, desc_act=True, sym=False), calibration=tokens)
    directory = tmp_path_factory.mktemp("act-order") / "gptq"
    qplug.save_quantized(model, directory)
    return directory


def test_act_order_gptq_converts_between_gptq_v1_and_v2(act_order, tmp_path):
    v2 = convert(act_order, tmp_path / "v2", to="gptq", checkpoint_format="gptq_v2")
    config = qplug.load_config(v2 / "config.json")
    assert config.desc_act and config.checkpoint_format == "gptq_v2"
    assert not (v2 / "quantize_config.json").exists()  # auto-gptq reads v1 only
    weights, logits = _weights(act_order)
    weights_v2, logits_v2 = _weights(v2)
    for name in weights:
        assert torch.equal(weights[name], weights_v2[name]), name
    assert (logits - logits_v2).abs().max() <= 1e-4 * logits.abs().max()
    back = convert(v2, tmp_path / "v1", to="gptq")
    _same_tensors(act_order, back)  # g_idx and all
    assert (back / "quantize_config.json").exists()


@pytest.mark.parametrize("to", ["awq", "compressed-tensors"])
def test_act_order_is_refused_where_the_format_has_none(act_order, tmp_path, to):
    with pytest.raises(ConversionError, match=rf"cannot convert model\.layers\.0\.\S+ to {to}: its act-order g_idx"):
        convert(act_order, tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("scheme", "dtype", "to", "options", "why"), [
    ({"num_bits": 8, "strategy": "channel"}, torch.float16, "awq", {}, r"8-bit weights \(AWQ's layouts hold 4-bit"),
    ({"num_bits": 4, "group_size": 64}, torch.float32, "awq", {"version": "gemv"},
     "its float32 scales do not all fit float16 exactly"),
    ({"num_bits": 4, "group_size": 64, "symmetric": False}, torch.float16, "gptq", {"sym": True},
     "it needs sym=False, and the options ask sym=True"),
])
def test_what_the_target_cannot_hold_is_refused_by_layer_and_reason(tmp_path, scheme, dtype, to, options, why):
    source = _quantized_ct(tmp_path / "src", dtype=dtype, **scheme)
    with pytest.raises(ConversionError, match=rf"cannot convert model\.layers\.0\.self_attn\.q_proj to {to}: {why}"):
        convert(source, tmp_path / "out", to=to, **options)
    assert not (tmp_path / "out").exists()


def test_a_failure_midway_leaves_an_existing_destination_whole(formats, tmp_path):
    """Layer 1 needs other settings than layer 0: refused after layer 0 is written, and DST is untouched."""
    groups = {"group_0": scheme_dict(4, group_size=64, targets=(r"re:.*layers\.0\..*",)),
              "group_1": scheme_dict(8, strategy="channel", targets=(r"re:.*layers\.1\..*",))}
    mixed = _quantized_ct(tmp_path / "mixed", groups=groups)
    dst = tmp_path / "dst"
    convert(formats.base("asym-group"), dst, to="gptq")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    written = []
    refusal = (r"cannot convert model\.layers\.1\.self_attn\.q_proj to gptq: it needs bits=8, group_size=-1.*"
               r"model\.layers\.0\.self_attn\.q_proj needs bits=4")
    with pytest.raises(ConversionError, match=refusal):
        convert(mixed, dst, to="gptq", on_layer=written.append)
    assert len(written) == 7  # layer 0's seven layers were converted and written before the refusal
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["dst", "mixed"]  # no staging directory left behind


def test_bad_requests_are_refused_before_any_work(formats, tmp_path):
    base = formats.base("asym-group")
    with pytest.raises(qplug.QuantConfigError, match="checkpoint_fromat"):
        convert(base, tmp_path / "out", to="gptq", checkpoint_fromat="gptq_v2")
    with pytest.raises(qplug.QuantConfigError, match="checkpoint_format"):
        convert(base, tmp_path / "out", to="gptq", checkpoint_format="marlin")
    with pytest.raises(qplug.UnknownBackendError, match="gptqq"):
        convert(base, tmp_path / "out", to="gptqq")
    with pytest.raises(ConversionError, match="onto itself"):
        convert(base, base, to="gptq")
    float_model = tmp_path / "float"
    tiny_llama(seed=0).save_pretrained(float_model)
    with pytest.raises(ConversionError, match="holds no quantization_config"):
        convert(float_model, tmp_path / "out", to="gptq")
    assert not (tmp_path / "out").exists()


def test_shards_and_the_command_line(formats, tmp_path, capsys):
    base = formats.base("asym-group")
    code = main(["convert", str(base), str(tmp_path / "v2"), "--to", "gptq",
                 "--format-option", "checkpoint_format=gptq_v2", "--max-shard-size", "100KB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Converted" in out and "14 repacked" in out and "generation_config.json" in out
    shards = sorted(p.name for p in (tmp_path / "v2").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "v2" / "model.safetensors.index.json").exists()
    assert qplug.load_config(tmp_path / "v2" / "config.json").checkpoint_format == "gptq_v2"
    weights, _ = _weights(tmp_path / "v2")
    reference, _ = formats.reference["asym-group"]
    assert all(torch.equal(weights[n], reference[n]) for n in reference)

    assert main(["convert", str(tmp_path / "v2"), str(tmp_path / "awq"), "--to", "autoawq",
                 "--format-option", "version=gemv"]) == 0
    assert qplug.load_config(tmp_path / "awq" / "config.json").version == "gemv"

    int8 = formats.base("int8-channel")
    assert main(["convert", str(int8), str(tmp_path / "no"), "--to", "awq"]) == 1
    assert "cannot convert model.layers.0.self_attn.q_proj to awq: 8-bit weights" in capsys.readouterr().err
    assert main(["convert", str(int8), str(tmp_path / "no"), "--to", "gptq", "--format-option", "bitz=8"]) == 1
    assert "--format-option bitz: GPTQConfig has no field 'bitz' (did you mean 'bits'?)" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_layers_large_enough_to_reuse_read_buffers_convert_bit_for_bit(tmp_path):
    """Wider layers than the tiny Llama's: a conversion reads each layer into the memory of an earlier one it
    has written (64 KiB and up, here 64-256 KiB: the embeddings' and every decoder layer's words), and GPTQ's
    words are transposed in that memory. Through GPTQ v1 and v2 and back, every byte is compressed-tensors'
    own, and the weights are the same in between."""
    config = CompressedTensorsConfig(config_groups={"group_0": scheme_dict(4, symmetric=False, group_size=128)})
    model = tiny_llama(seed=1, dtype=torch.float16, hidden_size=512, intermediate_size=1024, num_hidden_layers=3)
    base = tmp_path / "ct"
    qplug.save_quantized(qplug.quantize(model, config), base)
    reference, _ = _weights(base)
    for options in ({}, {"checkpoint_format": "gptq_v2"}):
        gptq = convert(base, tmp_path / "gptq", to="gptq", **options)
        weights, _ = _weights(gptq)
        assert all(torch.equal(weights[n], reference[n]) for n in reference) and len(reference) == 21
        _same_tensors(base, convert(gptq, tmp_path / "back", to="ct"))
