"""Converting a quantized checkpoint to another format: the same integers repacked, never re-quantized.

Every weight-only integer format qplug reads (GPTQ v1/v2, AWQ GEMM/GEMV, compressed-tensors
``pack-quantized``) stores one affine integer weight, ``w = (q - zero) * scale`` per group of input
columns, in its own packing. :func:`convert` reads each quantized layer of SRC into that plain form
(:class:`PlainLayer`, through the source backend's ``read_int_layer`` hook) and has the target backend
pack it again (``write_int_layer``), so the converted checkpoint dequantizes to the same weights, bit
for bit. Formats that store their codes in the same words (:class:`PackedCodes`: GPTQ, compressed-tensors
``pack-quantized``, AWQ GEMV) pass those words through the plain form as they are; only scales and zero
points are repacked. A target that cannot hold a layer exactly refuses it with
:class:`~qplug.ConversionError`, naming the layer and the reason (8-bit weights to AWQ, act-order to a
format without it, scales that would change in float16, ...).

It streams: SRC's model is built on the meta device only to learn which tensors form each quantized
layer (the source backend's ``replace_modules`` on a skeleton, as :func:`qplug.load_quantized` does);
then one layer's tensors at a time are read, converted and appended to DST's shards
(:class:`qplug.shards.ShardWriter`), a reader thread reading and converting the next layer while the
calling thread writes the last, with torch on one thread (the caller's count is restored at the end); the
memory a written layer was read into serves the next reads of the same size.
Every other tensor (embeddings, norms, the head) is copied as it is. Peak memory is the runtime floor plus about one
layer, whatever the depth. DST is assembled in a staging directory and swapped in at the end
(:func:`qplug._io.atomic_directory`): a refusal or a crash leaves an existing DST whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from qplug.errors import CheckpointError, ConversionError, IncompatibleModelError, PluginError, QuantConfigError
from qplug.plain_layers import PackedCodes, PlainLayer, WrittenLayer, exact_cast, refuse
from qplug.write_plan import RELEASE_EVERY_BYTES, to_meta

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qplug.checkpoint import CheckpointWeights
    from qplug.config import QuantConfig

__all__ = ["PackedCodes", "PlainLayer", "WrittenLayer", "convert", "exact_cast", "refuse"]



def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    max_shard_size: int | str | None = "50GB",
    on_layer: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Write the quantized checkpoint in ``src`` to ``dst`` in the format ``to``, the same integers repacked.

    See :mod:`qplug.conversion`. The layers' settings (bits, group size, symmetry, act-order) come from
    the checkpoint; ``options`` set the target config's other fields, e.g. ``checkpoint_format="gptq_v2"``
    (GPTQ) or ``version="gemv"`` (AWQ). ``config.json`` gets the new ``quantization_config``; SRC's
    tokenizer and generation files are copied (:data:`qplug.checkpoint.COMPANION_FILES`). While it runs,
    ``torch.get_num_threads()`` is 1, process-wide; the caller's setting is restored when it returns or raises.

    :param to: the target backend's name or alias (``"gptq"``, ``"awq"``, ``"compressed-tensors"``/``"ct"``).
    :param max_shard_size: as for :func:`qplug.save_quantized`: shards with an index beyond it.
    :param on_layer: called with each converted layer's name once its tensors are written.
    :param options: fields of the target's config (strings, numbers, lists as its JSON takes them).
    :return: ``dst``.
    :raises ConversionError: a layer the target cannot hold exactly (named, with the reason), or a
        backend that cannot read or write converted layers.
    :raises QuantConfigError: an option that is not a field of the target's config, or a bad value.
    :raises CheckpointError: SRC is not a quantized checkpoint qplug can read.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from qplug import memory, progress
    from qplug._io import atomic_directory, recover_directory
    from qplug.api import _prepare, _replace_modules, _validate, checkpoint_metadata, config_from_dict
    from qplug.checkpoint import CheckpointWeights, build_skeleton, read_model_config, write_model_config
    from qplug.manager import get_plugin_manager
    from qplug.shards import ShardWriter, parse_size

    src = recover_directory(src)
    if Path(dst).absolute().resolve() == Path(src).absolute().resolve():
        raise ConversionError(f"cannot convert {src} onto itself: give a different DST")
    model_config = read_model_config(src)
    saved = model_config.get("quantization_config")
    if not isinstance(saved, Mapping):
        raise ConversionError(f"{src} holds no quantization_config: convert reads quantized checkpoints "
                              "(qplug quantize makes one from a floating-point model)")
    manager = get_plugin_manager()
    source = config_from_dict(dict(saved))
    target_backend = manager.get_backend(to)
    to = target_backend.name
    _check_hook(manager, "read_int_layer", type(source), f"read {source.quant_method!r} layers")
    _check_hook(manager, "write_int_layer", target_backend.config_class, f"write {to!r} layers")
    target_backend.ensure_available()
    template = _target_template(target_backend.config_class, to, options)
    _validate(template, None, None)  # the target's own checks of the options (a layout it cannot write)
    parse_size(max_shard_size)  # a bad size fails before any work

    skeleton = build_skeleton(model_config)
    hook = manager.hook
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_torch_thread())
        weights = CheckpointWeights(src, stack)
        source, selected = _prepare(source, skeleton)
        layers = _replace_modules(source, skeleton, selected, calibration=None, prequantized=True,
                                  checkpoint_tensors=weights.tensor_infos())
        if not layers:
            raise ConversionError(f"{src}: no layer of this {source.quant_method!r} checkpoint is quantized")
        units = _units(skeleton, layers, weights)
        recycled = _RecycledBuffers()
        agreed: dict[str, Any] = {}  # the first layer's settings, and its name
        written_infos: dict[str, tuple[Any, tuple[int, ...]]] = {}  # name -> (dtype, shape)

        def convert_one(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            module = skeleton.get_submodule(name)
            try:
                module.load_state_dict(tensors, strict=True, assign=True)
            except (RuntimeError, ValueError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"{src}: {name}: {' '.join(str(exc).split())}") from exc  # torch's, on one line
            plain = hook.read_int_layer(config=source, name=name, module=module)
            if plain is None:
                raise PluginError(f"backend {source.quant_method!r} did not answer read_int_layer for {name!r} "
                                  f"({type(module).__name__})")
            plain.reusable = True  # its tensors were read for this write and go to the meta device after it
            try:
                written = hook.write_int_layer(config=template, name=name, layer=plain)
            except (IncompatibleModelError, QuantConfigError) as exc:  # the target's own checks, named here
                raise refuse(name, to, str(exc)) from exc
            if written is None:
                raise PluginError(f"backend {to!r} did not answer write_int_layer for {name!r}")
            _agree(name, to, written.settings, agreed, template, options)
            to_meta(module)
            return written.tensors

        def prepare(unit: tuple[str | None, list[str]]) -> tuple[int, dict[str, torch.Tensor], list[torch.Tensor]]:
            """On the reader thread: the unit's tensors read, a quantized layer's converted; the bytes read, and
            the buffers read into (recycled once the unit is written)."""
            owner, keys = unit
            tensors, buffers = {}, []
            for key in keys:
                nbytes = weights.nbytes(key)
                buffer = recycled.take(nbytes)
                tensors[key] = weights.get(key, into=buffer)
                if recycled.keeps(nbytes):
                    buffers.append(tensors[key].reshape(-1).view(torch.uint8) if buffer is None else buffer)
            read = sum(t.numel() * t.element_size() for t in tensors.values())
            if owner is not None:
                local = {key[len(owner) + 1:]: tensors.pop(key) for key in keys}
                tensors = {f"{owner}.{key}": t for key, t in convert_one(owner, local).items()}
            return read, tensors, buffers

        def produce() -> Iterator[tuple[str, torch.Tensor]]:
            from qplug.streaming import _prefetched

            # One thread reads and converts the next unit while this one writes the last: converting then costs
            # no time of its own where the writes take longer (they release the GIL, as torch's operations and
            # the C transpose do). Units are converted in order, one at a time, so `agreed` sees them in order.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qplug-convert") as reader:
                for (owner, _), (dropped, tensors, buffers) in _prefetched(reader, prepare, units):
                    for key in list(tensors):
                        tensor = tensors.pop(key)
                        written_infos[key] = (tensor.dtype, tuple(tensor.shape))
                        dropped += tensor.numel() * tensor.element_size()
                        yield key, tensor
                        del tensor
                    # written: nothing still to write holds the unit's reads (a layer's tensors are made from its
                    # own reads or fresh memory), so the next reads may take their memory
                    for buffer in buffers:
                        dropped -= buffer.numel()
                        recycled.give(buffer)
                    del buffers
                    memory.note_freed(dropped, every=RELEASE_EVERY_BYTES)  # as the disk paths do
                    if owner is not None:
                        shown.advance()
                        if on_layer is not None:
                            on_layer(owner)

        tied = {k: v for k, v in weights.tied.items() if k not in weights}
        metadata = {"format": "pt", **checkpoint_metadata()}
        if tied:
            import json

            from qplug.checkpoint import TIED_KEY

            metadata[TIED_KEY] = json.dumps(tied, sort_keys=True)
        with progress.task(f"converting to {to}", total=len(layers), unit="layers") as shown, \
                atomic_directory(Path(dst)) as staging:
            _copy_companions(Path(src), staging)
            with ShardWriter(staging, max_shard_size=max_shard_size, metadata=metadata) as writer, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="qplug-check") as checker:
                for key, tensor in produce():
                    writer.add(key, tensor)

                def final_config() -> QuantConfig:
                    final = _final_config(template, agreed, source, selected, layers)
                    _check_loads(final, model_config, layers, written_infos)
                    return final

                # checked while the shards are assembled (a copy in the kernel that releases the GIL): both
                # come before anything names DST, so a refusal still leaves it as it was
                checked = checker.submit(final_config)
                writer.finish()
                final = checked.result()
            serialized = hook.serialize(config=final, model=None)
            write_model_config(staging, {**model_config, "quantization_config": serialized})
            hook.add_checkpoint_files(config=final, model=None, directory=staging)
    recycled.clear()  # freed before the last trim hands them back
    memory.release_freed_memory()
    return Path(dst)


class _RecycledBuffers:
    """Read buffers handed back once their layer is written, for the next reads of the same byte count.

    A conversion reads on one thread and frees on another, and glibc hands much of what the writing thread
    frees back to the OS (a thread's arena trims its top, :func:`qplug.memory.note_freed` trims in batches):
    the 1.1B model's conversion took 110-142k page faults where reading and writing the same bytes take 68k
    (the next read faulting in every page again, the kernel zeroing each). Decoder layers repeat their shapes,
    so the buffers of one layer serve the next. Only buffers of :data:`SMALLEST` to :data:`LARGEST` bytes are
    kept (small ones glibc reuses without faults; a one-off embedding would stay held), at most
    :data:`LIMIT` bytes in all, so memory stays flat.
    """

    SMALLEST = 64 * 2**10
    LARGEST = 64 * 2**20
    LIMIT = 128 * 2**20

    def __init__(self) -> None:
        import threading

        self._free: dict[int, list[torch.Tensor]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def keeps(self, nbytes: int) -> bool:
        return self.SMALLEST <= nbytes <= self.LARGEST

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of ``nbytes`` bytes handed back earlier, or ``None``."""
        with self._lock:
            kept = self._free.get(nbytes)
            if not kept:
                return None
            self._held -= nbytes
            return kept.pop()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0

    def give(self, buffer: torch.Tensor) -> None:
        """Keep ``buffer`` (contiguous uint8, nothing else using it) for a later read, within :data:`LIMIT`."""
        nbytes = buffer.numel()
        with self._lock:
            if self.keeps(nbytes) and self._held + nbytes <= self.LIMIT:
                self._free.setdefault(nbytes, []).append(buffer)
                self._held += nbytes


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch's intra-op threads set to one for the conversion, the caller's count restored afterwards.

    A conversion's torch operations are small (scales, zero points, checks) next to its reads and writes,
    and with more threads each becomes an OpenMP region that waits for cores the writes, or other
    processes, hold: the 1.1B model took 1.7x longer with torch's two threads than with one on a loaded
    2-core machine (docs/performance.md). The setting is torch's, process-wide: other threads running
    torch meanwhile get one thread too.
    """
    import torch

    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_hook(manager: Any, hook_name: str, config_class: type, what: str) -> None:
    """Refuse at once when no plugin implements ``hook_name`` for ``config_class``."""
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        if impl.wrapper or impl.hookwrapper:
            continue
        owner = getattr(impl.function, "qplug_config_class", None)  # set by qplug.backend_hookimpl
        if owner is None or issubclass(config_class, owner):
            return
    able = sorted({entry.backend.name for entry in manager.backend_entries()
                   for impl in getattr(manager.hook, hook_name).get_hookimpls()
                   if getattr(impl.function, "qplug_config_class", None) is entry.backend.config_class})
    raise ConversionError(f"cannot {what}: no installed plugin implements {hook_name} for "
                          f"{config_class.__name__} (qplug converts between: {', '.join(able) or 'none installed'})")


def _target_template(config_class: type[QuantConfig], to: str, options: Mapping[str, Any]) -> QuantConfig:
    """The target's config from ``options`` alone (the layers' settings are filled in later)."""
    fields = config_class.field_names()
    for key in options:
        if key not in fields:
            raise QuantConfigError(field=key, value=options[key], config=config_class.__name__,
                                   accepted=f"a field of {config_class.__name__}: {', '.join(fields)}")
    return config_class.from_dict({**options, "quant_method": to})


def _units(skeleton: nn.Module, layers: list[str], weights: CheckpointWeights) -> list[tuple[str | None, list[str]]]:
    """SRC's tensors in the model's state-dict order: one unit per quantized layer, one per other tensor.

    Tensors SRC lacks (a tied head qplug did not write) are left out, as they are in SRC; a tensor the
    model does not have is refused, since copying it would hide a layer the config does not quantize.
    """
    layer_of = {}
    for name in layers:
        for key in skeleton.get_submodule(name).state_dict(prefix=name + "."):
            layer_of[key] = name
    units: list[tuple[str | None, list[str]]] = []
    state = skeleton.state_dict(keep_vars=True)
    for key in state:
        owner = layer_of.get(key)
        if key not in weights:
            continue
        if owner is None:
            units.append((None, [key]))
        elif units and units[-1][0] == owner:
            units[-1][1].append(key)
        else:
            units.append((owner, [key]))
    unexpected = [n for n in weights.names() if n not in state]
    if unexpected:
        raise CheckpointError(f"{weights.directory}: checkpoint has tensors the model does not: "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    return units


def _agree(name: str, to: str, settings: dict[str, Any], agreed: dict[str, Any], template: QuantConfig,
           options: Mapping[str, Any]) -> None:
    """Refuse a layer whose settings differ from the first layer's, or from an option the caller set."""
    for key in options:
        if key in settings and settings[key] != getattr(template, key):
            raise refuse(name, to, f"it needs {key}={settings[key]!r}, and the options ask "
                                   f"{key}={getattr(template, key)!r}")
    if not agreed:
        agreed.update(name=name, settings=settings)
        return
    first = agreed["settings"]
    if settings != first:
        keys = [k for k in dict.fromkeys([*settings, *first]) if settings.get(k) != first.get(k)]
        mine = ", ".join(f"{k}={settings.get(k)!r}" for k in keys)
        theirs = ", ".join(f"{k}={first.get(k)!r}" for k in keys)
        raise refuse(name, to, f"it needs {mine}, and {agreed['name']} needs {theirs}; qplug writes one "
                               f"{to} setting for every layer")


