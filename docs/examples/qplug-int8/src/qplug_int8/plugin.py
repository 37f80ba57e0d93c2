"""The ``int8-weight`` backend: everything a qplug backend needs, in one file.

Weights are stored as int8 with one float scale per output row (symmetric, absmax / 127);
activations stay in floating point. The layer declares two kernels to the core's kernel choice
(:mod:`qplug.kernels`): torch's int8 weight-only matmul on the CPU, and a dequantize-and-multiply
that runs anywhere. ``qplug inspect`` shows which one each layer ran.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import qplug
from qplug.config import QuantConfig, dtype_name, instance_of, list_of, one_of, optional, to_list


@attrs.define(kw_only=True)
class Int8WeightConfig(QuantConfig):
    """``{"quant_method": "int8-weight", "compute_dtype": "float32", "modules_to_not_convert": null}``"""

    quant_method: ClassVar[str] = "int8-weight"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    compute_dtype: str = attrs.field(
        default="float32", converter=dtype_name, validator=one_of(("float32", "bfloat16", "float16"))
    )
    modules_to_not_convert: list[str] | None = attrs.field(
        default=None, converter=to_list, validator=optional(list_of(str))
    )
    bits: int = attrs.field(default=8, validator=[instance_of(int), one_of((8,))])


def _int8_linear_class():
    # torch is imported here, not at module level, so `qplug backends` stays fast.
    import torch
    from torch import nn

    from qplug.kernels import Kernel, KernelLayer

    def cpu_only(layer, device, dtype):
        return None if device.type == "cpu" else f"torch's int8 matmul is a CPU kernel, not for {device.type}"

    def int8_mm(layer, scales, x):
        out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.weight, scales)
        return out if layer.bias is None else out + layer.bias.to(x.dtype)

    def dequant_mm(layer, _layout, x):
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return nn.functional.linear(x, layer.float_weight(x.dtype), bias)

    class Int8Linear(KernelLayer, nn.Module):
        """A linear layer holding int8 weights and per-output-channel scales."""

        kernels = (
            # The run-time layout is just the scales in the input dtype, as the kernel wants them.
            Kernel("int8pack-cpu", refuses=cpu_only, forward=int8_mm,
                   prepare=lambda layer, device, dtype: layer.weight_scale.view(-1).to(dtype)),
            Kernel("dequant", refuses=lambda layer, device, dtype: None, forward=dequant_mm,
                   prepare=lambda layer, device, dtype: None),
        )

        def __init__(self, in_features, out_features, bias, compute_dtype, device=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.compute_dtype = compute_dtype
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
            self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

        @classmethod
        def from_linear(cls, linear, compute_dtype):
            device = linear.weight.device
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device)
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            module.weight.copy_(torch.round(w / scale).clamp(-127, 127).to(torch.int8))
            module.weight_scale.copy_(scale)
            if linear.bias is not None:
                module.bias = nn.Parameter(linear.bias.detach().clone())
            return module

        def dequantized_weight(self):
            return self.float_weight(self.compute_dtype)

        def float_weight(self, dtype):
            return (self.weight.float() * self.weight_scale).to(dtype)

        def forward(self, x):
            return self.run_kernel(x, self.compute_dtype).to(x.dtype)

        def _load_from_state_dict(self, *args, **kwargs):
            self.reset_kernel()  # the layout was built from the tensors being replaced
            super()._load_from_state_dict(*args, **kwargs)

        def to_linear(self):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            linear.weight = nn.Parameter(self.dequantized_weight())
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().to(self.compute_dtype))
            return linear

    return Int8Linear


@qplug.hookimpl
def register_backends():
    return [
        qplug.Backend(
            name="int8-weight",
            config_class=Int8WeightConfig,
            aliases=("int8w",),
            requires=("torch>=2.1",),
            description="int8 weight-only, per-channel scales (pure PyTorch example)",
            presets={"int8w": {}},
            # streams: implementing quantize_module below is what makes quantize-on-load stream
        )
    ]


@qplug.backend_hookimpl(Int8WeightConfig)
def validate(config, model, module_names):
    # module_names: the layers the core selected (None when only the config is checked)
    for name in module_names or ():
        weight = model.get_submodule(name).weight
        if not weight.is_floating_point():
            raise qplug.IncompatibleModelError(f"int8-weight: {name} holds {weight.dtype} weights, not floats")


@qplug.backend_hookimpl(Int8WeightConfig)
def replace_modules(config, model, module_names, prequantized, checkpoint_tensors):
    from qplug.config import torch_dtype
    from qplug.modules import get_submodule, set_submodule

    int8_linear = _int8_linear_class()
    dtype = torch_dtype(config.compute_dtype)
    for name in module_names:
        linear = get_submodule(model, name)
        if prequantized:  # an empty layer shaped as the checkpoint's tensors say (its bias, not the skeleton's)
            has_bias = f"{name}.bias" in checkpoint_tensors
            new = int8_linear(linear.in_features, linear.out_features, has_bias, dtype, linear.weight.device)
        else:
            new = int8_linear.from_linear(linear, dtype)
        set_submodule(model, name, new)
    return module_names


@qplug.backend_hookimpl(Int8WeightConfig)
def quantize_module(config, module):
    from qplug.config import torch_dtype

    return _int8_linear_class().from_linear(module, torch_dtype(config.compute_dtype))


@qplug.backend_hookimpl(Int8WeightConfig)
def dequantize(config, model):
    from qplug.modules import set_submodule

    names = [n for n, m in model.named_modules() if hasattr(m, "to_linear") and hasattr(m, "weight_scale")]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    return names


@qplug.backend_hookimpl(Int8WeightConfig)
def serialize(config, model):
    return config.to_dict()


# qplug.convert: int8 codes with one scale per row are an affine integer weight (zero point 128 once the
# codes are made unsigned), so these checkpoints convert to and from GPTQ's and compressed-tensors' 8-bit ones.


@qplug.backend_hookimpl(Int8WeightConfig)
def read_int_layer(config, module):
    import torch

    from qplug.conversion import PlainLayer
    from qplug.int_kernels import IntWeight

    q = (module.weight.to(torch.int16) + 128).to(torch.uint8)
    zero = torch.full((module.out_features, 1), 128, dtype=torch.int16)
    weight = IntWeight(q, module.weight_scale, zero, bits=8, group_size=module.in_features)
    return PlainLayer(weight, None if module.bias is None else module.bias.detach(), channelwise=True)


@qplug.backend_hookimpl(Int8WeightConfig)
def write_int_layer(config, name, layer):
    import torch

    from qplug.config import torch_dtype
    from qplug.conversion import WrittenLayer, exact_cast, refuse

    w = layer.weight
    if w.bits != 8 or not layer.symmetric or not layer.channelwise or layer.act_order:
        raise refuse(name, "int8-weight", "it holds symmetric 8-bit weights with one scale per row, in order")
    out_features, in_features = w.q.shape
    module = _int8_linear_class()(in_features, out_features, layer.bias is not None, torch_dtype(config.compute_dtype))
    module.weight.copy_((w.q.to(torch.int16) - 128).to(torch.int8))
    module.weight_scale.copy_(exact_cast(w.scale, torch.float32, name=name, to="int8-weight", what="scales"))
    if layer.bias is not None:
        module.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return WrittenLayer(module.state_dict(), settings={})
