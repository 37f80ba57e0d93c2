"""Tiny seeded models built from a config: no model hub, same weights on every machine."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_LLAMA", "load_float_model", "tiny_llama", "tiny_llama_config"]

#: Shapes of the tiny Llama used by the tests and the demo: every dimension a multiple of 128 so
#: group-wise methods (group size 64 or 128) apply to every linear layer.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def tiny_llama_config(**overrides: Any):
    """A ``transformers.LlamaConfig`` with :data:`TINY_LLAMA` shapes (and ``overrides``)."""
    import transformers

    return transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})


def tiny_llama(seed: int = 0, *, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with seeded random weights, in eval mode.

    Weights are drawn with a wider spread than transformers' default initialisation (std 0.02 makes
    every logit nearly equal, which would hide quantization error rather than measure it).
    """
    import transformers

    config = tiny_llama_config(**overrides)
    generator = torch.Generator().manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (param.shape[-1] ** -0.5))
    return model.to(dtype).eval()


def load_float_model(path: Any, dtype: Any = "auto") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype`` on whichever transformers is installed
    (:func:`qplug.checkpoint.load_float_checkpoint`)."""
    from qplug.checkpoint import load_float_checkpoint

    return load_float_checkpoint(path, dtype)


def example_tokens(model: torch.nn.Module, *, batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    """Seeded token ids that fit ``model``'s vocabulary."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)
