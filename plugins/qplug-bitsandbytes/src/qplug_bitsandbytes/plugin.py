"""The qplug entry point of the bitsandbytes backend.

Light on purpose: only the (torch-free) config is imported here; torch and bitsandbytes are
imported inside the hooks that touch a model, so ``qplug backends`` stays fast and a missing
bitsandbytes is reported as :class:`qplug.BackendUnavailableError`, not raised at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import qplug
from qplug_bitsandbytes.config import BitsAndBytesConfig

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType

    from torch import nn

__all__ = [
    "BACKEND_NAME",
    "PRESETS",
    "dequantize",
    "quantize_module",
    "register_backends",
    "replace_modules",
    "serialize",
    "validate",
]

BACKEND_NAME = "bitsandbytes"
REQUIREMENT = "bitsandbytes>=0.48"
INSTALL = f"pip install '{REQUIREMENT}'"

#: Named settings for the common cases (the CLI's ``--method`` accepts them).
PRESETS: dict[str, dict[str, Any]] = {
    # QLoRA's recipe: NF4, double quantization, bfloat16 compute.
    "nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    },
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


def _modules() -> ModuleType:
    """:mod:`qplug_bitsandbytes.modules`, or :class:`qplug.BackendUnavailableError` with the pip command."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:  # absent, or present but broken (e.g. no native library)
        raise qplug.BackendUnavailableError(
            f"backend {BACKEND_NAME!r} needs bitsandbytes, which cannot be imported ({exc}): {INSTALL}",
            backend=BACKEND_NAME,
            install=INSTALL,
        ) from exc
    from qplug_bitsandbytes import modules

    return modules


@qplug.hookimpl
def register_backends() -> list[qplug.Backend]:
    return [
        qplug.Backend(
            name=BACKEND_NAME,
            config_class=BitsAndBytesConfig,
            aliases=("bnb",),
            requires=("torch>=2.1", REQUIREMENT),
            description="bitsandbytes: 4-bit NF4/FP4 (double quant, QLoRA) and 8-bit LLM.int8; HF-compatible",
            presets=PRESETS,
            devices=("cpu", "cuda", "xpu"),
            # streams: data-free, each layer is quantized from its own weights (quantize_module)
        )
    ]


@qplug.backend_hookimpl(BitsAndBytesConfig)
def validate(config: BitsAndBytesConfig, model: nn.Module | None) -> None:
    if model is None:
        return
    # Loading a checkpoint does not run check_quantizable, but a model needs one of the two modes.
    config.check_quantizable()


def _layer_settings(config: BitsAndBytesConfig) -> dict[str, Any]:
    from qplug.config import torch_dtype

    if config.load_in_4bit:
        return dict(
            quant_type=config.bnb_4bit_quant_type,
            compute_dtype=torch_dtype(config.bnb_4bit_compute_dtype),
            double_quant=config.bnb_4bit_use_double_quant,
            quant_storage=torch_dtype(config.bnb_4bit_quant_storage),
        )
    return dict(threshold=config.llm_int8_threshold, has_fp16_weights=config.llm_int8_has_fp16_weight)


def _quantized(config: BitsAndBytesConfig, name: str, linear: nn.Module, modules: ModuleType) -> nn.Module:
    if linear.weight.device.type == "meta":
        raise qplug.IncompatibleModelError(
            f"module {name!r}: its weight is on the meta device; quantizing needs real weights "
            "(load the float model first, or use qplug.load_quantized for a quantized checkpoint)"
        )
    quantize = modules.quantize_4bit if config.load_in_4bit else modules.quantize_8bit
    return quantize(linear, **_layer_settings(config))


def _mark(config: BitsAndBytesConfig, model: nn.Module) -> None:
    # What transformers sets on a bitsandbytes model; peft reads it to pick its bnb LoRA layers.
    model.is_loaded_in_4bit = config.load_in_4bit
    model.is_loaded_in_8bit = not config.load_in_4bit


