"""The operations an application calls: pick a backend by config, quantize, save, load, dequantize.

This module imports torch only inside the functions that touch a model, so importing qplug (and
listing backends) stays fast.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qplug.config import QuantConfig, read_quantization_config
from qplug.errors import CheckpointError, PluginError, QPlugError, QuantConfigError
from qplug.manager import get_plugin_manager

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "available_backends",
    "check",
    "config_from_dict",
    "dequantize",
    "get_config_class",
    "load_config",
    "load_quantized",
    "quantize",
    "quantized_config",
    "register_plugin",
    "save_quantized",
    "unregister_plugin",
]

# The attribute a quantized model carries: the config it was quantized with.
_CONFIG_ATTR = "qplug_config"
# transformers' default for save_pretrained (5.x): weights above it are split into shards with an index.
DEFAULT_SHARD_SIZE = "50GB"


# --------------------------------------------------------------------------------------------
# Backends and configs
# --------------------------------------------------------------------------------------------


def available_backends() -> list[str]:
    """Canonical names of the backends usable here (registered, requirements installed), sorted."""
    return get_plugin_manager().available_backends()


def get_config_class(name: str) -> type[QuantConfig]:
    """The config class of the backend called ``name`` or an alias of it, case-insensitively.

    Works even when the backend's library is missing: configs can always be read and checked.

    :raises UnknownBackendError: listing the registered names.
    """
    return get_plugin_manager().get_backend(name).config_class


def config_from_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Build the config a ``quantization_config`` dict describes, dispatching on ``quant_method``.

    ``quant_method`` may be a backend's alias (``"bnb"``). Without ``quant_method``, the backend
    is inferred from the keys (old AutoGPTQ ``quantize_config.json``, autoawq's native keys,
    trimmed bitsandbytes configs): among the config classes that recognise the dict, the one that
    knows the most of its keys (:meth:`QuantConfig.claimed_keys <qplug.QuantConfig.claimed_keys>`).

    :raises QuantConfigError: the dict is invalid for its backend (names the field).
    :raises UnknownBackendError: no backend is named or recognised.
    """
    if not isinstance(data, Mapping):
        raise QuantConfigError(field="quantization_config", value=data, accepted="expected a JSON object")
    manager = get_plugin_manager()
    method = data.get("quant_method")
    if method is None:
        backend = manager.infer_backend(dict(data))
    elif not isinstance(method, str):
        raise QuantConfigError(field="quant_method", value=method,
                               accepted="expected a backend name: " + ", ".join(manager.backend_names()))
    else:
        backend = manager.get_backend(method)
        data = {**data, "quant_method": backend.name}  # an alias resolved here, where aliases are known
    return backend.config_class.from_dict(data)


def load_config(path: str | os.PathLike[str]) -> QuantConfig:
    """Read a config from a bare ``quantization_config`` JSON file or a whole ``config.json`` holding one."""
    return config_from_dict(read_quantization_config(path))


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin (module or object with :data:`qplug.hookimpl` functions) at run time."""
    return get_plugin_manager().register(plugin, name)


def unregister_plugin(plugin: object | None = None, *, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin`, and its backends."""
    get_plugin_manager().unregister(plugin, name)


def quantized_config(model: nn.Module) -> QuantConfig | None:
    """The config ``model`` was quantized with by qplug, or ``None``."""
    return getattr(model, _CONFIG_ATTR, None)


# --------------------------------------------------------------------------------------------
# Operations on models
# --------------------------------------------------------------------------------------------


def _resolve(config: QuantConfig | Mapping[str, Any]) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raise TypeError(f"config must be a qplug.QuantConfig or a quantization_config dict, got {type(config).__name__}")


