"""The benchmark model: a random Llama with TinyLlama-1.1B shapes, bf16, in 3 safetensors shards.

Built from a config with seeded weights (no network), written tensor by tensor so building it
needs about one shard of memory. Cached under benchmarks/.cache/ and rebuilt when missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / ".cache"

TINYLLAMA_SHAPES = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
#: A small variant with the same structure, for a quick run of the whole suite (`--small`).
SMALL_SHAPES = {**TINYLLAMA_SHAPES, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8000}


def build_float_checkpoint(directory: Path, shapes: dict, shards: int = 3, seed: int = 0) -> Path:
    """Write the model to ``directory`` (config.json, shards, index) unless it is already there."""
    import transformers
    from safetensors.torch import save_file

    from qplug.modules import empty_weights

    if (directory / "model.safetensors.index.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**shapes, dtype="bfloat16")
    with empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    params = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    total = sum(torch.Size(s).numel() for _, s in params)
    generator = torch.Generator().manual_seed(seed)
    files: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    done = 0
    for name, shape in params:
        if name.endswith("norm.weight"):
            shard[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            shard[name] = (torch.randn(shape, generator=generator) * shape[-1] ** -0.5).to(torch.bfloat16)
        done += shard[name].numel()
        if shard and ((len(files) < shards - 1 and done >= total * (len(files) + 1) / shards) or name == params[-1][0]):
            part = f"part-{len(files)}.safetensors"
            save_file(shard, str(tmp / part), metadata={"format": "pt"})
            files.append((part, list(shard)))
            shard = {}
    weight_map: dict[str, str] = {}
    for i, (part, names) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / part, tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def model_dir(small: bool) -> Path:
    name = "llama-small-random-bf16" if small else "tinyllama-random-bf16"
    return build_float_checkpoint(CACHE / name, SMALL_SHAPES if small else TINYLLAMA_SHAPES)
