"""Calibrating methods (GPTQ, AWQ) from disk, one decoder block at a time, memory flat with depth.

:func:`quantize_blocks` is what :func:`qplug.quantize_checkpoint` runs when it is given calibration
data. The model stays a meta-device skeleton. The backend's ``calibrate_blocks`` hook says which
list holds the decoder blocks, which model inputs to run and how to quantize one block
(:class:`qplug.blocks.BlockCalibration`). Then:

1. the model is run on those inputs up to its first block; each module that runs on the way (the
   embeddings) has its tensors read from SRC just before it is called, and dropped afterwards;
2. for each block in turn its float weights are read from SRC, it runs the captured inputs, the
   backend quantizes its Linears (the same per-block code as its whole-model path), its quantized
   tensors are written to DST's shards at once, and it goes back to the meta device; the outputs
   the backend returns are the next block's inputs;
3. every other tensor (embeddings, norms, the head) is copied from SRC to DST in its turn.

So the peak is the runtime floor plus one block in floating point, the calibration activations and
the writer's buffers, whatever the depth. The tensors come out in the order, with the names and
metadata :func:`qplug.save_quantized` gives the model the whole-model path quantizes
(``qplug.quantize`` on the loaded float model), so the two checkpoints are byte-identical. DST is
replaced atomically, as every checkpoint write is: a failure leaves an existing DST whole.

A run killed part way keeps its finished blocks and the last one's outputs beside DST; run again
with the same arguments, it continues after them and writes the same bytes
(:mod:`qplug.block_resume`).

With ``device=`` (a GPU), the modules run before the first block, every block and the activations
live on that device; only the written tensors come back to the host.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qplug.config import QuantConfig
from qplug.errors import IncompatibleModelError, PlacementError, PluginError
from qplug.write_plan import RELEASE_EVERY_BYTES, Progress, WritePlan, refuse_shared, to_meta

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qplug.block_resume import BlockResume
    from qplug.blocks import BlockCalibration, BlockCall
    from qplug.checkpoint import CheckpointWeights

__all__ = ["quantize_blocks"]


def quantize_blocks(
    src: Path,
    dst: str | os.PathLike[str],
    config: QuantConfig,
    model_config: dict[str, Any],
    calibration: Any,
    *,
    max_shard_size: int | str | None,
    skip: Iterable[str] = (),
    on_module: Callable[[Progress], None] | None = None,
    device: str | torch.device | None = None,
    restart: bool = False,
    resume_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Quantize the float checkpoint ``src`` into ``dst`` block by block (see the module docstring).

    The caller (:func:`qplug.quantize_checkpoint`) has read ``model_config``, checked the config
    and that the backend implements ``calibrate_blocks``.

    A run continues after the last block an earlier, interrupted run with the same config, SRC,
    calibration and device finished (:mod:`qplug.block_resume`), unless ``restart``; what it needs
    is kept in ``resume_dir`` (default ``.NAME.resume`` beside ``dst``) until ``dst`` is complete.

    :raises PlacementError: ``device`` is not a device, or does not exist here.
    :raises IncompatibleModelError: a module to quantize lies outside the blocks, or the model reads
        a tensor before its first block other than by calling the module that holds it.
    """
    from qplug import memory
    from qplug.api import _checkpoint_config, _prepare, _replace_modules, _require_linear, checkpoint_metadata
    from qplug.block_resume import BlockResume, fingerprint, resume_directory
    from qplug.checkpoint import CheckpointWeights, build_skeleton, write_checkpoint
    from qplug.manager import get_plugin_manager

    target = _device(device)
    model = build_skeleton(model_config)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "_name_or_path"):
        # what from_pretrained(src) records and save_pretrained writes: the config.json of the
        # whole-model path (load, qplug.quantize, save) names its source the same way
        hf_config._name_or_path = str(src)
    config, names = _prepare(config, model, skip)
    _require_linear(config, model)
    hook = get_plugin_manager().hook
    calibrating = hook.calibrate_blocks(config=config, model=model, module_names=names, calibration=calibration)
    if calibrating is None:
        raise PluginError(f"backend {config.quant_method!r} did not answer calibrate_blocks")
    blocks = _blocks(model, calibrating)
    with contextlib.ExitStack() as stack:
        source = CheckpointWeights(src, stack)
        block_names = [f"{calibrating.blocks}.{index}" for index in range(len(blocks))]
        plan = WritePlan(model, block_names, source, blocks=True)
        identity = fingerprint(src=Path(src), config=config.to_dict(), batches=calibrating.batches, blocks=block_names,
                               device=_device_identity(target), versions=_versions(config))
        resume = stack.enter_context(BlockResume.open(
            Path(resume_dir) if resume_dir is not None else resume_directory(dst), identity, restart=restart))
        calls = _capture(model, blocks, calibrating, source, plan, target)
        if resume is not None and resume.done:
            calls = [call.with_hidden(hidden.to(target)) for call, hidden in zip(calls, resume.hidden(), strict=True)]
        replace = functools.partial(_replace_modules, config, model)
        tensors = stack.enter_context(contextlib.closing(
            _produce(model, plan, source, calibrating, calls, target, on_module, resume, replace)))
        write_checkpoint(dst, tensors, lambda: _checkpoint_config(config, model), tied=plan.tied,
                         metadata=checkpoint_metadata(), max_shard_size=max_shard_size,
                         add_files=lambda staging: hook.add_checkpoint_files(config=config, model=model,
                                                                             directory=staging))
        if resume is not None:
            resume.remove()
    memory.release_freed_memory()
    return Path(dst)


