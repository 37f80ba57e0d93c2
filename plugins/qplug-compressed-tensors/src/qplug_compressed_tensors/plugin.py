"""The ``compressed-tensors`` backend's hook implementations (the ``qplug`` entry point).

Kept light: only the torch-free config module is imported here; torch, the compressed-tensors library
and the tensor modules are imported inside the hooks that touch a model.
"""

from __future__ import annotations

from typing import Any

import qplug
from qplug_compressed_tensors.config import CompressedTensorsConfig, scheme_dict

__all__ = ["calibrate_blocks", "dequantize", "read_int_layer", "register_backends", "replace_modules", "serialize",
           "validate", "write_int_layer"]

_DESCRIPTION = (
    "compressed-tensors (llm-compressor, vLLM): weight-only int4/int8 (W4A16, W8A16; group, channel, tensor; "
    "symmetric or not; act-order g_idx) in pack-quantized, int-quantized, naive-quantized; quantizes "
    "round-to-nearest (streams) or GPTQ with calibration"
)

#: What compressed-tensors checkpoints may hold that this backend does not run (``qplug backends`` lists it;
#: the config's checks refuse each case by name when a checkpoint holds it).
_REFUSES = {
    "FP8, NVFP4, MXFP4 weights": "float weights: qplug's kernels run integer weights only",
    "W8A8, W4A8, FP8 dynamic": "activation quantization: qplug runs weight-only schemes (W4A16, W8A16)",
    "2-, 3-, 5-7-bit weights": "widths other than 4 and 8 pack differently across compressed-tensors releases",
    "sparse formats (2:4, bitmask, marlin-24)": "sparsity is not run",
    "kv_cache_scheme": "qplug does not quantize the KV cache",
    "transform_config": "weight transforms (Hadamard rotations: QuIP, SpinQuant) are not run",
}


def _preset(bits: int, *, symmetric: bool = True, strategy: str = "group", group_size: int | None = 128):
    return {"config_groups": {"group_0": scheme_dict(bits, symmetric=symmetric, strategy=strategy,
                                                     group_size=group_size)}}


@qplug.hookimpl
def register_backends():
    return [
        qplug.Backend(
            name="compressed-tensors",
            config_class=CompressedTensorsConfig,
            aliases=("ct", "compressed_tensors"),
            requires=("torch>=2.1", "compressed-tensors>=0.19"),
            optional=("qplug-gptq",),
            description=_DESCRIPTION,
            presets={
                "w4a16": _preset(4),
                "w4a16-asym": _preset(4, symmetric=False),
                "w8a16": _preset(8),
                "w8a16-channel": _preset(8, strategy="channel", group_size=None),
            },
            devices=("cpu", "cuda"),
            refuses=_REFUSES,
            streams=True,  # round-to-nearest quantizes each layer from its own weights while loading
        )
    ]


def _assigned(config: CompressedTensorsConfig, model: Any, names: list[str]):
    from qplug_compressed_tensors.targets import assign_schemes

    return assign_schemes(model, names, config.schemes(), config.ignore or ())


@qplug.backend_hookimpl(CompressedTensorsConfig)
def validate(config: CompressedTensorsConfig, model: Any) -> None:
    config.check_loadable()
    if model is None:
        return
    from qplug.modules import select_modules

    names = select_modules(model, config.skip_patterns(), warn_unmatched=False).names
    for name, scheme in _assigned(config, model, names).items():
        linear = model.get_submodule(name)
        in_f = getattr(linear, "in_features", None)
        if in_f is None:
            continue
        per_word = 32 // scheme.num_bits
        if scheme.strategy == "group" and in_f % scheme.group_size:
            raise qplug.IncompatibleModelError(
                f"compressed-tensors: {name} has in_features={in_f}, which groups of {scheme.group_size} "
                f"(config group {scheme.name!r}) do not divide; add it to ignore=[{name!r}]"
            )
        if scheme.format == "pack-quantized" and in_f % per_word:
            raise qplug.IncompatibleModelError(
                f"compressed-tensors: {name} has in_features={in_f}, not a multiple of {per_word}: "
                f"{scheme.num_bits}-bit pack-quantized weights fill whole int32 words; add it to ignore=[{name!r}]"
            )


