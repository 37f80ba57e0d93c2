"""The hooks a qplug plugin implements.

A plugin is any module or object with functions marked by :data:`qplug.hookimpl` whose names
match the specifications below. Backends mark their implementations with
:func:`qplug.backend_hookimpl`, which makes them answer only for their own config class; other
plugins (a policy, telemetry, packaging) may implement the same hooks for every backend, and
``wrapper=True`` implementations see every call's result or exception.

Implementations may accept fewer arguments than a specification lists, so new arguments can be
added later without breaking plugins: a backend written against the first four operations keeps
working unchanged. Arguments added later have a default in the specification (pluggy >= 1.7
passes it when a caller leaves the argument out), so code that calls a hook the old way keeps
working too. :data:`HOOK_NAMES` (in definition order) is derived from this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    import torch

    from qplug.backend import Backend
    from qplug.blocks import BlockCalibration
    from qplug.checkpoint import TensorInfo
    from qplug.config import QuantConfig
    from qplug.plain_layers import PlainLayer, WrittenLayer

PROJECT = "qplug"

# The spec marker is private: plugin authors only ever need ``qplug.hookimpl`` (see qplug.markers).
_hookspec = pluggy.HookspecMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@_hookspec
def register_backends() -> Iterable[Backend]:
    """Declare the backends this plugin provides.

    Called once, when the plugin is registered. Every implementation runs; the records are
    collected into the name and alias table, where two providers of one name are an error.
    Keep the module that implements this hook light: import your backend's library inside the
    other hooks, so listing backends stays fast and an unavailable library is reported, not raised.

    :return: the :class:`~qplug.Backend` records of this plugin's backends.

    Example::

        @qplug.hookimpl
        def register_backends():
            return [qplug.Backend(name="int8-weight", config_class=Int8Config,
                                  requires=("torch>=2.1",), presets={"int8w": {}})]
    """


# --------------------------------------------------------------------------------------------
# Operations on a model
# --------------------------------------------------------------------------------------------


@_hookspec
def validate(config: QuantConfig, model: torch.nn.Module | None, module_names: list[str] | None = None) -> None:
    """Check that ``config`` can be applied to ``model``; raise to veto.

    Called by :func:`qplug.quantize` and :func:`qplug.load_quantized` before any module is
    replaced, and by ``qplug config validate`` with only a config. Every implementation runs
    (this is not a ``firstresult`` hook): the owning backend checks shapes and module kinds, and
    any other plugin may enforce a policy.

    :param config: the validated config about to be applied.
    :param model: the model (on the meta device when loading a checkpoint), or ``None`` when only
        the config is being checked.
    :param module_names: the dotted names of the ``nn.Linear`` modules the core selected for
        :func:`replace_modules` (output head and skipped patterns removed), in model order; ``None``
        when ``model`` is ``None``. Check these rather than selecting again.
    :return: nothing; raise :class:`~qplug.QuantConfigError` or
        :class:`~qplug.IncompatibleModelError` naming the field or the module at fault.

    .. versionchanged:: 0.2 ``module_names``.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def validate(config, model, module_names):
            for name in module_names or ():
                if model.get_submodule(name).in_features % 8:
                    raise qplug.IncompatibleModelError(f"int8-weight: {name}: in_features is not a multiple of 8")
    """


@_hookspec(firstresult=True)
def replace_modules(
    config: QuantConfig,
    model: torch.nn.Module,
    module_names: list[str],
    calibration: Any,
    prequantized: bool,
    checkpoint_tensors: Mapping[str, TensorInfo] | None = None,
) -> list[str] | None:
    """Swap the selected modules of ``model`` for the backend's quantized modules, in place.

    Called by :func:`qplug.quantize` (``prequantized=False``: quantize the existing float weights)
    and :func:`qplug.load_quantized` (``prequantized=True``: ``model`` is a skeleton, its weights
    on the meta device; create empty quantized modules that
    ``model.load_state_dict(tensors, assign=True)`` then fills). Stops at first non-None result:
    only the backend that owns ``config`` answers.

    :param config: the backend's config.
    :param model: the model to change in place.
    :param module_names: dotted names of the ``nn.Linear`` modules to replace; the core has already
        removed the output head and every skipped pattern.
    :param calibration: calibration data for methods that need it (token tensors, or texts), else ``None``.
    :param prequantized: whether the weights come later from a quantized checkpoint.
    :param checkpoint_tensors: with ``prequantized=True``, every tensor name of the checkpoint
        (tied names included) mapped to its :class:`~qplug.checkpoint.TensorInfo` (``dtype``,
        ``shape``), read from the safetensors headers before any tensor data: size the empty modules
        from what the checkpoint holds (an optional bias: :func:`qplug.checkpoint.needs_bias`; a
        layer it holds quantized), not from the skeleton. A read-only mapping; ``None`` when quantizing.
    :return: the names of the modules replaced.

    .. versionchanged:: 0.2 ``checkpoint_tensors``.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def replace_modules(config, model, module_names, prequantized, checkpoint_tensors):
            for name in module_names:
                linear = qplug.modules.get_submodule(model, name)
                if prequantized:
                    new = Int8Linear.empty(linear, bias=f"{name}.bias" in checkpoint_tensors)
                else:
                    new = Int8Linear.from_linear(linear)
                qplug.modules.set_submodule(model, name, new)
            return module_names
    """


@_hookspec(firstresult=True)
def quantize_module(config: QuantConfig, model: torch.nn.Module, name: str,
                    module: torch.nn.Linear) -> torch.nn.Module | None:
    """Quantize one ``nn.Linear`` from its own weights and return the module that replaces it.

    Called by :func:`qplug.load_quantized` with ``quantization_config=`` (quantize-on-load): the
    float checkpoint is streamed one layer at a time, and each selected layer, once its weight and
    bias are read, is handed here; the core puts the result in its place and drops the float
    tensors before the next layer is read. Stops at first non-None result: only the backend that
    owns ``config`` answers.

    Implementing this hook is what makes a backend *streamable*: the core offers quantize-on-load
    for a backend exactly when the plugin that registers it implements ``quantize_module`` for its
    config class (:attr:`qplug.Backend.streams` then reads ``True``). Implement it only for methods
    that need nothing but the layer's own weights (no calibration, no whole-model pass).

    :param config: the backend's config (already checked by :func:`validate`).
    :param model: the model being filled; other modules may still be on the meta device. Set
        model-level markers here if the backend has any.
    :param name: the module's dotted name, one of those :func:`validate` was given.
    :param module: the float ``nn.Linear`` holding its real weights.
    :return: the quantized module to put at ``name``.

    .. versionadded:: 0.2

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def quantize_module(config, name, module):
            return Int8Linear.from_linear(module)
    """


@_hookspec(firstresult=True)
def calibrate_blocks(config: QuantConfig, model: torch.nn.Module, module_names: list[str],
                     calibration: Any) -> BlockCalibration | None:
    """Say how to calibrate ``model`` one decoder block at a time: the blocks, the inputs, the per-block step.

    Called by :func:`qplug.quantize_checkpoint` with ``calibration=`` (``qplug quantize SRC DST
    --calibration FILE``): the float model stays a meta-device skeleton; the core materialises from
    the checkpoint only what runs before the first block, captures that block's inputs for
    ``batches``, then for each block reads its float weights, hands it to ``quantize_block``, writes
    its quantized tensors to the destination, frees it and passes its outputs on. Memory is one
    block in floating point plus the calibration activations, whatever the depth.
    Stops at first non-None result: only the backend that owns ``config`` answers.

    Implementing this hook is what lets a calibrating backend quantize from disk (the manager's
    :attr:`~qplug.manager.BackendEntry.calibrates_blocks`). Build ``quantize_block`` from the same
    per-block code the backend's ``replace_modules`` runs over a loaded model, so both paths write
    the same checkpoint. Pass the next block the calls ``quantize_block`` was given with new hidden
    states only (``call.with_hidden``): a run resumed after an interruption restores exactly that
    (:mod:`qplug.block_resume`), and builds the finished blocks' modules with ``replace_modules``
    (``prequantized=True``), as loading does.

    :param config: the backend's config (already checked by :func:`validate`).
    :param model: the model skeleton, every parameter on the meta device; read names, shapes and
        structure only.
    :param module_names: the ``nn.Linear`` modules the core selected (as for :func:`replace_modules`).
    :param calibration: the calibration data the caller gave (see :mod:`qplug.calibration`).
    :return: a :class:`~qplug.blocks.BlockCalibration`; raise
        :class:`~qplug.IncompatibleModelError` when the model has no blocks to walk.

    .. versionadded:: 0.2

    Example::

        @qplug.backend_hookimpl(MyConfig)
        def calibrate_blocks(config, model, module_names, calibration):
            name, blocks = qplug.blocks.find_blocks(model, module_names)
            batches = qplug.calibration.padded_batches(qplug.calibration.token_samples(calibration))

            def quantize_block(block_name, block, calls):
                mine = [n for n in module_names if n.startswith(block_name + ".")]
                my_algorithm(model, mine, calls)        # replaces them in place
                return [call.with_hidden(call.run(block)) for call in calls]

            return qplug.blocks.BlockCalibration(name, batches, module_names, quantize_block)
    """


@_hookspec(firstresult=True)
def dequantize(config: QuantConfig, model: torch.nn.Module) -> list[str] | None:
    """Turn the backend's quantized modules of ``model`` back into plain ``nn.Linear`` modules.

    Called by :func:`qplug.dequantize`. Stops at first non-None result: only the backend that
    owns ``config`` answers.

    :param config: the config the model was quantized with.
    :param model: the quantized model, changed in place.
    :return: the names of the modules turned back to floating point.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def dequantize(config, model):
            names = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
            for name in names:
                qplug.modules.set_submodule(model, name, qplug.modules.get_submodule(model, name).to_linear())
            return names
    """


@_hookspec(firstresult=True)
def serialize(config: QuantConfig, model: torch.nn.Module | None) -> dict[str, Any] | None:
    """Return the JSON object written as ``quantization_config`` in the checkpoint's ``config.json``.

    Called by :func:`qplug.save_quantized`. Stops at first non-None result: the owning backend
    answers; a ``wrapper=True`` implementation may add keys to the result (e.g. provenance).

    :param config: the config the model was quantized with.
    :param model: the quantized model (``None`` when only the config is written).
    :return: a JSON-serialisable dict that includes ``quant_method``.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def serialize(config, model):
            return config.to_dict()
    """


@_hookspec
def add_checkpoint_files(config: QuantConfig, model: torch.nn.Module, directory: Path) -> None:
    """Write extra files into a checkpoint while :func:`qplug.save_quantized` assembles it.

    Called once per save, after ``config.json`` and the weights are written, inside the staging
    directory that is renamed over the target only when everything succeeded: a file written here
    is part of the atomic save (a failure leaves an old checkpoint whole) and is never left beside
    an older checkpoint. Every implementation runs: the owning backend writes what other tools need
    to read its format, and any other plugin may add its own (a model card, provenance).

    :param config: the config the model was quantized with.
    :param model: the quantized model being saved; ``None`` when :func:`qplug.convert` writes the
        checkpoint (it never holds the whole model).
    :param directory: the staging directory; write files inside it only, under names that are not
        ``config.json`` or weight files.
    :return: nothing; raise to abort the save.

    .. versionadded:: 0.2
    .. versionchanged:: 0.2 ``model`` is ``None`` when :func:`qplug.convert` writes.

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def add_checkpoint_files(config, directory):
            (directory / "int8_config.json").write_text(config.to_json_string())
    """


# --------------------------------------------------------------------------------------------
# Converting checkpoints between formats
# --------------------------------------------------------------------------------------------


@_hookspec(firstresult=True)
def read_int_layer(config: QuantConfig, name: str, module: torch.nn.Module) -> PlainLayer | None:
    """Give one quantized layer of a checkpoint in the plain affine integer form.

    Called by :func:`qplug.convert` once per quantized layer of the source checkpoint, one layer at a
    time. ``module`` is the backend's own module, made by its ``replace_modules`` hook
    (``prequantized=True``) and filled with this layer's checkpoint tensors
    (``load_state_dict(..., assign=True)``, so the module's own loading checks ran).
    Stops at first non-None result: only the backend that owns ``config`` answers. Implementing it
    makes the backend's checkpoints a *source* of conversions.

    :param config: the source checkpoint's config.
    :param name: the layer's dotted name, for messages.
    :param module: the filled module.
    :return: a :class:`qplug.conversion.PlainLayer`: its :class:`qplug.int_kernels.IntWeight`
        (``q``, ``scale``, ``zero``, ``bits``, ``group_size``, the act-order ``perm``), its bias, and
        whether the format declares one group per row; or, for a format whose codes are
        :class:`qplug.conversion.PackedCodes`, :meth:`~qplug.conversion.PlainLayer.from_packed` with
        those words, which a target storing the same words copies instead of repacking.

    .. versionadded:: 0.2

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def read_int_layer(config, module):
            return PlainLayer(module.int_weight(), module.bias, channelwise=True)
    """


@_hookspec(firstresult=True)
def write_int_layer(config: QuantConfig, name: str, layer: PlainLayer) -> WrittenLayer | None:
    """Pack one plain layer into this backend's checkpoint tensors, or refuse with the reason.

    Called by :func:`qplug.convert` once per layer, right after the source backend's
    :func:`read_int_layer`. Stops at first non-None result: only the backend that owns ``config``
    answers. Implementing it makes the backend a *target* of conversions. A conversion repacks the
    same integers, scales and zero points; where this format cannot hold them exactly (bits it does
    not store, asymmetric weights in a symmetric-only layout, act-order, scales that would change in
    its dtype), raise :class:`~qplug.ConversionError` (:func:`qplug.conversion.refuse` words it)
    naming ``name`` and why, rather than write different weights.

    :param config: the target config built from the caller's options alone (``checkpoint_format``,
        ``version``, ...); the layer decides bits, group size and symmetry.
    :param name: the layer's dotted name, for messages.
    :param layer: the plain layer (:class:`qplug.conversion.PlainLayer`): ``layer.bits``, ``scale``,
        ``symmetric``, ``columns_per_group`` and ``group_index()`` read nothing unpacked;
        ``layer.packed_codes()`` gives the codes packed (as they came, where the source stored them
        so), ``layer.weight`` unpacked; ``layer.zero`` the zero points ``[out, groups]``, and
        ``layer.packed_zeros()`` them packed as GPTQ's ``qzeros`` where the source stored them so.
    :return: a :class:`qplug.conversion.WrittenLayer`: the tensors by their names inside the layer, in
        the order :func:`qplug.save_quantized` writes them, and the config fields this layer needs
        (every layer must need the same; the core writes them into the ``quantization_config``).

    .. versionadded:: 0.2

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def write_int_layer(config, name, layer):
            if layer.weight.bits != 8 or not layer.symmetric:
                raise qplug.conversion.refuse(name, "int8-weight", "it holds symmetric 8-bit weights only")
            module = Int8Linear.from_integers(layer.weight.q, layer.weight.scale, bias=layer.bias)
            return WrittenLayer(module.state_dict(), settings={"bits": 8})
    """


#: The names of the hooks above, in the order they are defined; derived, never kept by hand.
HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, value in list(globals().items()) if callable(value) and hasattr(value, f"{PROJECT}_spec")
)