def _device_identity(device: torch.device) -> str:
    """The device as far as it decides the bytes: on the CPU the thread count changes the matmuls'
    sums (GPTQ writes other bytes with 1 thread than with 2), on a GPU the model of card."""
    import torch

    if device.type == "cpu":
        return f"cpu, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{device}, {torch.cuda.get_device_name(device)}"
    return str(device)


def _versions(config: QuantConfig) -> dict[str, str | None]:
    """The code that computes the blocks: another version may give other bytes."""
    import torch

    from qplug import __version__
    from qplug.manager import get_plugin_manager

    plugin = get_plugin_manager().get_entry(config.quant_method).plugin
    return {"qplug": __version__, "torch": torch.__version__, plugin.name: plugin.version}


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(f"device: {device!r} is not a device (cpu, cuda, cuda:N, ...)") from exc
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available or (parsed.index or 0) >= count:
        have = f"{count} {parsed.type} device(s)" if available else f"no {parsed.type} device"
        raise PlacementError(f"device: {device!r} does not exist here ({have})")
    return torch.device(parsed.type, parsed.index or 0)


def _blocks(model: nn.Module, calibrating: BlockCalibration) -> nn.ModuleList:
    """The block list the backend named, every module to quantize inside it."""
    from torch import nn

    try:
        blocks = model.get_submodule(calibrating.blocks)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise PluginError(f"calibrate_blocks named {calibrating.blocks!r} as the blocks of {type(model).__name__}, "
                          "which is not a non-empty nn.ModuleList")
    outside = [n for n in calibrating.module_names if not n.startswith(calibrating.blocks + ".")]
    if outside:
        raise IncompatibleModelError(
            f"{len(outside)} module(s) to quantize lie outside the blocks {calibrating.blocks} "
            f"({', '.join(outside[:3])}), which block-by-block calibration cannot reach: skip them "
            "(--skip / skip=), or load the float model and call qplug.quantize"
        )
    return blocks


def _capture(model: nn.Module, blocks: nn.ModuleList, calibrating: BlockCalibration, source: CheckpointWeights,
             plan: WritePlan, device: torch.device) -> list[BlockCall]:
    """The first block's calls on the calibration batches, with only the modules that run before it read.

    Every module outside the blocks gets a pre-hook that reads its own tensors from SRC onto
    ``device`` the first time it is called; afterwards they go back to the meta device.
    """
    import torch
    from torch import nn

    from qplug.blocks import capture_first_block

    filled: list[nn.Module] = []

    def fill(prefix: str) -> Callable[..., None]:
        def hook(module: nn.Module, *_: Any) -> None:
            if any(m is module for m in filled):
                return
            for store in (module._parameters, module._buffers):
                for key, value in list(store.items()):
                    if value is None:
                        continue
                    if value.device.type == "meta":
                        name = f"{prefix}{key}"
                        value = source.get(plan.reads.get(name, name))
                    value = value.to(device)
                    store[key] = nn.Parameter(value, requires_grad=False) if store is module._parameters else value
            filled.append(module)
        return hook

    handles = []
    for name, module in model.named_modules():
        if module is blocks or name.startswith(calibrating.blocks + "."):
            continue
        if any(v is not None for v in [*module._parameters.values(), *module._buffers.values()]):
            handles.append(module.register_forward_pre_hook(fill(f"{name}." if name else "")))
    try:
        with torch.no_grad():
            calls = capture_first_block(model, blocks[0], calibrating.batches, name=f"{calibrating.blocks}.0",
                                        device=device)
    finally:
        for handle in handles:
            handle.remove()
        for module in filled:
            to_meta(module)
    if any(_holds_meta(call) for call in calls):
        raise IncompatibleModelError(
            f"{type(model).__name__} uses a tensor before {calibrating.blocks}.0 other than by calling the module that "
            "holds it, so it cannot be calibrated block by block from disk; load it and call qplug.quantize"
        )
    return calls


