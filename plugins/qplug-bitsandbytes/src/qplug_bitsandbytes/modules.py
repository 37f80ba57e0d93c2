"""bitsandbytes modules for qplug: quantize, dequantize, export and import.

The modules here are bitsandbytes' own ``Linear4bit`` and ``Linear8bitLt`` (subclasses, so
every ``isinstance`` check in bitsandbytes, transformers and peft still holds) with three
changes, all about state dicts:

* **Export is exact after a forward.**  On CPUs with AVX512-BF16, bitsandbytes 0.50
  repacks a 4-bit weight in place on the first inference forward: the nibbles are
  re-ordered for its CPU kernel and the block scales (``absmax``) are de-nested, rounded to
  bfloat16 and transposed.  Its ``_save_to_state_dict`` undoes the nibble order but not the
  scales (it writes them transposed and rounded, or re-quantizes rounded values), so a
  checkpoint written after a forward is corrupt.  :class:`Linear4bit` keeps a reference
  to the quantization state as it was before the repack (no copy: the repack replaces
  attributes, it never writes into the tensors) and exports that, with the nibble order
  restored exactly.  Exporting never changes the module.
* **Import by assignment.**  A module built on the meta device is filled by
  ``model.load_state_dict(tensors, assign=True)`` from the tensors transformers writes
  (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4|fp4`` for 4-bit;
  ``weight``, ``SCB``, ``weight_format`` for 8-bit).  Missing or inconsistent tensors raise
  :class:`QuantStateError` naming the module and the tensor.
* **Training after inference works.**  A forward that needs gradients (training mode, or
  an input that requires grad) first restores the canonical layout, because bitsandbytes'
  repacked CPU kernel has no backward.

Everything here imports torch and bitsandbytes; :mod:`qplug_bitsandbytes.plugin` imports
this module only inside hook calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn

from qplug.errors import CheckpointError
from qplug.kernels import Kernel, KernelLayer, requested_kernels
from qplug_bitsandbytes import cpu_linear, fast4bit, fast8bit

__all__ = [
    "Linear4bit",
    "Linear8bitLt",
    "QuantStateError",
    "bnb_dequantize_4bit",
    "dequantize_module",
    "dequantized_weight",
    "empty_4bit",
    "empty_8bit",
    "quantize_4bit",
    "quantize_8bit",
    "quantized_bits",
]

class _OnceFilter(logging.Filter):
    """Lets each distinct message of bitsandbytes' ``MatMul8bitLt`` cast notice through once per process.

    bitsandbytes logs it on every int8 matmul whose input is not float16: fourteen times per
    forward of a small Llama, the same line each time.
    """

    PREFIX = "MatMul8bitLt: inputs will be cast"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


_bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _OnceFilter) for f in _bnb_logger.filters):
    _bnb_logger.addFilter(_OnceFilter())


#: Names of the 4-bit quant-state tensors under ``<module>.weight.`` in a state dict.
QUANT_STATE_KEYS_4BIT = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)

# bitsandbytes' CPU repack interleaves rows in blocks of this many (the default ``block_n``
# of ``bitsandbytes.functional._convert_weight_packed_for_cpu``).
_CPU_PACK_BLOCK_N = 32


class QuantStateError(CheckpointError):
    """A state dict's quantization tensors for one module are missing or inconsistent.

    A :class:`qplug.CheckpointError` (so a ``ValueError``); the message names the module (its
    dotted name in the model) and the tensor at fault.
    """


def _module_name(prefix: str) -> str:
    return prefix[:-1] if prefix.endswith(".") else (prefix or "<root>")


# --------------------------------------------------------------------------------------
# 4-bit
# --------------------------------------------------------------------------------------


def _is_cpu_packed(quant_state: QuantState | None) -> bool:
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _same_state(quant_state: QuantState) -> QuantState:
    """A new ``QuantState`` object sharing ``quant_state``'s tensors (no data is copied)."""
    return QuantState(
        absmax=quant_state.absmax,
        shape=quant_state.shape,
        code=quant_state.code,
        blocksize=quant_state.blocksize,
        quant_type=quant_state.quant_type,
        dtype=quant_state.dtype,
        offset=quant_state.offset,
        state2=quant_state.state2,
    )


