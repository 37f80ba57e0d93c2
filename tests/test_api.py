"""Model operations through the public API, with the example int8 backend on a tiny Llama."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qplug
from qplug.modules import SkipPatternWarning
from qplug.testing import example_tokens, tiny_llama


@pytest.fixture
def model():
    return tiny_llama(seed=0)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_quantize_save_load_dequantize_round_trip(int8_plugin, model, tmp_path):
    tokens = example_tokens(model)
    reference = logits(model, tokens)
    assert qplug.quantize(model, {"quant_method": "int8w"}) is model
    quantized = logits(model, tokens)
    assert 0 < (quantized - reference).abs().max() < 0.1 * reference.abs().max()
    qplug.save_quantized(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["model_type"] == "llama"
    assert saved["quantization_config"]["quant_method"] == "int8-weight"
    loaded = qplug.load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(loaded, tokens), quantized)
    qplug.dequantize(loaded)
    assert all(type(m) is nn.Linear for n, m in loaded.named_modules() if n.endswith("proj"))
    assert torch.allclose(logits(loaded, tokens), quantized, atol=1e-4)


def test_loading_allocates_no_float_weights_for_quantized_modules(int8_plugin, model, tmp_path):
    qplug.quantize(model, {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    loaded = qplug.load_quantized(tmp_path / "ckpt")
    proj = loaded.model.layers[0].mlp.up_proj
    assert proj.weight.dtype == torch.int8  # the checkpoint tensor itself, no float copy was built
    assert not [n for n, p in loaded.named_parameters() if p.device.type == "meta"]


def test_head_and_tied_embeddings_stay_in_float(int8_plugin, tmp_path):
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qplug.quantize(model, qplug.get_config_class("int8-weight")(modules_to_not_convert=["layers.1.mlp.down_proj"]))
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear  # user's skip adds to the default
    assert type(model.model.layers[1].mlp.up_proj) is not nn.Linear
    qplug.save_quantized(model, tmp_path / "tied")
    loaded = qplug.load_quantized(tmp_path / "tied")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    tokens = example_tokens(model)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_skip_patterns_regex_prefix_and_unmatched(int8_plugin, model):
    with pytest.warns(SkipPatternWarning, match="no_such_module"):
        qplug.quantize(model, {"quant_method": "int8-weight"},
                       skip=["model.layers.0", r"re:.*\.k_proj", "no_such_module"])
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.k_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is not nn.Linear
    assert qplug.quantized_config(model).modules_to_not_convert == [
        "model.layers.0", r"re:.*\.k_proj", "no_such_module"]


def test_quantizing_twice_and_dequantizing_a_float_model_are_errors(int8_plugin, model):
    with pytest.raises(qplug.QPlugError, match="not quantized by qplug"):
        qplug.dequantize(model)
    qplug.quantize(model, {"quant_method": "int8-weight"})
    with pytest.raises(qplug.QPlugError, match="already quantized"):
        qplug.quantize(model, {"quant_method": "int8-weight"})


def test_failed_save_leaves_the_old_checkpoint_whole(int8_plugin, model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    qplug.quantize(model, {"quant_method": "int8-weight"})
    qplug.save_quantized(model, target)
    (target / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    from qplug.shards import ShardWriter

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "add", disk_full)
    with pytest.raises(OSError, match="No space"):
        qplug.save_quantized(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
    monkeypatch.undo()
    qplug.save_quantized(model, target)
    assert (target / "tokenizer.json").exists()  # other files survive a successful save too


def _tamper(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    os.remove(path)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale"), "lacks tensors.*up_proj.weight_scale"),
        (lambda t: t.update({"model.layers.0.extra": torch.zeros(1)}), "tensors the model does not.*layers.0.extra"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3, dtype=torch.int8)}),
         r"up_proj.weight.*torch.Size\(\[3, 3\]\).*torch.Size\(\[256, 128\]\)"),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_bad_checkpoint_tensors_are_named(int8_plugin, model, tmp_path, change, message):
    qplug.quantize(model, {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt", change)
    with pytest.raises(qplug.CheckpointError, match=message):
        qplug.load_quantized(tmp_path / "ckpt")


def test_load_of_a_float_checkpoint_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    with pytest.raises(qplug.CheckpointError, match="not quantized"):
        qplug.load_quantized(tmp_path / "float")


def test_hooks_can_be_wrapped_vetoed_and_extended(int8_plugin, model, tmp_path):
    seen = []

    class Policy:
        @qplug.hookimpl
        def validate(self, config, model):
            if getattr(config, "compute_dtype", None) == "float16":
                raise qplug.QuantConfigError(field="compute_dtype", value="float16", accepted="policy: no fp16")

        @qplug.hookimpl(wrapper=True)
        def replace_modules(self, config, module_names):
            result = yield
            seen.append((config.quant_method, len(module_names), len(result)))
            return result

        @qplug.hookimpl(wrapper=True)
        def dequantize(self, config):
            names = yield
            seen.append(("dequantized", len(names)))
            return names

        @qplug.hookimpl(wrapper=True)
        def serialize(self):
            data = yield
            return {**data, "packaged_by": "policy"}

    qplug.register_plugin(Policy())
    with pytest.raises(qplug.QuantConfigError, match="policy"):
        qplug.quantize(model, {"quant_method": "int8-weight", "compute_dtype": "float16"})
    assert qplug.quantized_config(model) is None
    qplug.quantize(model, {"quant_method": "int8-weight"})
    assert seen == [("int8-weight", 14, 14)]
    qplug.save_quantized(model, tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert data["packaged_by"] == "policy"
    assert qplug.load_config(tmp_path / "ckpt" / "config.json").extra_keys == {"packaged_by": "policy"}
    qplug.dequantize(model)
    assert seen[-1] == ("dequantized", 14)


def test_quantize_on_load_streams_and_equals_in_memory_quantize(int8_plugin, tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    tokens = example_tokens(tiny_llama())
    in_memory = qplug.quantize(tiny_llama(seed=0), {"quant_method": "int8-weight"})
    order = []
    streamed = qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "int8-weight"},
                                    on_module=order.append)
    assert order == [n for n, m in in_memory.named_modules() if type(m).__name__ == "Int8Linear"]
    for (name, a), (_, b) in zip(in_memory.state_dict().items(), streamed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(logits(streamed, tokens), logits(in_memory, tokens))
    qplug.save_quantized(streamed, tmp_path / "q")
    with pytest.raises(qplug.QPlugError, match="already quantized"):
        qplug.load_quantized(tmp_path / "q", quantization_config={"quant_method": "int8-weight"})


def test_quantize_on_load_names_a_missing_layer(int8_plugin, tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    _tamper(tmp_path / "float", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(qplug.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "int8-weight"})


def test_quantize_on_load_is_refused_for_backends_that_do_not_stream(tmp_path):
    from helpers import ToyPlugin

    qplug.register_plugin(ToyPlugin())
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    with pytest.raises(qplug.QPlugError, match="cannot quantize a checkpoint while loading"):
        qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "toy"})


# Issue 13, item 1: loads from several threads at once, while another thread builds modules.
def test_concurrent_loads_work_and_leave_other_threads_modules_on_the_cpu(int8_plugin, model, tmp_path):
    qplug.quantize(model, {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    tokens = example_tokens(model)
    expected = logits(model, tokens)
    loaded, errors, devices = [], [], set()
    start = threading.Barrier(5)
    loading = threading.Event()

    def load():
        start.wait()
        try:
            for _ in range(3):
                loaded.append(qplug.load_quantized(tmp_path / "ckpt"))
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    def build():
        start.wait()
        while loading.is_set():
            devices.add(nn.Linear(8, 8).weight.device.type)

    loading.set()
    threads = [threading.Thread(target=load) for _ in range(4)]
    builder = threading.Thread(target=build)
    for t in [*threads, builder]:
        t.start()
    for t in threads:
        t.join()
    loading.clear()
    builder.join()
    assert errors == []
    assert devices == {"cpu"}
    assert len(loaded) == 12 and all(torch.equal(logits(m, tokens), expected) for m in loaded)
    assert nn.Linear(2, 2).weight.device.type == "cpu"


def _structure(model):
    """Module types, and the identity of every tensor, by name."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: id(t) for n, t in [*model.named_parameters(), *model.named_buffers()]})