def _holds_meta(value: Any) -> bool:
    import torch

    from qplug.blocks import BlockCall

    if isinstance(value, BlockCall):
        return _holds_meta([value.hidden, value.args, value.kwargs])
    if isinstance(value, torch.Tensor):
        return value.device.type == "meta"
    if isinstance(value, (tuple, list)):
        return any(_holds_meta(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_meta(v) for v in value.values())
    return False


def _produce(
    model: nn.Module,
    plan: WritePlan,
    source: CheckpointWeights,
    calibrating: BlockCalibration,
    calls: list[BlockCall],
    device: torch.device,
    on_module: Callable[[Progress], None] | None,
    resume: BlockResume | None,
    replace_modules: Callable[..., list[str]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in state-dict order, calibrating and quantizing each block as its turn comes.

    The blocks ``resume`` holds as finished are not calibrated again: their tensors come from it, and
    their modules become the backend's empty quantized ones (as loading builds them), so the config
    and files written at the end see every block quantized.
    """
    import torch

    from qplug import memory, progress

    total = len(calibrating.module_names)
    blocks = sum(1 for owner, _ in plan.units if owner is not None)
    done = written = index = 0
    captured = list(calls)
    with progress.task("calibrating to disk", total=blocks, unit="blocks") as shown:
        for owner, keys in plan.units:
            if owner is None:
                (key,) = keys
                tensor = source.get(plan.reads[key])
                nbytes = tensor.numel() * tensor.element_size()
                written += nbytes
                yield key, tensor
                del tensor
                memory.note_freed(nbytes, every=RELEASE_EVERY_BYTES)
                continue
            block = model.get_submodule(owner)
            mine = [name for name in calibrating.module_names if name.startswith(owner + ".")]
            if resume is not None and index < resume.resumed:
                out = resume.tensors(index)
                replace_modules(mine, None, prequantized=True, checkpoint_tensors=resume.infos(index))
            else:
                cut = len(owner) + 1
                block.load_state_dict({key[cut:]: source.get(key) for key in keys}, strict=True, assign=True)
                if device.type != "cpu":
                    block.to(device)
                with torch.no_grad(), progress.enabled(False):  # this task counts the blocks
                    calls = calibrating.quantize_block(owner, block, calls)
                state = block.state_dict(prefix=owner + ".")
                refuse_shared(owner, state)
                if resume is not None:
                    if _only_hidden_changed(captured, calls):
                        resume.save(index, list(state.items()), [call.hidden for call in calls])
                    else:
                        progress.note(f"{owner}: the backend passed on more than new hidden states to the next "
                                      "block, which a rerun could not restore: this run keeps no resume state")
                        resume = None
                out = ((name, state.pop(name)) for name in list(state))
            dropped = 0
            for name, tensor in out:
                nbytes = tensor.numel() * tensor.element_size()
                written += nbytes
                dropped += nbytes
                yield name, tensor
                del tensor
            to_meta(block)
            memory.note_freed(dropped, every=RELEASE_EVERY_BYTES)
            shown.advance()
            index += 1
            for name in mine:
                done += 1
                if on_module is not None:
                    on_module(Progress(name, done, total, written))


def _only_hidden_changed(captured: list[BlockCall], calls: list[BlockCall]) -> bool:
    """Whether ``calls`` are the captured first-block calls with new hidden states, all a rerun restores."""
    return len(calls) == len(captured) and all(
        new.args is old.args and new.kwargs is old.kwargs and new.keyword == old.keyword
        for new, old in zip(calls, captured, strict=True))
