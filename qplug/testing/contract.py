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
operation fails cleanly instead of skipping it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import torch
from torch import nn

import qplug
from qplug.testing.models import example_tokens, tiny_llama

__all__ = ["BackendContractTests", "relative_error"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` over all elements, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


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
    def tolerance(self) -> float:
        """Largest accepted relative error of the quantized logits against the float logits."""
        return 0.25

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
        for name, module in quantized.named_modules():
            if name and not list(module.children()) and hasattr(module, "weight") and module.weight is not None:
                if module.weight.dim() == 2 and not isinstance(module, nn.Embedding):
                    assert type(module) is nn.Linear, f"{name} is {type(module).__name__} after dequantize"
        after = _logits(quantized, tokens)
        assert relative_error(after, before) < dequantize_tolerance

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
