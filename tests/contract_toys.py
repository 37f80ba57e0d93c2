"""Toy backends for proving the contract kit: one that keeps the contract, and others broken in one way each.

``RtnPlugin`` rounds each row of a weight to ``bits`` bits with its own absmax scale and stores it
as ``qweight`` (as GPTQ and AWQ layers do: there is no ``.weight`` for a check to find). Every
subclass breaks exactly one promise; ``tests/test_contract_kit.py`` runs the kit against each and
names the kit test that must fail.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import nn

import qplug
from qplug.config import QuantConfig, instance_of, list_of, one_of, optional, to_list


@attrs.define(kw_only=True)
class RtnConfig(QuantConfig):
    """``{"quant_method": "toy-rtn", "bits": 8}``"""

    quant_method: ClassVar[str] = "toy-rtn"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    bits: int = attrs.field(default=8, validator=[instance_of(int), one_of((4, 8))])
    modules_to_not_convert: list[str] | None = attrs.field(
        default=None, converter=to_list, validator=optional(list_of(str))
    )


class RtnLinear(nn.Module):
    """Row-wise round-to-nearest weights (``qweight``, ``scale``) and a float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, scale: torch.Tensor | None = None) -> RtnLinear:
        """``linear`` rounded to ``bits`` bits; ``scale`` (default: each row's absmax) sets the grid."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        weight = linear.weight.detach().float()
        top = 2 ** (bits - 1) - 1
        if scale is None:
            scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
        module.scale.copy_(scale.expand_as(module.scale))
        module.qweight.copy_(torch.round(weight / module.scale).clamp(-top, top).to(torch.int8))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise RuntimeError(f"RtnLinear: input of dtype {x.dtype}; like nn.Linear, it takes floating-point input")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, (self.qweight.float() * self.scale).to(x.dtype), bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.qweight.float() * self.scale)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear


class RtnPlugin:
    """The toy backend that keeps the contract."""

    @qplug.hookimpl
    def register_backends(self):
        return [qplug.Backend(name="toy-rtn", config_class=RtnConfig, streams=True)]

    @qplug.backend_hookimpl(RtnConfig)
    def validate(self, config, model):
        if model is not None and not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise qplug.IncompatibleModelError(f"toy-rtn: {type(model).__name__} has no nn.Linear")

    @qplug.backend_hookimpl(RtnConfig)
    def replace_modules(self, config, model, module_names, prequantized):
        from qplug.modules import set_submodule

        scale = None if prequantized else self.scale(config, model, module_names)
        for name in module_names:
            linear = model.get_submodule(name)
            if prequantized:  # an empty layer: the checkpoint's tensors fill it
                new = RtnLinear(linear.in_features, linear.out_features, linear.bias is not None)
            else:
                new = RtnLinear.from_linear(linear, self.rounding_bits(config), scale)
            set_submodule(model, name, new)
        return list(module_names)

    def rounding_bits(self, config: RtnConfig) -> int:
        return config.bits

    def scale(self, config: RtnConfig, model: nn.Module, module_names: list[str]) -> torch.Tensor | None:
        return None  # each row its own

    @qplug.backend_hookimpl(RtnConfig)
    def dequantize(self, config, model):
        from qplug.modules import set_submodule

        names = [name for name, module in model.named_modules() if isinstance(module, RtnLinear)]
        for name in names:
            set_submodule(model, name, model.get_submodule(name).to_linear())
        return names

    @qplug.backend_hookimpl(RtnConfig)
    def serialize(self, config, model):
        return config.to_dict()


class DequantizeDoesNothing(RtnPlugin):
    """``dequantize`` answers ``[]`` and leaves every ``RtnLinear`` in place."""

    @qplug.backend_hookimpl(RtnConfig)
    def dequantize(self, config, model):
        return []


class DequantizeNamesNothing(RtnPlugin):
    """``dequantize`` converts every layer back but returns no names."""

    @qplug.backend_hookimpl(RtnConfig)
    def dequantize(self, config, model):
        RtnPlugin.dequantize(self, config, model)
        return []


class DequantizeMissesOne(RtnPlugin):
    """``dequantize`` leaves the last quantized layer quantized, yet names it as converted."""

    @qplug.backend_hookimpl(RtnConfig)
    def dequantize(self, config, model):
        from qplug.modules import set_submodule

        names = [name for name, module in model.named_modules() if isinstance(module, RtnLinear)]
        for name in names[:-1]:
            set_submodule(model, name, model.get_submodule(name).to_linear())
        return names


class ReplaceMisreports(RtnPlugin):
    """``replace_modules`` replaces every selected module but leaves the first out of its answer."""

    @qplug.backend_hookimpl(RtnConfig)
    def replace_modules(self, config, model, module_names, prequantized):
        return RtnPlugin.replace_modules(self, config, model, module_names, prequantized)[1:]


class SerializesAnyConfig(RtnPlugin):
    """``serialize`` is marked with the plain ``hookimpl``: it answers for every backend's config."""

    @qplug.hookimpl
    def serialize(self, config, model):
        return config.to_dict()


class ValidateNeedsAModel(RtnPlugin):
    """``validate`` assumes a model: ``validate(config, None)`` raises ``AttributeError``."""

    @qplug.backend_hookimpl(RtnConfig)
    def validate(self, config, model):
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise qplug.IncompatibleModelError(f"toy-rtn: {type(model).__name__} has no nn.Linear")


class ScaleSharedByTheCall(RtnPlugin):
    """One scale for every module of a ``replace_modules`` call: streaming (one module a call) differs."""

    def scale(self, config, model, module_names):
        top = 2 ** (config.bits - 1) - 1
        return torch.stack([model.get_submodule(n).weight.detach().abs().max() for n in module_names]).max() / top


class RoundsTwoBitsShort(RtnPlugin):
    """Rounds to ``bits - 2`` bits: an 8-bit config gets 6-bit error.

    0.086 relative logit error against 0.022 at 8 bits: inside the kit's old single default (0.25).
    """

    def rounding_bits(self, config):
        return config.bits - 2