# Issue 13, item 6: a failed load into the caller's model leaves that model as it was.
@pytest.mark.parametrize("how", ["unexpected-tensor", "corrupt-file", "quantize-on-load"])
def test_a_failed_load_into_a_given_model_leaves_it_unchanged(int8_plugin, tmp_path, how):
    source = tiny_llama(seed=0)
    if how == "quantize-on-load":
        source.save_pretrained(tmp_path / "ckpt")
        path = tmp_path / "ckpt" / "model.safetensors"
        tensors = load_file(path)
        # found mis-shaped only once the layers before it are converted
        tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
        save_file(tensors, path, metadata={"format": "pt"})
        kwargs = {"quantization_config": {"quant_method": "int8-weight"}}
    else:
        qplug.quantize(source, {"quant_method": "int8-weight"})
        qplug.save_quantized(source, tmp_path / "ckpt")
        if how == "unexpected-tensor":
            _tamper(tmp_path / "ckpt", lambda t: t.update({"model.layers.1.extra": torch.zeros(1)}))
        else:
            path = tmp_path / "ckpt" / "model.safetensors"
            path.write_bytes(path.read_bytes()[:-4])
        kwargs = {}
    model = tiny_llama(seed=3)
    tokens = example_tokens(model)
    before, reference = _structure(model), logits(model, tokens)
    with pytest.raises(qplug.CheckpointError):
        qplug.load_quantized(tmp_path / "ckpt", model, **kwargs)
    assert _structure(model) == before
    assert qplug.quantized_config(model) is None and not hasattr(model, "is_loaded_in_8bit")
    assert torch.equal(logits(model, tokens), reference)
    qplug.quantize(model, {"quant_method": "int8-weight"})  # and it is still an ordinary float model