@qplug.backend_hookimpl(CompressedTensorsConfig)
def replace_modules(config: CompressedTensorsConfig, model: Any, module_names: list[str], calibration: Any,
                    prequantized: bool):
    from torch import nn

    from qplug.modules import set_submodule
    from qplug_compressed_tensors.linear import CompressedTensorsLinear

    assigned = _assigned(config, model, list(module_names))
    for name in assigned:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise qplug.IncompatibleModelError(
                f"compressed-tensors: module {name!r} is a {type(model.get_submodule(name)).__name__}, not an nn.Linear"
            )
    formats = {name: scheme.format for name, scheme in assigned.items()}
    if prequantized:
        for name, scheme in assigned.items():
            linear = model.get_submodule(name)
            layer = CompressedTensorsLinear(
                linear.in_features, linear.out_features, bits=scheme.num_bits, strategy=scheme.strategy,
                group_size=scheme.group_size, symmetric=scheme.symmetric, format=formats[name],
                g_idx=scheme.has_g_idx, bias=linear.bias is not None, scale_dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            set_submodule(model, name, layer)
        return list(assigned)
    if calibration is None:
        from qplug_compressed_tensors.quantize import rtn_layer

        for name, scheme in assigned.items():
            set_submodule(model, name, rtn_layer(model.get_submodule(name), scheme, formats[name]))
        return list(assigned)
    from qplug_compressed_tensors.quantize import gptq_layers

    for name, layer in gptq_layers(model, assigned, calibration, formats).items():
        set_submodule(model, name, layer)
    return list(assigned)


@qplug.backend_hookimpl(CompressedTensorsConfig)
def calibrate_blocks(config: CompressedTensorsConfig, model: Any, module_names: list[str], calibration: Any):
    from qplug_compressed_tensors.quantize import gptq_block_calibration

    if calibration is None:  # round-to-nearest streams layer by layer (quantize_module's path)
        return None
    assigned = _assigned(config, model, list(module_names))
    formats = {name: scheme.format for name, scheme in assigned.items()}
    return gptq_block_calibration(model, assigned, calibration, formats)


@qplug.backend_hookimpl(CompressedTensorsConfig)
def dequantize(config: CompressedTensorsConfig, model: Any) -> list[str]:
    from qplug.modules import set_submodule
    from qplug_compressed_tensors.linear import CompressedTensorsLinear

    names = [name for name, module in model.named_modules() if isinstance(module, CompressedTensorsLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    return names


@qplug.backend_hookimpl(CompressedTensorsConfig)
def serialize(config: CompressedTensorsConfig, model: Any) -> dict[str, Any]:
    data = config.to_dict()
    if model is None:
        return data
    # Linear layers some group targets but qplug left in floating point (the output head, say) must be in
    # `ignore`, or compressed-tensors would look for their packed weights when transformers loads the checkpoint.
    from torch import nn

    from qplug_compressed_tensors.targets import matches_any

    ignore = list(data.get("ignore") or [])
    targets = [t for s in config.schemes() for t in s.targets]
    for name, module in model.named_modules():
        if type(module) is nn.Linear and matches_any(name, module, targets) and not matches_any(name, module, ignore):
            ignore.append(name)
    if ignore != list(data.get("ignore") or []):
        data["ignore"] = ignore
    return data


# --------------------------------------------------------------------------------------------
# conversion (qplug.convert): pack-quantized to and from the plain integer form
# --------------------------------------------------------------------------------------------


@qplug.backend_hookimpl(CompressedTensorsConfig)
def read_int_layer(config: CompressedTensorsConfig, name: str, module: Any):
    from qplug.conversion import PlainLayer

    # the tensor strategy's one scale reads as one group per row, which is what it is
    channelwise = module.strategy != "group"
    codes = module.packed_codes()
    if codes is None:
        return PlainLayer(module.int_weight(), module.bias, channelwise=channelwise)
    packed_zeros = module.packed_zero_points()  # handed over packed: a target storing them so copies the words
    if packed_zeros is None:
        scale, zero, group, perm = module.int_weight_parts()
    else:
        scale, zero, group, perm = module.int_weight_parts(zeros=False)
        zero = packed_zeros
    return PlainLayer.from_packed(codes, scale, zero, group, perm=perm, bias=module.bias, channelwise=channelwise)


@qplug.backend_hookimpl(CompressedTensorsConfig)
def write_int_layer(config: CompressedTensorsConfig, name: str, layer: Any):
    """4- and 8-bit weights in ``pack-quantized``: group or channel strategy, symmetric when every zero
    point is ``2**(bits-1)`` (then none is stored), scales in their dtype; no act-order."""
    from qplug.conversion import WrittenLayer, exact_cast, refuse
    from qplug_compressed_tensors.linear import CompressedTensorsLinear

    to = "compressed-tensors"
    if config.format != "pack-quantized":
        raise refuse(name, to, f"format={config.format!r}: qplug converts to 'pack-quantized' only")
    if layer.bits not in (4, 8):
        raise refuse(name, to, f"{layer.bits}-bit weights (4 and 8 carry over)")
    if layer.act_order:
        raise refuse(name, to, "its act-order g_idx (compressed-tensors 0.20 removed activation order 'group', "
                               "so transformers and vLLM could not load it)")
    layer.check_zeros_fit(name, to)
    symmetric = layer.symmetric
    strategy = "channel" if layer.channelwise else "group"
    group = layer.columns_per_group if strategy == "group" else None
    bias = exact_cast(layer.bias, layer.scale.dtype, name=name, to=to, what="bias values")
    codes = layer.packed_codes()  # weight_packed is these words as they are
    module = CompressedTensorsLinear.from_integers(
        layer.checkpoint_order()[0] if codes is None else codes, layer.scale.contiguous(),
        None if symmetric else layer.zero, bits=layer.bits, strategy=strategy, group_size=group, bias=bias,
    )
    scheme = scheme_dict(layer.bits, symmetric=symmetric, strategy=strategy, group_size=group)
    return WrittenLayer(module.state_dict(), {"config_groups": {"group_0": scheme}})
