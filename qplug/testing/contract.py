"""The contract every qplug backend keeps, as pytest tests a backend's own suite inherits.

Subclass :class:`BackendContractTests` in your plugin's tests and provide the fixtures marked
*override*::

    import pytest
    from qplug.testing import BackendContractTests

    class TestInt8Contract(BackendContractTests):
        @pytest.fixture
        def config(self):
            return Int8WeightConfig()

        @pytest.fixture
        def invalid_configs(self):
            return [({"quant_method": "int8-weight", "bits": 4}, "bits")]

A capability a backend lacks is declared in :meth:`capabilities`; the kit then asserts that the
operation fails cleanly instead of skipping it. The default :meth:`tolerance` depends on
:meth:`weight_bits`, read from the config's ``bits`` field; a config without one overrides it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import pytest
import torch
from torch import nn

import qplug
from qplug.testing.models import example_tokens, tiny_llama

__all__ = ["BackendContractTests", "default_tolerance", "relative_error"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` over all elements, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def default_tolerance(bits: int) -> float:
    """The kit's default bound on the relative logit error of a ``bits``-bit weight quantization.

    Measured on the kit's own model (:func:`~qplug.testing.tiny_llama`, Gaussian weights with no
    outliers, the hard case): 4-bit rounding reaches 0.31-0.39 (NF4, FP4, GPTQ, AWQ layouts), 8-bit
    0.02. Each bit removed about doubles the error, so the bound doubles too; below 4 bits a
    backend states its own.

    :raises ValueError: for ``bits`` below 4.
    """
    if bits >= 8:
        return 0.05
    if bits >= 4:
        return 0.45 * 2.0 ** (4 - bits)
    raise ValueError(f"qplug.testing: no default tolerance below 4 bits (got {bits}); override the 'tolerance' fixture")


def _must_override(fixture: str, what: str) -> Any:
    raise NotImplementedError(  # the kit's way of saying "provide this fixture"
        f"qplug.testing: your BackendContractTests subclass must override the {fixture!r} fixture ({what})"
    )


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


class BackendContractTests:
    """Behaviour every backend must have. Override the fixtures documented below."""

    # -- fixtures: override -------------------------------------------------------------------

    @pytest.fixture
    def config(self) -> qplug.QuantConfig:
        """*Override*: a valid config of your backend, ready to quantize :meth:`model`."""
        return _must_override("config", "a QuantConfig instance of your backend")

    @pytest.fixture
    def invalid_configs(self) -> list[tuple[dict[str, Any], str]]:
        """*Override*: ``(quantization_config dict, offending field)`` pairs that must be rejected."""
        return _must_override("invalid_configs", "a list of (config dict, offending field name) pairs")

    # -- fixtures: optional overrides ---------------------------------------------------------

    @pytest.fixture
    def model(self) -> nn.Module:
        """A fresh float model to quantize (default: :func:`qplug.testing.tiny_llama`)."""
        return tiny_llama(seed=0)

    @pytest.fixture
    def fresh_model(self) -> nn.Module:
        """Another float model of the same architecture to load a checkpoint into."""
        return tiny_llama(seed=123)

    @pytest.fixture
    def tokens(self, model: nn.Module) -> torch.Tensor:
        """The input used to compare outputs."""
        return example_tokens(model)

    @pytest.fixture
    def weight_bits(self, config: qplug.QuantConfig) -> int:
        """Bits per quantized weight, which sets the default :meth:`tolerance` (default: ``config.bits``)."""
        bits = getattr(config, "bits", None)
        if isinstance(bits, int) and not isinstance(bits, bool):
            return bits
        return _must_override("weight_bits", f"{type(config).__name__} has no int 'bits' field: "
                                             "the bits per quantized weight, e.g. 4 or 8")

    @pytest.fixture
    def tolerance(self, weight_bits: int) -> float:
        """Largest accepted relative error of the quantized logits against the float logits.

        The default depends on :meth:`weight_bits`: 0.05 from 8 bits up, 0.45 at 4 bits, doubling
        per bit removed in between. Below 4 bits there is no default; override this fixture.
        """
        return default_tolerance(weight_bits)

    @pytest.fixture
    def dequantize_tolerance(self) -> float:
        """Largest accepted relative difference between the quantized and the dequantized logits.

        Weight-only methods should stay well inside the default; a method that also quantizes
        activations (LLM.int8) needs more.
        """
        return 0.02

    @pytest.fixture
    def calibration(self, model: nn.Module) -> Any:
        """Calibration data passed to :func:`qplug.quantize` (``None`` when the method needs none)."""
        return None

    @pytest.fixture
    def capabilities(self) -> dict[str, bool]:
        """What the backend supports: ``dequantize``, ``load_without_model``."""
        return {"dequantize": True, "load_without_model": True}

    # -- helpers -----------------------------------------------------------------------------

    @pytest.fixture
    def quantized(self, model, config, calibration):
        """:meth:`model`, quantized with :meth:`config`."""
        return qplug.quantize(model, config, calibration=calibration)

    # -- config protocol ---------------------------------------------------------------------

    def test_config_is_registered_under_its_quant_method(self, config):
        assert qplug.get_config_class(config.quant_method) is type(config)
        assert config.quant_method in qplug.available_backends()

    def test_config_round_trips_through_dict(self, config):
        data = config.to_dict()
        assert data["quant_method"] == config.quant_method
        json.dumps(data)  # JSON-serialisable
        assert qplug.config_from_dict(data) == config
        assert type(config).from_dict(json.loads(config.to_json_string())) == config

    def test_config_round_trips_through_file(self, config, tmp_path):
        path = tmp_path / "quantization_config.json"
        config.to_json_file(path)
        assert qplug.load_config(path) == config
        whole = tmp_path / "config.json"
        whole.write_text(json.dumps({"model_type": "llama", "quantization_config": config.to_dict()}))
        assert qplug.load_config(whole) == config

    def test_diff_dict_rebuilds_the_same_config(self, config):
        diff = config.to_diff_dict()
        assert diff["quant_method"] == config.quant_method
        assert qplug.config_from_dict(diff) == config
        assert set(diff) <= set(config.to_dict())

    def test_unknown_keys_are_kept(self, config):
        data = {**config.to_dict(), "qplug_contract_unknown_key": [1, 2]}
        loaded = qplug.config_from_dict(data)
        assert loaded.to_dict()["qplug_contract_unknown_key"] == [1, 2]

    def test_invalid_configs_name_the_field(self, invalid_configs):
        assert invalid_configs, "invalid_configs must list at least one invalid config"
        for data, field in invalid_configs:
            with pytest.raises(qplug.QuantConfigError) as info:
                qplug.config_from_dict(data)
            assert field in str(info.value), f"error for {data!r} does not name {field!r}: {info.value}"

    def test_evolve_revalidates(self, config, invalid_configs):
        fields = type(config).field_names()
        cases = [(data, field) for data, field in invalid_configs if field in fields and field in data]
        assert cases, "invalid_configs needs at least one case whose offending key is a config field"
        for data, field in cases:
            with pytest.raises(qplug.QuantConfigError):
                attrs.evolve(config, **{field: data[field]})

    # -- module replacement ------------------------------------------------------------------

    def test_quantize_replaces_every_linear_but_the_head(self, quantized, config):
        from qplug.modules import output_head_names

        heads = output_head_names(quantized)
        assert heads, "the test model must have an output head"
        for head in heads:
            assert type(quantized.get_submodule(head)) is nn.Linear, f"output head {head} was replaced"
        still_plain = set(_linear_names(quantized)) - heads
        assert not still_plain, f"still plain nn.Linear after quantize: {sorted(still_plain)}"
        assert qplug.quantized_config(quantized) is not None

    def test_a_model_without_linear_layers_is_refused(self, config, calibration):
        with pytest.raises(qplug.IncompatibleModelError, match=r"has no nn\.Linear"):
            qplug.quantize(_NoLinear(), config, calibration=calibration)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
    def test_integer_input_is_refused_as_nn_linear_refuses_it(self, quantized, dtype):
        name = next(n for n, m in quantized.named_modules() if n and _is_quantized_linear(m))
        layer = quantized.get_submodule(name)
        x = torch.ones(2, layer.in_features, dtype=dtype)
        with pytest.raises(RuntimeError):
            nn.Linear(layer.in_features, layer.out_features)(x)
        with pytest.raises(RuntimeError, match=f"input of dtype {dtype}.*floating-point input"):
            layer(x)

    def test_skip_list_adds_to_the_defaults(self, model, config, calibration):
        first = next(name for name, m in model.named_modules() if type(m) is nn.Linear)
        qplug.quantize(model, config, calibration=calibration, skip=[first])
        assert type(model.get_submodule(first)) is nn.Linear
        from qplug.modules import output_head_names

        for head in output_head_names(model):
            assert type(model.get_submodule(head)) is nn.Linear
        assert first in qplug.quantized_config(model).skip_patterns()

    def test_forward_is_close_to_float(self, model, config, calibration, tokens, tolerance):
        expected = _logits(model, tokens)
        qplug.quantize(model, config, calibration=calibration)
        actual = _logits(model, tokens)
        assert torch.isfinite(actual).all()
        error = relative_error(actual, expected)
        assert 0 < error < tolerance, f"relative logit error {error:.4f} (tolerance {tolerance})"

    def test_dequantize_gives_plain_linear_modules(self, quantized, tokens, capabilities, dequantize_tolerance):
        if not capabilities.get("dequantize", True):
            with pytest.raises(qplug.QPlugError):
                qplug.dequantize(quantized)
            return
        before = _logits(quantized, tokens)
        qplug.dequantize(quantized)
        assert qplug.quantized_config(quantized) is None
        # Quantized layers hold packed tensors (qweight, ...) rather than a weight: look for the layer
        # kind, not for a 2-D weight.
        left = [f"{n} ({type(m).__name__})" for n, m in quantized.named_modules() if n and _is_quantized_linear(m)]
        assert not left, f"still quantized after dequantize: {', '.join(left)}"
        after = _logits(quantized, tokens)
        assert relative_error(after, before) < dequantize_tolerance

    def test_dequantize_turns_back_exactly_the_modules_quantize_replaced(self, model, config, calibration,
                                                                         capabilities):
        linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        with _recorded_answers() as answers:
            qplug.quantize(model, config, calibration=calibration)
        replaced = sorted(name for name, linear in linears.items() if _was_replaced(model, name, linear))
        assert replaced, "quantize replaced no nn.Linear"
        assert answers.names("replace_modules") == replaced, (
            f"replace_modules returned {answers.names('replace_modules')}, but quantize replaced {replaced}"
        )
        if not capabilities.get("dequantize", True):
            return  # test_dequantize_gives_plain_linear_modules checks the refusal
        with _recorded_answers() as answers:
            qplug.dequantize(model)
        for name in replaced:
            module, linear = model.get_submodule(name), linears[name]
            assert type(module) is nn.Linear, f"{name} is {type(module).__name__} after dequantize, not nn.Linear"
            assert (module.in_features, module.out_features) == (linear.in_features, linear.out_features), name
            assert (module.bias is None) == (linear.bias is None), f"{name}: dequantize changed whether it has a bias"
            assert module.weight.device.type != "meta" and torch.isfinite(module.weight).all(), name
        assert answers.names("dequantize") == replaced, (
            f"dequantize returned {answers.names('dequantize')}, but quantize replaced {replaced}"
        )

    # -- hooks -------------------------------------------------------------------------------

    def test_hooks_decline_configs_they_do_not_own(self, config, model):
        """Every per-config hook of the backend returns None for another backend's config, touching nothing.

        Answering for a foreign config would take over another backend's models (``firstresult``
        hooks stop at the first answer). :func:`qplug.backend_hookimpl` declines by itself.
        """
        manager = qplug.get_plugin_manager()
        owners = _plugins_providing(manager, config.quant_method)
        assert owners, f"no registered plugin declares the backend {config.quant_method!r}"
        foreign = _ForeignConfig()
        arguments = {"config": foreign, "model": model, "module_names": _linear_names(model),
                     "calibration": None, "prequantized": False}
        modules = dict(model.named_modules())
        tensors = {name: t.clone() for name, t in model.state_dict().items()}
        asked = []
        for hook_name, caller in _per_config_hooks(manager):
            for impl in caller.get_hookimpls():
                if impl.plugin not in owners or impl.wrapper or impl.hookwrapper:
                    continue  # wrappers pass results on; they do not answer
                # Called as pluggy calls it: positionally, the arguments the implementation names
                # (one this kit does not know is None).
                answer = impl.function(*(arguments.get(arg) for arg in impl.argnames))
                assert answer is None, (
                    f"{impl.plugin_name}'s {hook_name} answered {answer!r:.80} for {type(foreign).__name__}, "
                    f"a config it does not own (use qplug.backend_hookimpl({type(config).__name__}))"
                )
                asked.append(hook_name)
        assert asked, f"the plugin of {config.quant_method!r} implements no hook that takes a config"
        changed = [n for n, m in model.named_modules() if modules.get(n) is not m]
        changed += [n for n, t in model.state_dict().items() if n not in tensors or not torch.equal(t, tensors[n])]
        assert not changed, f"hooks changed the model for a config they do not own: {changed}"

    def test_validate_checks_a_config_without_a_model(self, config):
        """``validate(config, None)``: checking a config alone (``qplug config validate``) works."""
        hook = qplug.get_plugin_manager().hook.validate
        hook(**{**dict.fromkeys(hook.spec.argnames), "config": config, "model": None})

    def test_quantize_on_load_equals_quantize(self, model, fresh_model, config, tokens, tmp_path):
        """A streaming backend quantizes a float checkpoint while loading it exactly as :func:`qplug.quantize`
        quantizes the model without calibration data (streaming is data-free, so a backend that calibrates
        when given data is compared with its data-free path); any other backend refuses to, cleanly."""
        from qplug.checkpoint import state_tensors, write_checkpoint

        tensors, tied = state_tensors(model)
        hf_config = getattr(model, "config", None)
        model_config = hf_config.to_dict() if callable(getattr(hf_config, "to_dict", None)) else {}
        write_checkpoint(tmp_path / "float", tensors, model_config, tied=tied)
        if not qplug.get_plugin_manager().backend_for_config(config).streams:
            with pytest.raises(qplug.QPlugError, match="while loading"):
                qplug.load_quantized(tmp_path / "float", fresh_model, quantization_config=config)
            return
        streamed = qplug.load_quantized(tmp_path / "float", fresh_model, quantization_config=config)
        qplug.quantize(model, config)
        assert qplug.quantized_config(streamed) == qplug.quantized_config(model)
        expected, actual = model.state_dict(), streamed.state_dict()
        assert list(actual) == list(expected)
        differ = [n for n, t in expected.items() if isinstance(t, torch.Tensor) and not torch.equal(actual[n], t)]
        assert not differ, f"quantize-on-load and quantize disagree on {differ}"
        assert torch.equal(_logits(streamed, tokens), _logits(model, tokens))

    # -- checkpoints -------------------------------------------------------------------------

    def test_save_then_load_gives_identical_outputs(self, quantized, fresh_model, tokens, tmp_path):
        expected = _logits(quantized, tokens)
        qplug.save_quantized(quantized, tmp_path / "ckpt")
        loaded = qplug.load_quantized(tmp_path / "ckpt", model=fresh_model)
        assert torch.equal(_logits(loaded, tokens), expected)

    def test_load_without_model_builds_it(self, quantized, tokens, tmp_path, capabilities):
        qplug.save_quantized(quantized, tmp_path / "ckpt")
        if not capabilities.get("load_without_model", True):
            with pytest.raises(qplug.QPlugError):
                qplug.load_quantized(tmp_path / "ckpt")
            return
        loaded = qplug.load_quantized(tmp_path / "ckpt")
        assert torch.equal(_logits(loaded, tokens), _logits(quantized, tokens))

    def test_saved_config_reloads(self, quantized, tmp_path):
        qplug.save_quantized(quantized, tmp_path / "ckpt")
        data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        assert qplug.config_from_dict(data["quantization_config"]) == qplug.quantized_config(quantized)


@attrs.define(kw_only=True)
class _ForeignConfig(qplug.QuantConfig):
    """A config no backend owns (never registered): what every backend's hooks must decline."""

    quant_method: ClassVar[str] = "qplug-contract-foreign"


