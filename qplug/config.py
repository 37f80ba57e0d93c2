"""The config protocol: :class:`QuantConfig`, the attrs base class of every backend's config.

A backend's config is an ``attrs`` class whose fields are exactly the JSON keys of the
``quantization_config`` a checkpoint carries. This module is deliberately torch-free so that
listing backends and checking configs never imports torch: dtype fields hold bare names
(``"bfloat16"``) and :func:`torch_dtype` turns one into a ``torch.dtype`` on demand.

Writing a config class::

    import attrs
    from typing import ClassVar
    from qplug.config import QuantConfig, instance_of, one_of

    @attrs.define(kw_only=True)
    class Int8Config(QuantConfig):
        quant_method: ClassVar[str] = "int8-weight"
        skip_field: ClassVar[str | None] = "modules_to_not_convert"

        bits: int = attrs.field(default=8, validator=[instance_of(int), one_of((8,))])
        modules_to_not_convert: list[str] | None = attrs.field(default=None, ...)

Validation runs on construction, on assignment and on :func:`attrs.evolve`; cross-field rules
go in :meth:`QuantConfig.check`, rules that only matter when quantizing in
:meth:`QuantConfig.check_quantizable`. Validators and converters come from this module: the
validators raise :class:`~qplug.QuantConfigError` naming the field, the value and what is accepted;
the converters never raise (a value they cannot convert passes through for the validator to reject).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

import attrs

from qplug.errors import ConfigFileError, QuantConfigError, _short_repr
from qplug.patterns import PatternError, compile_pattern

__all__ = [
    "DTYPE_NAMES",
    "QuantConfig",
    "check_model_config",
    "check_pattern",
    "dtype_name",
    "instance_of",
    "list_of",
    "mapping",
    "module_patterns",
    "number_in",
    "one_of",
    "optional",
    "parse_json",
    "positive_int",
    "read_quantization_config",
    "reject",
    "skip_list",
    "to_float",
    "to_list",
    "to_lower",
    "torch_dtype",
]


C = TypeVar("C", bound="QuantConfig")

#: The dtype names a dtype field accepts, as ``torch`` spells them.
DTYPE_NAMES: tuple[str, ...] = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "float8_e4m3fn",
    "float8_e5m2",
)
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "fp32": "float32",
                  "fp16": "float16", "bf16": "bfloat16"}

# Unknown keys are reported once per (config class, key), not on every load.
_reported_unknown: set[tuple[str, str]] = set()

#: How deeply JSON objects and lists may nest in a config (real ones nest two or three levels).
MAX_DEPTH = 64
#: The largest integer an integer field accepts unless it says otherwise (int32's maximum: a tensor
#: dimension, a group size, a sequence length are all far below it).
MAX_INT = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Converters: never raise; return the value unchanged when it is not theirs to convert.
# --------------------------------------------------------------------------------------------


def to_float(value: Any) -> Any:
    """``6`` → ``6.0``; bools, non-numbers and integers too large for a float pass through untouched."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # 10**400: left for the validator to reject, naming the field
            return value
    return value


def to_lower(value: Any) -> Any:
    """Strings are stripped and lower-cased."""
    return value.strip().lower() if isinstance(value, str) else value


def to_list(value: Any) -> Any:
    """Tuples become lists, so configs compare and serialise the same way whatever was passed."""
    return list(value) if isinstance(value, tuple) else value


def dtype_name(value: Any) -> Any:
    """A ``torch.dtype`` or a name (``"torch.bfloat16"``, ``"bf16"``) → the bare name ``"bfloat16"``."""
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        value = str(value)
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(name, name)
    return value


def torch_dtype(name: str):
    """The ``torch.dtype`` named ``name`` (imports torch)."""
    import torch

    return getattr(torch, dtype_name(name))


