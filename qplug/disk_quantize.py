"""Disk-to-disk quantization: a floating-point checkpoint in, a quantized one out, memory flat with depth.

:func:`quantize_checkpoint` walks the model's state dict in order on a meta-device skeleton. Each
module to quantize gets its float weights read from SRC, is quantized by the backend's
``replace_modules`` hook on its own, and its quantized tensors are written to DST's shards at once
(:class:`qplug.shards.ShardWriter`) and then replaced by meta tensors; every other tensor (embeddings,
norms, the head) goes from SRC to DST without staying in memory. A reader thread fetches the next
tensors while the current module is quantized. So peak memory is the runtime floor plus about one
layer in floating point, one layer quantized and the writer's small buffers, whatever the depth.

The tensors come out in the order, with the names, metadata (``qplug.version``, tied weights under
``qplug.tied``) and sharding that :func:`qplug.save_quantized` gives the same model quantized on
load, so the files are byte-identical to ``load_quantized(SRC, quantization_config=...)`` followed
by ``save_quantized``. DST is replaced atomically (:func:`qplug._io.atomic_directory`): a failure
or an interruption leaves an existing DST whole, and a new run starts again from the beginning.

That is the path of data-free methods (bitsandbytes, int8 weight-only). Given calibration data,
:func:`quantize_checkpoint` hands methods that calibrate on activations (GPTQ, AWQ) to
:mod:`qplug.block_quantize`, which goes one decoder block at a time instead of one layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from qplug.config import QuantConfig
from qplug.errors import CheckpointError, QPlugError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qplug.checkpoint import CheckpointWeights

__all__ = ["Progress", "quantize_checkpoint"]


# Freed memory is handed back after every ~64 MB dropped. glibc does not reuse all of it for the next
# layers, so resident memory climbs by about one float layer per layer between trims: 256 MB batches
# (quantize-on-load's) made the peak of a 1024-wide Llama grow with depth (0.10 GiB above the floor at
# 8 layers, 0.18 at 48); 64 MB batches kept it flat layer after layer at no measurable cost in time
# (16 layers: 5.0-5.5 s either way).
_RELEASE_EVERY_BYTES = 64 * 2**20


class Progress(NamedTuple):
    """What :func:`quantize_checkpoint` reports after each quantized module is on disk."""

    module: str  #: the module just written
    done: int  #: modules quantized so far
    total: int  #: modules to quantize
    bytes_written: int  #: tensor bytes written to DST so far


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quantization_config: QuantConfig | Mapping[str, Any],
    *,
    calibration: Any = None,
    device: str | torch.device | None = None,
    max_shard_size: int | str | None = "50GB",
    skip: Iterable[str] = (),
    on_module: Callable[[Progress], None] | None = None,
) -> Path:
    """Quantize the floating-point checkpoint ``src`` into the checkpoint directory ``dst``, layer by layer.

    Without ``calibration`` (data-free methods), the result is the checkpoint
    ``qplug.save_quantized(qplug.load_quantized(src, quantization_config=...), dst)`` writes, byte for
    byte, without the quantized model ever being in memory (see :mod:`qplug.disk_quantize`).

    With ``calibration`` (GPTQ, AWQ, compressed-tensors GPTQ), the model is calibrated one decoder
    block at a time, each block's float weights read from ``src`` only for its turn (see
    :mod:`qplug.block_quantize`); the result is the checkpoint ``qplug.quantize`` on the loaded float
    model followed by ``qplug.save_quantized`` writes, byte for byte.

    Other files already in ``dst`` (a tokenizer) are kept; SRC's own extra files are not copied.

    :param quantization_config: the method's config (or its dict), e.g. bitsandbytes NF4 or GPTQ.
    :param calibration: calibration data for methods that calibrate, in any form :func:`qplug.quantize`
        accepts (see :mod:`qplug.calibration`); the backend must implement the ``calibrate_blocks`` hook.
    :param device: with ``calibration``: where the blocks and activations live while calibrating
        (``"cuda"``, ``"cuda:1"``); default the CPU.
    :param max_shard_size: as for :func:`qplug.save_quantized`: shards with an index beyond it.
    :param skip: more modules to leave in floating point (recorded in the config).
    :param on_module: called with a :class:`Progress` once each quantized module is written.
    :return: ``dst``.
    :raises QPlugError: ``src`` is already quantized; the method needs calibration data and got none;
        or the backend cannot work from disk this way (data-free without ``quantize_module``,
        calibrating without ``calibrate_blocks``).
    :raises CheckpointError: ``src`` lacks a tensor the model needs, or has one it does not (named).
    :raises PlacementError: ``device`` does not exist here.
    """
    from qplug import memory
    from qplug._io import recover_directory
    from qplug.api import _checkpoint_config, _module_quantizer, _prepare, _resolve, checkpoint_metadata
    from qplug.calibration import check_given
    from qplug.checkpoint import CheckpointWeights, build_skeleton, read_model_config, write_checkpoint
    from qplug.manager import get_plugin_manager
    from qplug.shards import parse_size

    src = recover_directory(src)
    model_config = read_model_config(src)
    saved = model_config.get("quantization_config")
    if saved is not None:
        method = saved.get("quant_method") if isinstance(saved, Mapping) else None
        raise QPlugError(f"{src} is already quantized ({method!r}); quantize_checkpoint reads floating-point "
                         "checkpoints")
    config = _resolve(quantization_config)
    entry = get_plugin_manager().get_entry(config.quant_method)
    backend = entry.backend
    config.check_quantizable()
    check_given(config, calibration)
    if calibration is not None:
        if not entry.calibrates_blocks:
            raise QPlugError(
                f"backend {backend.name!r} cannot calibrate a checkpoint block by block from disk (its plugin has "
                "no calibrate_blocks hook); leave calibration out for a data-free method, or load the float model, "
                "call qplug.quantize and qplug.save_quantized"
            )
        parse_size(max_shard_size)  # a bad size fails before any work
        from qplug.block_quantize import quantize_blocks

        return quantize_blocks(src, dst, config, model_config, calibration, max_shard_size=max_shard_size,
                               skip=skip, on_module=on_module, device=device)
    if device is not None:
        raise QPlugError("device= places calibration (with calibration=); data-free methods quantize on the CPU")
    if not backend.streams:
        raise QPlugError(
            f"backend {backend.name!r} cannot quantize a checkpoint layer by layer (it needs the whole model, "
            "e.g. for calibration); load the float model, call qplug.quantize and qplug.save_quantized"
        )
    parse_size(max_shard_size)  # a bad size fails before any work
    model = build_skeleton(model_config)
    config, names = _prepare(config, model, skip)
    with contextlib.ExitStack() as stack:
        source = CheckpointWeights(src, stack)
        plan = _Plan(model, names, source)
        tensors = stack.enter_context(contextlib.closing(_produce(
            model, plan, source,
            _module_quantizer(config, model, entry.quantizes_modules),
            on_module,
        )))
        hook = get_plugin_manager().hook
        write_checkpoint(dst, tensors, lambda: _checkpoint_config(config, model), tied=plan.tied,
                         metadata=checkpoint_metadata(), max_shard_size=max_shard_size,
                         add_files=lambda staging: hook.add_checkpoint_files(config=config, model=model,
                                                                             directory=staging))
    memory.release_freed_memory()
    return Path(dst)


class _Plan:
    """The skeleton's state dict as units to write in order: one module to quantize, or one tensor to copy.

    ``tied`` maps each name the model shares with an earlier one (``lm_head.weight`` tied to
    ``model.embed_tokens.weight``) to that name, as :func:`qplug.checkpoint.state_tensors` does.
    Every check against SRC runs here, before anything is written.

    :param names: the units to quantize: ``nn.Linear`` modules, or with ``blocks=True`` whole
        blocks (:mod:`qplug.block_quantize`), each of whose tensors SRC must hold.
    """

    def __init__(self, model: nn.Module, names: list[str], source: CheckpointWeights, *, blocks: bool = False) -> None:
        from torch import nn

        selected = set(names)

        def owner_of(key: str) -> str:
            if blocks:
                return next((name for name in names if key.startswith(name + ".")), "")
            return key.rpartition(".")[0]

        self.units: list[tuple[str | None, list[str]]] = []  # (module to quantize or None, its keys)
        self.tied: dict[str, str] = {}
        self.reads: dict[str, str] = {}  # key to copy -> the SRC tensor holding it
        first: dict[int, str] = {}
        groups: dict[int, list[str]] = {}
        state = model.state_dict(keep_vars=True)
        for key, value in state.items():
            groups.setdefault(id(value), []).append(key)
        for key, value in state.items():
            owner = owner_of(key)
            shared = groups[id(value)]
            if owner in selected:
                if len(shared) > 1:
                    others = ", ".join(k for k in shared if k != key)
                    raise QPlugError(f"{owner}: its tensor {key!r} is shared with {others}; a shared tensor "
                                     "cannot be quantized layer by layer (skip the module)")
                if blocks and key not in source:
                    raise CheckpointError(f"checkpoint lacks tensor {key!r}")
                if self.units and self.units[-1][0] == owner:
                    self.units[-1][1].append(key)
                else:
                    self.units.append((owner, [key]))
                continue
            if value.numel() and id(value) in first:
                self.tied[key] = first[id(value)]
                continue
            if value.numel():
                first[id(value)] = key
            held = next((k for k in [key, *shared] if k in source), None)
            if held is None:
                raise CheckpointError(f"checkpoint lacks tensors the model needs: {key}")
            self.reads[key] = held
            self.units.append((None, [key]))
        for name in () if blocks else names:
            if not isinstance(model.get_submodule(name), nn.Linear):
                raise QPlugError(f"{name} is {type(model.get_submodule(name)).__name__}, not nn.Linear; "
                                 "cannot quantize it layer by layer")
            if f"{name}.weight" not in source:
                raise CheckpointError(f"checkpoint lacks tensor {name + '.weight'!r}")
        unexpected = [n for n in source.names() if n not in state]
        if unexpected:
            raise CheckpointError(f"checkpoint has tensors the model does not: {', '.join(unexpected)}")
        self.modules = len(names)


def _produce(
    model: nn.Module,
    plan: _Plan,
    source: CheckpointWeights,
    quantize_one: Callable[[str], Any],
    on_module: Callable[[Progress], None] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in state-dict order, quantizing each module as its turn comes.

    Each tensor is dropped once the consumer asks for the next one (it has been written by then).
    """
    from concurrent.futures import ThreadPoolExecutor

    from qplug import memory, progress
    from qplug.streaming import _materialize, _prefetched

    def read(unit: tuple[str | None, list[str]]) -> dict[str, torch.Tensor]:
        owner, keys = unit
        if owner is None:
            return {key: source.get(plan.reads[key]) for key in keys}
        return {key.rpartition(".")[2]: source.get(key) for key in keys if key in source}

    done = written = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qplug-read") as reader, \
            progress.task("quantizing to disk", total=plan.modules, unit="modules") as shown:
        for (owner, _), tensors in _prefetched(reader, read, plan.units):
            dropped = sum(t.numel() * t.element_size() for t in tensors.values())
            if owner is None:
                for name, tensor in tensors.items():
                    written += tensor.numel() * tensor.element_size()
                    yield name, tensor
                del tensors
                memory.note_freed(dropped, every=_RELEASE_EVERY_BYTES)
                continue
            _materialize(model, owner, tensors)
            del tensors
            with progress.enabled(False):  # this task counts the modules; the backend's own would count one
                quantize_one(owner)
            module = model.get_submodule(owner)
            out = module.state_dict(prefix=owner + ".")
            _refuse_shared(owner, out)
            for name in list(out):
                tensor = out.pop(name)
                written += tensor.numel() * tensor.element_size()
                yield name, tensor
                dropped += tensor.numel() * tensor.element_size()
                del tensor
            _to_meta(module)
            memory.note_freed(dropped, every=_RELEASE_EVERY_BYTES)
            done += 1
            shown.advance()
            if on_module is not None:
                on_module(Progress(owner, done, plan.modules, written))