def check(config: QuantConfig | Mapping[str, Any], model: nn.Module | None = None) -> QuantConfig:
    """Check ``config``, and ``model`` when given, the way quantizing and loading will; nothing is changed.

    Every plugin's :func:`~qplug.hookspecs.validate` hook runs: the backend that owns the config
    checks it (and, with a model, the model's shapes and module kinds), and any other plugin may
    veto. Use it to fail early, before a long load: ``qplug config validate`` and ``qplug quantize``
    do. :func:`quantize` and :func:`load_quantized` run the same check themselves.

    The backend's library need not be installed: a config can always be checked.

    :param config: a :class:`QuantConfig`, or a ``quantization_config`` dict (built first, as
        :func:`config_from_dict` builds it).
    :param model: the model the config is meant for (its parameters may be on the meta device), or
        ``None`` to check the config alone.
    :return: the config checked (the one built from the dict, when a dict was given).
    :raises QuantConfigError: the config is invalid (names the field and what is accepted).
    :raises UnknownBackendError: no registered backend owns the config.
    :raises IncompatibleModelError: ``model`` cannot take the config (names the module).

    A plugin's own error type, if it raises one, propagates unchanged.
    """
    config = _resolve(config)
    get_plugin_manager().backend_for_config(config)  # a config whose backend is gone: UnknownBackendError
    names = None
    if model is not None:
        from qplug.modules import select_modules

        names = list(select_modules(model, config.skip_patterns(), warn_unmatched=False).names)
    _validate(config, model, names)
    return config


def _validate(config: QuantConfig, model: nn.Module | None, module_names: list[str] | None) -> None:
    """The one call of the ``validate`` hook (:func:`check`, and so quantizing and loading, come through here).

    ``module_names`` is what the core selected for ``model`` (``None`` without one).
    """
    get_plugin_manager().hook.validate(config=config, model=model,
                                       module_names=None if module_names is None else list(module_names))


def _prepare(config: QuantConfig, model: nn.Module, skip: Iterable[str] = ()) -> tuple[QuantConfig, list[str]]:
    """Check the backend and the model, record ``skip`` in the config, choose the modules."""
    from qplug.modules import select_modules

    manager = get_plugin_manager()
    manager.backend_for_config(config).ensure_available()
    if quantized_config(model) is not None:
        raise QPlugError(
            f"{type(model).__name__} is already quantized with {quantized_config(model).quant_method!r}; "
            "call qplug.dequantize(model) first"
        )
    config = config.with_skips(skip)
    names = list(select_modules(model, config.skip_patterns()).names)
    _validate(config, model, names)
    return config, names


def _replace_modules(config: QuantConfig, model: nn.Module, names: list[str], calibration: Any,
                     prequantized: bool, checkpoint_tensors: Mapping[str, Any] | None = None) -> list[str]:
    replaced = get_plugin_manager().hook.replace_modules(
        config=config, model=model, module_names=names, calibration=calibration, prequantized=prequantized,
        checkpoint_tensors=checkpoint_tensors,
    )
    if replaced is None:
        raise PluginError(f"backend {config.quant_method!r} did not answer replace_modules for {type(config).__name__}")
    return list(replaced)


def quantize(
    model: nn.Module,
    config: QuantConfig | Mapping[str, Any],
    *,
    calibration: Any = None,
    skip: Iterable[str] = (),
    progress: bool | None = None,
) -> nn.Module:
    """Quantize ``model`` in place with the backend that owns ``config``; returns the model.

    Every ``nn.Linear`` is replaced except the output head, the config's own skip list and
    ``skip`` (which adds to them and is recorded in the config, so it round-trips through a save).

    :param calibration: data for methods that calibrate (GPTQ, AWQ): token ids, texts with a
        tokenizer, or a file; see :mod:`qplug.calibration` for every accepted form.
    :param progress: ``False`` silences the progress display, ``True`` shows it even where
        ``QPLUG_PROGRESS=0``; ``None`` (default) follows the variable (see :mod:`qplug.progress`).
    :raises QuantConfigError: the config cannot quantize (e.g. neither 4- nor 8-bit chosen), or a
        method that calibrates got no ``calibration`` (refused before any work).
    :raises BackendUnavailableError: the backend's library is not installed.
    """
    from qplug.calibration import check_given
    from qplug.progress import enabled

    config = _resolve(config)
    config.check_quantizable()
    check_given(config, calibration)
    config, names = _prepare(config, model, skip)
    _require_linear(config, model)
    with enabled(progress):
        _replace_modules(config, model, names, calibration, prequantized=False)
    setattr(model, _CONFIG_ATTR, config)
    return model


