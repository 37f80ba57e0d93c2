"""Measuring a model and a checkpoint: bytes, bits per parameter, which layers a backend replaced, peak memory.

Shared by ``qplug quantize``, ``qplug inspect`` and ``qplug demo`` so that the three report the same
numbers the same way. Importing it imports no torch; the functions that look at a model do.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LinearSnapshot",
    "checkpoint_bytes",
    "linear_snapshot",
    "model_tensor_bytes",
    "numel",
    "peak_memory",
]


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape``."""
    n = 1
    for dim in shape:
        n *= dim
    return n


def model_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a checkpoint of ``model`` holds (shared storage counted once)."""
    from qplug.checkpoint import state_tensors

    tensors, _ = state_tensors(model)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_bytes(directory: str | os.PathLike[str], modules: Iterable[str] | None = None) -> int:
    """Bytes of the tensors of the checkpoint in ``directory`` (of ``modules`` only, when given: the tensors
    named ``<module>.*``), from its safetensors headers (nothing is loaded)."""
    from qplug.checkpoint import weight_files
    from qplug.safetensors_io import SafetensorsFile

    prefixes = None if modules is None else tuple(f"{m}." for m in modules)
    total = 0
    for path in weight_files(directory):
        with SafetensorsFile(path) as fh:
            total += sum(fh.nbytes(name) for name in fh.keys() if prefixes is None or name.startswith(prefixes))
    return total


def peak_memory() -> int | None:
    """Peak resident memory of this process in bytes (``getrusage``), or ``None`` where unsupported."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _module_bytes(module: nn.Module) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


@attrs.define
class LinearSnapshot:
    """The linear layers of a model before quantization, to tell afterwards which were replaced.

    Holds weak references only, so the float layers a backend replaces can be freed.
    """

    refs: dict[str, weakref.ref] = attrs.field(factory=dict)
    types: dict[str, type] = attrs.field(factory=dict)
    params: dict[str, int] = attrs.field(factory=dict)

    def replaced(self, model: nn.Module) -> list[str]:
        """Names of the layers that are no longer the original float module (in model order)."""
        out = []
        for name, ref in self.refs.items():
            try:
                current = model.get_submodule(name)
            except AttributeError:  # the backend removed or fused it
                out.append(name)
                continue
            if current is not ref() or type(current) is not self.types[name]:
                out.append(name)
        return out

    def bits_per_param(self, model: nn.Module, names: Iterable[str]) -> float | None:
        """Bits the quantized layers ``names`` hold per parameter they had in floating point."""
        names = list(names)
        params = sum(self.params[n] for n in names)
        if not params:
            return None
        held = 0
        for name in names:
            try:
                held += _module_bytes(model.get_submodule(name))
            except AttributeError:
                continue
        return 8 * held / params


def linear_snapshot(model: nn.Module) -> LinearSnapshot:
    """Remember every ``nn.Linear`` of ``model`` (see :class:`LinearSnapshot`)."""
    from qplug.modules import iter_linear

    snap = LinearSnapshot()
    for name, module in iter_linear(model):
        snap.refs[name] = weakref.ref(module)
        snap.types[name] = type(module)
        snap.params[name] = sum(p.numel() for p in module.parameters())
    return snap
