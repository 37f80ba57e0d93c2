"""The ``awq`` backend's hook implementations (the ``qplug`` entry point).

Kept light: only the torch-free config module is imported at the top; torch and the
tensor modules are imported inside the hooks that touch a model.
"""

from __future__ import annotations

from typing import Any

import qplug
from qplug_awq.config import AwqConfig

__all__ = ["calibrate_blocks", "dequantize", "read_int_layer", "register_backends", "replace_modules", "serialize",
           "validate", "write_int_layer"]


@qplug.hookimpl
def register_backends():
    return [
        qplug.Backend(
            name="awq",
            config_class=AwqConfig,
            aliases=("autoawq",),
            requires=("torch>=2.1",),
            optional=("autoawq==0.2.9",),
            description="AWQ 4-bit (GEMM/GEMV checkpoints); runs without autoawq, uses its kernels where they work",
            presets={
                "awq-4bit": {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
                "awq-4bit-g64": {"bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
                "awq-4bit-gemv": {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"},
            },
            devices=("cpu", "cuda"),
        )
    ]


def _layout(config: AwqConfig) -> str:
    # exllama, ipex and gemv_fast kernels read (and repack) a GEMM checkpoint; gemv is its own layout
    return "gemv" if config.version == "gemv" else "gemm"


@qplug.backend_hookimpl(AwqConfig)
def validate(config: AwqConfig, model: Any, module_names: list[str] | None) -> None:
    if config.bits != 4:
        raise qplug.QuantConfigError(
            field="bits", value=config.bits, accepted="4: AWQ's checkpoint layouts and kernels are 4-bit",
            config="AwqConfig",
        )
    if config.version == "gemv_fast":
        raise qplug.QuantConfigError(
            field="version", value=config.version,
            accepted="gemm, gemv, exllama or ipex: the gemv_fast layout (interleaved for autoawq's "
                     "GEMVFast CUDA kernel) is not supported by qplug-awq",
            config="AwqConfig",
        )
    group = config.group_size
    for name in module_names or ():
        linear = model.get_submodule(name)
        in_f, out_f = linear.in_features, linear.out_features
        if out_f % 8 or in_f % 8 or (group != -1 and in_f % group):
            raise qplug.IncompatibleModelError(
                f"awq: {name} ({in_f} -> {out_f}) cannot be quantized with group_size={group}: AWQ needs "
                f"in_features divisible by group_size and both sizes divisible by 8; skip it with "
                f"modules_to_not_convert=[{name!r}]"
            )


@qplug.backend_hookimpl(AwqConfig)
def replace_modules(
    config: AwqConfig, model: Any, module_names: list[str], calibration: Any, prequantized: bool,
    checkpoint_tensors: Any,
):
    from qplug.checkpoint import needs_bias
    from qplug.modules import set_submodule
    from qplug_awq.linear import AwqLinear

    if prequantized:
        for name in module_names:
            linear = model.get_submodule(name)
            device = linear.weight.device
            layer = AwqLinear(
                linear.in_features, linear.out_features, bits=config.bits, group_size=config.group_size,
                version=_layout(config), bias=needs_bias(name, linear, checkpoint_tensors), device=device,
            )
            set_submodule(model, name, layer)
        return list(module_names)

    from qplug_awq.algorithm import quantize_model

    return quantize_model(model, module_names, calibration, _settings(config))


def _settings(config: AwqConfig):
    from qplug_awq.algorithm import AwqSettings

    return AwqSettings(
        bits=config.bits, group_size=config.group_size, zero_point=config.zero_point,
        version=_layout(config), duo_scaling=config.duo_scaling, apply_clip=config.apply_clip,
    )


@qplug.backend_hookimpl(AwqConfig)
def calibrate_blocks(config: AwqConfig, model: Any, module_names: list[str], calibration: Any):
    from qplug.blocks import BlockCalibration
    from qplug_awq.algorithm import BlockQuantizer, calibration_tokens, find_blocks

    name, _ = find_blocks(model, module_names)
    # all samples in one batch, as the whole-model path runs them
    batches = [{"input_ids": calibration_tokens(calibration)}]
    return BlockCalibration(name, batches, module_names, BlockQuantizer(module_names, _settings(config)))


@qplug.backend_hookimpl(AwqConfig)
def dequantize(config: AwqConfig, model: Any) -> list[str]:
    from qplug.modules import dequantized_dtype, set_submodule
    from qplug_awq.linear import AwqLinear

    dtype = dequantized_dtype(model)
    names = [name for name, module in model.named_modules() if isinstance(module, AwqLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear(dtype))
    return names


@qplug.backend_hookimpl(AwqConfig)
def serialize(config: AwqConfig, model: Any) -> dict[str, Any]:
    return config.to_dict()


# --------------------------------------------------------------------------------------------
# conversion (qplug.convert): AWQ GEMM and GEMV to and from the plain integer form
# --------------------------------------------------------------------------------------------


@qplug.backend_hookimpl(AwqConfig)
def read_int_layer(config: AwqConfig, name: str, module: Any):
    from qplug.conversion import PlainLayer

    channelwise = config.group_size == -1
    codes = module.packed_codes()
    if codes is None:
        return PlainLayer(module.int_weight(), module.bias, channelwise=channelwise)
    scale, zero = module.int_weight_parts()
    return PlainLayer.from_packed(codes, scale, zero, module.group_size, bias=module.bias, channelwise=channelwise)


@qplug.backend_hookimpl(AwqConfig)
def write_int_layer(config: AwqConfig, name: str, layer: Any):
    """4-bit weights, groups of contiguous columns, float16 scales and bias, in ``config.version``'s layout."""
    import torch

    from qplug.conversion import WrittenLayer, exact_cast, refuse
    from qplug_awq.linear import AwqLinear

    if layer.bits != 4:
        raise refuse(name, "awq", f"{layer.bits}-bit weights (AWQ's layouts hold 4-bit ones)")
    if layer.act_order:
        raise refuse(name, "awq", "its act-order g_idx (AWQ has no activation order)")
    layer.check_zeros_fit(name, "awq")
    scale = exact_cast(layer.scale, torch.float16, name=name, to="awq", what="scales")
    bias = exact_cast(layer.bias, torch.float16, name=name, to="awq", what="bias values")
    version = _layout(config)
    # GEMV stores packed codes' words as they are; GEMM interleaves along `out`, so it repacks the codes
    codes = layer.packed_codes() if version == "gemv" else None
    module = AwqLinear.from_unpacked(layer.checkpoint_order()[0] if codes is None else codes, layer.zero, scale,
                                     bias, group_size=layer.columns_per_group, bits=4, version=version)
    return WrittenLayer(module.state_dict(), {"bits": 4, "group_size": layer.group_size, "zero_point": True})