# --------------------------------------------------------------------------------------------
# Validators: attrs validators that raise QuantConfigError naming field, value and what is accepted.
# --------------------------------------------------------------------------------------------

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def reject(inst: Any, attribute: attrs.Attribute, value: Any, accepted: str,
           *, choices: tuple[Any, ...] | None = None) -> NoReturn:
    """Raise the :class:`QuantConfigError` a validator raises: field, value given, what is accepted.

    For validators a backend writes itself::

        def even(inst, attribute, value):
            if value % 2:
                reject(inst, attribute, value, "expected an even number")

    ``choices``: the accepted values, when they are a fixed list.
    """
    raise QuantConfigError(field=attribute.name, value=value, accepted=accepted, config=type(inst).__name__,
                           choices=choices)


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a JSON object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # JSON's true/false are Python bools, which are ints: never let them pass for numbers.
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def instance_of(*types: type) -> Validator:
    """The value is one of ``types`` (a bool is never accepted as a number)."""

    def validate(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not _is_instance(value, types):
            reject(inst, attribute, value, f"expected {_type_names(types)}")

    return validate


def one_of(choices: Iterable[Any]) -> Validator:
    """The value is one of ``choices`` (listed in the error)."""
    allowed = tuple(choices)

    def validate(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        try:
            ok = any(value == c and type(value) is type(c) for c in allowed)
        except Exception:
            ok = False
        if not ok:
            reject(inst, attribute, value, "expected one of " + ", ".join(repr(c) for c in allowed), choices=allowed)

    return validate


def number_in(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Validator:
    """A finite number (not a bool) in the interval; ``*_open`` excludes the end point.

    NaN, infinities (which JSON cannot carry: ``Infinity`` is Python's extension) and integers
    beyond a float's range are refused even without bounds.
    """

    def validate(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f"a number in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        if not _is_instance(value, (int, float)):
            reject(inst, attribute, value, "expected " + span)
        if not _finite(value):
            reject(inst, attribute, value, "expected a finite " + span.removeprefix("a "))
        if low is not None and (value < low or (low_open and value == low)):
            reject(inst, attribute, value, "expected " + span)
        if high is not None and (value > high or (high_open and value == high)):
            reject(inst, attribute, value, "expected " + span)

    return validate


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range
        return False


def positive_int(*, or_minus_one: str | None = None, high: int = MAX_INT) -> Validator:
    """A positive integer (not a bool) up to ``high``; with ``or_minus_one``, also -1, which that text explains."""
    accepted = f"a positive integer up to {high}"
    accepted = f"expected -1 ({or_minus_one}) or {accepted}" if or_minus_one else f"expected {accepted}"

    def validate(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        instance_of(int)(inst, attribute, value)
        if (value <= 0 and not (or_minus_one and value == -1)) or value > high:
            reject(inst, attribute, value, accepted)

    return validate


def optional(*validators: Validator) -> Validator:
    """``None`` or a value that passes every one of ``validators``."""

    def validate(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            for v in validators:
                v(inst, attribute, value)

    return validate


def list_of(*types: type) -> Validator:
    """A list whose items are all of ``types``."""

    def validate(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, list) or not all(_is_instance(item, types) for item in value):
            reject(inst, attribute, value, f"expected a list of {_type_names(types)} values")

    return validate


def mapping(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A JSON object (dict with string keys)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        reject(inst, attribute, value, "expected a JSON object")


def check_pattern(pattern: str, *, field: str, config: str | None = None, regex: bool = False) -> None:
    """Compile one module-name pattern (see :mod:`qplug.modules`) so matching never meets a bad one.

    A ``"re:"`` entry (or, with ``regex``, any entry) must be a regular expression of the syntax
    :mod:`qplug.patterns` accepts, which it matches in linear time.

    :raises QuantConfigError: naming ``field``, the pattern and what is wrong with it.
    """
    source = pattern if regex else pattern[3:] if pattern.startswith("re:") else None
    if source is None:
        return
    try:
        compile_pattern(source)
    except PatternError as exc:
        raise QuantConfigError(
            field=field, value=pattern, config=config,
            accepted=f"a regular expression qplug matches in linear time (see qplug.patterns): {exc}",
        ) from None


def module_patterns(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Every ``"re:"`` entry of a list of module-name patterns compiles (lists are checked by :func:`list_of`)."""
    if isinstance(value, list):
        for pattern in value:
            if isinstance(pattern, str):
                check_pattern(pattern, field=attribute.name, config=type(inst).__name__)


def skip_list() -> Validator:
    """``None`` or a list of module-name patterns whose ``"re:"`` entries compile: a skip field's validator."""
    return optional(list_of(str), module_patterns)


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class QuantConfig:
    """Base class of every backend's quantization config.

    Subclasses are ``@attrs.define(kw_only=True)`` classes that set :attr:`quant_method` and
    declare one attrs field per JSON key. Keys a class does not know are kept in
    :attr:`extra_keys` and written back by :meth:`to_dict`, so nothing in a real checkpoint's
    config is lost.
    """

    #: The canonical backend name, as written in ``quantization_config.quant_method``.
    quant_method: ClassVar[str] = ""
    #: The field that holds the list of module-name patterns to leave unquantized, if any.
    #: :func:`qplug.quantize` adds the user's ``skip`` patterns to it so they round-trip.
    skip_field: ClassVar[str | None] = None
    #: Keys :meth:`to_dict` writes only because another tool reads them from the file (transformers'
    #: private ``_load_in_4bit`` mirrors a public field): kept in files, left out of
    #: :meth:`to_diff_dict` and of what the ``qplug`` command shows a person.
    file_only_keys: ClassVar[frozenset[str]] = frozenset()

    #: Keys of the source dict this class does not know, kept verbatim.
    extra_keys: dict[str, Any] = attrs.field(factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.extra_keys, Mapping):  # kept keys are written back: JSON they must stay
            _check_json(self.extra_keys, type(self).__name__)
        if self.skip_field is not None:
            patterns = getattr(self, self.skip_field, None)
            if isinstance(patterns, list):  # compiled now, so a bad one never reaches matching
                for pattern in patterns:
                    if isinstance(pattern, str):
                        check_pattern(pattern, field=self.skip_field, config=type(self).__name__)
        self.check()

    # -- hooks for subclasses ----------------------------------------------------------------

    def check(self) -> None:
        """Cross-field validation; runs after construction and on :func:`attrs.evolve`."""

    def check_quantizable(self) -> None:
        """Validation that only matters when quantizing a float model (not when loading a checkpoint)."""

    def needs_calibration(self) -> bool:
        """Whether quantizing with this config needs calibration data from the caller.

        ``qplug.quantize`` (``calibration=``) and ``qplug quantize`` (``--calibration``) refuse a
        missing one before any work starts. ``False`` here: data-free methods.
        """
        return False

    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Translate foreign spellings (other libraries' key names) before construction."""
        return data

    @classmethod
    def recognizes(cls, data: Mapping[str, Any]) -> bool:
        """Whether a dict *without* ``quant_method`` looks like this backend's config.

        Say only what marks your own format; never refuse a dict because it holds another
        backend's keys. When several classes recognise a dict, the one claiming the most of its
        keys (:meth:`claimed_keys`) wins.
        """
        return False

    @classmethod
    def claimed_keys(cls, data: Mapping[str, Any]) -> frozenset[str]:
        """The keys of ``data`` this class knows: its fields, and the foreign spellings
        :meth:`normalize_dict` translates. How specific a :meth:`recognizes` claim is.
        """
        known = set(cls.field_names())
        try:
            translated = set(cls.normalize_dict(dict(data)))
        except Exception:  # a contradictory dict is still weighed by the keys the class knows
            translated = set(data)
        return frozenset(k for k in data if isinstance(k, str) and (k in known or k not in translated))

    # -- introspection -----------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The JSON keys this class knows (its attrs fields, without :attr:`extra_keys`)."""
        return tuple(f.name for f in attrs.fields(cls) if f.init and f.name != "extra_keys")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field's default, as JSON values."""
        out: dict[str, Any] = {}
        for f in attrs.fields(cls):
            if f.name == "extra_keys" or not f.init or f.default is attrs.NOTHING:
                continue
            default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[union-attr]
            out[f.name] = _jsonable(f.converter(default) if callable(f.converter) else default)
        return out

    def skip_patterns(self) -> list[str]:
        """The module-name patterns this config leaves in floating point."""
        if self.skip_field is None:
            return []
        return list(getattr(self, self.skip_field) or [])

    def with_skips(self: C, patterns: Iterable[str] | str) -> C:
        """A copy whose :attr:`skip_field` also holds ``patterns`` (kept in order, no duplicates).

        A single string is one pattern (never split into characters).
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        extra = [p for p in dict.fromkeys(patterns) if p not in self.skip_patterns()]
        if not extra:
            return self
        if self.skip_field is None:
            raise QuantConfigError(
                f"{type(self).__name__} has no field for modules to skip; cannot record {extra!r}",
                field="skip", value=extra, config=type(self).__name__,
            )
        return attrs.evolve(self, **{self.skip_field: [*self.skip_patterns(), *extra]})

    # -- parsing -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], **overrides: Any) -> C:
        """Build a config from the JSON a checkpoint carries (``quantization_config``).

        ``quant_method`` may be absent; if present it must name this class's backend. Unknown keys
        are kept in :attr:`extra_keys` and reported once. Any problem raises
        :class:`~qplug.QuantConfigError`.
        """
        if not isinstance(data, Mapping):
            raise QuantConfigError(field="quantization_config", value=data, accepted="expected a JSON object",
                                   config=cls.__name__)
        data = {**data, **overrides}
        _check_json(data, cls.__name__)
        method = data.pop("quant_method", None)
        if method is not None:
            cls._check_method(method)
        try:
            data = cls.normalize_dict(data)
            known_names = set(cls.field_names())
            known = {k: v for k, v in data.items() if k in known_names}
            unknown = {str(k): v for k, v in data.items() if k not in known_names}
            _report_unknown(cls, unknown)
            return cls(**known, extra_keys=copy.deepcopy(unknown))
        except QuantConfigError:
            raise
        except Exception as exc:  # a config dict is untrusted input: nothing but QuantConfigError escapes
            # The message names the error, never the whole (untrusted, possibly huge) dict.
            raise QuantConfigError(
                f"{cls.__name__}: cannot build from this quantization_config: {type(exc).__name__}: "
                f"{_short(str(exc))}", config=cls.__name__,
            ) from exc

    @classmethod
    def _check_method(cls, method: Any) -> None:
        # Aliases ("bnb") are the plugin manager's to resolve: qplug.config_from_dict passes the
        # canonical name down, so this module never imports the manager (which imports it).
        if isinstance(method, str) and method.strip().lower() == cls.quant_method:
            return
        raise QuantConfigError(field="quant_method", value=method,
                               accepted=f"expected {cls.quant_method!r} (qplug.config_from_dict also accepts "
                                        "a backend's aliases)", config=cls.__name__)

    @classmethod
    def from_json_file(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Read a bare ``quantization_config`` JSON file, or a whole ``config.json`` holding one."""
        return cls.from_dict(read_quantization_config(path))

    # -- writing -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON values, the kept unknown keys, and ``quant_method``."""
        out = {name: _jsonable(getattr(self, name)) for name in self.field_names()}
        for key, value in self.extra_keys.items():
            out.setdefault(key, copy.deepcopy(value))
        out["quant_method"] = self.quant_method
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only what differs from the class defaults, plus ``quant_method`` and unknown keys.

        :attr:`file_only_keys` are left out: they mirror fields the diff already shows.
        """
        full = self.to_dict()
        defaults = self.defaults()
        out = {k: v for k, v in full.items()
               if k not in self.file_only_keys and (k not in defaults or defaults[k] != v)}
        out["quant_method"] = self.quant_method
        return out

    def to_json_string(self, *, use_diff: bool = False, indent: int = 2) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=indent, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike[str], *, use_diff: bool = False) -> None:
        """Write the JSON atomically (a failed write leaves an existing file whole)."""
        from qplug._io import atomic_write_text

        atomic_write_text(Path(path), self.to_json_string(use_diff=use_diff))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_json(data: Mapping[str, Any], config: str) -> None:
    """Refuse, naming the top-level key, what JSON cannot hold or what would make later steps recurse:
    nesting deeper than :data:`MAX_DEPTH` (or a cyclic dict), and NaN or infinite numbers."""
    stack: list[tuple[Any, int, str]] = [(v, 1, str(k)) for k, v in data.items()]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            raise QuantConfigError(f"{config}.{field}: nested more than {MAX_DEPTH} levels deep",
                                   field=field, config=config, accepted=f"JSON nested at most {MAX_DEPTH} levels deep")
        if isinstance(value, float) and not math.isfinite(value):
            raise QuantConfigError(field=field, value=value, config=config,
                                   accepted="finite numbers (JSON has no NaN or Infinity)")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1, field) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1, field) for v in value)


def _report_unknown(cls: type[QuantConfig], unknown: Mapping[str, Any]) -> None:
    new = [k for k in unknown if (cls.__name__, k) not in _reported_unknown]
    if new:
        _reported_unknown.update((cls.__name__, k) for k in new)
        import logging  # only here: listing backends and checking configs need no logging machinery

        logging.getLogger("qplug").info("%s: keeping unknown keys %s as they are", cls.__name__,
                                        ", ".join(sorted(new)))


def read_quantization_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``quantization_config`` dict in a JSON file: a bare one, or a whole ``config.json`` holding one.

    :raises ConfigFileError: the file is missing, unreadable, not JSON, or a ``config.json`` without one.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if "quantization_config" in data:
        check_model_config(data, str(path))
        inner = data["quantization_config"]
        if not isinstance(inner, dict):
            raise ConfigFileError(f"{path}: quantization_config must be a JSON object, found {type(inner).__name__}")
        return inner
    if "model_type" in data or "architectures" in data:
        check_model_config(data, str(path))
        raise ConfigFileError(f"{path}: a model config.json without a quantization_config (the model is not quantized)")
    return data


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` for untrusted files: any failure, nesting too deep for the parser included, is a
    :class:`~qplug.ConfigFileError` naming ``where``.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigFileError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:
        raise ConfigFileError(f"{where}: not valid JSON: {exc}") from exc


def check_model_config(data: Mapping[str, Any], where: str = "config.json") -> None:
    """The fields of a model ``config.json`` that choose the model class have the types transformers needs.

    ``model_type`` is a string and ``architectures`` a list of class names (identifiers), when present.

    :raises ConfigFileError: naming ``where``, the field and the value.
    """
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigFileError(f"{where}: model_type: {_short_repr(model_type)} given — expected a string "
                              "such as 'llama'")
    architectures = data.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) and a.isidentifier() for a in architectures)
    ):
        raise ConfigFileError(f"{where}: architectures: {_short_repr(architectures)} given — expected a list of "
                              "model class names such as ['LlamaForCausalLM']")
