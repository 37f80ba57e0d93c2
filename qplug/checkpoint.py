"""Checkpoint directories on disk: safetensors weights plus a ``config.json``.

Finding a checkpoint's weight files and reading their headers import no torch (the CLI describes a
checkpoint that way); the functions that make or fill tensors import it.

The layout is the one Hugging Face transformers reads: ``config.json`` (the model config with a
``quantization_config``) and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Nothing is ever pickled. Writes are atomic: the new checkpoint
is assembled beside the target and renamed over it, so a failure leaves an old one whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from qplug import progress
from qplug._io import atomic_directory
from qplug.errors import BackendUnavailableError, CheckpointError, ConfigFileError
from qplug.shards import INDEX_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "COMPANION_FILES",
    "CheckpointWeights",
    "TensorInfo",
    "build_skeleton",
    "load_float_checkpoint",
    "needs_bias",
    "read_model_config",
    "read_tensors",
    "state_tensors",
    "write_checkpoint",
    "write_model_config",
]

CONFIG_NAME = "config.json"
# safetensors metadata key listing tensors that were not written because they share storage
# with another one (tied weights): {"lm_head.weight": "model.embed_tokens.weight"}.
TIED_KEY = "qplug.tied"
_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME}

#: Files of a model directory that travel with its weights unchanged when qplug writes a new checkpoint
#: from it (``qplug quantize``, :func:`qplug.convert`): the tokenizer and its friends.
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict as contiguous CPU-independent tensors, shared storage written once.

    :return: ``(tensors, tied)`` where ``tied`` maps each omitted name to the name kept.
    Tensors a ``device_map`` offloaded (``qplug.load_quantized(..., device_map=...)``) are read back from
    where accelerate keeps them.

    :raises CheckpointError: a tensor is still on the meta device (never loaded).
    """
    import torch

    from qplug.placement import offloaded_tensor

    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.device.type == "meta":
            value = offloaded_tensor(model, name)
            if value is None:
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
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    config: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    *,
    tied: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensors`` and ``config`` as a checkpoint directory, atomically.

    Files already in ``directory`` that are not weights or configs (a tokenizer, a README) are
    carried over; old weight files are not. ``add_files`` is called with the staging directory
    once the config and weights are in it, so what it writes is part of the same atomic save.

    :param tensors: a mapping, or an iterable of ``(name, tensor)`` pairs that may produce each
        tensor as it is asked for (each is on disk, and may be dropped, before the next is asked for).
    :param config: the ``config.json`` contents, or a function giving them once every tensor is written.
    :param max_shard_size: see :class:`qplug.shards.ShardWriter`; ``None``: one ``model.safetensors``.
    """
    from qplug.shards import ShardWriter

    target = Path(directory)
    meta = {"format": "pt", **(metadata or {})}
    if tied:
        meta[TIED_KEY] = json.dumps(dict(tied), sort_keys=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    # three steps: the weights (and the files carried over), the config and added files, the sync and swap
    with progress.task(f"saving {target}", total=3, unit="steps") as saving:
        with atomic_directory(target) as staging:
            if target.is_dir():
                _carry_over(target, staging)
            with ShardWriter(staging, max_shard_size=max_shard_size, metadata=meta) as writer:
                for name, tensor in items:
                    writer.add(name, tensor)
                    # dropped before the next is asked for: a generator may take long producing it
                    # (a block quantized from disk), with this one held for nothing in the meantime
                    del tensor
                writer.finish()
            saving.advance()
            write_model_config(staging, config() if callable(config) else config)
            if add_files is not None:
                add_files(staging)
            saving.advance()
        saving.advance()
    return target


def write_model_config(directory: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` into ``directory`` (a staging one) as every qplug checkpoint has it."""
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _carry_over(old: Path, new: Path) -> None:
    """Bring the other files of ``old`` (a tokenizer, a README) into ``new``.

    Symbolic links are copied as links, never followed: a link to a file or directory elsewhere
    never brings that file's contents into the checkpoint. Sockets, FIFOs and devices are left out.
    """
    for entry in old.iterdir():
        if entry.name in _OWN_FILES or entry.suffix in {".safetensors", ".bin", ".pt", ".pth"}:
            continue
        dest = new / entry.name
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry), dest)
        elif stat.S_ISDIR(mode):
            shutil.copytree(entry, dest, symlinks=True)
        elif stat.S_ISREG(mode):
            try:
                os.link(entry, dest, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, dest, follow_symlinks=False)


