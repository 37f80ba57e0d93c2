"""``CompressedTensorsConfig``: the ``quantization_config`` of compressed-tensors checkpoints. Torch-free.

The fields are the keys compressed-tensors' ``QuantizationConfig`` writes (``config_groups``,
``format``, ``quantization_status``, ``ignore``, ``kv_cache_scheme``, ``global_compression_ratio``);
what a release adds beside them (``sparsity_config``, ``transform_config``, ``version``,
``moe_sparsity_config``, ...) is kept in ``extra_keys``. ``config_groups`` is kept exactly as written
(a scheme per group, or a preset name mapped to its targets), so every real config writes back
byte for byte.

Two levels of checking:

* on construction, torch-free: the shapes and types of every key, and every ``re:`` pattern of
  ``targets`` and ``ignore`` compiled by :mod:`qplug.patterns` (matched in linear time);
* :meth:`CompressedTensorsConfig.schemes` (called by the hooks, where torch is loaded anyway) parses
  the groups with the compressed-tensors library itself, which expands preset names and applies its
  own validation; :meth:`~CompressedTensorsConfig.check_loadable` then refuses, by name and with the
  reason, every scheme this backend cannot run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from qplug.config import QuantConfig, check_pattern, instance_of, mapping, number_in, one_of, optional, skip_list
from qplug.errors import BackendUnavailableError, QuantConfigError

__all__ = [
    "FORMATS",
    "RUNNABLE_FORMATS",
    "STATUSES",
    "CompressedTensorsConfig",
    "Scheme",
    "scheme_dict",
]

#: compressed-tensors' ``CompressionFormat`` values (and ``fakequant``, its default for a fresh config).
FORMATS = (
    "dense", "sparse-bitmask", "sparse-24-bitmask", "int-quantized", "float-quantized", "naive-quantized",
    "pack-quantized", "marlin-24", "mixed-precision", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
    "mxfp6-pack-quantized", "mxfp8-quantized", "fakequant",
)
#: formats whose tensors this backend reads and writes (integer codes with scales and zero points)
RUNNABLE_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
#: ``quantization_status`` values, in compressed-tensors' lifecycle order
STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
_STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
#: weight strategies the kernels run: one scale per tensor, per output row, or per group of inputs
RUNNABLE_STRATEGIES = ("tensor", "channel", "group")
#: weight bits the kernels run (int4 and int8 weight-only: W4A16, W8A16)
RUNNABLE_BITS = (4, 8)
# Activation orders that store a per-column group index (``weight_g_idx``). compressed-tensors 0.20
# removed them (its validator refuses them), but checkpoints made before carry them.
_G_IDX_ORDERS = ("group", "dynamic")
_ACTORDERS = ("group", "weight", "static", "dynamic")
_SCHEME_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")


def _args_dict(num_bits: int, *, symmetric: bool, strategy: str, group_size: int | None) -> dict[str, Any]:
    """Weight arguments as compressed-tensors 0.20 writes them (``observer``/``actorder`` omitted when unset)."""
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "dynamic": False}


def scheme_dict(num_bits: int = 4, *, symmetric: bool = True, strategy: str = "group", group_size: int | None = 128,
                targets: tuple[str, ...] = ("Linear",), format: str | None = None) -> dict[str, Any]:
    """One ``config_groups`` entry for weight-only int quantization, in compressed-tensors' own JSON."""
    if strategy != "group":
        group_size = None
    return {"targets": list(targets),
            "weights": _args_dict(num_bits, symmetric=symmetric, strategy=strategy, group_size=group_size),
            "input_activations": None, "output_activations": None, "format": format}


def _default_groups() -> dict[str, Any]:
    return {"group_0": scheme_dict(4, symmetric=True, strategy="group", group_size=128)}


# --------------------------------------------------------------------------------------------
# torch-free checks of config_groups
# --------------------------------------------------------------------------------------------


def _bad(inst: Any, path: str, value: Any, accepted: str) -> QuantConfigError:
    return QuantConfigError(field="config_groups", value=value, accepted=f"{path}: {accepted}",
                            config=type(inst).__name__)


def _check_targets(inst: Any, path: str, targets: Any) -> None:
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _bad(inst, path, targets, "a non-empty list of module names, class names or 're:' patterns")
    for target in targets:
        if target.startswith("re:"):
            check_pattern(target, field="config_groups", config=type(inst).__name__)


