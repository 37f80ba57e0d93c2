"""What the hooks are given: selected names in validate, the checkpoint's tensors in replace_modules,
a staging directory in add_checkpoint_files, one module at a time in quantize_module — and that a
plugin written before those inputs existed keeps working unchanged."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch
from safetensors import safe_open

import qplug
from qplug import hookspecs
from qplug.config import QuantConfig, instance_of, list_of, optional, to_list
from qplug.testing import example_tokens, tiny_llama

REPO = Path(__file__).resolve().parents[1]
INT8 = {"quant_method": "int8-weight"}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# --------------------------------------------------------------------------------------------
# A backend written against qplug 0.1's hooks: the fewest arguments, ``streams=True`` declared.
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class LegacyConfig(QuantConfig):
    quant_method: ClassVar[str] = "legacy-int8"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    modules_to_not_convert: list[str] | None = attrs.field(default=None, converter=to_list,
                                                           validator=optional(list_of(str)))


class LegacyPlugin:
    def __init__(self, int8_plugin):
        self.int8 = int8_plugin._int8_linear_class()
        self.calls: list[str] = []

    @qplug.hookimpl
    def register_backends(self):
        return [qplug.Backend(name="legacy-int8", config_class=LegacyConfig, streams=True)]

    @qplug.backend_hookimpl(LegacyConfig)
    def validate(self, config, model):
        self.calls.append("validate")

    @qplug.backend_hookimpl(LegacyConfig)
    def replace_modules(self, config, model, module_names, prequantized):
        from qplug.modules import get_submodule, set_submodule

        self.calls.append(f"replace_modules x{len(module_names)}")
        for name in module_names:
            linear = get_submodule(model, name)
            if prequantized:
                new = self.int8(linear.in_features, linear.out_features, linear.bias is not None, torch.float32,
                                linear.weight.device)
            else:
                new = self.int8.from_linear(linear, torch.float32)
            set_submodule(model, name, new)
        return module_names

    @qplug.backend_hookimpl(LegacyConfig)
    def dequantize(self, config, model):
        from qplug.modules import set_submodule

        names = [n for n, m in model.named_modules() if isinstance(m, self.int8)]
        for name in names:
            set_submodule(model, name, model.get_submodule(name).to_linear())
        return names

    @qplug.backend_hookimpl(LegacyConfig)
    def serialize(self, config):
        return config.to_dict()


def test_a_plugin_written_before_the_new_inputs_works_unchanged(int8_plugin, tmp_path):
    legacy = LegacyPlugin(int8_plugin)
    qplug.register_plugin(legacy)
    tokens = example_tokens(tiny_llama())
    reference = qplug.quantize(tiny_llama(seed=0), INT8)  # the same arithmetic, through the new hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        model = qplug.quantize(tiny_llama(seed=0), {"quant_method": "legacy-int8"})
        assert torch.equal(logits(model, tokens), logits(reference, tokens))
        qplug.save_quantized(model, tmp_path / "q")
        loaded = qplug.load_quantized(tmp_path / "q")
        assert torch.equal(logits(loaded, tokens), logits(reference, tokens))

        # quantize-on-load still streams through replace_modules, one module at a time
        tiny_llama(seed=0).save_pretrained(tmp_path / "float")
        assert qplug.get_plugin_manager().get_backend("legacy-int8").streams is True
        legacy.calls.clear()
        streamed = qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "legacy-int8"})
        assert torch.equal(logits(streamed, tokens), logits(reference, tokens))
        assert legacy.calls == ["validate"] + ["replace_modules x1"] * 14
        qplug.dequantize(streamed)
    assert qplug.get_plugin_manager().plugins()[-1].hooks == (
        "dequantize", "register_backends", "replace_modules", "serialize", "validate")


def test_a_caller_written_before_the_new_inputs_works_unchanged(int8_plugin):
    """Code that calls the hooks the old way (the CLI's ``config validate``) gets the specs' defaults."""
    hook = qplug.get_plugin_manager().hook
    config = qplug.config_from_dict(INT8)
    model = tiny_llama(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hook.validate(config=config, model=None)  # the example's validate takes module_names: None
        replaced = hook.replace_modules(config=config, model=model, module_names=["model.layers.0.mlp.up_proj"],
                                        calibration=None, prequantized=False)
    assert replaced == ["model.layers.0.mlp.up_proj"]
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"


# --------------------------------------------------------------------------------------------
# validate and replace_modules see what the core knows
# --------------------------------------------------------------------------------------------


class Recorder:
    """A plugin that takes part in every hook (as a policy or telemetry plugin would) and records."""

    def __init__(self):
        self.seen: dict[str, list] = {}

    @qplug.hookimpl
    def validate(self, config, model, module_names):
        self.seen.setdefault("validate", []).append(module_names)

    @qplug.hookimpl(wrapper=True)
    def replace_modules(self, module_names, prequantized, checkpoint_tensors):
        replaced = yield
        self.seen.setdefault("replace_modules", []).append((list(replaced), prequantized, checkpoint_tensors))
        return replaced

    @qplug.hookimpl
    def add_checkpoint_files(self, config, model, directory):
        self.seen.setdefault("add_checkpoint_files", []).append(directory)
        (directory / "MODEL_CARD.md").write_text(f"quantized with {config.quant_method}\n")


def test_validate_is_given_the_names_replace_modules_then_replaces(int8_plugin):
    recorder = Recorder()
    qplug.register_plugin(recorder)
    model = qplug.quantize(tiny_llama(seed=0), INT8, skip=["mlp.down_proj"])
    [names] = recorder.seen["validate"]
    [(replaced, prequantized, tensors)] = recorder.seen["replace_modules"]
    assert names == replaced and not prequantized and tensors is None
    assert names == [n for n, m in model.named_modules() if type(m).__name__ == "Int8Linear"]
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)


def test_replace_modules_is_given_the_checkpoint_tensors_from_the_headers(int8_plugin, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0), INT8)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: saved once, listed under both names
    qplug.save_quantized(model, tmp_path / "q")
    recorder = Recorder()
    qplug.register_plugin(recorder)
    qplug.load_quantized(tmp_path / "q", tiny_llama(seed=1))
    [(replaced, prequantized, tensors)] = recorder.seen["replace_modules"]
    assert prequantized and len(replaced) == 14
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        on_disk = {name: f.get_slice(name) for name in f.keys()}
        assert "lm_head.weight" not in on_disk
        assert set(tensors) == {*on_disk, "lm_head.weight"}
        for name, part in on_disk.items():
            assert tuple(tensors[name].shape) == tuple(part.get_shape()), name
            assert str(tensors[name].dtype).removeprefix("torch.") == _torch_dtype_name(part.get_dtype()), name
    assert tensors["lm_head.weight"] == tensors["model.embed_tokens.weight"]
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    with pytest.raises(TypeError):
        tensors["model.layers.0.extra"] = tensors["lm_head.weight"]  # read-only


def _torch_dtype_name(safetensors_dtype: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "I32": "int32",
            "I64": "int64", "U8": "uint8"}[safetensors_dtype]


def test_a_checkpoint_bias_the_skeleton_lacks_is_loaded(int8_plugin, tmp_path):
    """A quantized layer is sized from the checkpoint: a bias the float layer lacked is adopted."""
    model = qplug.quantize(tiny_llama(seed=0), INT8)
    model.model.layers[0].mlp.up_proj.bias = torch.nn.Parameter(torch.full((256,), 0.5))
    tokens = example_tokens(model)
    qplug.save_quantized(model, tmp_path / "q")
    loaded = qplug.load_quantized(tmp_path / "q", tiny_llama(seed=1))  # Llama's projections have no bias
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.bias, torch.full((256,), 0.5))
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


# --------------------------------------------------------------------------------------------
# add_checkpoint_files: inside the atomic save
# --------------------------------------------------------------------------------------------


def test_add_checkpoint_files_writes_inside_the_atomic_save(int8_plugin, tmp_path):
    recorder = Recorder()
    qplug.register_plugin(recorder)
    model = qplug.quantize(tiny_llama(seed=0), INT8)
    target = tmp_path / "q"
    qplug.save_quantized(model, target)
    [staging] = recorder.seen["add_checkpoint_files"]
    assert staging != target and not staging.exists()  # written in staging, which became the target
    assert (target / "MODEL_CARD.md").read_text() == "quantized with int8-weight\n"
    assert (staging / "config.json").name in {p.name for p in target.iterdir()}

    class Failing:
        @qplug.hookimpl
        def add_checkpoint_files(self, directory):
            (directory / "half-written").write_text("x")
            raise OSError("disk full")

    before = {p.name: p.read_bytes() for p in target.iterdir()}
    qplug.register_plugin(Failing())
    with pytest.raises(OSError, match="disk full"):
        qplug.save_quantized(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing left beside it


# --------------------------------------------------------------------------------------------
# quantize_module: its presence is what makes a backend stream
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class StreamConfig(QuantConfig):
    quant_method: ClassVar[str] = "stream-toy"


def _backend_plugin(int8_plugin, *, with_hook: bool, streams: bool | None = None):
    int8 = int8_plugin._int8_linear_class()

    class Plugin:
        @qplug.hookimpl
        def register_backends(self):
            return [qplug.Backend(name="stream-toy", config_class=StreamConfig, streams=streams)]

        @qplug.backend_hookimpl(StreamConfig)
        def replace_modules(self, config, module_names):
            raise AssertionError("streaming must not call replace_modules when quantize_module exists")

    if with_hook:
        @qplug.backend_hookimpl(StreamConfig)
        def quantize_module(self, config, name, module):
            self.names.append(name)
            return int8.from_linear(module, torch.float32)

        Plugin.quantize_module = quantize_module
    plugin = Plugin()
    plugin.names = []
    return plugin


@pytest.mark.parametrize(("with_hook", "streams", "expected"), [
    (True, None, True), (False, None, False), (True, False, False),
], ids=["hook", "no-hook", "hook-but-turned-off"])
def test_a_backend_streams_exactly_when_it_implements_quantize_module(int8_plugin, tmp_path, with_hook, streams,
                                                                      expected):
    plugin = _backend_plugin(int8_plugin, with_hook=with_hook, streams=streams)
    qplug.register_plugin(plugin)
    assert qplug.get_plugin_manager().get_backend("stream-toy").streams is expected
    tiny_llama(seed=0).save_pretrained(tmp_path / "float")
    if not expected:
        with pytest.raises(qplug.QPlugError, match="cannot quantize a checkpoint while loading"):
            qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "stream-toy"})
        return
    model = qplug.load_quantized(tmp_path / "float", quantization_config={"quant_method": "stream-toy"})
    reference = qplug.quantize(tiny_llama(seed=0), INT8)
    assert plugin.names == [n for n, m in reference.named_modules() if type(m).__name__ == "Int8Linear"]
    tokens = example_tokens(model)
    assert torch.equal(logits(model, tokens), logits(reference, tokens))


def test_the_example_backend_streams_through_quantize_module(int8_plugin):
    entry = qplug.get_plugin_manager().get_entry("int8-weight")
    assert entry.quantizes_modules and entry.backend.streams


# --------------------------------------------------------------------------------------------
# Config inference: the most specific claim wins
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class NarrowConfig(QuantConfig):
    quant_method: ClassVar[str] = "narrow"
    bits: int = attrs.field(default=4, validator=instance_of(int))
    group: int = attrs.field(default=128, validator=instance_of(int))

    @classmethod
    def recognizes(cls, data):
        return "bits" in data


@attrs.define(kw_only=True)
class WideConfig(QuantConfig):
    quant_method: ClassVar[str] = "wide"
    bits: int = attrs.field(default=4, validator=instance_of(int))
    group: int = attrs.field(default=128, validator=instance_of(int))
    zero: bool = attrs.field(default=True, validator=instance_of(bool))

    @classmethod
    def normalize_dict(cls, data):
        data = dict(data)
        if "w_zero" in data:
            data["zero"] = data.pop("w_zero")
        return data

    @classmethod
    def recognizes(cls, data):
        return "bits" in data


class Claims:
    @qplug.hookimpl
    def register_backends(self):
        return [qplug.Backend(name="narrow", config_class=NarrowConfig),
                qplug.Backend(name="wide", config_class=WideConfig)]


def test_inference_picks_the_claim_that_knows_most_keys():
    qplug.register_plugin(Claims())
    assert type(qplug.config_from_dict({"bits": 4, "group": 64, "zero": False})) is WideConfig
    assert type(qplug.config_from_dict({"bits": 4, "w_zero": False})) is WideConfig  # a foreign spelling counts
    assert WideConfig.claimed_keys({"bits": 4, "w_zero": False, "other": 1}) == {"bits", "w_zero"}
    with pytest.raises(qplug.UnknownBackendError, match=r"any of narrow, wide \(each knows 2 of its keys"):
        qplug.config_from_dict({"bits": 4, "group": 64})


def test_an_alias_as_quant_method_is_resolved_by_config_from_dict():
    from helpers import ToyConfig, ToyPlugin

    qplug.register_plugin(ToyPlugin())
    config = qplug.config_from_dict({"quant_method": "toy-alias", "bits": 2})
    assert type(config) is ToyConfig and config.to_dict()["quant_method"] == "toy"
    with pytest.raises(qplug.QuantConfigError, match="config_from_dict also accepts"):
        ToyConfig.from_dict({"quant_method": "toy-alias"})  # the config module knows no aliases


# --------------------------------------------------------------------------------------------
# Structure: no import cycles, hook names derived from the specs
# --------------------------------------------------------------------------------------------


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Which modules of ``package`` import which others, lazy imports inside functions included.

    The package's ``__init__`` (a facade that re-exports everything) is left out.
    """
    files = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])]) \
                    if node.level else node.module
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {d for d in deps if d in files and d not in (name, package)}
    graph.pop(package, None)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize(("root", "package"), [
    (REPO, "qplug"),
    (REPO / "plugins" / "qplug-awq" / "src", "qplug_awq"),
    (REPO / "plugins" / "qplug-gptq" / "src", "qplug_gptq"),
    (REPO / "plugins" / "qplug-bitsandbytes" / "src", "qplug_bitsandbytes"),
])
def test_no_import_cycles(root, package):
    assert find_cycle(import_graph(root, package)) is None


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]


def test_a_misspelt_hook_is_refused_naming_the_real_ones():
    class Typo:
        @qplug.hookimpl
        def quantize_modul(self, config):
            return None

    with pytest.raises(qplug.PluginError, match=r"did you mean .quantize_module.*add_checkpoint_files"):
        qplug.register_plugin(Typo())
    assert json.dumps(list(hookspecs.HOOK_NAMES))  # a plain tuple of names
