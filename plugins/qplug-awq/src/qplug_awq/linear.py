"""``AwqLinear``: an ``nn.Module`` holding AWQ checkpoint tensors in their exact layout.

Its buffers carry the names, shapes and dtypes that autoawq's ``WQLinear_GEMM`` /
``WQLinear_GEMV`` (and transformers) save, so ``state_dict()`` is an AWQ checkpoint, byte for
byte after any number of forwards and moves, and an AWQ checkpoint loads into it.

The forward runs on one of :attr:`AwqLinear.kernels`, chosen per device and input dtype by
:mod:`qplug.kernels`: autoawq's own CUDA module where it passes its probe
(:mod:`qplug_awq.autoawq`), torch's int4 tinygemm (CUDA; CPU for bfloat16 inputs), and otherwise a
blocked dequantize-and-multiply that never holds the whole float weight (:mod:`qplug.int_kernels`).
``dequant-cached`` (opt-in: ``qplug.set_kernel(model, "dequant-cached")``, or
:func:`set_weight_cache`) keeps a full-precision copy of the weight instead.
"""

from __future__ import annotations

import torch
from torch import nn

from qplug import int_kernels, native
from qplug.errors import IncompatibleModelError
from qplug.kernels import KernelLayer
from qplug.plain_layers import PackedCodes

from .autoawq import AUTOAWQ
from .packing import (
    AWQ_ORDER,
    PackingError,
    _check_range,
    _unpack_last,
    dequantize_unpacked,
    gemv_zeros_width,
    pack_gemm_zeros,
    pack_gemv_zeros,
    unpack_gemm,
    unpack_gemv,
)
from .quant import quantize_weight

__all__ = ["VERSIONS", "AwqLinear", "set_weight_cache"]

#: layouts AwqLinear stores (the GEMV_fast, exllama and ipex layouts are repacks made at load time by their kernels)
VERSIONS = ("gemm", "gemv")