def _check_args(inst: Any, path: str, args: Any) -> None:
    """The quantization arguments of weights or activations (compressed-tensors' ``QuantizationArgs``)."""
    if not isinstance(args, Mapping):
        raise _bad(inst, path, args, "a JSON object of quantization arguments (num_bits, type, ...)")
    bits = args.get("num_bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32:
        raise _bad(inst, f"{path}.num_bits", bits, "an integer from 1 to 32")
    kind = args.get("type", "int")
    if not isinstance(kind, str) or kind.lower() not in ("int", "float"):
        raise _bad(inst, f"{path}.type", kind, "'int' or 'float'")
    if not isinstance(args.get("symmetric", True), bool):
        raise _bad(inst, f"{path}.symmetric", args.get("symmetric"), "true or false")
    strategy = args.get("strategy")
    if strategy is not None and (not isinstance(strategy, str) or strategy.lower() not in _STRATEGIES):
        raise _bad(inst, f"{path}.strategy", strategy, "null or one of " + ", ".join(_STRATEGIES))
    group = args.get("group_size")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or not -1 <= group <= 2**31 - 1
                              or group == 0):
        raise _bad(inst, f"{path}.group_size", group, "null, -1 (one group per row) or a positive integer")
    if (strategy or "").lower() in ("group", "tensor_group") and (group is None or group <= 0):
        raise _bad(inst, f"{path}.group_size", group, f"a positive integer for strategy {strategy!r}")
    order = args.get("actorder")
    if order is not None and not isinstance(order, bool) and (not isinstance(order, str) or
                                                            order.lower() not in _ACTORDERS):
        raise _bad(inst, f"{path}.actorder", order, "null, true, false or one of " + ", ".join(_ACTORDERS))
    dynamic = args.get("dynamic", False)
    if not isinstance(dynamic, bool) and dynamic != "local":
        raise _bad(inst, f"{path}.dynamic", dynamic, "true, false or 'local'")


