"""``CompressedTensorsLinear``: a linear layer holding compressed-tensors checkpoint tensors as stored.

``pack-quantized`` (llm-compressor's format for W4A16 / W8A16)::

    weight_packed      int32 [out, in * bits / 32]  codes q + 2**(bits-1), packed along `in`, lowest bits first
    weight_scale       float [out, in / group_size] (strategy group), [out, 1] (channel) or [1] (tensor)
    weight_zero_point  asymmetric only: int32 [out * bits / 32, groups], zero points + 2**(bits-1) packed
                       along `out` (group, channel); int8 [1] unpacked (tensor)
    weight_shape       int64 [2]: (out, in)
    weight_g_idx       int32 [in], checkpoints made with activation order "group" (older releases)

``int-quantized`` / ``naive-quantized``: ``weight`` int8 ``[out, in]`` (the signed codes), ``weight_scale``
and, asymmetric, ``weight_zero_point`` int8 of the scale's shape. In every format
``w = (q - zero_point) * scale``, with ``scale`` and ``zero_point`` of input column ``i`` taken from its
group (``g_idx[i]`` where stored, else ``i // group_size``).

These tensors are what ``state_dict()`` returns, byte for byte, after any number of forwards and moves.
The forward runs on the shared affine-integer kernels of :mod:`qplug.int_kernels` (the same as GPTQ's and
AWQ's), chosen per device and dtype by :mod:`qplug.kernels`: the layer converts its packing to the plain
form (:meth:`CompressedTensorsLinear.int_weight`) and back (:meth:`~CompressedTensorsLinear.checkpoint_from_codes`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qplug import int_kernels, native
from qplug.errors import CheckpointError
from qplug.kernels import KernelLayer
from qplug.plain_layers import PackedCodes

__all__ = ["FORMATS", "CompressedTensorsLinear"]

#: the formats this layer stores
FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _unpack_bytes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Rows of int32 words ``[rows, words]`` -> uint8 ``[rows, count]`` of ``bits``-bit fields, lowest bits first.

    Read from the words' bytes (little-endian, as torch stores int32 on every platform it runs on here).
    """
    b = packed.contiguous().reshape(-1).view(torch.uint8).view(packed.shape[0], -1)
    if bits == 8:
        return b[:, :count]
    return native.unpacked_nibbles(b)[:, :count]  # C (SIMD) on the CPU: most of a layout's build was torch's stack


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[rows, n]`` fields below ``2**bits`` -> int32 words ``[rows, ceil(n * bits / 32)]`` (the inverse)."""
    rows, n = codes.shape
    per_word = 32 // bits
    pad = -n % per_word
    if pad:
        codes = torch.cat((codes, codes.new_zeros(rows, pad)), dim=1)
    if bits == 4:
        codes = codes[:, 0::2] | codes[:, 1::2] << 4
    # through one dimension: a [1, n] tensor counts as contiguous whatever its row stride
    return codes.contiguous().reshape(-1).view(torch.int32).reshape(rows, -1)


class CompressedTensorsLinear(KernelLayer, nn.Module):
    """A linear layer with int4/int8 compressed-tensors weights; see the module docstring.

    :param in_features: input size.
    :param out_features: output size.
    :param bits: 4 or 8.
    :param strategy: ``"group"``, ``"channel"`` or ``"tensor"``.
    :param group_size: inputs per group for strategy ``"group"`` (ignored otherwise).
    :param symmetric: no zero point stored (it is 0 in compressed-tensors' signed codes).
    :param format: ``"pack-quantized"``, ``"int-quantized"`` or ``"naive-quantized"``.
    :param g_idx: the checkpoint stores ``weight_g_idx`` (activation order "group").
    :param bias: whether the layer has a bias.
    :param scale_dtype: dtype of the (zero) scales allocated here; a loaded checkpoint keeps its own.
    :param device: where to allocate the buffers; ``"meta"`` for a skeleton that
        ``load_state_dict(..., assign=True)`` fills.
    """

    kernels = int_kernels.KERNELS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        strategy: str = "group",
        group_size: int | None = 128,
        symmetric: bool = True,
        format: str = "pack-quantized",
        g_idx: bool = False,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits!r}: CompressedTensorsLinear runs 4- and 8-bit weights")
        if strategy not in ("group", "channel", "tensor"):
            raise ValueError(f"strategy={strategy!r}: expected 'group', 'channel' or 'tensor'")
        if format not in FORMATS:
            raise ValueError(f"format={format!r}: expected one of {list(FORMATS)}")
        if strategy == "group":
            if not group_size or group_size <= 0 or in_features % group_size:
                raise ValueError(f"group_size={group_size!r} must be positive and divide in_features={in_features}")
        elif g_idx:
            raise ValueError(f"g_idx needs strategy 'group' (got {strategy!r})")
        per_word = 32 // bits
        if format == "pack-quantized" and in_features % per_word:
            raise ValueError(f"in_features={in_features} must be a multiple of {per_word} for {bits}-bit packing")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.strategy = strategy
        #: the kernels' group size: -1 (one group per row) for the channel and tensor strategies
        self.group_size = group_size if strategy == "group" else -1
        self.symmetric = symmetric
        self.format = format
        groups = in_features // group_size if strategy == "group" else 1
        scale_shape = (1,) if strategy == "tensor" else (out_features, groups)
        if format == "pack-quantized":
            self.register_buffer("weight_packed", torch.zeros(out_features, in_features // per_word, dtype=torch.int32,
                                                              device=device))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=scale_dtype, device=device))
        if not symmetric:
            if format == "pack-quantized" and strategy != "tensor":
                zp = torch.zeros(math.ceil(out_features / per_word), groups, dtype=torch.int32, device=device)
            else:
                zp = torch.zeros(scale_shape, dtype=torch.int8, device=device)
            self.register_buffer("weight_zero_point", zp)
        if format == "pack-quantized":
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                              device=device))
        if g_idx:
            self.register_buffer("weight_g_idx", torch.arange(in_features, dtype=torch.int32, device=device)
                                 // group_size)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device))
        else:
            self.bias = None

    @property
    def has_g_idx(self) -> bool:
        return "weight_g_idx" in self._buffers or "weight_g_idx" in self._released

    @property
    def offset(self) -> int:
        """What compressed-tensors adds to its signed codes to store them unsigned: ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_integers(
        cls,
        q: torch.Tensor | PackedCodes,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        *,
        bits: int,
        strategy: str,
        group_size: int | None = None,
        format: str = "pack-quantized",
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> CompressedTensorsLinear:
        """A layer from unsigned codes.

        :param q: uint8 (or any integer) ``[out, in]``, ``0 <= q < 2**bits``: compressed-tensors' signed
            codes plus ``2**(bits-1)``; or those codes packed (:class:`qplug.plain_layers.PackedCodes` of
            ``bits`` bits), which ``pack-quantized`` stores as they are.
        :param scale: ``[out, groups]`` (``[1]`` or ``[out, 1]`` for the tensor strategy), stored in its dtype.
        :param zero: unsigned zero points of ``scale``'s shape, ``None`` for symmetric weights (whose zero
            point is ``2**(bits-1)``).
        :param g_idx: int ``[in]``, each input column's group (activation order "group"), or ``None``.
        """
        if isinstance(q, PackedCodes):
            if q.bits != bits:
                raise ValueError(f"{q.bits}-bit packed codes for a {bits}-bit layer")
            out_features, in_features, device = q.out_features, q.in_features, q.words.device
        else:
            out_features, in_features = q.shape
            device = q.device
        layer = cls(in_features, out_features, bits=bits, strategy=strategy, group_size=group_size,
                    symmetric=zero is None, format=format, g_idx=g_idx is not None, bias=bias is not None,
                    scale_dtype=scale.dtype, device="meta")
        if isinstance(q, PackedCodes) and format == "pack-quantized":  # the same words: no unpacking
            layer.weight_packed = q.contiguous_words()
        else:
            q = q.unpack() if isinstance(q, PackedCodes) else q.to(torch.uint8)
            for name, tensor in layer.checkpoint_from_codes(q).items():
                setattr(layer, name, tensor)
        if strategy == "tensor":
            scale = scale.reshape(1)
        layer.weight_scale = scale.detach().clone().contiguous()
        if zero is not None:
            if strategy == "tensor":
                zero = zero.reshape(1)
            signed = zero.to(torch.int16) - layer.offset
            if format == "pack-quantized" and strategy != "tensor":
                # packed along `out`: the words of zero^T's rows, transposed back
                unsigned = (signed + layer.offset).to(torch.uint8)
                layer.weight_zero_point = _pack_bytes(unsigned.t(), bits).t().contiguous()
            else:
                layer.weight_zero_point = signed.to(torch.int8).contiguous()
        if format == "pack-quantized":
            layer.weight_shape = torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        if g_idx is not None:
            layer.weight_g_idx = g_idx.to(device=device, dtype=torch.int32).contiguous()
            layer.check_g_idx()
        if bias is not None:
            layer.bias = bias.detach().to(scale.dtype).clone()
        return layer

    # ------------------------------------------------------------------ loading
    def _expected(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        exp = {name: (tuple(t.shape), (t.dtype,)) for name, t in self._buffers.items() if t is not None}
        exp["weight_scale"] = (exp["weight_scale"][0], _FLOATS)
        if "weight_g_idx" in exp:
            exp["weight_g_idx"] = (exp["weight_g_idx"][0], (torch.int32, torch.int64))
        if "weight_shape" in exp:
            exp["weight_shape"] = (exp["weight_shape"][0], (torch.int64, torch.int32))
        if "bias" in exp:
            exp["bias"] = (exp["bias"][0], _FLOATS)
        return exp

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        where = prefix.rstrip(".") or type(self).__name__
        if self.bias is None and prefix + "bias" in state_dict:  # a checkpoint may carry a bias the model lacks
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=self.weight_scale.dtype,
                                                     device=self.weight_scale.device))
        for name, (shape, dtypes) in self._expected().items():
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{where}: tensor {prefix + name} has shape {tuple(t.shape)}, expected {shape} for a "
                    f"{self.bits}-bit {self.format} layer ({self.strategy}"
                    f"{f' {self.group_size}' if self.strategy == 'group' else ''}, "
                    f"{'symmetric' if self.symmetric else 'asymmetric'}) with in_features={self.in_features}, "
                    f"out_features={self.out_features}"
                )
            if t.dtype not in dtypes:
                raise CheckpointError(f"{where}: tensor {prefix + name} has dtype {t.dtype}, expected one of "
                                      f"{list(dtypes)}")
        shape = state_dict.get(prefix + "weight_shape")
        if shape is not None and shape.device.type != "meta" and shape.tolist() != [self.out_features,
                                                                                     self.in_features]:
            raise CheckpointError(f"{where}: {prefix}weight_shape is {shape.tolist()}, the model's layer is "
                                  f"[{self.out_features}, {self.in_features}]")
        from qplug.checks import check_tensor

        check_tensor(prefix + "weight_scale", state_dict.get(prefix + "weight_scale"), finite=True)
        groups = self.in_features // self.group_size if self.strategy == "group" else 1
        check_tensor(prefix + "weight_g_idx", state_dict.get(prefix + "weight_g_idx"), low=0, high=groups)
        self.reset_kernel()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight_g_idx" in state_dict:
            self.check_g_idx(where)

    def check_g_idx(self, name: str = "") -> None:
        """Raise unless ``weight_g_idx`` puts ``group_size`` input columns in each group."""
        g = getattr(self, "weight_g_idx", None)
        if g is None or g.device.type == "meta":
            return
        try:
            int_kernels.plain_from_g_idx(g, self.group_size)
        except ValueError as exc:
            raise CheckpointError(f"{name or 'compressed-tensors layer'}: weight_g_idx: {exc} "
                                  f"(group_size={self.group_size})") from None

    # ------------------------------------------------------------------ plain form
    def codes(self) -> torch.Tensor:
        """uint8 ``[out, in]``: compressed-tensors' signed codes plus ``2**(bits-1)``, in checkpoint column order."""
        if self.format == "pack-quantized":
            return _unpack_bytes(self.weight_packed, self.bits, self.in_features)
        return (self.weight.to(torch.int16) + self.offset).to(torch.uint8)

    def scales(self) -> torch.Tensor:
        """``[out, groups]`` (one group for the channel and tensor strategies), the checkpoint's dtype."""
        s = self.weight_scale
        return s.reshape(1, 1).expand(self.out_features, 1) if self.strategy == "tensor" else s

    def zeros(self) -> torch.Tensor:
        """Unsigned zero points ``[out, groups]`` (int16): ``2**(bits-1)`` for symmetric weights."""
        groups = self.scales().shape[1]
        if self.symmetric:
            return torch.full((self.out_features, groups), self.offset, dtype=torch.int16,
                              device=self.weight_scale.device)
        zp = self.weight_zero_point
        if self.strategy == "tensor":
            return (zp.to(torch.int16) + self.offset).reshape(1, 1).expand(self.out_features, 1)
        if self.format == "pack-quantized":  # packed along `out`: byte j of word (r, g) holds rows 8r + 2j, 8r + 2j + 1
            words, groups = zp.shape
            b = zp.contiguous().reshape(-1).view(torch.uint8).view(words, groups, 4)  # any size-1 stride
            if self.bits == 4:
                b = torch.stack((b & 15, b >> 4), dim=-1).view(words, groups, 8)
            rows = b.permute(0, 2, 1).reshape(-1, groups)
            return rows[: self.out_features].to(torch.int16)
        return zp.to(torch.int16) + self.offset

    def group_index(self) -> torch.Tensor:
        """Each input column's group (``weight_g_idx`` where stored)."""
        g = getattr(self, "weight_g_idx", None)
        if g is not None:
            return g.long()
        size = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.weight_scale.device) // size

    def int_weight(self) -> int_kernels.IntWeight:
        """The plain integer form the kernels build their layouts from (new tensors, same device)."""
        q = self.codes()
        scale, zero, group, perm = self.int_weight_parts()
        q = q.contiguous() if perm is None else q.index_select(1, perm).contiguous()
        return int_kernels.IntWeight(q, scale, zero, self.bits, group, perm)

    def int_weight_parts(self, *, zeros: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, int,
                                                               torch.Tensor | None]:
        """:meth:`int_weight` but its codes: ``(scale [out, groups], zero [out, groups], columns per group, perm)``;
        ``zero`` is ``None`` when ``zeros`` is false (a caller taking them packed)."""
        perm = None
        g = getattr(self, "weight_g_idx", None)
        if g is not None:
            perm = int_kernels.plain_from_g_idx(g, self.group_size)
        group = self.in_features if self.group_size == -1 else self.group_size
        return self.scales().contiguous(), self.zeros().contiguous() if zeros else None, group, perm

    def packed_zero_points(self) -> PackedCodes | None:
        """``weight_zero_point`` as :class:`qplug.plain_layers.PackedCodes` of the zero points transposed
        (``[groups, out]``, the same words seen transposed): for asymmetric ``pack-quantized`` group and channel
        layers whose rows fill whole words, else ``None``."""
        if (self.symmetric or self.format != "pack-quantized" or self.strategy == "tensor"
                or self.out_features % (32 // self.bits)):
            return None
        return PackedCodes(self.weight_zero_point.t(), self.bits)

    def packed_codes(self) -> PackedCodes | None:
        """``weight_packed`` as :class:`qplug.plain_layers.PackedCodes` (the same words), ``None`` for the unpacked
        formats."""
        return PackedCodes(self.weight_packed, self.bits) if self.format == "pack-quantized" else None

    @property
    def code_tensors(self) -> tuple[str, ...]:
        """The checkpoint tensor holding nothing but the codes: a kernel keeping them in its own packing drops it."""
        return ("weight_packed",) if self.format == "pack-quantized" else ("weight",)

    def checkpoint_from_codes(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The code tensor from uint8 codes ``[out, in]`` (checkpoint column order), bit for bit."""
        if self.format == "pack-quantized":
            return {"weight_packed": _pack_bytes(q, self.bits)}
        return {"weight": (q.to(torch.int16) - self.offset).to(torch.int8)}

    # ------------------------------------------------------------------ compute
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(q - zero_point) * scale`` ``[out, in]``: formed in float32, rounded once to ``dtype``
        (default: the scale's dtype, which is what compressed-tensors' own decompression gives)."""
        g = self.group_index()
        q = self.codes().float()
        z = self.zeros().float().index_select(1, g)
        s = self.scales().float().index_select(1, g)
        return ((q - z) * s).to(dtype or self.weight_scale.dtype)

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference weight (:meth:`dequantize_weight`), for :mod:`qplug.kernels`."""
        return self.dequantize_weight(dtype)

    # the per-layer switch for the opt-in dequant-cached kernel, as GPTQ's and AWQ's layers have it
    cache_weight = int_kernels.CACHE_WEIGHT_SWITCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this CompressedTensorsLinear expects "
                             f"{self.in_features}")
        return self.run_kernel(x)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (in the scale's dtype by default)."""
        dtype = dtype or self.weight_scale.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(self.dequantize_weight(dtype).contiguous(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        size = f" {self.group_size}" if self.strategy == "group" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, {self.strategy}{size}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"format={self.format}{', g_idx' if self.has_g_idx else ''}")
