"""Writing safetensors shards as tensors are produced, so a checkpoint never sits whole in memory.

A safetensors file is a little-endian u64 header length, a JSON header (name -> dtype, shape,
data_offsets) and the raw bytes. The header comes first but is only known once every tensor of the
file is, so each tensor's bytes are appended to a part file beside the shard the moment it is
added, and the shard is assembled when it is full: header, then the part files' bytes copied in
the kernel (``os.copy_file_range``), never through this process's memory.

Every tensor must start at a multiple of its element size, or readers that view the bytes in place
(``safetensors.torch`` does) cannot use it, and the format allows no padding between tensors. So,
as the ``safetensors`` library does, a shard holds its 8-byte dtypes first, then 4-, 2- and 1-byte
ones: one part file per element size, each in the order the tensors were added. The header is
padded with spaces to a multiple of 8.

Shards follow transformers' rule and names: a tensor that would take the current shard past
``max_shard_size`` starts a new one (a tensor larger than the limit gets a shard of its own); one
shard is ``model.safetensors``, several are ``model-00001-of-0000N.safetensors`` listed in
``model.safetensors.index.json``. The same tensors, order, metadata and limit give the same bytes,
which is what makes :func:`qplug.quantize_checkpoint` byte-identical to a save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qplug.errors import CheckpointError, QuantConfigError
from qplug.safetensors_io import _DTYPES, _ITEMSIZE

if TYPE_CHECKING:
    import torch

__all__ = ["ShardWriter", "parse_size"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# torch dtype attribute name ("bfloat16") -> the format's name ("BF16")
_NAMES = {attribute: name for name, attribute in _DTYPES.items()}
_ALIGNMENTS = (8, 4, 2, 1)  # the order of a shard's sections
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str | None) -> int | None:
    """A shard size limit in bytes: an int, or a string such as ``"5GB"`` (10**9) or ``"512MiB"`` (2**20).

    :raises QuantConfigError: naming ``max_shard_size`` when it is neither.
    """
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", size.lower())):
        value = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    else:
        value = -1
    if value <= 0:
        raise QuantConfigError(field="max_shard_size", value=size,
                               accepted="a positive number of bytes, or a size such as '5GB' or '512MiB'")
    return value


class ShardWriter:
    """Safetensors shards written into ``directory`` as tensors are added (see the module docstring).

    Use it as a context manager, :meth:`add` tensors in order, then :meth:`finish`. On an error the
    part files are removed; the directory is a staging one, replaced only once everything is written.

    :param max_shard_size: bytes (or a size string, see :func:`parse_size`); ``None``: one file.
    :param metadata: the ``__metadata__`` every shard carries.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_shard_size: int | str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = dict(metadata or {})
        self.bytes_written = 0  # tensor bytes added so far, all shards together
        self._shards: list[tuple[Path, list[str]]] = []  # assembled shards and their tensors
        self._names: set[str] = set()
        self._entries: list[tuple[str, str, list[int], int]] = []  # the open shard: name, dtype, shape, size
        self._parts: dict[int, object] = {}  # element size -> open part file of the open shard
        self._size = 0

    # ------------------------------------------------------------------ adding
    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor``'s bytes to the open shard (starting a new one when it is full); returns them.

        The caller may drop the tensor as soon as this returns.

        :raises CheckpointError: a repeated name, a meta tensor, or a dtype safetensors cannot hold.
        """
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} is written twice")
        if tensor.device.type == "meta":
            raise CheckpointError(f"cannot save {name!r}: it is on the meta device (it was never loaded)")
        dtype = _NAMES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise CheckpointError(f"cannot save {name!r}: safetensors has no dtype for {tensor.dtype}")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_shard_size is not None and self._entries and self._size + nbytes > self.max_shard_size:
            self._close_shard()
        self._names.add(name)
        if nbytes:
            import torch

            _write_all(self._part(tensor.element_size()), tensor.reshape(-1).view(torch.uint8).numpy())
        self._entries.append((name, dtype, list(tensor.shape), nbytes))
        self._size += nbytes
        self.bytes_written += nbytes
        return nbytes

    def _part(self, itemsize: int):
        if itemsize not in self._parts:
            path = self._part_path(len(self._shards), itemsize)
            self._parts[itemsize] = open(path, "xb", buffering=0)  # closed by _close_shard or close
        return self._parts[itemsize]

    def _part_path(self, shard: int, itemsize: int) -> Path:
        return self.directory / f".shard-{shard + 1:05d}.{itemsize}.part"

    # ------------------------------------------------------------------ assembling
    def _close_shard(self) -> None:
        """Assemble the open shard: header, then the part files' bytes, largest elements first."""
        index = len(self._shards)
        itemsize = {n: _itemsize(d) for n, d, _, _ in self._entries}
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for alignment in _ALIGNMENTS:
            for name, dtype, shape, nbytes in self._entries:
                if itemsize[name] == alignment:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        path = self.directory / f".shard-{index + 1:05d}.safetensors"
        with open(path, "xb", buffering=0) as out:
            _write_all(out, struct.pack("<Q", len(text)) + text)
            for alignment in _ALIGNMENTS:
                part = self._parts.pop(alignment, None)
                if part is None:
                    continue
                part.close()
                part_path = self._part_path(index, alignment)
                with open(part_path, "rb", buffering=0) as source:
                    _copy(source, out)
                os.unlink(part_path)
        self._shards.append((path, [name for name, *_ in self._entries]))
        self._entries = []
        self._size = 0

    def finish(self) -> list[Path]:
        """Assemble the last shard, give the shards their final names, write the index; returns the files."""
        if self._entries or not self._shards:
            self._close_shard()
        total = len(self._shards)
        if total == 1:
            names = [WEIGHTS_NAME]
        else:
            names = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        files = []
        for (path, _), name in zip(self._shards, names, strict=True):
            os.rename(path, self.directory / name)  # a fresh name in a staging directory: nothing is replaced
            files.append(self.directory / name)
        if total > 1:
            weight_map = {tensor: name for (_, tensors), name in zip(self._shards, names, strict=True)
                          for tensor in tensors}
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it
            (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")
            files.append(self.directory / INDEX_NAME)
        return files

    def close(self) -> None:
        """Drop unfinished part files (after an error)."""
        for itemsize, part in list(self._parts.items()):
            part.close()
            path = self._part_path(len(self._shards), itemsize)
            if path.exists():
                os.unlink(path)
        self._parts.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _itemsize(dtype_name: str) -> int:
    return _ITEMSIZE[dtype_name]


def _write_all(out, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = out.write(view)
        view = view[written:]


def _copy(source, out) -> None:
    """Append all of ``source`` to ``out``: in the kernel where it can, through a small buffer otherwise."""
    size = os.fstat(source.fileno()).st_size
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while done < size:
                n = copy_file_range(source.fileno(), out.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError:  # not supported between these file systems: fall back
            pass
    if done < size:
        source.seek(done)
        out.seek(0, os.SEEK_END)
        shutil.copyfileobj(source, out, 16 * 2**20)
