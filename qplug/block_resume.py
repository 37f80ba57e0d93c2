"""Resuming block-by-block calibration after the last block a killed run finished.

Calibrating a large model takes hours; a run killed at block 30 of 80 should not start again at
block 0. :class:`BlockResume` keeps, in a directory beside DST (``.NAME.resume``), what a rerun
needs to go on:

* ``manifest.json``: what the run is (its :func:`fingerprint`: the method's config, SRC's files,
  the calibration tokens, the device, the versions) and how many blocks are finished;
* ``block-NNNNN.safetensors``: each finished block's quantized tensors, in the order they are written;
* ``hidden-NNNNN.safetensors``: the hidden states the last finished block output (the next block's
  inputs); only the latest is kept.

A block is finished once both files are durable and the manifest, replaced last and atomically,
counts it: a run killed at any instant leaves a state that is consistent. A rerun with the same
fingerprint skips the finished blocks: their tensors are read back from the block files and written
to DST's shards again, since the checkpoint is always assembled in full (so it is byte for byte
what an uninterrupted run writes, and nothing has to be known about the shards the killed run left
half written). The first block's other inputs (attention masks, position embeddings) are captured
again from the calibration data, which costs one pass through the embeddings, with the saved hidden
states in place of the captured ones. A different fingerprint discards the state and starts over,
and says so. The directory goes once DST is complete.

A run holds an exclusive lock on the directory (:func:`qplug._io.directory_lock`); a second run
into the same DST while the first is alive neither reads nor writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qplug import progress
from qplug._io import atomic_write_text, directory_lock, durable_replace

if TYPE_CHECKING:
    import torch

    from qplug.checkpoint import TensorInfo

__all__ = ["BlockResume", "fingerprint", "resume_directory"]

MANIFEST = "manifest.json"
_FORMAT = 1
_ORDER_KEY = "qplug.order"  # a block file's metadata: its tensor names, in the order they are written


def resume_directory(dst: str | os.PathLike[str]) -> Path:
    """Where a calibrating run into ``dst`` keeps what a rerun needs: ``.NAME.resume`` beside it."""
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.resume"


def fingerprint(*, src: Path, config: Mapping[str, Any], batches: Sequence[Mapping[str, torch.Tensor]],
                blocks: Sequence[str], device: str, versions: Mapping[str, str | None]) -> dict[str, Any]:
    """What must be the same for a rerun to continue a run's blocks: a JSON object.

    SRC is identified by its weight files' names, sizes and modification times and its
    ``config.json`` (hashing gigabytes of weights would cost as much as a block); the calibration by
    a hash of the token tensors the backend made of it.
    """
    from qplug.checkpoint import CONFIG_NAME, weight_files

    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in weight_files(src)}
    files[CONFIG_NAME] = hashlib.sha256((src / CONFIG_NAME).read_bytes()).hexdigest()
    tokens = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            tensor = batch[key].detach().to("cpu").contiguous()
            tokens.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
            tokens.update(tensor.reshape(-1).view(_uint8()).numpy().tobytes())
    return json.loads(json.dumps({
        "config": dict(config), "source": files, "calibration": tokens.hexdigest(), "blocks": list(blocks),
        "device": device, "versions": dict(versions),
    }, sort_keys=True, default=str))


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8


class BlockResume:
    """The resume state of one run into one DST (see the module docstring).

    Use :meth:`open`; then :attr:`done` blocks are finished, :meth:`tensors` and :meth:`hidden`
    give what they left, :meth:`save` records each block this run finishes, and :meth:`remove`
    deletes it all once DST is complete.
    """

    def __init__(self, directory: Path, identity: dict[str, Any], done: int) -> None:
        self.directory = directory
        self.identity = identity
        self.done = done  #: blocks finished, by earlier runs and this one
        self.resumed = done  #: blocks an earlier run finished (what this run skips)

    @classmethod
    @contextlib.contextmanager
    def open(cls, directory: Path, identity: dict[str, Any], *, restart: bool = False) -> Iterator[BlockResume | None]:
        """Lock ``directory`` and read what it holds, for the length of the ``with`` block.

        Yields ``None`` when another live run holds it (this run then keeps no state).

        :param identity: this run's :func:`fingerprint`; state made with another one is discarded.
        :param restart: discard whatever state there is, and start from the first block.
        """
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(directory_lock(directory, wait=False))
            except BlockingIOError:
                pass  # another live run holds it: said below, outside the lock's context
            else:
                yield cls(directory, identity, cls._read(directory, identity, restart))
                return
        progress.note(f"{directory} is held by another run into the same destination: this run starts "
                      "from the first block and keeps no resume state")
        yield None

    @staticmethod
    def _read(directory: Path, identity: dict[str, Any], restart: bool) -> int:
        """The blocks the state finished; discards the state (saying why) when it cannot be used."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            manifest = None
        except (OSError, ValueError):
            manifest = {}
        done = manifest.get("done") if isinstance(manifest, dict) else None
        why = None
        if manifest is None:
            pass
        elif restart:
            why = "as asked (restart)"
        elif not isinstance(done, int) or manifest.get("format") != _FORMAT or "fingerprint" not in manifest:
            why = "its manifest is unreadable"
        elif manifest["fingerprint"] != identity:
            keys = sorted(k for k in {*identity, *manifest["fingerprint"]}
                          if identity.get(k) != manifest["fingerprint"].get(k))
            why = f"it was made with a different {', '.join(keys)}"
        elif done and not all((directory / _block_file(i)).is_file() for i in range(done)):
            why = "block files are missing"
        elif done and not (directory / _hidden_file(done - 1)).is_file():
            why = "the last block's outputs are missing"
        if why is not None:
            progress.note(f"discarding the resume state in {directory} ({done} block(s) finished): {why}; "
                          "starting from the first block")
            done = 0
        done = done or 0
        keep = {MANIFEST, *(_block_file(i) for i in range(done)), *([_hidden_file(done - 1)] if done else [])}
        for entry in directory.iterdir():
            if entry.name not in keep or why is not None:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if done:
            blocks = len(identity.get("blocks", ()))
            progress.note(f"resuming after block {done} of {blocks}: {done} block(s) finished by an earlier run, "
                          f"kept in {directory}")
        return done

    # ------------------------------------------------------------------ reading what earlier runs left
    def tensors(self, index: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Block ``index``'s quantized tensors, one at a time, in the order they were written."""
        from qplug.safetensors_io import SafetensorsFile

        with SafetensorsFile(self.directory / _block_file(index)) as handle:
            for name in json.loads(handle.metadata[_ORDER_KEY]):
                yield name, handle.get_tensor(name)

    def infos(self, index: int) -> dict[str, TensorInfo]:
        """Block ``index``'s tensor names with their dtypes and shapes, from the header alone."""
        from qplug.checkpoint import TensorInfo
        from qplug.safetensors_io import SafetensorsFile

        with SafetensorsFile(self.directory / _block_file(index)) as handle:
            return {name: TensorInfo(handle.dtype(name), handle.shape(name)) for name in handle.keys()}

    def hidden(self) -> list[torch.Tensor]:
        """The hidden states the last finished block output, one per captured call."""
        from qplug.safetensors_io import SafetensorsFile

        with SafetensorsFile(self.directory / _hidden_file(self.done - 1)) as handle:
            return [handle.get_tensor(str(i)) for i in range(len(handle.keys()))]

    # ------------------------------------------------------------------ recording this run's blocks
    def save(self, index: int, tensors: Sequence[tuple[str, torch.Tensor]], hidden: Sequence[torch.Tensor]) -> None:
        """Record block ``index`` as finished: its tensors, its outputs, then the manifest."""
        if index != self.done:
            raise ValueError(f"block {index} finished after {self.done} block(s): blocks are saved in order")
        self._write(_block_file(index), tensors, {_ORDER_KEY: json.dumps([name for name, _ in tensors])})
        self._write(_hidden_file(index), [(str(i), h) for i, h in enumerate(hidden)], {})
        self.done = index + 1
        atomic_write_text(self.directory / MANIFEST, json.dumps(
            {"format": _FORMAT, "done": self.done, "fingerprint": self.identity}, indent=1, sort_keys=True) + "\n")
        if index:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / _hidden_file(index - 1))

    def _write(self, name: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
        from qplug.shards import ShardWriter

        scratch = self.directory / ".writing"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        with ShardWriter(scratch, metadata=metadata) as writer:
            for key, tensor in tensors:
                writer.add(key, tensor)
            (written,) = writer.finish()
        durable_replace(written, self.directory / name)
        scratch.rmdir()

    def remove(self) -> None:
        """Delete the state: DST is complete."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def _hidden_file(index: int) -> str:
    return f"hidden-{index:05d}.safetensors"