def _unpack_cpu_weight(packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """Exact inverse of bitsandbytes' CPU nibble repack, without touching ``quant_state``.

    The canonical layout holds the ``[N, K]`` 4-bit values row-major, two per byte, high
    nibble first.  The repack (``_convert_weight_packed_for_cpu``) regroups them into tiles
    of 32 rows x 2 columns, and stores each tile as 32 bytes whose low nibbles are the
    tile's first 32 values and whose high nibbles are the last 32.  This function is the
    pure permutation back, in the original storage dtype and shape.
    """
    n, k = (int(d) for d in quant_state.shape)
    block = _CPU_PACK_BLOCK_N
    groups = packed.reshape(-1, block)  # each row: 32 bytes = 32 low + 32 high nibbles
    values = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # [-1, 64] as before packing
    values = values.reshape(n // block, k // 2, block, 2).transpose(1, 2).reshape(-1)
    canonical = (values[0::2] << 4) | values[1::2]
    canonical = canonical.to(torch.uint8).reshape(quant_state.original_qshape)
    storage = getattr(quant_state, "original_storage_type", None)
    return canonical.view(storage) if storage is not None else canonical


def _bnb_forward_4bit(layer: Linear4bit, layout: None, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own ``Linear4bit.forward``, keeping what it needs to export exactly afterwards."""
    state = getattr(layer.weight, "quant_state", None)
    if _is_cpu_packed(state):
        if layer.training or x.requires_grad or x.device.type != "cpu":
            layer.restore_canonical_layout()
    elif state is not None:
        # bitsandbytes may repack in this call; remember the canonical state first.
        layer._canonical_state = _same_state(state)
    return bnb.nn.Linear4bit.forward(layer, x)


def _bnb_prepare(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    if layer.kernel_request is None and "bitsandbytes" not in requested_kernels():
        ours = next(k for k in layer.kernels if k.name.startswith("qplug-"))
        why = ours.refuses(layer, device, dtype)
        if why is not None:
            cpu_linear.warn_fallback(layer, device, f"{ours.name}: {why}")
    return None


def _refuses_bnb_avx512bf16(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    # Measured faster than qplug-4bit-cpu for bfloat16 inference on AVX512-BF16 CPUs (README); it computes
    # in bfloat16 with bfloat16 block scales, so it is not used for float32/float16 inputs.
    if device.type != "cpu" or dtype != torch.bfloat16:
        return "bfloat16 inputs on the CPU only"
    if layer.training:
        return "inference only (bitsandbytes repacks the weight for it)"
    probe = getattr(bnb.functional, "has_avx512bf16", None)
    if not (probe and probe()):
        return "this CPU (or bitsandbytes) has no AVX512-BF16 kernel"
    path, _ = cpu_linear.isa()
    if path in ("avx2", "portable"):  # QPLUG_ISA caps every CPU kernel chosen here, bitsandbytes' too
        return f"{cpu_linear.ISA_ENV_VAR} caps the instruction set at {path}"
    return None


def _bnb_forward_4bit_inference(layer: Linear4bit, layout: None, x: torch.Tensor) -> torch.Tensor:
    # The core runs kernels without autograd (input gradients go through the dequantized weight), so a
    # detached input takes bitsandbytes' repacked inference kernel even when x requires grad.
    return _bnb_forward_4bit(layer, layout, x.detach())


def _never(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    return None


_BNB_4BIT = Kernel(
    "bitsandbytes", refuses=_never, prepare=_bnb_prepare, forward=_bnb_forward_4bit,
    description="bitsandbytes' own Linear4bit forward (GPU/XPU kernels; on CPU dequantize or its AVX512-BF16 repack)",
)
_BNB_4BIT_AVX512BF16 = Kernel(
    "bitsandbytes-avx512bf16", refuses=_refuses_bnb_avx512bf16, prepare=_bnb_prepare,
    forward=_bnb_forward_4bit_inference,
    description="bitsandbytes' repacked bfloat16 CPU kernel (AVX512-BF16 CPUs, bfloat16 inference)",
)
_QPLUG_4BIT_CPU = Kernel(
    "qplug-4bit-cpu", refuses=cpu_linear.refuses_4bit, prepare=cpu_linear.prepare_4bit,
    forward=cpu_linear.forward_4bit,
    description="qplug's C GEMV (decode) / blocked dequantize + matmul (prefill) on the stored NF4/FP4 bytes",
)


class Linear4bit(KernelLayer, bnb.nn.Linear4bit):
    """bitsandbytes ``Linear4bit`` with exact export after CPU forwards, import by assignment, and
    qplug's kernel choice (:mod:`qplug.kernels`).

    Kernels, in order of preference: ``bitsandbytes-avx512bf16`` (bitsandbytes' repacked kernel, for
    bfloat16 inference on AVX512-BF16 CPUs, where it measured fastest), ``qplug-4bit-cpu``
    (:mod:`qplug_bitsandbytes.cpu_linear`: CPU, float32/bfloat16/float16 inputs) and ``bitsandbytes``
    (bitsandbytes' own forward: every other device, and the CPU where qplug's kernels cannot run, with
    one warning).
    """

    kernels = (_BNB_4BIT_AVX512BF16, _QPLUG_4BIT_CPU, _BNB_4BIT)
    # qplug.placement: accelerate's disk offload moves tensors, and this layer's state is more than them
    qplug_disk_offload_refusal = "its quant_state lives outside the tensors accelerate offloads and reads back"

    # The quant state as it was before bitsandbytes repacked the weight for its CPU kernel;
    # None while the weight is in the canonical layout.
    _canonical_state: QuantState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_kernel(x)

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """bitsandbytes' dequantization of the weight (:func:`dequantized_weight`), in ``dtype``."""
        return dequantized_weight(self).to(dtype)

    def canonical_weight(self) -> tuple[torch.Tensor, QuantState | None]:
        """The 4-bit data and quant state in bitsandbytes' canonical (serialisable) layout.

        Never modifies the module.
        """
        state = getattr(self.weight, "quant_state", None)
        if not _is_cpu_packed(state):
            return self.weight.data, state
        canonical = self._canonical_state
        if canonical is None:  # repacked by someone else without our forward: cannot undo
            raise QuantStateError(
                f"{type(self).__name__}: the 4-bit weight was repacked for the CPU kernel outside "
                "qplug's forward; its original block scales are lost"
            )
        return _unpack_cpu_weight(self.weight.data, state), canonical

    def restore_canonical_layout(self) -> None:
        """Undo bitsandbytes' CPU repack in place, exactly (the next CPU forward redoes it)."""
        state = getattr(self.weight, "quant_state", None)
        if not _is_cpu_packed(state):
            return
        data, canonical = self.canonical_weight()
        self.weight.data = data
        self.weight.quant_state = canonical
        self.quant_state = canonical
        self._canonical_state = None

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # Moving (or casting) a repacked weight would carry the CPU-only layout along.
        self.restore_canonical_layout()
        return super()._apply(fn, recurse)  # KernelLayer's: drops the run-time layout

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        repacked = _is_cpu_packed(getattr(self.weight, "quant_state", None))
        data, state = self.canonical_weight()
        if repacked:  # the parameter holds the CPU layout; export the canonical bytes instead
            destination[prefix + "weight"] = data
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        weight_key = prefix + "weight"
        stats = {
            name: state_dict.pop(prefix + "weight." + name)
            for name in QUANT_STATE_KEYS_4BIT
            if prefix + "weight." + name in state_dict
        }
        weight = state_dict.pop(weight_key, None)
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight is None:
            if stats:
                raise QuantStateError(
                    f"module {_module_name(prefix)!r}: the state dict has 4-bit quant-state tensors "
                    f"({', '.join('weight.' + s for s in sorted(stats))}) but no 'weight'"
                )
            return  # missing_keys already names it
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        if weight.is_floating_point() and not stats and tuple(weight.shape) == (
            self.out_features,
            self.in_features,
        ):
            self._quantize_from(weight)
            return
        self._load_quantized(weight, stats, _module_name(prefix))

    def _quantize_from(self, weight: torch.Tensor) -> None:
        param = bnb.nn.Params4bit(
            weight.detach(),
            requires_grad=False,
            blocksize=self.weight.blocksize,
            compress_statistics=self.weight.compress_statistics,
            quant_type=self.weight.quant_type,
            quant_storage=self.quant_storage,
            module=self,
        )
        self.weight = _quantize_param(param, weight.device)
        self._canonical_state = None
        self.reset_kernel()

    def _load_quantized(self, weight: torch.Tensor, stats: dict[str, torch.Tensor], name: str) -> None:
        check_4bit_state(name, weight, stats, self.out_features, self.in_features, self.weight.quant_type)
        param = bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=dict(stats), requires_grad=False, device=weight.device, module=self
        )
        param.module = self
        self.weight = param
        self.quant_state = param.quant_state
        self.quant_storage = param.quant_storage
        self._canonical_state = None
        self.reset_kernel()


def check_4bit_state(
    name: str,
    weight: torch.Tensor,
    stats: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    quant_type: str | None = None,
) -> None:
    """Raise :class:`QuantStateError` unless ``stats`` fully describe ``weight``.

    ``stats`` maps the names after ``weight.`` (``absmax``, ``quant_map``, ...) to tensors.
    """
    from bitsandbytes.utils import unpack_tensor_to_dict

    def fail(problem: str) -> QuantStateError:
        return QuantStateError(f"module {name!r}: {problem}")

    packed_keys = [k for k in stats if k.startswith("quant_state.")]
    if not packed_keys:
        raise fail(
            "missing tensor 'weight.quant_state.bitsandbytes__nf4' (or '__fp4'); a 4-bit weight "
            "needs its quant state: weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__<type>"
        )
    if len(packed_keys) > 1:
        raise fail(f"more than one quant-state tensor: {sorted('weight.' + k for k in packed_keys)}")
    stored_type = packed_keys[0].rsplit("__", 1)[1]
    for required in ("absmax", "quant_map"):
        if required not in stats:
            raise fail(f"missing tensor 'weight.{required}'")
    try:
        meta = unpack_tensor_to_dict(stats[packed_keys[0]])
    except Exception as exc:  # bitsandbytes raises json / unicode errors here
        raise fail(f"tensor 'weight.{packed_keys[0]}' is not a bitsandbytes quant state ({exc})") from exc
    from qplug_bitsandbytes.checks import check_4bit_statistics, quant_state_problem

    problem = quant_state_problem(meta)
    if problem:
        raise fail(f"tensor 'weight.{packed_keys[0]}' is not a valid bitsandbytes quant state: {problem}")
    if meta.get("quant_type", stored_type) != stored_type:
        raise fail(
            f"tensor 'weight.{packed_keys[0]}' says quant_type {meta.get('quant_type')!r}, "
            f"its name says {stored_type!r}"
        )
    if quant_type is not None and stored_type != quant_type:
        raise fail(f"checkpoint holds {stored_type!r} weights but the config asks for {quant_type!r}")
    shape = tuple(meta.get("shape") or ())
    if shape != (out_features, in_features):
        raise fail(
            f"quant state shape {list(shape)} does not match the layer's "
            f"[out_features, in_features] = [{out_features}, {in_features}]"
        )
    numel = out_features * in_features
    nbytes = weight.numel() * weight.element_size()
    if nbytes != (numel + 1) // 2:
        raise fail(
            f"tensor 'weight' holds {nbytes} bytes; {numel} 4-bit values need {(numel + 1) // 2}"
        )
    blocksize = meta.get("blocksize")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise fail(f"quant state blocksize {blocksize!r} is not a positive integer")
    blocks = math.ceil(numel / blocksize)
    if stats["absmax"].numel() != blocks:
        raise fail(
            f"tensor 'weight.absmax' has {stats['absmax'].numel()} scales; "
            f"{numel} values in blocks of {blocksize} need {blocks}"
        )
    if stats["quant_map"].numel() != 16:
        raise fail(f"tensor 'weight.quant_map' has {stats['quant_map'].numel()} entries, expected 16")
    nested = [k for k in ("nested_absmax", "nested_quant_map") if k in stats]
    nested_meta = "nested_blocksize" in meta
    if nested and len(nested) != 2:
        missing = ({"nested_absmax", "nested_quant_map"} - set(nested)).pop()
        raise fail(f"missing tensor 'weight.{missing}' (double-quantized weights need both nested tensors)")
    if bool(nested) != nested_meta:
        raise fail(
            "quant state and tensors disagree on double quantization: "
            + ("nested tensors present but no nested_* entries in the quant state" if nested else
               "the quant state is nested but 'weight.nested_absmax' / 'weight.nested_quant_map' are missing")
        )
    if nested:
        nested_blocks = math.ceil(blocks / int(meta["nested_blocksize"]))
        if stats["nested_absmax"].numel() != nested_blocks:
            raise fail(
                f"tensor 'weight.nested_absmax' has {stats['nested_absmax'].numel()} scales, expected {nested_blocks}"
            )
        if stats["nested_quant_map"].numel() != 256:
            raise fail(
                f"tensor 'weight.nested_quant_map' has {stats['nested_quant_map'].numel()} entries, expected 256"
            )
    check_4bit_statistics(name, stats, nested=bool(nested))


def _quantize_param(param: bnb.nn.Params4bit, device: torch.device) -> bnb.nn.Params4bit:
    """``param._quantize(device)``, through qplug's compiled CPU quantizer where it applies.

    :mod:`qplug_bitsandbytes.fast4bit` writes the very bytes bitsandbytes writes, several times
    faster; wherever it cannot run (GPU tensors, no C compiler, ``QPLUG_BNB_FAST4BIT=0``) it calls
    bitsandbytes' own quantizer.
    """
    if torch.device(device).type != "cpu" or not fast4bit.fast_path_available(param.data.dtype):
        return param._quantize(device)
    data = param.data.contiguous().to(device)
    packed, state = fast4bit.quantize_4bit(
        data, blocksize=param.blocksize, compress_statistics=param.compress_statistics,
        quant_type=param.quant_type, quant_storage=param.quant_storage,
    )
    # The same bookkeeping bitsandbytes' Params4bit._quantize does after its quantize_4bit call.
    param.data = packed
    param.quant_state = state
    if param.module is not None:
        param.module.quant_state = state
    param.bnb_quantized = True
    return param


def _linear_args(linear: nn.Linear) -> tuple[int, int, bool]:
    return linear.in_features, linear.out_features, linear.bias is not None


def quantize_4bit(
    linear: nn.Linear,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = torch.float32,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int = 64,
) -> Linear4bit:
    """A :class:`Linear4bit` holding ``linear``'s weight quantized (on its device) and its bias.

    Quantization is bitsandbytes' ``quantize_4bit`` through ``Params4bit``, exactly as
    transformers does it when loading with ``load_in_4bit``.
    """
    in_features, out_features, has_bias = _linear_args(linear)
    module = Linear4bit(
        in_features,
        out_features,
        bias=has_bias,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    weight = linear.weight.detach()
    param = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=module,
    )
    module.weight = _quantize_param(param, weight.device)
    if has_bias:
        module.bias = linear.bias
    module.requires_grad_(False)
    module.train(linear.training)
    return module


def empty_4bit(
    in_features: int,
    out_features: int,
    bias: bool,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = torch.float32,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> Linear4bit:
    """A :class:`Linear4bit` on the meta device, to be filled by ``load_state_dict(assign=True)``."""
    module = Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    module.requires_grad_(False)
    return module


# --------------------------------------------------------------------------------------
# 8-bit
# --------------------------------------------------------------------------------------


def _bnb_forward_int8(layer: Linear8bitLt, layout: None, x: torch.Tensor) -> torch.Tensor:
    return bnb.nn.Linear8bitLt.forward(layer, x)


_BNB_INT8 = Kernel(
    "bitsandbytes", refuses=_never, prepare=_bnb_prepare, forward=_bnb_forward_int8,
    description="bitsandbytes' own Linear8bitLt forward (int8 inputs with float outliers; float weights in training)",
)
_QPLUG_INT8_CPU = Kernel(
    "qplug-int8-cpu", refuses=cpu_linear.refuses_int8, prepare=cpu_linear.prepare_int8,
    forward=cpu_linear.forward_int8,
    description="qplug's C GEMV (decode) / blocked dequantize + matmul (prefill) on the stored int8 rows",
)

_QPLUG_LLM_INT8_CPU = Kernel(
    "qplug-llm-int8-cpu", refuses=cpu_linear.refuses_int8, prepare=cpu_linear.prepare_int8,
    forward=cpu_linear.forward_int8_inference, opt_in=True,
    rounds_inputs="decode inputs rounded to float16, then to int8 per row (outlier columns in float)",
    description="bitsandbytes' inference arithmetic (int8 inputs, float outliers) in qplug's C int8 x int8 GEMV "
                "for decode; prefill as qplug-int8-cpu: opt-in",
)


class Linear8bitLt(KernelLayer, bnb.nn.Linear8bitLt):
    """bitsandbytes ``Linear8bitLt`` that loads a checkpoint by assignment (meta device), with qplug's
    kernel choice: ``qplug-int8-cpu`` (:mod:`qplug_bitsandbytes.cpu_linear`), then ``bitsandbytes``; the opt-in
    ``qplug-llm-int8-cpu`` runs bitsandbytes' inference arithmetic in qplug's C (decode).
    """

    kernels = (_QPLUG_INT8_CPU, _BNB_INT8, _QPLUG_LLM_INT8_CPU)
    qplug_disk_offload_refusal = "bitsandbytes' Int8Params lose their scales (SCB) when accelerate reads them back"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_kernel(x)

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """bitsandbytes' ``int8_vectorwise_dequant`` of the weight (float weights as they are), in ``dtype``."""
        if self.state.has_fp16_weights:
            return self.weight.detach().to(dtype)
        return bnb.functional.int8_vectorwise_dequant(self.weight.data, self._scb()).to(dtype)

    def _scb(self) -> torch.Tensor | None:
        scb = getattr(self.weight, "SCB", None)
        return scb if scb is not None else self.state.SCB

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # nn.Module._apply (behind .cuda(), .cpu(), .to()) swaps the weight's .data but leaves the
        # int8 matrix (CB) and row scales (SCB) that bitsandbytes' matmul reads from
        # `weight` or `state` on the old device; make them follow the weight.
        super()._apply(fn, recurse)  # KernelLayer's: drops the run-time layout
        if self.state.has_fp16_weights:
            return self
        weight = self.weight
        for holder in (weight, self.state):
            if getattr(holder, "CB", None) is not None:
                holder.CB = weight.data
            scb = getattr(holder, "SCB", None)
            if scb is not None and scb.device != weight.device:
                holder.SCB = scb.to(weight.device)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        weight_key, scb_key = prefix + "weight", prefix + "SCB"
        name = _module_name(prefix)
        weight_format = state_dict.pop(prefix + "weight_format", None)
        if weight_format is not None:
            _check_weight_format(name, weight_format)
        weight = state_dict.pop(weight_key, None)
        scb = state_dict.pop(scb_key, None)
        # (bitsandbytes' own pre-hook sees no weight now and leaves the dict alone.)
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight is None:
            if scb is not None:
                raise QuantStateError(f"module {name!r}: the state dict has 'SCB' but no 'weight'")
            return
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise QuantStateError(
                f"module {name!r}: tensor 'weight' has shape {list(weight.shape)}, expected {list(expected)}"
            )
        if weight.is_floating_point():
            if scb is not None:
                raise QuantStateError(
                    f"module {name!r}: 'SCB' given with a {weight.dtype} weight; an 8-bit checkpoint stores int8"
                )
            self._set_weight_from_float(weight)
            return
        if weight.dtype != torch.int8:
            raise QuantStateError(f"module {name!r}: tensor 'weight' is {weight.dtype}, expected torch.int8")
        if scb is None:
            raise QuantStateError(
                f"module {name!r}: missing tensor 'SCB' (the row scales of the int8 weight)"
            )
        if tuple(scb.shape) != (self.out_features,):
            raise QuantStateError(
                f"module {name!r}: tensor 'SCB' has shape {list(scb.shape)}, expected [{self.out_features}]"
            )
        from qplug.checks import check_tensor  # cheap content check: finite floating-point row scales

        check_tensor(prefix + "SCB", scb, floating=True, finite=True)
        self.weight = bnb.nn.Int8Params(
            weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb
        )
        self.state.has_fp16_weights = False
        self.state.CB = None
        self.state.SCB = None
        self.reset_kernel()

    def _set_weight_from_float(self, weight: torch.Tensor) -> None:
        has_fp16 = self.state.has_fp16_weights
        quantized = None if has_fp16 else fast8bit.quantize_weight(weight)
        if quantized is not None:  # the bytes Int8Params._quantize writes, from qplug's CPU kernel
            CB, SCB = quantized
            self.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        else:
            param = bnb.nn.Int8Params(weight.detach(), requires_grad=has_fp16, has_fp16_weights=has_fp16)
            self.weight = param if has_fp16 else param._quantize(weight.device)
        self.state.CB = None
        self.state.SCB = None
        self.reset_kernel()


def _check_weight_format(name: str, weight_format: Any) -> None:
    """bitsandbytes >= 0.45 writes only row-major int8 weights: format 0 / "row"."""
    value = weight_format.item() if isinstance(weight_format, torch.Tensor) else weight_format
    if value not in (0, "row"):
        raise QuantStateError(
            f"module {name!r}: tensor 'weight_format' is {value!r}; only row-major int8 weights "
            "(weight_format 0, \"row\") are supported"
        )


def quantize_8bit(
    linear: nn.Linear,
    *,
    threshold: float = 6.0,
    has_fp16_weights: bool = False,
) -> Linear8bitLt:
    """A :class:`Linear8bitLt` holding ``linear``'s weight quantized (LLM.int8) and its bias."""
    in_features, out_features, has_bias = _linear_args(linear)
    module = Linear8bitLt(
        in_features,
        out_features,
        bias=has_bias,
        has_fp16_weights=has_fp16_weights,
        threshold=threshold,
        device="meta",
    )
    module._set_weight_from_float(linear.weight)
    if has_bias:
        module.bias = linear.bias
    module.requires_grad_(has_fp16_weights)
    if has_bias:
        module.bias.requires_grad_(False)
    module.train(linear.training)
    module.qplug_dtype = linear.weight.dtype
    return module


def empty_8bit(
    in_features: int,
    out_features: int,
    bias: bool,
    *,
    threshold: float = 6.0,
    has_fp16_weights: bool = False,
) -> Linear8bitLt:
    """A :class:`Linear8bitLt` on the meta device, to be filled by ``load_state_dict(assign=True)``."""
    module = Linear8bitLt(
        in_features,
        out_features,
        bias=bias,
        has_fp16_weights=has_fp16_weights,
        threshold=threshold,
        device="meta",
    )
    module.requires_grad_(False)
    return module


# --------------------------------------------------------------------------------------
# dequantization and measurement
# --------------------------------------------------------------------------------------


def bnb_dequantize_4bit(data: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(data, state)``, through bitsandbytes' portable torch
    implementation where its native CPU one is wrong.

    bitsandbytes 0.50's native CPU dequantization (the AVX-512 build used below blocksize 2048) gives
    wrong values when a row's length is not a multiple of the blocksize (blocks then straddle rows;
    e.g. NF4 blocksize 1024 on a 5632-wide down projection). bitsandbytes' own default-backend code
    (``_dequantize_4bit_compute``, which it uses itself for larger blocksizes and odd shapes) is right.
    """
    if data.device.type != "cpu" or len(state.shape) != 2 or int(state.shape[1]) % int(state.blocksize) == 0:
        return bnb.functional.dequantize_4bit(data, state)
    # bitsandbytes' own arithmetic (its default backend's, spelled out here because that function is
    # torch.compile'd: seconds of compilation per shape): code[q] * absmax in float32, then the dtype.
    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit decodes it
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    n = math.prod(int(d) for d in state.shape)
    flat = data.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].int()
    scales = absmax.float().repeat_interleave(int(state.blocksize))[:n]
    return (state.code.float()[codes] * scales).reshape(state.shape).to(state.dtype)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a 4-bit or 8-bit module's weight.

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` on the canonical data (dtype: the
    weight's dtype when it was quantized).  8-bit: ``int8_vectorwise_dequant`` (float32),
    cast to the original dtype when qplug quantized the module.
    """
    if isinstance(module, bnb.nn.Linear4bit):
        if isinstance(module, Linear4bit):
            data, state = module.canonical_weight()
        else:
            if _is_cpu_packed(module.weight.quant_state):
                raise QuantStateError(
                    f"{type(module).__name__}: weight repacked for the CPU kernel; its original scales are lost"
                )
            data, state = module.weight.data, module.weight.quant_state
        return bnb_dequantize_4bit(data, state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        if module.state.has_fp16_weights:
            return module.weight.data.clone()
        scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        cb = module.weight.data
        weight = bnb.functional.int8_vectorwise_dequant(cb, scb)
        dtype = getattr(module, "qplug_dtype", None)
        return weight.to(dtype) if dtype is not None else weight
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes Linear4bit or Linear8bitLt")


def dequantize_module(module: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` whose weight is :func:`dequantized_weight` and whose bias is kept."""
    weight = dequantized_weight(module)
    linear = nn.Linear(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        device="meta",
        dtype=weight.dtype,
    )
    linear.weight = nn.Parameter(weight, requires_grad=True)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=True)
    linear.train(module.training)
    return linear


def quantized_bits(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """``(bits stored, parameters quantized)`` over bitsandbytes 4/8-bit modules' weights.

    Counts every tensor a checkpoint stores for the weight (data, scales, nested scales,
    quant maps and the packed quant-state blob), i.e. what ``state_dict`` exports.
    """
    bits = params = 0
    for module in modules:
        prefix = "w."
        sd: dict[str, torch.Tensor] = {}
        module._save_to_state_dict(sd, prefix, keep_vars=False)
        for key, tensor in sd.items():
            if key == prefix + "bias":
                continue
            bits += tensor.numel() * tensor.element_size() * 8
        params += module.in_features * module.out_features
    return bits, params