def _check_groups(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    mapping(inst, attribute, value)
    if not value:
        raise _bad(inst, "config_groups", value, "at least one group")
    for name, group in value.items():
        if isinstance(group, list):  # a preset scheme name (W4A16, ...) mapped to its targets
            _check_targets(inst, name, group)
            continue
        if not isinstance(group, Mapping):
            raise _bad(inst, name, group, "a scheme (a JSON object with targets, weights, ...) or a list of targets")
        unknown = sorted(set(group) - set(_SCHEME_KEYS))
        if unknown:  # compressed-tensors' QuantizationScheme forbids extra keys
            raise _bad(inst, name, group, f"only the keys {', '.join(_SCHEME_KEYS)} (not {', '.join(unknown)})")
        _check_targets(inst, f"{name}.targets", group.get("targets"))
        for part in ("weights", "input_activations", "output_activations"):
            if group.get(part) is not None:
                _check_args(inst, f"{name}.{part}", group[part])
        fmt = group.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise _bad(inst, f"{name}.format", fmt, "null or a format name such as 'pack-quantized'")


# --------------------------------------------------------------------------------------------
# resolved schemes
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Scheme:
    """One config group as the compressed-tensors library reads it, with what qplug needs to run it.

    :param name: the group's key in ``config_groups``.
    :param targets: module names, class names (``"Linear"``) or ``re:`` patterns it applies to.
    :param format: the checkpoint format of its tensors (the group's own, else the config's).
    :param num_bits: weight bits (``None``: the group quantizes no weight).
    :param type: ``"int"`` or ``"float"``.
    :param strategy: ``"tensor"``, ``"channel"``, ``"group"``, ...
    :param group_size: input channels per group (strategy ``"group"``), else ``None``.
    :param actorder: the activation order, lower case, or ``None``.
    :param activations: the group also quantizes inputs or outputs (W8A8, FP8, ...).
    :param dynamic: weights are quantized at run time (``dynamic`` set on the weights).
    """

    name: str
    targets: tuple[str, ...]
    format: str | None
    num_bits: int | None = None
    type: str = "int"
    symmetric: bool = True
    strategy: str | None = None
    group_size: int | None = None
    actorder: str | None = None
    activations: bool = False
    dynamic: bool = False

    @property
    def has_g_idx(self) -> bool:
        """Whether its checkpoints store ``weight_g_idx`` (activation order with per-column groups)."""
        return self.actorder in _G_IDX_ORDERS

    @property
    def label(self) -> str:
        """A short name: ``W4A16 group 128 symmetric``."""
        if self.num_bits is None:
            return "no weight quantization"
        weights = f"{'W' if self.type == 'int' else 'FP'}{self.num_bits}"
        size = f" {self.group_size}" if self.strategy == "group" else ""
        acts = ", activations quantized" if self.activations else ""
        return (f"{weights}{'' if self.activations else 'A16'} {self.strategy}{size} "
                f"{'symmetric' if self.symmetric else 'asymmetric'}{acts}")

    def refusal(self) -> str | None:
        """Why qplug cannot run this scheme, or ``None`` when it can."""
        if self.num_bits is None:
            return "it quantizes no weights (activation or KV-cache quantization only), which qplug does not run"
        if self.activations:
            return ("it quantizes activations too (W8A8, W4A8, FP8 dynamic ...); qplug runs weight-only schemes "
                    "(W4A16, W8A16)")
        if self.type != "int":
            return (f"its weights are {self.num_bits}-bit floats (FP8, NVFP4, MXFP4 ...); qplug's kernels run "
                    "integer weights only")
        if self.dynamic:
            return "its weights are quantized dynamically at run time; qplug runs stored integer weights"
        if self.num_bits not in RUNNABLE_BITS:
            return (f"{self.num_bits}-bit weights: qplug runs {' and '.join(map(str, RUNNABLE_BITS))}-bit ones "
                    "(other widths pack differently across compressed-tensors releases)")
        if self.strategy not in RUNNABLE_STRATEGIES:
            return f"strategy {self.strategy!r}: qplug runs the strategies {', '.join(RUNNABLE_STRATEGIES)}"
        if self.format not in RUNNABLE_FORMATS:
            return (f"format {self.format!r}: qplug reads {', '.join(RUNNABLE_FORMATS)}"
                    + (" (sparse formats are not run)" if self.format and "sparse" in self.format else ""))
        return None


def _load_library():
    try:
        import compressed_tensors.quantization as ctq
    except ImportError as exc:
        raise BackendUnavailableError(
            f"compressed-tensors: the compressed-tensors library does not import ({exc}): "
            "pip install 'compressed-tensors>=0.19'",
            backend="compressed-tensors", install="pip install 'compressed-tensors>=0.19'",
        ) from exc
    return ctq


# --------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class CompressedTensorsConfig(QuantConfig):
    """compressed-tensors quantization settings, as the library (and llm-compressor) writes them.

    :param config_groups: ``{name: scheme}``: each scheme names its ``targets`` (class names such as
        ``"Linear"``, module names, ``re:`` patterns) and its ``weights`` arguments (``num_bits``,
        ``type``, ``symmetric``, ``strategy``, ``group_size``, ``actorder``); or ``{preset: targets}``
        with a compressed-tensors preset name (``"W4A16"``).
    :param format: the checkpoint format (``pack-quantized``, ``int-quantized``, ``naive-quantized``,
        ... ; ``mixed-precision`` when the groups name their own).
    :param quantization_status: the lifecycle stage of the stored weights (``compressed`` for a
        quantized checkpoint).
    :param ignore: modules left in floating point (names, class names, ``re:`` patterns).
    :param kv_cache_scheme: quantization of the KV cache (not run by qplug).
    :param global_compression_ratio: informational.

    The default is W4A16: 4-bit symmetric weights in groups of 128 inputs, ``pack-quantized``.
    """

    quant_method: ClassVar[str] = "compressed-tensors"
    skip_field: ClassVar[str | None] = "ignore"

    config_groups: dict[str, Any] = attrs.field(factory=_default_groups, validator=_check_groups)
    format: str | None = attrs.field(default="pack-quantized", validator=optional(instance_of(str)))
    quantization_status: str | None = attrs.field(default="compressed", validator=optional(one_of(STATUSES)))
    ignore: list[str] | None = attrs.field(factory=lambda: ["lm_head"], validator=skip_list())
    kv_cache_scheme: dict[str, Any] | None = attrs.field(default=None, validator=optional(mapping))
    global_compression_ratio: float | None = attrs.field(default=None, validator=optional(number_in(0)))

    # ------------------------------------------------------------------ parsing
    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if isinstance(data.get("ignore"), tuple):
            data["ignore"] = list(data["ignore"])
        return data

    @classmethod
    def recognizes(cls, data: Mapping[str, Any]) -> bool:
        """A compressed-tensors config without ``quant_method`` still has ``config_groups``."""
        return isinstance(data.get("config_groups"), Mapping)

    def schemes(self) -> list[Scheme]:
        """Every config group, parsed and validated by the compressed-tensors library (imports torch).

        :raises QuantConfigError: the library rejects a group (its message, naming the group).
        :raises BackendUnavailableError: the library is not installed.
        """
        ctq = _load_library()
        out = []
        for name, group in self.config_groups.items():
            if isinstance(group, list):
                try:
                    parsed = ctq.preset_name_to_scheme(name, list(group))
                except Exception as exc:  # KeyError for an unknown name, ValueError from the library
                    raise QuantConfigError(field="config_groups", value=name, config=type(self).__name__,
                                           accepted=f"a compressed-tensors preset scheme name ({exc})") from None
                raw = parsed.model_dump()
                actorder = None
            else:
                raw = dict(group)
                weights = dict(raw["weights"]) if raw.get("weights") is not None else None
                actorder = None
                if weights is not None:
                    order = weights.get("actorder")
                    actorder = "group" if order is True else (order.lower() if isinstance(order, str) else None)
                    if actorder in _G_IDX_ORDERS:
                        # the library's current releases refuse these orders; the arguments are otherwise its own
                        weights.pop("actorder")
                    raw["weights"] = weights
                try:
                    raw = ctq.QuantizationScheme.model_validate(raw).model_dump()
                except Exception as exc:  # pydantic's ValidationError (a ValueError), or the library's own
                    raise QuantConfigError(field="config_groups", value=group, config=type(self).__name__,
                                           accepted=f"{name}: a scheme compressed-tensors accepts ({_first_line(exc)})"
                                           ) from None
            out.append(_scheme(name, raw, actorder, self.format))
        return out

    # ------------------------------------------------------------------ checks
    def check_loadable(self) -> None:
        """Refuse, by name and with the reason, a checkpoint whose schemes qplug cannot run."""
        self._check_runnable()
        if self.quantization_status not in ("compressed", None):
            raise QuantConfigError(
                field="quantization_status", value=self.quantization_status, config=type(self).__name__,
                accepted="'compressed': in this checkpoint the weights are stored in floating point with "
                         "fake-quantization parameters beside them; load it as a float model",
            )

    def check_quantizable(self) -> None:
        """What only matters when quantizing (the ``validate`` hook refuses unrunnable schemes on every path)."""
        for scheme in self.schemes():
            if scheme.has_g_idx:
                raise QuantConfigError(
                    field="config_groups", value=scheme.actorder, config=type(self).__name__,
                    accepted=f"{scheme.name}.weights.actorder: 'weight', 'static' or null when quantizing "
                             f"(compressed-tensors 0.20 removed {scheme.actorder!r}, so transformers could not "
                             "load the result); qplug still loads such checkpoints",
                )

    def _check_runnable(self) -> None:
        for key, what in (("sparsity_config", "sparsity (2:4 or unstructured sparse formats)"),
                          ("transform_config", "weight transforms (Hadamard rotations: QuIP, SpinQuant)")):
            if self.extra_keys.get(key):
                raise QuantConfigError(field=key, value=self.extra_keys[key], config=type(self).__name__,
                                       accepted=f"null: qplug does not run {what}")
        if self.kv_cache_scheme is not None:
            raise QuantConfigError(field="kv_cache_scheme", value=self.kv_cache_scheme, config=type(self).__name__,
                                   accepted="null: qplug does not quantize the KV cache")
        for scheme in self.schemes():
            why = scheme.refusal()
            if why is not None:
                raise QuantConfigError(field="config_groups", value=scheme.name, config=type(self).__name__,
                                       accepted=f"a scheme qplug runs: group {scheme.name!r} ({scheme.label}) "
                                                f"cannot run: {why}")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _scheme(name: str, raw: Mapping[str, Any], actorder: str | None, top_format: str | None) -> Scheme:
    weights = raw.get("weights")
    activations = raw.get("input_activations") is not None or raw.get("output_activations") is not None
    fmt = raw.get("format") or top_format
    if not weights:
        return Scheme(name=name, targets=tuple(raw["targets"]), format=fmt, activations=activations)
    strategy = str(weights.get("strategy") or "tensor").lower()
    order = weights.get("actorder") if actorder is None else actorder
    dynamic = weights.get("dynamic", False)
    return Scheme(
        name=name, targets=tuple(raw["targets"]), format=fmt, num_bits=int(weights["num_bits"]),
        type=str(weights.get("type", "int")).lower(), symmetric=bool(weights.get("symmetric", True)),
        strategy=strategy, group_size=weights.get("group_size") if strategy == "group" else None,
        actorder=order.lower() if isinstance(order, str) else None, activations=activations,
        dynamic=bool(dynamic),
    )
