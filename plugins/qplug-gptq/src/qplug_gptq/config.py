"""``GPTQConfig``: the ``quantization_config`` of GPTQ checkpoints (torch-free).

Field names, defaults and JSON follow Hugging Face transformers' ``GPTQConfig`` (v4 and v5),
plus ``static_groups`` (AutoGPTQ) and ``modules_to_not_convert`` (the core's skip list).
Configs written by other tools load as they are:

* AutoGPTQ ``quantize_config.json`` (no ``quant_method``; ``w_bit``/``q_group_size`` synonyms,
  ``model_name_or_path``, ``is_marlin_format`` ...);
* GPTQModel (``format``, ``dynamic``, ``pack_dtype``, ``lm_head``, ``meta``);
* optimum (``disable_exllama``);
* transformers v5 (``format`` as well as ``checkpoint_format``, ``act_group_aware``).

Keys this class has no field for are kept in ``extra_keys`` and written back. Checks that
only matter when quantizing (a usable calibration dataset, its tokenizer) live in
:meth:`GPTQConfig.check_quantizable`: real checkpoints carry values such as
``"dataset": "alpaca-zh,alpaca-en"`` that must not stop them from loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from qplug.config import (
    QuantConfig,
    check_pattern,
    instance_of,
    list_of,
    mapping,
    number_in,
    one_of,
    optional,
    positive_int,
    reject,
    skip_list,
    to_float,
    to_list,
    to_lower,
)
from qplug.errors import QuantConfigError

__all__ = ["AUTOGPTQ_CONFIG_NAME", "NAMED_DATASETS", "SUPPORTED_FORMATS", "GPTQConfig"]

#: Calibration datasets transformers/optimum know by name (downloaded from the hub by them).
NAMED_DATASETS = ("wikitext2", "c4", "c4-new")
#: ``checkpoint_format`` values whose tensors this backend reads and writes.
SUPPORTED_FORMATS = ("gptq", "gptq_v2")

# Other tools' spellings of our fields (AutoGPTQ's SYNONYMS; GPTQModel/transformers v5's "format").
_SYNONYMS = {"w_bit": "bits", "q_group_size": "group_size", "format": "checkpoint_format"}


def _str_or_str_list(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str):
        return
    list_of(str)(inst, attribute, value)


def _dataset(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    # Loading accepts any string (real checkpoints say "alpaca-zh,alpaca-en") or list of strings;
    # whether it can be used to quantize is check_quantizable's business.
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        reject(inst, attribute, value, "expected a dataset name or a list of texts")


def _nested_str_lists(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in value
    ):
        reject(inst, attribute, value, "expected a list of lists of module names")


def _exllama_config(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    mapping(inst, attribute, value)
    if "version" not in value or value["version"] not in (1, 2) or isinstance(value["version"], bool):
        reject(inst, attribute, value, 'expected {"version": 1} or {"version": 2}')


def _tokenizer(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    # A name/path, or a tokenizer object (as transformers allows); objects are written as their name.
    if value is not None and not isinstance(value, str) and not callable(value):
        reject(inst, attribute, value, "expected a tokenizer, its name or a local path")


def _bool():
    return instance_of(bool)


@attrs.define(kw_only=True)
class GPTQConfig(QuantConfig):
    """GPTQ weight quantization (``quant_method: "gptq"``).

    ``GPTQConfig(bits=4, group_size=128)`` quantizes with calibration data; the same class reads
    the ``quantization_config`` of any GPTQ checkpoint.
    """

    quant_method: ClassVar[str] = "gptq"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    bits: int = attrs.field(default=4, validator=[instance_of(int), one_of((2, 3, 4, 8))])
    tokenizer: Any = attrs.field(default=None, validator=_tokenizer, eq=False)
    dataset: Any = attrs.field(default=None, converter=to_list, validator=optional(_dataset))
    group_size: int = attrs.field(default=128, validator=positive_int(or_minus_one="one group per row"))
    damp_percent: float = attrs.field(
        default=0.1, converter=to_float, validator=number_in(0, 1, low_open=True, high_open=True)
    )
    desc_act: bool = attrs.field(default=False, validator=_bool())
    sym: bool = attrs.field(default=True, validator=_bool())
    true_sequential: bool = attrs.field(default=True, validator=_bool())
    static_groups: bool = attrs.field(default=False, validator=_bool())
    checkpoint_format: str = attrs.field(default="gptq", converter=to_lower, validator=instance_of(str))
    meta: dict[str, Any] | None = attrs.field(default=None, validator=optional(mapping))
    backend: str | None = attrs.field(default=None, converter=to_lower, validator=optional(instance_of(str)))
    use_cuda_fp16: bool = attrs.field(default=False, validator=_bool())
    model_seqlen: int | None = attrs.field(default=None, validator=optional(positive_int()))
    block_name_to_quantize: str | list[str] | None = attrs.field(
        default=None, converter=to_list, validator=optional(_str_or_str_list)
    )
    module_name_preceding_first_block: list[str] | None = attrs.field(
        default=None, converter=to_list, validator=optional(list_of(str))
    )
    batch_size: int = attrs.field(default=1, validator=positive_int())
    pad_token_id: int | None = attrs.field(default=None, validator=optional(instance_of(int)))
    use_exllama: bool | None = attrs.field(default=None, validator=optional(_bool()))
    max_input_length: int | None = attrs.field(default=None, validator=optional(positive_int()))
    exllama_config: dict[str, Any] | None = attrs.field(default=None, validator=optional(_exllama_config))
    cache_block_outputs: bool = attrs.field(default=True, validator=_bool())
    modules_in_block_to_quantize: list[list[str]] | None = attrs.field(
        default=None, converter=to_list, validator=optional(_nested_str_lists)
    )
    modules_to_not_convert: list[str] | None = attrs.field(default=None, converter=to_list, validator=skip_list())

    # -- checks ------------------------------------------------------------------------------
    def check(self) -> None:
        self._check_dynamic()

    def _check_dynamic(self) -> None:
        """GPTQModel's ``dynamic``: each key a pattern qplug can match, each override a valid setting.

        Checked here, when the config is read, so a bad checkpoint config fails before any model
        work, naming ``dynamic``, the key and the setting.
        """
        dynamic = self.extra_keys.get("dynamic")
        if dynamic is None:
            return
        name = type(self).__name__
        if not isinstance(dynamic, Mapping):
            raise QuantConfigError(field="dynamic", value=dynamic, config=name,
                                   accepted='expected a JSON object of "[+-]:regex": {overrides}')
        fields = attrs.fields_dict(type(self))
        for key, overrides in dynamic.items():
            if not isinstance(key, str):
                raise QuantConfigError(field="dynamic", value=key, config=name, accepted="keys are regex strings")
            check_pattern(_dynamic_regex(key), field="dynamic", config=name, regex=True)
            if not isinstance(overrides, Mapping):
                raise QuantConfigError(field="dynamic", value={key: overrides}, config=name,
                                       accepted=f"the overrides of {key!r} must be a JSON object")
            for setting in _DYNAMIC_SETTINGS:
                if setting not in overrides:
                    continue
                try:
                    fields[setting].validator(self, fields[setting], overrides[setting])
                except QuantConfigError as exc:
                    raise QuantConfigError(
                        field="dynamic", value={key: {setting: overrides[setting]}}, config=name,
                        accepted=f"{setting} of {key!r}: {exc.accepted}",
                    ) from None

    def check_loadable(self) -> None:
        """The checkpoint tensors are in a layout this backend reads."""
        if self.checkpoint_format not in SUPPORTED_FORMATS:
            raise QuantConfigError(
                field="checkpoint_format",
                value=self.checkpoint_format,
                accepted="this backend reads and writes " + ", ".join(repr(f) for f in SUPPORTED_FORMATS),
                config=type(self).__name__,
            )

    def check_quantizable(self) -> None:
        """Checks that only matter when quantizing a float model."""
        self.check_loadable()
        ds = self.dataset
        if isinstance(ds, str) and ds not in NAMED_DATASETS:
            raise QuantConfigError(
                field="dataset",
                value=ds,
                accepted="to quantize, expected a list of texts or one of "
                + ", ".join(repr(n) for n in NAMED_DATASETS),
                config=type(self).__name__,
            )
        if isinstance(ds, list) and not all(isinstance(t, str) for t in ds):
            raise QuantConfigError(
                field="dataset", value=ds, accepted="to quantize, expected a list of texts", config=type(self).__name__
            )
        if isinstance(ds, list) and self.tokenizer is None:
            raise QuantConfigError(
                field="tokenizer",
                value=None,
                accepted="a dataset of texts needs a tokenizer (an object or a local path)",
                config=type(self).__name__,
            )

    def needs_calibration(self) -> bool:
        """GPTQ calibrates: on the caller's samples, unless ``dataset`` is a list of texts."""
        return not isinstance(self.dataset, list)

    # -- other tools' configs ----------------------------------------------------------------
    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for foreign, ours in _SYNONYMS.items():
            if foreign in data:
                value = data.pop(foreign)
                if ours in data and _norm(data[ours]) != _norm(value):
                    raise QuantConfigError(
                        field=ours,
                        value=data[ours],
                        accepted=f"{foreign}={value!r} says otherwise; a config must not contradict itself",
                        config=cls.__name__,
                    )
                data[ours] = value
        if "disable_exllama" in data:  # optimum's spelling, the inverse of use_exllama
            value = data.pop("disable_exllama")
            if isinstance(value, bool) and data.get("use_exllama") is None:
                data["use_exllama"] = not value
            elif value is not None and not isinstance(value, bool):
                raise QuantConfigError(
                    field="disable_exllama", value=value, accepted="expected true or false", config=cls.__name__
                )
        if data.pop("is_marlin_format", False) is True:  # AutoGPTQ's marlin repacking
            data.setdefault("checkpoint_format", "marlin")
        return data

    @classmethod
    def recognizes(cls, data: Mapping[str, Any]) -> bool:
        """An AutoGPTQ ``quantize_config.json`` (no ``quant_method``): ``bits`` and a GPTQ-only key.

        A dict another backend also recognises goes to the one knowing more of its keys
        (autoawq's native dicts to AWQ): see :meth:`qplug.QuantConfig.claimed_keys`.
        """
        gptq_keys = {
            "desc_act",
            "damp_percent",
            "static_groups",
            "true_sequential",
            "model_file_base_name",
            "checkpoint_format",
        }
        return "bits" in data and bool(gptq_keys & set(data))

    # -- writing -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tok = self.tokenizer
        if tok is not None and not isinstance(tok, str):
            out["tokenizer"] = getattr(tok, "name_or_path", None) or None
        out["format"] = self.checkpoint_format  # transformers v5 / GPTQModel read "format"
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        out.pop("format", None)
        return out

    def to_autogptq_dict(self, model_file_base_name: str = "model") -> dict[str, Any]:
        """The ``quantize_config.json`` auto-gptq 0.7.1 reads (its fields only)."""
        if self.checkpoint_format != "gptq":
            raise QuantConfigError(
                field="checkpoint_format",
                value=self.checkpoint_format,
                accepted="auto-gptq reads 'gptq' (v1) checkpoints only",
                config=type(self).__name__,
            )
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": self.extra_keys.get("model_name_or_path"),
            "model_file_base_name": model_file_base_name,
            "is_marlin_format": False,
            "quant_method": "gptq",
        }

    # -- per-module settings (GPTQModel's "dynamic", "lm_head") -------------------------------
    def module_settings(self, name: str) -> dict[str, Any] | None:
        """Settings for module ``name``: ``None`` if GPTQModel's ``dynamic`` excludes it
        (a ``"-:regex"`` key), else ``bits``/``group_size``/``sym``/``desc_act`` with the
        overrides of the first matching ``"+:regex"`` (or bare regex) key."""
        from qplug.patterns import compile_pattern

        base = {setting: getattr(self, setting) for setting in _DYNAMIC_SETTINGS}
        self._check_dynamic()  # the config may have been changed since construction
        dynamic = self.extra_keys.get("dynamic") or {}
        for pattern, overrides in dynamic.items():
            negative = pattern.startswith("-:")
            # GPTQModel matches with re.match (a prefix); qplug's engine, in linear time.
            if compile_pattern(_dynamic_regex(pattern)).match(name):
                if negative:
                    return None
                if isinstance(overrides, Mapping):
                    base.update({k: overrides[k] for k in base if k in overrides})
                return base
        return base

    @property
    def quantizes_lm_head(self) -> bool:
        """GPTQModel's ``"lm_head": true``: the output head is quantized too."""
        return self.extra_keys.get("lm_head") is True


#: The settings a ``dynamic`` entry may override for the modules it matches.
_DYNAMIC_SETTINGS = ("bits", "group_size", "sym", "desc_act")


def _dynamic_regex(key: str) -> str:
    """A ``dynamic`` key without its ``+:``/``-:`` marker."""
    return key[2:] if key[:2] in ("-:", "+:") else key


def _norm(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


#: The file auto-gptq reads a checkpoint's settings from; ``qplug.save_quantized`` writes it with
#: every ``gptq`` (v1) checkpoint, inside the atomic save (the backend's ``add_checkpoint_files``).
AUTOGPTQ_CONFIG_NAME = "quantize_config.json"