def read_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory.

    :raises ConfigFileError: missing, unreadable or not a JSON object.
    """
    from qplug.config import parse_json

    path = Path(directory) / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigFileError(f"{directory}: no {CONFIG_NAME} (is this a model directory?)") from exc
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # not UTF-8
        raise ConfigFileError(f"{path}: not valid JSON: {exc}") from exc
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a JSON object")
    return data


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint, in index order when there is an index.

    :raises CheckpointError: the index is malformed, names a file outside the directory or a missing
        one, or there are no safetensors weights at all.
    """
    directory = Path(directory)
    weight_map = _index_map(directory)
    if weight_map is not None:
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    if os.path.lexists(directory / WEIGHTS_NAME):
        return [directory / WEIGHTS_NAME]  # opening it says what is wrong if it is not a regular file
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights (qplug never reads pickled .bin files)")
    return files


def _index_map(directory: Path) -> dict[str, str] | None:
    """The index's ``weight_map`` (tensor -> file name), validated; ``None`` without an index."""
    index = directory / INDEX_NAME
    if not os.path.lexists(index):
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{index}: the index is a dangling symbolic link") from None
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read the index: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index}: the index is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: the index is a JSON {type(data).__name__}, not an object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file name")
    for tensor, name in weight_map.items():
        problem = _unsafe_file_name(name)
        if problem:
            raise CheckpointError(f"{index}: tensor {tensor!r} is mapped to {name!r}, {problem}")
    for name in dict.fromkeys(weight_map.values()):
        if not os.path.lexists(directory / name):
            tensor = next(t for t, n in weight_map.items() if n == name)
            raise CheckpointError(f"{index}: tensor {tensor!r} is in {name!r}, which is missing from {directory}")
    return weight_map


def _unsafe_file_name(name: object) -> str | None:
    """Why ``name`` is not a file name inside the checkpoint directory, or ``None`` when it is one."""
    if not isinstance(name, str) or not name:
        return "which is not a file name"
    if "\\" in name or "\0" in name:
        return "which is not a plain file name"
    parts = name.split("/")
    if name.startswith("/") or os.path.isabs(name):
        return "an absolute path (an index may only name files inside its checkpoint directory)"
    if any(part in ("", ".", "..") for part in parts):
        return "a path that leaves or re-enters the checkpoint directory"
    return None