def test_check_runs_every_validate_hook_and_changes_nothing(int8_plugin, model):
    calls = []

    class Policy:
        @qplug.hookimpl
        def validate(self, config, model):
            calls.append((config.quant_method, model))
            if config.to_dict().get("compute_dtype") == "float16":
                raise qplug.QuantConfigError(field="compute_dtype", value="float16", accepted="policy: no fp16")

    qplug.register_plugin(Policy())
    config = qplug.check({"quant_method": "int8w"})  # a dict is built as config_from_dict builds it
    assert isinstance(config, qplug.get_config_class("int8-weight"))
    assert qplug.check(config, model) is config
    assert calls == [("int8-weight", None), ("int8-weight", model)]
    assert qplug.quantized_config(model) is None
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    with pytest.raises(qplug.QuantConfigError, match="policy: no fp16"):
        qplug.check({"quant_method": "int8-weight", "compute_dtype": "float16"})
    with pytest.raises(qplug.UnknownBackendError, match="no-such"):
        qplug.check({"quant_method": "no-such"})
    # quantize runs the same check, with the model
    calls.clear()
    qplug.quantize(model, config)
    assert calls == [("int8-weight", model)]


def test_check_refuses_a_config_whose_backend_is_gone(int8_plugin):
    config = qplug.get_config_class("int8-weight")()
    qplug.unregister_plugin(int8_plugin)
    with pytest.raises(qplug.UnknownBackendError):
        qplug.check(config)
