"""Helpers shared by this plugin's tests (a uniquely named module, not conftest)."""

from __future__ import annotations

import shutil
import warnings

import torch
import transformers

# Whether the C quantization kernels can be built here at all. Where a compiler exists they must
# build: their tests skip only without one (and then the bitsandbytes fallback is what runs).
HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))

# Sizes: every projection has a multiple of 32 output rows, so bitsandbytes' AVX512-BF16
# CPU repack (the path behind the "save after forward" bug) is taken on capable CPUs.
TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def make_tiny_llama(seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with seeded weights, in eval mode, float32."""
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


# Configurations exercised everywhere: transformers' kwargs for each bitsandbytes format.
HF_4BIT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
}
HF_8BIT = {"int8": dict(load_in_8bit=True)}
HF_ALL = {**HF_4BIT, **HF_8BIT}
# Checked by the checkpoint and parity tests only (to keep the suite fast): the packed 4-bit
# data stored as bfloat16, as FSDP setups do.
HF_STORAGE = {
    "nf4-dq-bf16-storage": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
}
HF_WIDE = {**HF_ALL, **HF_STORAGE}


def module_kwargs(hf_kwargs: dict) -> tuple[str, dict]:
    """Map transformers' BitsAndBytesConfig kwargs to ``qplug_bitsandbytes.modules`` kwargs."""
    if hf_kwargs.get("load_in_8bit"):
        return "8bit", dict(threshold=hf_kwargs.get("llm_int8_threshold", 6.0))
    return "4bit", dict(
        quant_type=hf_kwargs.get("bnb_4bit_quant_type", "fp4"),
        double_quant=hf_kwargs.get("bnb_4bit_use_double_quant", False),
        compute_dtype=hf_kwargs.get("bnb_4bit_compute_dtype", torch.float32),
        quant_storage=hf_kwargs.get("bnb_4bit_quant_storage", torch.uint8),
    )


def linear_names(model) -> list[str]:
    """The linears transformers' bnb path converts (all but the output head), whether converted yet
    or not: bitsandbytes' ``Linear4bit``/``Linear8bitLt`` are ``nn.Linear`` subclasses."""
    names = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"
    ]
    assert names, "the model has no linears to convert"  # loops over these must never be vacuous
    return names


def quantize_with_modules(model, hf_kwargs: dict):
    """Quantize ``model`` in place with this plugin's module functions, like transformers does."""
    from qplug_bitsandbytes import modules

    kind, kwargs = module_kwargs(hf_kwargs)
    for name in linear_names(model):
        linear = model.get_submodule(name)
        if kind == "8bit":
            model.set_submodule(name, modules.quantize_8bit(linear, **kwargs))
        else:
            model.set_submodule(name, modules.quantize_4bit(linear, **kwargs))
    return model


def empty_skeleton(hf_kwargs: dict, **overrides):
    """A tiny Llama whose converted linears are empty quantized modules on the meta device."""
    from qplug_bitsandbytes import modules

    model = make_tiny_llama(seed=99, **overrides)  # different weights: all must come from the checkpoint
    kind, kwargs = module_kwargs(hf_kwargs)
    for name in linear_names(model):
        linear = model.get_submodule(name)
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        new = modules.empty_8bit(*args, **kwargs) if kind == "8bit" else modules.empty_4bit(*args, **kwargs)
        new.train(linear.training)
        model.set_submodule(name, new)
    return model


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # Bitwise: 4-bit data stored as bfloat16 (bnb_4bit_quant_storage) holds NaN bit patterns.
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def state_dicts_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (in presence, dtype, shape or bits)."""
    return sorted(key for key in set(a) | set(b) if key not in a or key not in b or not _same_bits(a[key], b[key]))
