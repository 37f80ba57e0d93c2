"""``AwqConfig``: the ``quantization_config`` of AWQ checkpoints. Torch-free.

Field names, defaults and JSON keys follow Hugging Face transformers' ``AwqConfig``
(v4's fields, and the ones v5 adds when it re-based the class on ``GPTQConfig``).
What loads:

* configs written by transformers v4 and v5 (v5's ``format`` is read as ``version``);
* autoawq's native ``quant_config.json`` keys ``w_bit`` and ``q_group_size``, and its
  upper-case ``version`` (``"GEMM"``);
* any unknown key, kept and written back.

What is written loads in transformers v4 *and* v5: v4 rejects ``backend: "auto"``
(so ``"auto"`` is stored as the equivalent ``"autoawq"``) and v5 rejects
``version: "exllama"``/``"ipex"`` and v4-unknown kernel backends (so those are written
as ``"gemm"`` / ``"autoawq"``, both of which read the same checkpoint tensors, with
the choice kept under ``qplug_version`` / ``qplug_backend``, keys both versions ignore).
Note that transformers v4 itself refuses a non-null ``modules_to_not_convert`` unless
autoawq is installed.

Validation is transformers' own (``do_fuse`` needs ``fuse_max_seq_len``,
``modules_to_fuse`` needs its required keys, ``exllama_config`` needs a ``version``
1 or 2, ...) and never depends on what is installed: no check imports autoawq or
looks for a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from qplug.config import (
    QuantConfig,
    instance_of,
    list_of,
    mapping,
    number_in,
    one_of,
    optional,
    positive_int,
    skip_list,
    to_float,
    to_list,
    to_lower,
)
from qplug.errors import QuantConfigError

__all__ = ["BACKENDS", "VERSIONS", "AwqConfig"]

#: checkpoint layouts / kernels named by ``version`` (``llm-awq`` is v5's spelling of backend llm-awq)
VERSIONS = ("gemm", "gemv", "gemv_fast", "exllama", "ipex")
#: ``version`` values transformers v5 rejects; written as "gemm" (they read GEMM checkpoints)
_V4_ONLY_VERSIONS = ("exllama", "ipex")
#: packing backends both transformers versions accept
_PORTABLE_BACKENDS = ("autoawq", "llm-awq")
#: kernel backends transformers v5 adds (v4 rejects them)
_V5_BACKENDS = (
    "auto_trainable", "machete", "marlin", "exllama_v2", "exllama_v1", "gemm", "gemm_triton",
    "gemv", "gemv_fast", "torch_awq", "torch_fused_awq",
)
BACKENDS = (*_PORTABLE_BACKENDS, "auto", *_V5_BACKENDS)
_FUSE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "mlp", "attention", "layernorm", "use_alibi")
#: v5's dataset names (a list of texts is accepted too)
_DATASETS = ("wikitext2", "c4", "c4-new")


def _to_backend(value: Any) -> Any:
    value = to_lower(value)
    # v5 maps v4's "autoawq" onto "auto"; v4 knows no "auto". Store the spelling both accept.
    return "autoawq" if value == "auto" else value


def _to_version(value: Any) -> Any:
    value = to_lower(value)
    if isinstance(value, str) and value.startswith("awqlinearversion."):  # str(AWQLinearVersion.GEMM)
        value = value.split(".", 1)[1]
    return value


def _dataset(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return
    one_of(_DATASETS)(inst, attribute, value)


@attrs.define(kw_only=True)
class AwqConfig(QuantConfig):
    """AWQ quantization settings, as transformers' ``AwqConfig`` spells them.

    :param bits: weight bits (AWQ's layouts and kernels define 4; transformers accepts 2, 3, 4, 8).
    :param group_size: input channels per scale/zero group; -1 for one group per row.
    :param zero_point: asymmetric (zero-point) quantization.
    :param version: checkpoint layout / kernel: gemm, gemv, gemv_fast, exllama, ipex (case-insensitive).
    :param backend: packing backend: autoawq, llm-awq, auto (= autoawq), or a transformers-5 kernel name.
    :param modules_to_not_convert: module-name patterns kept in floating point (adds to the output head).
    :param do_fuse: fuse attention and MLP (transformers/autoawq loading option); needs ``fuse_max_seq_len``.
    :param fuse_max_seq_len: longest sequence for fused modules.
    :param modules_to_fuse: a custom fusing map, with keys hidden_size, num_attention_heads, ...
    :param exllama_config: ``{"version": 1|2, "max_input_len": ..., "max_batch_size": ...}``.
    :param duo_scaling: AWQ's scale search uses activation *and* weight magnitudes (autoawq default).
    :param apply_clip: search a clipping range for each weight group after scaling.

    The remaining fields are the ones transformers 5 inherits from ``GPTQConfig`` and writes into
    every AWQ config; they are kept, validated as v5 does, and unused by AWQ.
    """

    quant_method: ClassVar[str] = "awq"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    bits: int = attrs.field(default=4, validator=[instance_of(int), one_of((2, 3, 4, 8))])
    group_size: int = attrs.field(default=128, validator=positive_int(or_minus_one="one group per row"))
    zero_point: bool = attrs.field(default=True, validator=instance_of(bool))
    version: str = attrs.field(default="gemm", converter=_to_version, validator=one_of(VERSIONS))
    backend: str = attrs.field(default="autoawq", converter=_to_backend, validator=one_of(BACKENDS))
    modules_to_not_convert: list[str] | None = attrs.field(default=None, converter=to_list, validator=skip_list())
    do_fuse: bool = attrs.field(default=False, validator=instance_of(bool))
    fuse_max_seq_len: int | None = attrs.field(default=None, validator=optional(instance_of(int), number_in(1)))
    modules_to_fuse: dict[str, Any] | None = attrs.field(default=None, validator=optional(mapping))
    exllama_config: dict[str, Any] | None = attrs.field(default=None, validator=optional(mapping))
    # qplug's own quantization switches (autoawq's quantize() arguments); written, ignored by transformers
    duo_scaling: bool = attrs.field(default=True, validator=instance_of(bool))
    apply_clip: bool = attrs.field(default=True, validator=instance_of(bool))
    # -- fields transformers 5 adds (inherited from its GPTQConfig) --------------------------------
    tokenizer: Any = None
    dataset: str | list[str] | None = attrs.field(default=None, converter=to_list, validator=_dataset)
    damp_percent: float = attrs.field(
        default=0.1, converter=to_float, validator=number_in(0, 1, low_open=True, high_open=True)
    )
    desc_act: bool = attrs.field(default=False, validator=instance_of(bool))
    act_group_aware: bool = attrs.field(default=True, validator=instance_of(bool))
    sym: bool = attrs.field(default=True, validator=instance_of(bool))
    true_sequential: bool = attrs.field(default=True, validator=instance_of(bool))
    meta: dict[str, Any] | None = attrs.field(default=None, validator=optional(mapping))
    model_seqlen: int | None = attrs.field(default=None, validator=optional(instance_of(int)))
    block_name_to_quantize: str | None = attrs.field(default=None, validator=optional(instance_of(str)))
    module_name_preceding_first_block: list[str] | None = attrs.field(
        default=None, converter=to_list, validator=optional(list_of(str))
    )
    batch_size: int = attrs.field(default=1, validator=[instance_of(int), number_in(1)])
    pad_token_id: int | None = attrs.field(default=None, validator=optional(instance_of(int)))
    max_input_length: int | None = attrs.field(default=None, validator=optional(instance_of(int)))
    cache_block_outputs: bool = attrs.field(default=True, validator=instance_of(bool))
    modules_in_block_to_quantize: list[list[str]] | None = attrs.field(
        default=None, converter=to_list, validator=optional(list_of(list))
    )

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        if self.do_fuse and self.fuse_max_seq_len is None:
            raise QuantConfigError(
                field="fuse_max_seq_len", value=None,
                accepted="an integer: fused modules (do_fuse=True) need a maximum sequence length",
                config=type(self).__name__,
            )
        if self.do_fuse and self.modules_to_fuse is not None:
            missing = [k for k in _FUSE_KEYS if k not in self.modules_to_fuse]
            if missing:
                raise QuantConfigError(
                    field="modules_to_fuse", value=self.modules_to_fuse,
                    accepted=f"a mapping with the keys {', '.join(_FUSE_KEYS)} (missing: {', '.join(missing)})",
                    config=type(self).__name__,
                )
        if self.version == "exllama" and self.exllama_config is not None:
            ex_version = self.exllama_config.get("version")
            if ex_version not in (1, 2):
                raise QuantConfigError(
                    field="exllama_config", value=self.exllama_config,
                    accepted="a mapping whose 'version' is 1 or 2", config=type(self).__name__,
                )
        if self.group_size != -1 and self.group_size % 8 and self.bits == 4:
            raise QuantConfigError(field="group_size", value=self.group_size,
                                   accepted="-1 or a multiple of 8 (eight 4-bit values per int32 word)",
                                   config=type(self).__name__)
        if self.modules_in_block_to_quantize is not None and not all(
            isinstance(item, str) for inner in self.modules_in_block_to_quantize for item in inner
        ):
            raise QuantConfigError(field="modules_in_block_to_quantize", value=self.modules_in_block_to_quantize,
                                   accepted="a list of lists of module names", config=type(self).__name__)

    def check_quantizable(self) -> None:
        if self.bits != 4:
            raise QuantConfigError(field="bits", value=self.bits,
                                   accepted="4: AWQ's checkpoint layouts and kernels are 4-bit",
                                   config=type(self).__name__)
        if self.version not in ("gemm", "gemv"):
            raise QuantConfigError(
                field="version", value=self.version,
                accepted="'gemm' or 'gemv' when quantizing (gemv_fast, exllama and ipex are kernels that "
                         "repack a GEMM/GEMV checkpoint at load time)",
                config=type(self).__name__,
            )

    def needs_calibration(self) -> bool:
        """AWQ searches its scales on the caller's calibration samples."""
        return True

    # --------------------------------------------------------------- parsing
    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for native, ours in (("w_bit", "bits"), ("q_group_size", "group_size")):
            if native in data:
                value = data.pop(native)
                if ours in data and data[ours] != value:
                    raise QuantConfigError(
                        field=ours, value=data[ours],
                        accepted=f"the same value as autoawq's {native!r} ({value!r}) when both are given",
                        config=cls.__name__,
                    )
                data[ours] = value
        # transformers v5 writes "format" beside the legacy "version" (and reads version first)
        fmt = data.pop("format", None)
        if data.get("version") is None and fmt is not None:
            data["version"] = fmt
        data.pop("checkpoint_format", None)
        if "do_fuse" in data and data["do_fuse"] is None:
            # transformers: an unset do_fuse means "fuse exactly when a fusing map is given"
            data["do_fuse"] = bool(data.get("modules_to_fuse"))
        # v5's format "llm-awq" is v4's backend "llm-awq" with the GEMM version
        if _to_version(data.get("version")) == "llm-awq":
            data["version"], data["backend"] = "gemm", "llm-awq"
        # the choices written under qplug's keys because one transformers version rejects them
        for key, field in (("qplug_version", "version"), ("qplug_backend", "backend")):
            if key in data:
                data[field] = data.pop(key)
        return data

    @classmethod
    def recognizes(cls, data: Mapping[str, Any]) -> bool:
        """autoawq's ``quant_config.json`` (``w_bit``, ``q_group_size``) has no ``quant_method``."""
        return "w_bit" in data or "q_group_size" in data or (
            "zero_point" in data and _to_version(data.get("version")) in VERSIONS
        )

    # --------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.version in _V4_ONLY_VERSIONS:
            out["version"], out["qplug_version"] = "gemm", self.version
        if self.backend not in _PORTABLE_BACKENDS:
            out["backend"], out["qplug_backend"] = "autoawq", self.backend
        out["format"] = out["version"]  # what transformers v5 writes beside "version"
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        if "version" not in out and "qplug_version" not in out:
            out.pop("format", None)  # the default layout needs no second spelling
        return out

    def autoawq_dict(self) -> dict[str, Any]:
        """The ``quant_config.json`` autoawq itself writes (its native key names)."""
        return {
            "zero_point": self.zero_point,
            "q_group_size": self.group_size,
            "w_bit": self.bits,
            "version": self.version.upper(),
            "modules_to_not_convert": self.modules_to_not_convert,
        }
