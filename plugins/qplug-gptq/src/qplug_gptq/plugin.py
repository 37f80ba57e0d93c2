"""The ``gptq`` backend's qplug hooks (the module the ``qplug`` entry point names).

Kept light: at import time only the torch-free config is loaded; torch, the GPTQ code
and auto-gptq are imported inside the hooks.

Kernel choice (environment variable ``QPLUG_GPTQ_KERNEL``):

* ``auto`` (default): auto-gptq's modules where auto-gptq imports *and* its compiled
  kernels load and the layer sits on a GPU; otherwise the backend's own PyTorch modules.
  On a CPU auto-gptq would only run its own PyTorch fallback: the same arithmetic as
  ours, slower (it unpacks on every call), and only for float16 activations.
* ``torch``: always the backend's own modules.
* ``auto-gptq``: always auto-gptq's modules (fails if it is not importable).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import qplug
from qplug_gptq.config import NAMED_DATASETS, GPTQConfig

logger = logging.getLogger("qplug.gptq")

KERNELS = ("auto", "torch", "auto-gptq")


@qplug.hookimpl
def register_backends():
    return [
        qplug.Backend(
            name="gptq",
            config_class=GPTQConfig,
            requires=("torch>=2.1",),
            optional=("auto-gptq==0.7.1",),
            description="GPTQ: calibrated 2/3/4/8-bit weights; GPTQ checkpoints on CPU and GPU; auto-gptq optional",
            presets={
                "gptq-4bit": {"bits": 4, "group_size": 128},
                "gptq-4bit-act-order": {"bits": 4, "group_size": 128, "desc_act": True},
                "gptq-8bit": {"bits": 8, "group_size": 128},
            },
            devices=("cpu", "cuda"),
        )
    ]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def kernel_choice() -> str:
    value = os.environ.get("QPLUG_GPTQ_KERNEL", "auto").strip().lower().replace("_", "-")
    if value not in KERNELS:
        raise qplug.QuantConfigError(
            field="QPLUG_GPTQ_KERNEL", value=value, accepted="expected one of " + ", ".join(KERNELS)
        )
    return value


def _use_autogptq(config: GPTQConfig, device_type: str) -> bool:
    from qplug_gptq import autogptq

    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "auto-gptq":
        if not autogptq.available():
            raise qplug.BackendUnavailableError(
                f"QPLUG_GPTQ_KERNEL=auto-gptq but auto-gptq does not import here ({autogptq.import_error()}): "
                "pip install auto-gptq==0.7.1 'transformers<4.50' 'peft<0.11'",
                backend="gptq",
                install="pip install auto-gptq==0.7.1",
            )
        if config.checkpoint_format != "gptq":
            raise qplug.QuantConfigError(
                field="checkpoint_format",
                value=config.checkpoint_format,
                accepted="auto-gptq's modules read 'gptq' (v1) only",
                config="GPTQConfig",
            )
        return True
    return device_type == "cuda" and config.checkpoint_format == "gptq" and autogptq.compiled_kernels_load()


def select_modules(
    config: GPTQConfig, model, module_names: list[str], *, prequantized: bool
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The modules GPTQ applies to, with each one's settings.

    As in transformers/optimum and AutoGPTQ, only linear layers inside the decoder blocks are
    quantized (when the model has blocks), narrowed by ``modules_in_block_to_quantize``;
    GPTQModel's ``dynamic`` may exclude modules or change their settings, and its
    ``lm_head: true`` adds the output head.
    """
    from qplug.blocks import find_blocks

    names = list(module_names)
    found = find_blocks(model, names, block_name(config))
    if found is not None:
        prefix = found[0]
        outside = [n for n in names if not n.startswith(prefix + ".")]
        if outside:
            logger.info(
                "gptq: leaving %d linear layer(s) outside %s in floating point: %s", len(outside), prefix, outside[:5]
            )
        names = [n for n in names if n.startswith(prefix + ".")]
        if config.modules_in_block_to_quantize:
            inner = {m for group in config.modules_in_block_to_quantize for m in group}
            names = [n for n in names if n.split(".", prefix.count(".") + 2)[-1] in inner]
    if config.quantizes_lm_head and prequantized:
        from qplug.modules import output_head_names

        names += [h for h in sorted(output_head_names(model)) if h not in names]
    settings: dict[str, dict[str, Any]] = {}
    for n in names:
        s = config.module_settings(n)
        if s is not None:
            settings[n] = s
    return [n for n in names if n in settings], settings


