"""Checkpoint directories on disk: safetensors weights plus a ``config.json``.

The layout is the one Hugging Face transformers reads: ``config.json`` (the model config with a
``quantization_config``) and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Nothing is ever pickled. Writes are atomic: the new checkpoint
is assembled beside the target and renamed over it, so a failure leaves an old one whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qplug._io import atomic_directory
from qplug.errors import BackendUnavailableError, CheckpointError, ConfigFileError

__all__ = ["build_skeleton", "read_model_config", "read_tensors", "state_tensors", "write_checkpoint"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# safetensors metadata key listing tensors that were not written because they share storage
# with another one (tied weights): {"lm_head.weight": "model.embed_tokens.weight"}.
TIED_KEY = "qplug.tied"
_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME}


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict as contiguous CPU-independent tensors, shared storage written once.

    :return: ``(tensors, tied)`` where ``tied`` maps each omitted name to the name kept.
    :raises CheckpointError: a tensor is still on the meta device (never loaded).
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.device.type == "meta":
            raise CheckpointError(f"cannot save {name!r}: it is on the meta device (it was never loaded)")
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
               tuple(value.stride()), value.dtype) if value.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = value.detach().contiguous()
    return tensors, tied


def write_checkpoint(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    tied: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` and ``config`` as a checkpoint directory, atomically.

    Files already in ``directory`` that are not weights or configs (a tokenizer, a README) are
    carried over; old weight files are not.
    """
    from safetensors.torch import save_file

    target = Path(directory)
    meta = {"format": "pt", **(metadata or {})}
    if tied:
        meta[TIED_KEY] = json.dumps(dict(tied), sort_keys=True)
    with atomic_directory(target) as staging:
        if target.is_dir():
            _carry_over(target, staging)
        save_file(dict(tensors), str(staging / WEIGHTS_NAME), metadata=meta)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        if entry.name in _OWN_FILES or entry.suffix in {".safetensors", ".bin", ".pt", ".pth"}:
            continue
        dest = new / entry.name
        if entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True)
        else:
            try:
                os.link(entry, dest)
            except OSError:
                shutil.copy2(entry, dest)


def read_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory.

    :raises ConfigFileError: missing, unreadable or not a JSON object.
    """
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigFileError(f"{directory}: no {CONFIG_NAME} (is this a model directory?)") from exc
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a JSON object")
    return data


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint, in index order when there is an index."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights (qplug never reads pickled .bin files)")
    return files


def read_tensors(
    directory: str | os.PathLike[str], *, threads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a checkpoint, and the tied-name map qplug recorded when saving it.

    Tensors are read with plain reads (no memory map), so resident memory is what they take.
    ``threads`` (default: the CPU count, at most 8) read tensors concurrently: copying from the
    page cache into fresh memory is bound by page faults and copies on one core, not by the disk.
    """
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from qplug.safetensors_io import SafetensorsFile

    tied: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        jobs = []
        for path in weight_files(directory):
            fh = stack.enter_context(SafetensorsFile(path))
            if TIED_KEY in fh.metadata:
                tied.update(json.loads(fh.metadata[TIED_KEY]))
            jobs += [(fh, name) for name in fh.keys()]
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1), thread_name_prefix="qplug-read") as pool:
            read = pool.map(lambda job: job[0].get_tensor(job[1]), jobs)
            tensors = {name: tensor for (_, name), tensor in zip(jobs, read, strict=True)}
    return tensors, tied


def build_skeleton(config: Mapping[str, Any]) -> nn.Module:
    """A transformers model built from a ``config.json`` dict, parameters on the meta device.

    :raises BackendUnavailableError: transformers is not installed.
    :raises ConfigFileError: the config names no known architecture.
    """
    try:
        import transformers
    except ImportError as exc:
        raise BackendUnavailableError(
            "load_quantized without a model builds it from config.json with transformers, which is not "
            "installed: pip install 'qplug[transformers]' (or pass model=...)",
            install="pip install 'qplug[transformers]'",
        ) from exc
    from qplug.modules import empty_weights

    # Private keys record how the saving process ran (transformers < 4.50 writes
    # "_attn_implementation_autoset", which would force eager attention here): leave them out.
    fields = {k: v for k, v in config.items() if k != "quantization_config" and not k.startswith("_")}
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigFileError("config.json has no model_type; pass model=... to load_quantized")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as exc:
        raise ConfigFileError(f"config.json: transformers cannot build a {model_type!r} config: {exc}") from exc
    architectures = fields.get("architectures") or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    with empty_weights():
        if model_cls is not None:
            model = model_cls(hf_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model.eval()