def _final_config(template: QuantConfig, agreed: dict[str, Any], source: QuantConfig, selected: list[str],
                  layers: list[str]) -> QuantConfig:
    """The target config: ``template`` with the layers' settings, leaving in floating point what SRC did."""
    config = attrs.evolve(template, **agreed["settings"]).with_skips(source.skip_patterns())
    converted = set(layers)
    left = [name for name in selected if name not in converted]  # SRC's backend left them unquantized
    return config.with_skips(left) if left else config


def _check_loads(config: QuantConfig, model_config: Mapping[str, Any], layers: list[str],
                 written: Mapping[str, tuple[Any, tuple[int, ...]]]) -> None:
    """Refuse a config that would load other layers than the ones converted (before it is written)."""
    from qplug.api import _prepare, _replace_modules
    from qplug.checkpoint import TensorInfo, build_skeleton

    skeleton = build_skeleton(model_config)
    config, names = _prepare(config, skeleton)
    infos = {key: TensorInfo(dtype, shape) for key, (dtype, shape) in written.items()}
    loaded = _replace_modules(config, skeleton, names, calibration=None, prequantized=True, checkpoint_tensors=infos)
    missing = [n for n in layers if n not in set(loaded)]
    extra = [n for n in loaded if n not in set(layers)]
    if missing or extra:
        raise ConversionError(
            f"cannot convert to {config.quant_method}: its config would "
            + (f"leave {', '.join(missing[:3])} unquantized" if missing else f"quantize {', '.join(extra[:3])}")
            + ", which the source checkpoint does not"
        )


def _copy_companions(src: Path, staging: Path) -> None:
    """SRC's tokenizer, generation and processor files, copied (never linked: DST is its own checkpoint)."""
    from qplug.checkpoint import COMPANION_FILES

    for name in COMPANION_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, staging / name)