def block_name(config: GPTQConfig) -> str | None:
    """The blocks' list the config names (transformers allows a list of names: the first is the blocks)."""
    name = config.block_name_to_quantize
    return name[0] if isinstance(name, list) and name else (name or None)


def _check_shape(name: str, linear, bits: int) -> None:
    from qplug_gptq import packing

    run = packing.run_length(bits)
    for what, size in (("in_features", linear.in_features), ("out_features", linear.out_features)):
        if size % run:
            raise qplug.IncompatibleModelError(
                f"gptq: module {name!r} has {what}={size}, which is not a multiple of {run}: "
                f"{bits}-bit GPTQ packs {run} values per run; skip it (skip=[{name!r}])"
            )


def calibration_batches(config: GPTQConfig, model, calibration: Any) -> list[dict[str, Any]]:
    """The model-input batches GPTQ runs: ``calibration``, else the config's ``dataset`` of texts."""
    from qplug.calibration import padded_batches, token_samples

    data = calibration
    if data is None:
        if isinstance(config.dataset, str):
            raise qplug.QuantConfigError(
                field="dataset",
                value=config.dataset,
                config="GPTQConfig",
                accepted=f"named datasets ({', '.join(NAMED_DATASETS)}) are downloaded from the hub, "
                "which qplug never does; pass calibration= token ids, or texts with a tokenizer",
            )
        data = config.dataset
    tokenizer = config.tokenizer
    if isinstance(tokenizer, str):
        try:
            import transformers
        except ImportError as exc:
            raise qplug.BackendUnavailableError(
                "gptq: a tokenizer given by name needs transformers: pip install transformers",
                backend="gptq",
                install="pip install transformers",
            ) from exc
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
    samples = token_samples(data, tokenizer=tokenizer, method="gptq")
    return padded_batches(
        samples, batch_size=config.batch_size, pad_token_id=config.pad_token_id, max_length=config.model_seqlen
    )


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@qplug.backend_hookimpl(GPTQConfig)
def validate(config, model, module_names):
    config.check_loadable()
    kernel_choice()
    if model is None:
        return
    from torch import nn

    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise qplug.IncompatibleModelError(f"gptq: {type(model).__name__} has no nn.Linear layer to quantize")
    if module_names is None:  # called without the core's selection: nothing more to check
        return
    names, settings = select_modules(config, model, module_names, prequantized=False)
    for n in names:
        lin = model.get_submodule(n)
        if not isinstance(lin, nn.Linear):
            raise qplug.IncompatibleModelError(f"gptq: module {n!r} is a {type(lin).__name__}, not an nn.Linear")
        _check_shape(n, lin, settings[n]["bits"])


def _algorithm_settings(config: GPTQConfig):
    """The :class:`qplug_gptq.algorithm.GPTQSettings` the config sets."""
    from qplug_gptq.algorithm import GPTQSettings

    return GPTQSettings(
        bits=config.bits,
        group_size=config.group_size,
        damp_percent=config.damp_percent,
        desc_act=config.desc_act,
        static_groups=config.static_groups,
        sym=config.sym,
        true_sequential=config.true_sequential,
        modules_in_block=config.modules_in_block_to_quantize,
    )