def _require_linear(config: QuantConfig, model: nn.Module) -> None:
    """Every backend quantizes ``nn.Linear`` layers: a model without one is refused the same way by all."""
    from torch import nn

    from qplug.errors import IncompatibleModelError

    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise IncompatibleModelError(
            f"{config.quant_method}: {type(model).__name__} has no nn.Linear layer to quantize"
        )


def dequantize(model: nn.Module) -> nn.Module:
    """Turn a model quantized by qplug back into plain floating-point modules, in place."""
    config = quantized_config(model)
    if config is None:
        raise QPlugError(f"{type(model).__name__} was not quantized by qplug; nothing to dequantize")
    result = get_plugin_manager().hook.dequantize(config=config, model=model)
    if result is None:
        raise PluginError(f"backend {config.quant_method!r} did not answer dequantize")
    delattr(model, _CONFIG_ATTR)
    return model


def save_quantized(model: nn.Module, directory: str | os.PathLike[str], *,
                   max_shard_size: int | str | None = DEFAULT_SHARD_SIZE, progress: bool | None = None) -> Path:
    """Save a quantized model as safetensors plus a ``config.json`` carrying ``quantization_config``.

    The directory is written atomically: on failure an existing checkpoint there stays whole.

    :param max_shard_size: weights beyond this size are split into ``model-0000K-of-0000N.safetensors``
        files listed in ``model.safetensors.index.json``, as transformers does: bytes, or a string such
        as ``"5GB"`` or ``"512MiB"``; ``None`` writes one ``model.safetensors`` whatever its size.
    :param progress: show (``True``) or silence (``False``) the progress display; ``None`` follows
        ``QPLUG_PROGRESS`` (see :mod:`qplug.progress`).
    """
    from qplug.checkpoint import state_tensors, write_checkpoint
    from qplug.progress import enabled

    config = quantized_config(model)
    if config is None:
        raise QPlugError(f"{type(model).__name__} was not quantized by qplug; use qplug.quantize first")
    hook = get_plugin_manager().hook
    model_config = _checkpoint_config(config, model)
    tensors, tied = state_tensors(model)
    with enabled(progress):
        return write_checkpoint(
            directory, tensors, model_config, tied=tied, metadata=checkpoint_metadata(), max_shard_size=max_shard_size,
            add_files=lambda staging: hook.add_checkpoint_files(config=config, model=model, directory=staging),
        )


