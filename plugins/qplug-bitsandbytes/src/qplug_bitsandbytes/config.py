"""``BitsAndBytesConfig``: transformers' bitsandbytes config as a qplug config (torch-free).

Field names, defaults and JSON are those of ``transformers.BitsAndBytesConfig``, so the
``quantization_config`` of any bitsandbytes checkpoint loads, and :meth:`BitsAndBytesConfig.to_dict`
writes what transformers writes, its private ``_load_in_4bit`` / ``_load_in_8bit`` keys included
(they are ``file_only_keys``: ``to_diff_dict`` and the ``qplug`` command leave them out).

Validation is transformers' with the gaps closed: a quant type other than ``nf4``/``fp4`` or an
unknown dtype name fails at construction (not later inside bitsandbytes), an integer threshold
such as ``6`` is accepted as ``6.0``, and every error names the field and what it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from qplug.config import (
    QuantConfig,
    dtype_name,
    instance_of,
    number_in,
    one_of,
    skip_list,
    to_float,
    to_list,
    to_lower,
)
from qplug.errors import QuantConfigError

__all__ = ["COMPUTE_DTYPES", "QUANT_STORAGE_DTYPES", "QUANT_TYPES", "BitsAndBytesConfig"]

#: 4-bit data types bitsandbytes implements.
QUANT_TYPES = ("fp4", "nf4")
#: Dtypes bitsandbytes' 4-bit matmul computes in.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
#: Dtypes the packed 4-bit weight may be stored as (transformers' list).
QUANT_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")

# transformers writes both the public and these private keys; they mirror load_in_4bit/8bit.
_PRIVATE_KEYS = {"_load_in_4bit": "load_in_4bit", "_load_in_8bit": "load_in_8bit"}
# Keys whose presence marks a dict without quant_method as a bitsandbytes config.
_SIGNATURE_KEYS = frozenset({"load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit",
                             "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "llm_int8_threshold"})


def _dtype_or_default(default: str):
    """Converter: ``None`` → ``default`` (transformers' meaning of None); names and torch dtypes → bare names."""

    def convert(value: Any) -> Any:
        return default if value is None else dtype_name(value)

    return convert


def _flag() -> Any:
    return attrs.field(default=False, validator=instance_of(bool))


@attrs.define(kw_only=True)
class BitsAndBytesConfig(QuantConfig):
    """bitsandbytes quantization: 4-bit NF4/FP4 (QLoRA) or 8-bit LLM.int8.

    Exactly one of :attr:`load_in_4bit` and :attr:`load_in_8bit` must be true to quantize; a
    config with neither is valid to read (transformers writes such configs) but
    :func:`qplug.quantize` refuses it.

    >>> BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    ... # doctest: +ELLIPSIS
    BitsAndBytesConfig(load_in_8bit=False, load_in_4bit=True, ...)
    """

    quant_method: ClassVar[str] = "bitsandbytes"
    file_only_keys: ClassVar[frozenset[str]] = frozenset(_PRIVATE_KEYS)
    skip_field: ClassVar[str | None] = "llm_int8_skip_modules"

    load_in_8bit: bool = _flag()
    load_in_4bit: bool = _flag()
    llm_int8_threshold: float = attrs.field(default=6.0, converter=to_float, validator=number_in(0, None))
    llm_int8_skip_modules: list[str] | None = attrs.field(default=None, converter=to_list, validator=skip_list())
    llm_int8_enable_fp32_cpu_offload: bool = _flag()
    llm_int8_has_fp16_weight: bool = _flag()
    bnb_4bit_compute_dtype: str = attrs.field(
        default="float32", converter=_dtype_or_default("float32"), validator=one_of(COMPUTE_DTYPES)
    )
    bnb_4bit_quant_type: str = attrs.field(default="fp4", converter=to_lower, validator=one_of(QUANT_TYPES))
    bnb_4bit_use_double_quant: bool = _flag()
    bnb_4bit_quant_storage: str = attrs.field(
        default="uint8", converter=_dtype_or_default("uint8"), validator=one_of(QUANT_STORAGE_DTYPES)
    )

    # -- validation --------------------------------------------------------------------------

    def check(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise QuantConfigError(
                field="load_in_4bit",
                value=True,
                accepted="load_in_4bit and load_in_8bit are both true; choose one "
                "(4-bit NF4/FP4 or 8-bit LLM.int8)",
                config=type(self).__name__,
            )

    def check_quantizable(self) -> None:
        if not (self.load_in_4bit or self.load_in_8bit):
            raise QuantConfigError(
                field="load_in_4bit",
                value=False,
                accepted="neither 4 nor 8 bit chosen: set load_in_4bit=True (NF4/FP4) "
                "or load_in_8bit=True (LLM.int8) to quantize",
                config=type(self).__name__,
            )

    # -- what the config selects ------------------------------------------------------------

    def quantization_method(self) -> str | None:
        """``"llm_int8"``, ``"nf4"``, ``"fp4"`` or ``None`` (transformers' method of the same name)."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    # -- JSON --------------------------------------------------------------------------------

    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Fold transformers' private ``_load_in_4bit``/``_load_in_8bit`` into the public fields."""
        data = dict(data)
        for private, public in _PRIVATE_KEYS.items():
            if private not in data:
                continue
            value = data.pop(private)
            if public not in data:
                data[public] = value
            elif data[public] != value:
                raise QuantConfigError(
                    field=private,
                    value=value,
                    accepted=f"must equal {public} ({data[public]!r}); transformers writes both with one value",
                    config=cls.__name__,
                )
        return data

    @classmethod
    def recognizes(cls, data: Mapping[str, Any]) -> bool:
        return bool(_SIGNATURE_KEYS & set(data))

    def to_dict(self) -> dict[str, Any]:
        """What ``transformers.BitsAndBytesConfig.to_dict()`` writes, plus any unknown keys kept."""
        out = super().to_dict()
        for private, public in _PRIVATE_KEYS.items():
            out[private] = getattr(self, public)
        return out