@qplug.backend_hookimpl(BitsAndBytesConfig)
def replace_modules(
    config: BitsAndBytesConfig, model: nn.Module, module_names: list[str], prequantized: bool,
    checkpoint_tensors: Mapping[str, Any] | None,
) -> list[str]:
    from qplug.checkpoint import needs_bias
    from qplug.modules import get_submodule, set_submodule
    from qplug.progress import track

    modules = _modules()
    names = list(module_names)
    if prequantized:
        names += _heads_quantized_in(checkpoint_tensors, model, names)
    empty = modules.empty_4bit if config.load_in_4bit else modules.empty_8bit
    # Building empty modules for a checkpoint is instant; quantizing weights is the long work.
    for name in names if prequantized else track(names, "bitsandbytes", unit="modules"):
        linear = get_submodule(model, name)
        if prequantized:
            new = empty(linear.in_features, linear.out_features, needs_bias(name, linear, checkpoint_tensors),
                        **_layer_settings(config))
            new.train(linear.training)
        else:
            new = _quantized(config, name, linear, modules)
        set_submodule(model, name, new)
    _mark(config, model)
    return names


@qplug.backend_hookimpl(BitsAndBytesConfig)
def quantize_module(config: BitsAndBytesConfig, model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    _mark(config, model)
    return _quantized(config, name, module, _modules())


def _heads_quantized_in(
    checkpoint_tensors: Mapping[str, Any] | None, model: nn.Module, selected: list[str]
) -> list[str]:
    """Output heads the checkpoint holds quantized: it has their 4-bit ``absmax`` or 8-bit ``SCB``.

    qplug keeps the head in floating point, but transformers quantizes it when a checkpoint's
    ``llm_int8_skip_modules`` is a list that leaves it out; such checkpoints load as they are.
    """
    from qplug.modules import output_head_names

    if not checkpoint_tensors:
        return []
    quantized_marks = ("weight.absmax", "SCB")
    return sorted(
        head for head in output_head_names(model)
        if head not in selected and any(f"{head}.{mark}" in checkpoint_tensors for mark in quantized_marks)
    )


# -- output heads when saving: transformers' rule ----------------------------------------------
#
# qplug always keeps the output head in floating point; ``llm_int8_skip_modules`` adds to that.
# transformers adds its default skips (the head, tied weights) only when the list is None: given
# a list, it quantizes every linear the list does not name, the head included. So that
# transformers reads qplug's checkpoints the way qplug wrote them, qplug names the float head in a
# non-None list when saving.


def _hf_skips(name: str, patterns: list[str]) -> bool:
    r"""transformers' ``should_convert_module`` rule, negated: does a pattern skip ``name``?

    transformers tries each key as a regular expression matched at the start of the name and ending
    at a dot boundary (``re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", name)``). Keys come from
    checkpoints, so they are matched with qplug's linear-time engine instead of Python's ``re``.
    """
    from qplug.patterns import PatternError, compile_pattern

    for key in patterns:
        if name.endswith(key):
            return True
        try:
            ends = compile_pattern(key).prefix_ends(name)
        except PatternError:  # not a regular expression qplug accepts: a plain name, matched above
            continue
        if any(end == len(name) or name[end] == "." or (end and name[end - 1] == ".") for end in ends):
            return True
    return False


def _untied_heads(model: nn.Module) -> list[str]:
    from qplug.modules import output_head_names

    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    shared = getattr(embeddings, "weight", None)
    return sorted(
        name for name in output_head_names(model)
        if getattr(model.get_submodule(name), "weight", None) is not shared
    )


@qplug.backend_hookimpl(BitsAndBytesConfig)
def dequantize(config: BitsAndBytesConfig, model: nn.Module) -> list[str]:
    import bitsandbytes as bnb

    from qplug.modules import set_submodule

    modules = _modules()
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = [name for name, module in model.named_modules() if isinstance(module, kinds)]
    for name in names:
        set_submodule(model, name, modules.dequantize_module(model.get_submodule(name)))
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, None) is not None:
            setattr(model, flag, False)
    return names


@qplug.backend_hookimpl(BitsAndBytesConfig)
def serialize(config: BitsAndBytesConfig, model: nn.Module | None) -> dict[str, Any]:
    data = config.to_dict()
    patterns = config.llm_int8_skip_modules
    if model is not None and patterns is not None:
        # transformers adds no default skips to a given list: name the float heads in it.
        import bitsandbytes as bnb

        kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        quantized = {n for n, m in model.named_modules() if isinstance(m, kinds)}
        data["llm_int8_skip_modules"] = [*patterns, *(
            head for head in _untied_heads(model) if head not in quantized and not _hf_skips(head, patterns)
        )]
    return data