def _refuse_shared(owner: str, tensors: dict[str, torch.Tensor]) -> None:
    """A quantized module whose tensors share memory would be saved with ties: refuse rather than differ."""
    seen: dict[tuple, str] = {}
    for name, value in tensors.items():
        if not value.numel():
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
               tuple(value.stride()), value.dtype)
        if key in seen:
            raise QPlugError(f"{owner}: the backend's module stores {name!r} and {seen[key]!r} in one tensor; "
                             "save it with qplug.load_quantized and qplug.save_quantized instead")
        seen[key] = name


def _to_meta(module: nn.Module) -> None:
    """Replace every tensor ``module`` holds by a meta tensor of its shape and dtype, freeing its memory.

    Parameters and buffers, and tensors the module keeps in its other attributes, directly or inside
    objects of its own (bitsandbytes' ``quant_state``, ``MatmulLtState``): those hold most of a
    quantized layer's bytes. The module keeps its class and every other attribute, so the backend's
    ``serialize`` still sees what was quantized; it is never run again.
    """
    from torch import nn

    seen: set[int] = set()
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(_meta(param), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = _meta(buffer)
        state = vars(sub)
        for name, value in list(state.items()):
            if name not in ("_parameters", "_buffers", "_modules"):
                state[name] = _strip(value, seen, depth=3)


def _strip(value: Any, seen: set[int], depth: int) -> Any:
    """``value`` with the tensors in it (in plain containers and objects' attributes) made meta."""
    import torch
    from torch import nn

    if isinstance(value, torch.Tensor):
        return nn.Parameter(_meta(value), requires_grad=False) if isinstance(value, nn.Parameter) else _meta(value)
    if depth == 0 or id(value) in seen or isinstance(value, (nn.Module, type)) or callable(value):
        return value
    seen.add(id(value))
    if type(value) in (list, tuple):
        return type(value)(_strip(item, seen, depth - 1) for item in value)
    if type(value) is dict:
        for key in list(value):
            value[key] = _strip(value[key], seen, depth - 1)
        return value
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and type(value).__module__ not in ("builtins", "torch"):
        for key in list(attributes):
            attributes[key] = _strip(attributes[key], seen, depth - 1)
    return value


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor like ``tensor`` (never a subclass that could keep state alive)."""
    import torch

    return torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