@qplug.backend_hookimpl(GPTQConfig)
def replace_modules(config, model, module_names, calibration, prequantized, checkpoint_tensors):
    # validate has checked the layers selected here (the output head a checkpoint quantized aside:
    # building its module checks its shape)
    names, settings = select_modules(config, model, module_names, prequantized=prequantized)

    results = None  # loading: empty modules
    if not prequantized:
        from qplug_gptq.algorithm import quantize_model

        batches = calibration_batches(config, model, calibration)
        results = quantize_model(model, names, batches, _algorithm_settings(config), block_name=block_name(config),
                                 per_module=settings)
    _swap_modules(config, model, names, settings, results, checkpoint_tensors)
    return names


@qplug.backend_hookimpl(GPTQConfig)
def calibrate_blocks(config, model, module_names, calibration):
    from qplug.blocks import BlockCalibration, find_blocks
    from qplug_gptq.algorithm import quantize_block

    names, settings = select_modules(config, model, module_names, prequantized=False)
    found = find_blocks(model, names, block_name(config))
    if found is None:
        raise qplug.IncompatibleModelError(
            f"gptq: {type(model).__name__} has no list of decoder blocks (nn.ModuleList) holding the layers to "
            "quantize, so it cannot be calibrated block by block; load it and call qplug.quantize"
        )
    batches = calibration_batches(config, model, calibration)
    algorithm = _algorithm_settings(config)

    def quantize_one_block(name, block, calls):
        mine = [n for n in names if n.startswith(name + ".")]
        results, calls = quantize_block(block, name, mine, calls, algorithm, per_module=settings)
        _swap_modules(config, model, mine, settings, results, None)
        return calls

    return BlockCalibration(found[0], batches, names, quantize_one_block)


def _swap_modules(config, model, names, settings, results, checkpoint_tensors) -> None:
    """Put GPTQ modules in place of ``names``: built from ``results`` (quantizing), empty when it is ``None``."""
    from qplug.checkpoint import needs_bias
    from qplug.modules import get_submodule, set_submodule
    from qplug_gptq import autogptq
    from qplug_gptq.linear import GPTQLinear

    prequantized = results is None
    for n in names:
        lin = get_submodule(model, n)
        s = settings[n]
        device = lin.weight.device
        if prequantized:
            new = GPTQLinear(
                lin.in_features,
                lin.out_features,
                bits=s["bits"],
                group_size=s["group_size"],
                bias=needs_bias(n, lin, checkpoint_tensors),
                checkpoint_format=config.checkpoint_format,
                sym=s["sym"],
                weight_dtype=lin.weight.dtype,
                device=device,
            )
        else:
            import torch

            r = results[n]
            new = GPTQLinear.from_integers(
                r.intweight,
                r.zeros,
                r.scales.to(torch.float16),
                r.g_idx,
                bits=s["bits"],
                group_size=s["group_size"],
                bias=lin.bias,
                checkpoint_format=config.checkpoint_format,
                sym=s["sym"],
                weight_dtype=lin.weight.dtype,
            )
        if _use_autogptq(config, device.type):
            if prequantized:
                new = autogptq.empty_module(
                    lin.in_features,
                    lin.out_features,
                    bits=s["bits"],
                    group_size=s["group_size"],
                    desc_act=s["desc_act"],
                    bias=needs_bias(n, lin, checkpoint_tensors),
                )
            else:
                new = autogptq.from_gptq_linear(new, desc_act=s["desc_act"])
        set_submodule(model, n, new)


@qplug.backend_hookimpl(GPTQConfig)
def dequantize(config, model):
    from qplug.modules import dequantized_dtype, set_submodule
    from qplug_gptq import autogptq
    from qplug_gptq.linear import GPTQLinear

    dtype = dequantized_dtype(model)
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, GPTQLinear):
            module.weight_dtype = dtype
            set_submodule(model, name, module.to_linear())
            names.append(name)
        elif autogptq.is_autogptq_module(module):
            set_submodule(model, name, autogptq.to_linear(module, dtype))
            names.append(name)
    return names


@qplug.backend_hookimpl(GPTQConfig)
def serialize(config, model):
    return config.to_dict()