class AwqLinear(KernelLayer, nn.Module):
    """A linear layer with 4-bit AWQ weights.

    :param in_features: input size (a multiple of ``group_size`` and of 8).
    :param out_features: output size (a multiple of 8).
    :param bits: weight bits; AWQ layouts define 4 only.
    :param group_size: input channels per quantisation group; ``-1`` for one group per row.
    :param version: ``"gemm"`` or ``"gemv"``, the checkpoint layout.
    :param bias: whether the layer has a bias (stored as float16, like autoawq).
    :param cache_weight: run on the opt-in ``dequant-cached`` kernel (a full-precision copy of the weight).
    :param kernel: one of :attr:`kernels` by name to insist on (like :func:`qplug.set_kernel`);
        ``None`` or ``"auto"``: choose per device and dtype.
    :param device: where to allocate the (zero) buffers; ``"meta"`` for a skeleton that
        ``load_state_dict(..., assign=True)`` fills.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int = 128,
        version: str = "gemm",
        bias: bool = True,
        device: torch.device | str | None = None,
        cache_weight: bool = False,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        names = [k.name for k in self.kernels]
        if kernel not in (None, "auto", *names):
            raise IncompatibleModelError(f"kernel={kernel!r}: expected None, 'auto' or one of {names}")
        version = str(version).lower()
        if version not in VERSIONS:
            raise IncompatibleModelError(f"version={version!r}: AwqLinear stores one of {list(VERSIONS)}")
        if bits != 4:
            raise IncompatibleModelError(f"bits={bits!r}: AWQ layouts are defined for 4-bit weights only")
        group_size = in_features if group_size in (-1, 0) else group_size
        if group_size <= 0 or in_features % group_size:
            raise IncompatibleModelError(f"group_size={group_size} must divide in_features={in_features}")
        per_word = 32 // bits
        if out_features % per_word or in_features % per_word:
            raise IncompatibleModelError(
                f"in_features={in_features} and out_features={out_features} must be multiples of {per_word}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.version = version
        self.kernel_request = None if kernel == "auto" else kernel
        if cache_weight:
            self.cache_weight = True
        groups = in_features // group_size
        for name, shape, dtype in self._layout(groups):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None

    kernels = (
        AUTOAWQ,
        int_kernels.TINYGEMM_INT4_CUDA,
        int_kernels.TINYGEMM_INT4_CPU,
        int_kernels.QPLUG_INT4_CPU,
        int_kernels.DEQUANT_BLOCKED,
        int_kernels.QPLUG_INT4_W4A8_CPU,
        int_kernels.DEQUANT_CACHED,
    )

    # ------------------------------------------------------------------ layout
    def _layout(self, groups: int) -> list[tuple[str, tuple[int, int], torch.dtype]]:
        per_word = 32 // self.bits
        if self.version == "gemm":
            return [
                ("qweight", (self.in_features, self.out_features // per_word), torch.int32),
                ("qzeros", (groups, self.out_features // per_word), torch.int32),
                ("scales", (groups, self.out_features), torch.float16),
            ]
        width = gemv_zeros_width(self.in_features, self.group_size, self.bits)
        return [
            ("qweight", (self.out_features, self.in_features // per_word), torch.int32),
            ("qzeros", (self.out_features, width), torch.int32),
            ("scales", (self.out_features, width * per_word), torch.float16),
        ]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        groups = self.in_features // self.group_size
        for name, shape, dtype in self._layout(groups):
            key = prefix + name
            if key in state_dict:
                t = state_dict[key]
                if tuple(t.shape) != shape:
                    raise PackingError(
                        f"{key}: shape {tuple(t.shape)} does not match the AWQ {self.version.upper()} layout "
                        f"{shape} for in_features={self.in_features}, out_features={self.out_features}, "
                        f"group_size={self.group_size}"
                    )
                if dtype == torch.int32 and t.dtype != torch.int32:
                    raise PackingError(f"{key}: packed tensors must be int32, got {t.dtype}")
        # Cheap content check (qplug.checks): the scales are finite floating-point numbers.
        from qplug.checks import check_tensor

        check_tensor(prefix + "scales", state_dict.get(prefix + "scales"), floating=True, finite=True)
        self.reset_kernel()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------ construction
    @classmethod
    def from_unpacked(
        cls,
        iweight: torch.Tensor | PackedCodes,
        izeros: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        group_size: int,
        bits: int = 4,
        version: str = "gemm",
    ) -> AwqLinear:
        """Build a layer from unpacked ``iweight [out, in]``, ``izeros``/``scales [out, groups]``.

        ``iweight`` may be the codes packed along ``in`` (:class:`qplug.plain_layers.PackedCodes`):
        GEMV stores those words as they are; GEMM, whose words run along ``out`` in AWQ's interleaved
        order, repacks them from their bytes.
        """
        if isinstance(iweight, PackedCodes):
            out_features, in_features = iweight.out_features, iweight.in_features
        else:
            out_features, in_features = iweight.shape
        layer = cls(
            in_features, out_features, bits=bits, group_size=group_size, version=version,
            bias=bias is not None, device="meta",
        )
        if layer.version == "gemm":
            layer.qzeros, layer.scales = pack_gemm_zeros(izeros, scales, bits)
        else:
            layer.qzeros, layer.scales = pack_gemv_zeros(izeros, scales, in_features, bits)
        if isinstance(iweight, PackedCodes) and layer.version == "gemv" and iweight.bits == bits:
            layer.qweight = iweight.contiguous_words()
        elif isinstance(iweight, PackedCodes):
            layer.qweight = layer.checkpoint_from_codes(iweight.unpack())["qweight"]
        else:
            _check_range("iweight", iweight, bits)  # a code of 16 or more would overwrite its neighbours
            layer.qweight = layer.checkpoint_from_codes(iweight.to(torch.uint8))["qweight"]
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        version: str = "gemm",
        kernel: str | None = None,
    ) -> AwqLinear:
        """Round-to-nearest quantise an ``nn.Linear`` (its weight as it is: AWQ scaling happens before)."""
        # autoawq quantises in float16: the stored fp16 scales are then exactly the ones the integers were made with
        w = linear.weight.detach().to(torch.float16)
        iweight, izeros, scales = quantize_weight(w, bits, group_size, zero_point)
        layer = cls.from_unpacked(
            iweight, izeros, scales, linear.bias, group_size=group_size, bits=bits, version=version
        )
        if kernel not in (None, "auto"):
            layer.kernel_request = kernel
        return layer.to(linear.weight.device)

    # ------------------------------------------------------------- dequantise
    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(iweight [out, in], izeros [out, groups], scales [out, groups])``."""
        if self.version == "gemm":
            return unpack_gemm(self.qweight, self.qzeros, self.scales, self.bits)
        return unpack_gemv(self.qweight, self.qzeros, self.scales, self.group_size, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` in ``dtype``: ``(q - z) * s`` as autoawq computes it."""
        return dequantize_unpacked(*self.unpack(), dtype=dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantised weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(self.dequantize(dtype).contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.to(dtype).clone(), requires_grad=False)
        return linear

    # ----------------------------------------------------------------- kernels
    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference weight for :mod:`qplug.kernels`: formed in float32, rounded once to ``dtype``."""
        return self.dequantize(torch.float32).to(dtype)

    def int_weight(self) -> int_kernels.IntWeight:
        """The plain integer form the kernels build their layouts from (new tensors, same device)."""
        # the codes straight from qweight's bytes (little-endian words, low nibble first): no int32 unpacking
        b = self.qweight.contiguous().reshape(-1).view(torch.uint8)  # through 1-D: any stride on a size-1 dim
        if self.version == "gemm":  # [in, out / 8] words; position k of a word holds column 8c + AWQ_ORDER[k]
            # bytes 0-3 of word (i, c) hold output rows (0, 2), (4, 6), (1, 3), (5, 7) of group c, low nibble
            # first: one transpose to [out / 8, 4, in], then whole rows of nibbles in AWQ_REVERSE_ORDER
            b = b.view(self.in_features, -1, 4).permute(1, 2, 0).contiguous()
            b0, b1, b2, b3 = b.unbind(1)
            q = torch.stack((b0 & 15, b2 & 15, b0 >> 4, b2 >> 4, b1 & 15, b3 & 15, b1 >> 4, b3 >> 4), dim=1)
            q = q.view(self.out_features, self.in_features)
        else:  # [out, in / 8] words, in order
            q = native.unpacked_nibbles(b).view(self.out_features, self.in_features)
        scales, izeros = self.int_weight_parts()
        return int_kernels.IntWeight(q.contiguous(), scales, izeros, self.bits, self.group_size)

    def int_weight_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`int_weight`'s ``(scale, zero)``, ``[out, groups]`` each, without its codes."""
        groups = self.in_features // self.group_size
        if self.version == "gemm":
            izeros, scales = _unpack_last(self.qzeros, self.bits, AWQ_ORDER).t(), self.scales.t()
        else:
            izeros, scales = _unpack_last(self.qzeros, self.bits, None)[:, :groups], self.scales[:, :groups]
        return scales, izeros.contiguous()

    def packed_codes(self) -> PackedCodes | None:
        """GEMV's ``qweight`` as :class:`qplug.plain_layers.PackedCodes` (the same words); ``None`` for GEMM, whose
        words run along ``out`` in AWQ's interleaved order."""
        return PackedCodes(self.qweight, self.bits) if self.version == "gemv" else None

    #: ``qweight`` holds nothing but the codes: a kernel that keeps them in its own packing drops it
    code_tensors = ("qweight",)

    def checkpoint_from_codes(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """``qweight`` from uint8 codes ``[out, in]``, bit for bit (the inverse of :meth:`int_weight`'s reading)."""
        if self.version == "gemm":  # [in, out / 8] words, position k holding column 8c + AWQ_ORDER[k]
            # whole rows of codes into the words' bytes (rows (0, 2), (4, 6), (1, 3), (5, 7) of each group of
            # eight, low nibble first), then one transpose to [in, out / 8, 4]: no per-element gather
            r = q.reshape(self.out_features // 8, 8, self.in_features).unbind(1)
            b = torch.stack((r[0] | r[2] << 4, r[4] | r[6] << 4, r[1] | r[3] << 4, r[5] | r[7] << 4), dim=2)
            b = b.permute(1, 0, 2).contiguous()  # [in, out / 8, 4]
            return {"qweight": b.view(torch.int32).squeeze(-1)}
        nib = q.reshape(self.out_features, -1, 8)  # [out, in / 8] words, in order
        b = nib[..., 0::2] | nib[..., 1::2] << 4  # low nibble first
        return {"qweight": b.contiguous().view(torch.int32).squeeze(-1)}

    # the old per-layer switch, kept for compatibility: on means the opt-in dequant-cached kernel
    cache_weight = int_kernels.CACHE_WEIGHT_SWITCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise IncompatibleModelError(f"input has {x.shape[-1]} features, this AwqLinear expects {self.in_features}")
        return self.run_kernel(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, version={self.version}"
        )


def set_weight_cache(model: nn.Module, enabled: bool = True) -> int:
    """Run every ``AwqLinear`` in ``model`` on ``dequant-cached`` (or choose again); return how many.

    Kept for old callers: ``qplug.set_kernel(model, "dequant-cached")`` does the same for every backend.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, AwqLinear):
            module.cache_weight = enabled
            count += 1
    return count