def _checkpoint_config(config: QuantConfig, model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint of ``model``: its HF config with ``quantization_config``."""
    serialized = get_plugin_manager().hook.serialize(config=config, model=model)
    if serialized is None:
        raise PluginError(f"backend {config.quant_method!r} did not answer serialize")
    model_config: dict[str, Any] = {}
    hf_config = getattr(model, "config", None)
    if hf_config is not None and callable(getattr(hf_config, "to_dict", None)):
        model_config = hf_config.to_dict()
        model_config.pop("quantization_config", None)
    model_config["quantization_config"] = serialized
    return model_config


def checkpoint_metadata() -> dict[str, str]:
    """The safetensors metadata qplug writes into every checkpoint it saves."""
    from qplug import __version__

    return {"qplug.version": __version__}


def load_quantized(
    directory: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    quantization_config: QuantConfig | Mapping[str, Any] | None = None,
    skip: Iterable[str] = (),
    on_module: Callable[[str], None] | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Load a quantized checkpoint, or quantize a floating-point one while loading it.

    A checkpoint whose ``config.json`` carries a ``quantization_config`` (saved by qplug or by
    transformers) is loaded as it is. A floating-point checkpoint is quantized on load with
    ``quantization_config``: one layer at a time is read, quantized and dropped, so the float model
    never sits in memory (data-free methods only; see :mod:`qplug.streaming`).

    Without ``model``, the skeleton is built from ``config.json`` with transformers, its parameters
    on the meta device. With ``model``, its modules are replaced and its tensors overwritten.

    :param skip: with ``quantization_config``: more modules to leave in floating point.
    :param on_module: with ``quantization_config``: called with each module name once quantized.
    :param device_map: where the modules live, as in transformers' ``from_pretrained`` (see
        :mod:`qplug.placement`): ``"auto"``/``"balanced"``/``"balanced_low_0"``/``"sequential"``
        (accelerate's plan for ``max_memory``), a device such as ``"cuda:0"``, or a dict of module name ->
        device, ``"disk"`` included (tensors then go to ``offload_folder`` and are read back at each
        forward). A pre-quantized checkpoint's tensors go from the file to their device; a model
        quantized while loading is placed once it is complete.
    :param progress: show (``True``) or silence (``False``) the progress display; ``None`` follows
        ``QPLUG_PROGRESS`` (see :mod:`qplug.progress`).
    :raises CheckpointError: a tensor is missing, unexpected or mis-shaped (named).
    :raises PlacementError: a device that does not exist, a map that misses a module, disk without
        ``offload_folder``, or a layer that cannot be offloaded (named, before any tensor is read).
    """
    from qplug._io import recover_directory
    from qplug.checkpoint import read_model_config
    from qplug.progress import enabled

    # A save killed between its two renames leaves the checkpoint beside its path: finish that save.
    directory = recover_directory(directory)
    model_config = read_model_config(directory)
    saved = model_config.get("quantization_config")
    if saved is not None and quantization_config is not None:
        raise QPlugError(f"{directory} is already quantized ({saved.get('quant_method')!r}); "
                         "load it without quantization_config")
    if saved is None and quantization_config is None:
        raise CheckpointError(f"{directory}: config.json has no quantization_config; the checkpoint is not "
                              "quantized (pass quantization_config=... to quantize it while loading)")
    config = config_from_dict(saved) if saved is not None else _resolve(quantization_config)
    # Loading into the caller's model is a transaction: on any failure, every module of it is put
    # back as it was (a half-converted model would run and give wrong outputs).
    snapshot = _ModelSnapshot(model) if model is not None else None
    placing = None if device_map is None else (device_map, max_memory, offload_folder)
    try:
        with enabled(progress):
            model = _load_into(directory, model, model_config, config, saved is not None, skip, on_module,
                               placing)
    except BaseException as exc:
        if snapshot is not None:
            try:
                snapshot.restore()
            except Exception as restore_error:
                raise QPlugError(
                    f"loading {directory} failed ({exc}) and the model passed in could not be restored "
                    f"({restore_error}): it is unusable, build it again"
                ) from exc
        raise
    setattr(model, _CONFIG_ATTR, config)
    return model.eval()


def _load_into(directory: str | os.PathLike[str], model: nn.Module | None, model_config: dict[str, Any],
               config: QuantConfig, prequantized: bool, skip: Iterable[str],
               on_module: Callable[[str], None] | None, placing: tuple | None = None) -> nn.Module:
    """The body of :func:`load_quantized`: build or convert ``model``, fill and place it; returns it."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from qplug import placement
    from qplug.checkpoint import CheckpointWeights, build_skeleton

    def plan(model: nn.Module) -> placement.Placement | None:
        if placing is None:
            return None
        device_map, max_memory, offload_folder = placing
        return placement.plan(model, device_map, max_memory=max_memory, offload_folder=offload_folder)

    if prequantized:
        with contextlib.ExitStack() as files:
            # The headers first (cheap: the backend sizes its modules from them), then the tensors
            # on another thread while this one builds the (meta-device) model.
            weights = CheckpointWeights(directory, files)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qplug-load") as background:
                # in this thread's context, so the progress switch (qplug.progress.enabled) holds there too;
                # placed elsewhere than the CPU, tensors are read after the plan, one at a time, each to its place
                reading = (background.submit(contextvars.copy_context().run, weights.read_all)
                           if placing is None else None)
                if model is None:
                    model = build_skeleton(model_config)
                config, names = _prepare(config, model)
                _replace_modules(config, model, names, calibration=None, prequantized=True,
                                 checkpoint_tensors=weights.tensor_infos())
                where = plan(model)  # the quantized skeleton: the plan counts the bytes really loaded
                if reading is not None:
                    tensors = reading.result()
                elif where is None or where.single_device == "cpu":
                    tensors = weights.read_all()
                else:
                    tensors = where.read_placed(weights)
        _load_tensors(model, tensors, weights.tied, filled=placement.offloaded_module_names(where))
    else:
        if model is None:
            model = build_skeleton(model_config)
        from qplug.streaming import stream_quantize

        entry = get_plugin_manager().get_entry(config.quant_method)
        if not entry.backend.streams:
            raise QPlugError(
                f"backend {entry.backend.name!r} cannot quantize a checkpoint while loading it (it needs the whole "
                "model, e.g. for calibration); load the float model and call qplug.quantize"
            )
        config.check_quantizable()
        config, names = _prepare(config, model, skip)
        quantize_one = _module_quantizer(config, model, entry.quantizes_modules)
        # a map that names its devices is planned on the float skeleton, and each module goes to its place as
        # soon as it is quantized; a strategy ("auto", ...) needs the quantized sizes, so it is planned after
        early = None if placing is None or _is_strategy(placing[0]) else plan(model)
        if early is not None:
            quantize_one = _placing_each(quantize_one, model, early)
        rest = stream_quantize(model, Path(directory), names, quantize_one, on_module)
        if early is not None:
            rest = early.place_rest(rest)
        _load_tensors(model, rest, {}, filled=[*names, *placement.offloaded_module_names(early)])
        where = early or plan(model)
    return model if where is None else where.dispatch(model)


def _is_strategy(device_map: Any) -> bool:
    from qplug.placement import STRATEGIES

    return isinstance(device_map, str) and device_map in STRATEGIES


def _placing_each(quantize_one: Callable[[str], None], model: nn.Module, where: Any) -> Callable[[str], None]:
    def quantize_and_place(name: str) -> None:
        quantize_one(name)
        where.place_module(model, name)

    return quantize_and_place


def _module_quantizer(config: QuantConfig, model: nn.Module, hooked: bool) -> Callable[[str], None]:
    """Quantize one module of ``model`` in place, through ``quantize_module`` where the backend has it."""
    from qplug.modules import get_submodule, set_submodule

    hook = get_plugin_manager().hook

    def quantize_one(name: str) -> None:
        if not hooked:  # a plugin written before quantize_module: replace_modules, one module at a time
            _replace_modules(config, model, [name], calibration=None, prequantized=False)
            return
        quantized = hook.quantize_module(config=config, model=model, name=name, module=get_submodule(model, name))
        if quantized is None:
            raise PluginError(f"backend {config.quant_method!r} did not answer quantize_module for {name!r}")
        set_submodule(model, name, quantized)

    return quantize_one


def _load_tensors(model: nn.Module, tensors: dict[str, Any], tied: Mapping[str, str],
                  filled: Iterable[str] = ()) -> None:
    """Assign checkpoint tensors; ``filled`` names modules already complete (their keys may be absent)."""
    from qplug.modules import meta_tensor_names

    for name, kept in tied.items():
        if name not in tensors and kept in tensors:
            tensors[name] = tensors[kept]
    # Parameters the model itself ties (one object under several names): a checkpoint may hold one name.
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    tied_in_model = {n: names for names in aliases.values() if len(names) > 1 for n in names}
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError) as exc:  # torch's size-mismatch report, or a module's own check
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {exc}") from exc
    if result.unexpected_keys:
        raise CheckpointError(f"checkpoint has tensors the model does not: {', '.join(result.unexpected_keys)}")
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    filled = list(filled)
    done = ("",) if "" in filled else tuple(f"{name}." for name in filled)  # "": the whole model
    missing = [
        n for n in result.missing_keys
        if not n.startswith(done) and not any(other in tensors for other in tied_in_model.get(n, ()))
    ]
    missing += [n for n in meta_tensor_names(model) if n not in missing and not n.startswith(done)]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors the model needs: {', '.join(sorted(missing))}")


class _ModelSnapshot:
    """Every module's attributes, shallowly: enough to undo module swaps and tensor assignments.

    Dicts and sets held by a module (``_modules``, ``_parameters``, ``_buffers``, hooks) are copied
    and refilled in place on :meth:`restore`, so references to them stay valid; tensors are not
    copied (loading replaces them, it never writes into them).
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = []
        for module in model.modules():
            attributes = dict(vars(module))
            containers = {k: v.copy() for k, v in attributes.items() if isinstance(v, (dict, set))}
            self._saved.append((module, attributes, containers))

    def restore(self) -> None:
        for module, attributes, containers in self._saved:
            state = vars(module)
            state.clear()
            state.update(attributes)
            for key, contents in containers.items():
                live = state[key]
                live.clear()
                live.update(contents)