class _AnswerRecorder:
    """A plugin that records what ``replace_modules`` and ``dequantize`` answered, changing nothing."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Any]] = {"replace_modules": [], "dequantize": []}

    def names(self, hook_name: str) -> list[str] | None:
        """The sorted names of the one call of ``hook_name`` (``None`` when it answered ``None``)."""
        calls = self.answers[hook_name]
        assert len(calls) == 1, f"{hook_name} was called {len(calls)} times, not once"
        return None if calls[0] is None else sorted(calls[0])

    @qplug.hookimpl(wrapper=True)
    def replace_modules(self):
        answer = yield
        self.answers["replace_modules"].append(answer)
        return answer

    @qplug.hookimpl(wrapper=True)
    def dequantize(self):
        answer = yield
        self.answers["dequantize"].append(answer)
        return answer


@contextlib.contextmanager
def _recorded_answers() -> Iterator[_AnswerRecorder]:
    recorder = _AnswerRecorder()
    name = qplug.register_plugin(recorder, name="qplug-contract-recorder")
    try:
        yield recorder
    finally:
        qplug.unregister_plugin(name=name)


def _was_replaced(model: nn.Module, name: str, linear: nn.Linear) -> bool:
    try:
        now = model.get_submodule(name)
    except AttributeError:
        return True
    return now is not linear or type(now) is not nn.Linear


def _plugins_providing(manager: Any, backend_name: str) -> list[object]:
    """The plugin objects whose ``register_backends`` declares ``backend_name``."""
    return [impl.plugin for impl in manager.hook.register_backends.get_hookimpls()
            if any(getattr(b, "name", None) == backend_name for b in impl.function() or ())]


def _per_config_hooks(manager: Any) -> Iterator[tuple[str, Any]]:
    """``(name, hook caller)`` of every hook that takes a ``config``, read from the hook specs."""
    relay = manager.hook
    for hook_name in sorted(dir(relay)):
        caller = getattr(relay, hook_name)
        if not hook_name.startswith("_") and getattr(caller, "spec", None) is not None \
                and "config" in caller.spec.argnames:
            yield hook_name, caller


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


class _NoLinear(nn.Module):
    """Embeddings and a convolution, but no nn.Linear: nothing any backend could quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.conv = nn.Conv1d(32, 32, 1)

    def forward(self, ids):
        return self.conv(self.embed(ids).transpose(1, 2))


def _is_quantized_linear(module: nn.Module) -> bool:
    """A leaf with in/out features that is no longer a plain nn.Linear: a backend's quantized layer."""
    return (type(module) is not nn.Linear and hasattr(module, "in_features") and hasattr(module, "out_features")
            and not any(True for _ in module.children()))
