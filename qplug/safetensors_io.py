"""Reading safetensors files one tensor at a time with plain reads, never a memory map.

``safetensors.safe_open`` maps the whole file; every page a load touches then counts in the
process's resident memory until the map closes, so streaming a large checkpoint through it costs
as much RSS as the checkpoint. Here each tensor is read with ``os.pread`` into memory that belongs
to that tensor alone, so dropping the tensor gives the memory back. The format is a little-endian
u64 header length, a JSON header (name → dtype, shape, data_offsets), then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from qplug.errors import CheckpointError

__all__ = ["SafetensorsFile"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """An open safetensors file: its header, and each tensor read on demand.

    :raises CheckpointError: the file is not a valid safetensors file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", self._read_exact(8, 0))
            if length > _MAX_HEADER:
                raise CheckpointError(f"{self.path}: header of {length} bytes; not a safetensors file")
            header = json.loads(self._read_exact(length, 8))
        except (struct.error, ValueError, CheckpointError) as exc:
            os.close(self._fd)
            raise CheckpointError(f"{self.path}: not a valid safetensors file ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name]["data_offsets"]
        return end - start

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into fresh memory."""
        try:
            entry = self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        out = torch.empty(shape, dtype=dtype)
        if end - start != out.numel() * out.element_size():
            raise CheckpointError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {shape}")
        if end > start:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            self._readinto(view, self._data_start + start)
        return out

    def _read_exact(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise CheckpointError(f"{self.path}: truncated (wanted {size} bytes at {offset})")
        return data

    def _readinto(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated at byte {offset + done}")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