@attrs.frozen
class TensorInfo:
    """What a checkpoint's safetensors header says about one tensor, without reading its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def needs_bias(name: str, linear: nn.Module, checkpoint_tensors: Mapping[str, TensorInfo] | None) -> bool:
    """Whether the empty quantized module that replaces ``linear`` at ``name`` gets a bias.

    It does when the checkpoint holds ``<name>.bias`` (AutoGPTQ writes one for every layer, zeros
    where the float layer had none), and when the skeleton's layer has one: loading then reports a
    checkpoint that lacks it instead of silently dropping a bias the architecture has.
    """
    in_checkpoint = checkpoint_tensors is not None and f"{name}.bias" in checkpoint_tensors
    return in_checkpoint or getattr(linear, "bias", None) is not None


class CheckpointWeights:
    """The safetensors files of a checkpoint directory, opened and cross-checked.

    Every file's header is validated on opening. With an index, each tensor must be in the file the
    index names and nowhere else; without one, no tensor may appear in two files. ``tied`` is the
    tied-name map qplug recorded when saving (``{omitted: kept}``).

    :raises CheckpointError: naming the file and the tensor at fault.
    """

    def __init__(self, directory: str | os.PathLike[str], stack: contextlib.ExitStack) -> None:
        from qplug.safetensors_io import SafetensorsFile

        directory = self.directory = Path(directory)
        weight_map = _index_map(directory)
        self.where: dict[str, SafetensorsFile] = {}
        self.tied: dict[str, str] = {}
        for path in weight_files(directory):
            handle = stack.enter_context(SafetensorsFile(path))
            for name in handle.keys():
                if name in self.where:
                    raise CheckpointError(
                        f"{directory}: tensor {name!r} is in both {self.where[name].path.name} and {path.name}"
                    )
                if weight_map is not None and weight_map.get(name) != path.name:
                    listed = weight_map.get(name)
                    raise CheckpointError(
                        f"{path}: holds tensor {name!r}, which the index "
                        + (f"places in {listed!r}" if listed is not None else "does not list")
                    )
                self.where[name] = handle
            if TIED_KEY in handle.metadata:
                self.tied.update(_parse_tied(path, handle.metadata[TIED_KEY]))
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if name not in self.where:
                    raise CheckpointError(
                        f"{directory / file_name}: lacks tensor {name!r}, which the index places there"
                    )

    def names(self) -> list[str]:
        return list(self.where)

    def tensor_infos(self) -> Mapping[str, TensorInfo]:
        """Every tensor name, tied names included, with its dtype and shape: a read-only mapping.

        Built from the headers already read, so it costs no tensor data.
        """
        infos = {name: TensorInfo(handle.dtype(name), handle.shape(name)) for name, handle in self.where.items()}
        for omitted, kept in self.tied.items():
            if omitted not in infos and kept in infos:
                infos[omitted] = infos[kept]
        return types.MappingProxyType(infos)

    def read_all(self, threads: int | None = None) -> dict[str, torch.Tensor]:
        """Every tensor (see :func:`read_tensors`)."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = self.names()
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1), thread_name_prefix="qplug-read") as pool:
            read = progress.track(pool.map(self.get, jobs), f"reading {self.directory}", total=len(jobs),
                                  unit="tensors")
            return dict(zip(jobs, read, strict=True))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``, read into fresh memory or into ``into`` (as ``SafetensorsFile.get_tensor``)."""
        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        return self.where[name].get_tensor(name, into)

    def nbytes(self, name: str) -> int:
        """The byte count of tensor ``name`` (from the header)."""
        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        return self.where[name].nbytes(name)


def _parse_tied(path: Path, text: str) -> dict[str, str]:
    try:
        tied = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata {TIED_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CheckpointError(f"{path}: metadata {TIED_KEY!r} must be a JSON object of tensor name -> tensor name")
    return tied


def read_tensors(
    directory: str | os.PathLike[str], *, threads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a checkpoint, and the tied-name map qplug recorded when saving it.

    Tensors are read with plain reads (no memory map), so resident memory is what they take.
    ``threads`` (default: the CPU count, at most 8) read tensors concurrently: copying from the
    page cache into fresh memory is bound by page faults and copies on one core, not by the disk.
    """
    with contextlib.ExitStack() as stack:
        weights = CheckpointWeights(directory, stack)
        tensors = weights.read_all(threads)
    return tensors, weights.tied


def load_float_checkpoint(path: str | os.PathLike[str], dtype: Any = "auto") -> nn.Module:
    """``transformers.AutoModelForCausalLM.from_pretrained(path)`` in ``dtype`` (a ``torch.dtype`` or ``"auto"``)
    on whichever transformers is installed: it renamed ``torch_dtype`` to ``dtype`` in 4.56, and older
    releases (the auto-gptq and autoawq sessions pin them) ignore the new name. Exceptions are transformers'."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **{key: dtype})


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
    from torch import nn

    from qplug.config import check_model_config
    from qplug.modules import build_empty

    check_model_config(config)
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
    if model_cls is not None and not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise ConfigFileError(f"config.json: architectures: {architectures[0]!r} is not a transformers model class")
    # On the meta device through torch's per-thread device context: no global patching, so other
    # threads (another load, an nn.Linear built meanwhile) are unaffected.
    if model_cls is not None:
        model = build_empty(lambda: model_cls(hf_config))
    else:
        model = build_empty(lambda: transformers.AutoModelForCausalLM.from_config(hf_config))
    return model.eval()
