"""Reading safetensors files one tensor at a time with plain reads, never a memory map.

``safetensors.safe_open`` maps the whole file; every page a load touches then counts in the
process's resident memory until the map closes, so streaming a large checkpoint through it costs
as much RSS as the checkpoint. Here each tensor is read with ``os.pread`` into memory that belongs
to that tensor alone, so dropping the tensor gives the memory back. The format is a little-endian
u64 header length, a JSON header (name → dtype, shape, data_offsets), then the raw bytes.

Checkpoints come from strangers, so the whole header is validated when the file is opened, before
any tensor memory is allocated: the header is a JSON object of well-formed entries, each entry's
byte count agrees with its dtype and shape, and the entries' byte ranges tile the data buffer
exactly (in bounds, no overlap, no hole), as the format requires. No allocation can then exceed
the file's size. Every problem is a :class:`~qplug.CheckpointError` naming the file and the tensor.

Opening a file and reading its header import no torch: ``qplug inspect`` and the checkpoint checks
describe a checkpoint from its headers alone. Torch is imported when a tensor is read.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from qplug.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["SafetensorsFile"]

# The format's dtype names -> the torch dtype (by attribute name, so this table needs no torch).
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER = 100 * 1024 * 1024
# torch keeps sizes in int64 and caps the number of dimensions; anything beyond is not a real tensor.
_MAX_DIM = 2**53
_MAX_RANK = 64


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile:
    """An open safetensors file: its validated header, and each tensor read on demand.

    :raises CheckpointError: the file is missing, not a regular file, or not a valid safetensors
        file (the message names the file and, where one is at fault, the tensor).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            what = "a dangling symbolic link" if os.path.islink(self.path) else "missing"
            raise CheckpointError(f"{self.path}: weight file is {what}") from None
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"{self.path}: not a regular file (a weight file must be one)")
            self._size = info.st_size
            self._entries, self.metadata, self._data_start = self._read_header()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    # ------------------------------------------------------------------ header
    def _fail(self, problem: str, tensor: str | None = None) -> CheckpointError:
        where = f"{self.path}: tensor {tensor!r}" if tensor is not None else str(self.path)
        return CheckpointError(f"{where}: {problem}")

    def _read_header(self) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
        if self._size < 8:
            raise self._fail(f"not a safetensors file (truncated: {self._size} bytes)")
        (length,) = struct.unpack("<Q", self._read_exact(8, 0))
        if length > min(_MAX_HEADER, self._size - 8):
            raise self._fail(f"not a safetensors file (a header of {length} bytes in a file of {self._size})")
        try:
            header = json.loads(self._read_exact(length, 8), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._fail(f"not a valid safetensors file (header is not valid JSON: {exc})") from None
        if not isinstance(header, dict):
            raise self._fail(f"not a valid safetensors file (header is a JSON {type(header).__name__}, not an object)")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must be an object of strings")
        data_size = self._size - 8 - length
        entries = {name: self._check_entry(name, entry, data_size) for name, entry in header.items()}
        # The byte ranges must tile [0, data_size): sorted by start, each begins where the previous ended.
        position = 0
        previous = None
        for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if start != position:
                if start < position:
                    raise self._fail(f"its bytes [{start}, {end}) overlap those of {previous!r}", name)
                raise self._fail(f"bytes [{position}, {start}) before it belong to no tensor (a hole)", name)
            position = end
            previous = name
        if position != data_size:
            raise self._fail(
                f"the tensors cover {position} bytes of the data buffer but it holds {data_size} "
                "(trailing bytes belong to no tensor)"
            )
        return entries, metadata, 8 + length

    def _check_entry(self, name: str, entry: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
        if not isinstance(entry, dict):
            raise self._fail(f"header entry is a JSON {type(entry).__name__}, not an object", name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise self._fail(f"header entry has no {key!r}", name)
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise self._fail(f"unsupported dtype {dtype_name!r} (supported: {', '.join(_DTYPES)})", name)
        if (not isinstance(shape, list) or len(shape) > _MAX_RANK
                or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)):
            raise self._fail(f"shape {shape!r} is not a list of at most {_MAX_RANK} non-negative integers", name)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise self._fail(f"data_offsets {offsets!r} is not a list of two integers", name)
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise self._fail(
                f"data_offsets [{start}, {end}] lie outside the data buffer [0, {data_size}]"
                + (" (the file is truncated)" if 0 <= start <= end else ""),
                name,
            )
        numel = 1
        for dim in shape:
            numel *= dim
        if numel * _ITEMSIZE[dtype_name] != end - start:
            raise self._fail(
                f"{end - start} bytes for shape {shape} of {dtype_name} ({numel * _ITEMSIZE[dtype_name]} expected)",
                name,
            )
        return dtype_name, tuple(shape), start, end

    # ------------------------------------------------------------------ tensors
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise self._fail("not in this file", name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._entry(name)[0])

    def dtype_name(self, name: str) -> str:
        """The format's name for the dtype of ``name`` (``"F16"``, ``"U8"``, ...); needs no torch."""
        return self._entry(name)[0]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._entry(name)
        return end - start

    def get_tensor(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` into fresh memory (of exactly its validated byte count).

        :param into: memory to read it into instead, a contiguous uint8 CPU tensor of exactly
            :meth:`nbytes` bytes (a reader recycling its buffers): the result is a view of it.
        """
        import torch

        dtype_name, shape, start, end = self._entry(name)
        try:
            if into is None:
                out = _allocate(shape, _torch_dtype(dtype_name), end - start)
            else:
                if into.dtype != torch.uint8 or into.numel() != end - start or not into.is_contiguous():
                    raise ValueError(f"a buffer for {name!r} must be {end - start} contiguous uint8 bytes, got "
                                     f"{into.numel()} {into.dtype}")
                out = into.view(_torch_dtype(dtype_name)).view(shape)
        except RuntimeError as exc:  # e.g. an empty tensor whose shape torch cannot represent
            raise self._fail(f"torch cannot build shape {list(shape)}: {exc}", name) from None
        if end > start:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            self._readinto(view, self._data_start + start)
        return out

    def _read_exact(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise self._fail(f"truncated (wanted {size} bytes at {offset})")
        return data

    def _readinto(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise self._fail(f"truncated at byte {offset + done} (the file changed while it was read)")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[name])


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """The one place tensor memory is allocated (``nbytes`` is already checked against the file size)."""
    import torch

    return torch.empty(shape, dtype=dtype)
