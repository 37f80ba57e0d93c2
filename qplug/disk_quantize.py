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
:mod:`qplug.block_quantize`, which goes one decoder block at a time instead of one layer; an
interrupted calibrating run continues after the last block it finished (:mod:`qplug.block_resume`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qplug.config import QuantConfig
from qplug.errors import QPlugError
from qplug.write_plan import RELEASE_EVERY_BYTES, Progress, WritePlan, refuse_shared, to_meta

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qplug.checkpoint import CheckpointWeights

__all__ = ["Progress", "quantize_checkpoint"]


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
    restart: bool = False,
    resume_dir: str | os.PathLike[str] | None = None,
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
    :param on_module: called with a :class:`Progress` once each quantized module is written (for the
        blocks a resumed run skips too).
    :param restart: with ``calibration``: discard what an interrupted run into ``dst`` left and start
        from the first block. By default a run continues after the last block such a run finished,
        when the config, SRC, calibration and device (with its thread count) are the same
        (:mod:`qplug.block_resume`), and
        writes the same bytes as an uninterrupted run. Data-free runs always start over (a layer
        costs about what reading it does).
    :param resume_dir: with ``calibration``: where the finished blocks and the last one's outputs are
        kept until ``dst`` is complete; default ``.NAME.resume`` beside ``dst``. For a caller that
        writes into a staging directory of its own (the CLI), the one beside its real destination.
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
                               skip=skip, on_module=on_module, device=device, restart=restart,
                               resume_dir=resume_dir)
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
        plan = WritePlan(model, names, source)
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


def _produce(
    model: nn.Module,
    plan: WritePlan,
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
                memory.note_freed(dropped, every=RELEASE_EVERY_BYTES)
                continue
            _materialize(model, owner, tensors)
            del tensors
            with progress.enabled(False):  # this task counts the modules; the backend's own would count one
                quantize_one(owner)
            module = model.get_submodule(owner)
            out = module.state_dict(prefix=owner + ".")
            refuse_shared(owner, out)
            for name in list(out):
                tensor = out.pop(name)
                written += tensor.numel() * tensor.element_size()
                yield name, tensor
                dropped += tensor.numel() * tensor.element_size()
                del tensor
            to_meta(module)
            memory.note_freed(dropped, every=RELEASE_EVERY_BYTES)
            done += 1
            shown.advance()
            if on_module is not None:
                on_module(Progress(owner, done, plan.modules, written))
