"""Quantize-on-load: stream a floating-point checkpoint into a quantized model, one layer at a time.

The skeleton's parameters live on the meta device. Each selected ``nn.Linear`` gets its weight
(and bias) read from safetensors, is quantized on its own by the owning backend's
``quantize_module`` hook (see :func:`qplug.hookspecs.quantize_module`; its presence is what makes
a backend streamable), and the float copy is dropped before the next one is needed; a reader thread fetches
the next layer's tensors while the current one is quantized. Peak memory is therefore about the
quantized model plus two layers in floating point, not the whole float model.

This works for data-free methods (bitsandbytes, int8 weight-only). Methods that calibrate on
whole-model activations (GPTQ, AWQ) need the float model in memory: use :func:`qplug.quantize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qplug import memory, progress
from qplug.checkpoint import CheckpointWeights
from qplug.errors import CheckpointError, PluginError

__all__ = ["stream_quantize"]


def stream_quantize(
    model: nn.Module,
    directory: Path,
    module_names: list[str],
    quantize_one: Callable[[str], Any],
    on_module: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Fill ``model`` from the float checkpoint in ``directory``, quantizing ``module_names`` as they arrive.

    :param quantize_one: called with a module's name once that module holds its float weights;
        replaces it in ``model`` with its quantized form (the backend's ``quantize_module``).
    :param on_module: progress callback, called with each module name once it is quantized.
    :return: the tensors of every other module (embeddings, norms, the head), for the caller to load.
    """
    with contextlib.ExitStack() as stack:
        source = CheckpointWeights(directory, stack)
        for name in module_names:
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise PluginError(f"{name} is {type(linear).__name__}, not nn.Linear; cannot quantize it on load")
            if f"{name}.weight" not in source:
                raise CheckpointError(f"checkpoint lacks tensor {name + '.weight'!r}")

        def read_layer(name: str) -> dict[str, torch.Tensor]:
            keys = [f"{name}.weight", *([f"{name}.bias"] if f"{name}.bias" in source else [])]
            return {key.rsplit(".", 1)[1]: source.get(key) for key in keys}

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qplug-read") as reader, \
                progress.task(f"quantizing {directory} on load", total=len(module_names), unit="modules") as task:
            for name, tensors in _prefetched(reader, read_layer, module_names):
                _materialize(model, name, tensors)
                with progress.enabled(False):  # this task counts the modules; the backend's own would count one
                    quantize_one(name)
                task.advance()
                dropped = sum(t.numel() * t.element_size() for t in tensors.values())
                del tensors
                memory.note_freed(dropped, every=_RELEASE_EVERY_BYTES)
                if on_module is not None:
                    on_module(name)
        memory.release_freed_memory()  # before the rest of the checkpoint is read
        taken = {f"{n}.{part}" for n in module_names for part in ("weight", "bias")}
        return {name: source.get(name) for name in source.names() if name not in taken}


def _prefetched(reader: ThreadPoolExecutor, read: Callable[[str], Any], names: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, read(name))`` while the next read already runs on the reader thread."""
    pending = reader.submit(read, names[0]) if names else None
    for index, name in enumerate(names):
        assert pending is not None
        tensors = pending.result()
        pending = reader.submit(read, names[index + 1]) if index + 1 < len(names) else None
        yield name, tensors


# Handing freed memory back after every ~256 MB of dropped float weights rather than after every
# Linear lets the next reads reuse it: on the TinyLlama-shaped benchmark NF4 quantize-on-load took
# 2.2 s instead of 2.6 s, with the same peak (benchmarks/paths.py, 4 alternating runs each).
_RELEASE_EVERY_BYTES = 256 * 2**20


def _materialize(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    linear = model.get_submodule(name)
    weight = tensors["weight"]
    expected = (linear.out_features, linear.in_features)
    if tuple(weight.shape) != expected:
        raise CheckpointError(
            f"size mismatch for {name}.weight: checkpoint has {tuple(weight.shape)}, the model expects {expected}"
        )
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if "bias" in tensors:
        linear.bias = nn.Parameter(tensors["bias"], requires_grad=False)