@qplug.backend_hookimpl(GPTQConfig)
def add_checkpoint_files(config, directory):
    """auto-gptq 0.7.1 loads a directory only through ``quantize_config.json`` (never ``config.json``).

    It reads ``gptq`` (v1) checkpoints only; for other formats a copy carried over from an earlier
    save into the same directory is removed, so auto-gptq is never told the wrong layout.
    """
    from qplug_gptq.config import AUTOGPTQ_CONFIG_NAME

    path = directory / AUTOGPTQ_CONFIG_NAME
    if config.checkpoint_format == "gptq":
        path.write_text(json.dumps(config.to_autogptq_dict(), indent=2) + "\n", encoding="utf-8")
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------------------------
# conversion (qplug.convert): GPTQ v1 and v2 to and from the plain integer form
# --------------------------------------------------------------------------------------------


@qplug.backend_hookimpl(GPTQConfig)
def read_int_layer(config, name, module):
    from qplug.conversion import PlainLayer
    from qplug_gptq.linear import GPTQLinear

    if not isinstance(module, GPTQLinear):  # auto-gptq's modules (QPLUG_GPTQ_KERNEL=auto-gptq) hold no plain form
        raise qplug.ConversionError(f"cannot read {name}: it is a {type(module).__name__}, not qplug's GPTQLinear; "
                                    "unset QPLUG_GPTQ_KERNEL=auto-gptq to convert")
    channelwise = module.group_size == -1
    codes = module.packed_codes()
    if codes is None:  # 3 bits: fields straddle words, so the codes are unpacked
        return PlainLayer(module.int_weight(), module.bias, channelwise=channelwise)
    scale, zero, group, perm = module.int_weight_parts()
    return PlainLayer.from_packed(codes, scale, zero, group, perm=perm, bias=module.bias, channelwise=channelwise)


@qplug.backend_hookimpl(GPTQConfig)
def write_int_layer(config, name, layer):
    """Any bits GPTQ packs (2, 3, 4, 8), symmetric or not, act-order kept as ``g_idx``; scales in their dtype.
    Packed codes (2, 4, 8 bits) become ``qweight`` as they are, transposed."""
    import torch

    from qplug.conversion import WrittenLayer, exact_cast, refuse
    from qplug_gptq import packing
    from qplug_gptq.linear import GPTQLinear

    if layer.bits not in packing.SUPPORTED_BITS:
        raise refuse(name, "gptq", f"{layer.bits}-bit weights (GPTQ packs {list(packing.SUPPORTED_BITS)})")
    layer.check_zeros_fit(name, "gptq")
    g_idx = layer.group_index()
    if g_idx is None:
        g_idx = packing.default_g_idx(layer.in_features, layer.group_size, device=layer.scale.device)
    elif layer.channelwise:
        raise refuse(name, "gptq", "act-order with one group per row has no GPTQ g_idx")
    bias = exact_cast(layer.bias, layer.scale.dtype, name=name, to="gptq", what="bias values")
    common = {"group_size": layer.group_size, "bias": bias, "checkpoint_format": config.checkpoint_format,
              "sym": layer.symmetric, "dtype": layer.scale.dtype}
    codes = layer.packed_codes()
    if codes is not None:
        zeros = layer.packed_zeros()  # qzeros' own layout where the source stored them so: repacked as words
        module = GPTQLinear.from_packed(codes, layer.zero.t() if zeros is None else zeros, layer.scale.t(), g_idx,
                                        in_place=layer.reusable, **common)
    else:
        module = GPTQLinear.from_integers(layer.checkpoint_order()[0].t(), layer.zero.t(), layer.scale.t(), g_idx,
                                          bits=layer.bits, **common)
    settings = {"bits": layer.bits, "group_size": layer.group_size, "sym": layer.symmetric,
                "desc_act": layer.act_order}
    with torch.no_grad():
        return WrittenLayer(module.state_dict(), settings)
