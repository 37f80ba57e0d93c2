"""The plain form quantized layers convert through, and the records the conversion hooks exchange.

A layer of any weight-only integer format (GPTQ, AWQ, compressed-tensors, ...) reads into a
:class:`PlainLayer` (an affine :class:`qplug.int_kernels.IntWeight`, its bias, whether the format
declares one group per row) and is written back from one as a :class:`WrittenLayer`. Formats that
store their codes in the same packed words (:class:`PackedCodes`: GPTQ, compressed-tensors
``pack-quantized``, AWQ GEMV) hand the words over as they are, so converting between them copies
words instead of unpacking and packing every code. Kept apart from
:mod:`qplug.conversion` (which drives a whole conversion) so the hook specifications can name these
types without importing the public API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from qplug.errors import ConversionError

if TYPE_CHECKING:
    import torch

    from qplug.int_kernels import IntWeight

__all__ = ["PackedCodes", "PlainLayer", "WrittenLayer", "exact_cast", "refuse"]


@attrs.frozen(eq=False)
class PackedCodes:
    """Integer codes packed the way several formats store them, so a conversion between two of them
    copies words instead of unpacking and packing every code.

    ``words`` is int32 ``[out, in * bits / 32]``: each row's codes in checkpoint column order, unsigned,
    value ``k`` of a word in bits ``bits*k .. bits*k + bits - 1`` (lowest bits first, little-endian
    words). GPTQ's ``qweight`` is these words transposed, compressed-tensors' ``weight_packed`` and
    AWQ GEMV's ``qweight`` are these words as they are.

    :param words: the words (any strides: a transposed view is fine).
    :param bits: 2, 4 or 8, the widths whose fields never straddle a byte.
    """

    #: the widths this layout holds
    BITS = (2, 4, 8)

    words: torch.Tensor
    bits: int

    def __attrs_post_init__(self) -> None:
        import torch

        if self.bits not in self.BITS:
            raise ValueError(f"PackedCodes holds {list(self.BITS)}-bit codes, not {self.bits}-bit ones")
        if self.words.dtype != torch.int32 or self.words.dim() != 2:
            raise TypeError(f"PackedCodes.words must be 2-D int32, got {self.words.dim()}-D {self.words.dtype}")

    @property
    def in_features(self) -> int:
        return self.words.shape[1] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    def contiguous_words(self) -> torch.Tensor:
        """:attr:`words` as a contiguous tensor (compressed-tensors' ``weight_packed``, AWQ GEMV's ``qweight``);
        words held transposed (GPTQ's) are copied by :func:`qplug.native.transposed`, by tiles."""
        from qplug.native import transposed

        return self.words if self.words.is_contiguous() else transposed(self.words.t())

    def transposed_words(self, *, in_place: bool = False) -> torch.Tensor:
        """The words transposed, ``[in * bits / 32, out]`` contiguous: GPTQ's ``qweight``.

        :param in_place: in the words' own memory where they are contiguous (:func:`qplug.native.transposed`):
            afterwards :attr:`words` no longer holds these codes. Only for words the caller owns and drops
            (see :attr:`PlainLayer.reusable`).
        """
        from qplug.native import transposed

        return transposed(self.words, in_place=in_place)

    @classmethod
    def pack(cls, q: torch.Tensor, bits: int) -> PackedCodes:
        """Pack uint8 codes ``[out, in]`` (``in`` a multiple of ``32 / bits``), refusing a code of ``2**bits`` or
        more, which would overwrite its neighbours."""
        import torch

        if bits not in cls.BITS:
            raise ValueError(f"PackedCodes holds {list(cls.BITS)}-bit codes, not {bits}-bit ones")
        out_f, in_f = q.shape
        if q.dtype != torch.uint8 or in_f % (32 // bits):
            raise ValueError(f"cannot pack {q.dtype} codes of {in_f} columns at {bits} bits: uint8 codes in whole "
                             f"words ({32 // bits} a word) only")
        if bits < 8 and q.numel() and int(q.max()) >> bits:
            raise ValueError(f"codes to pack at {bits} bits must lie in [0, {(1 << bits) - 1}], got {int(q.max())}")
        per_byte = 8 // bits
        fields = q.contiguous().view(out_f, in_f // per_byte, per_byte)
        packed = fields[..., 0].clone()
        for k in range(1, per_byte):
            packed |= fields[..., k] << (bits * k)
        return cls(packed.contiguous().reshape(-1).view(torch.int32).view(out_f, -1), bits)

    def unpack(self) -> torch.Tensor:
        """The codes, uint8 ``[out, in]`` in checkpoint column order."""
        import torch

        # [out, in * bits / 8], little-endian bytes (through one dimension: a contiguous tensor may have any
        # stride along a dimension of size 1)
        data = self.contiguous_words().reshape(-1).view(torch.uint8).view(self.out_features, -1)
        if self.bits == 8:
            return data
        mask = (1 << self.bits) - 1
        fields = [data & mask, *((data >> (self.bits * k)) & mask for k in range(1, 8 // self.bits))]
        return torch.stack(fields, dim=-1).view(self.out_features, self.in_features)


class PlainLayer:
    """One quantized layer in the plain affine integer form every format converts through.

    Built from an :class:`qplug.int_kernels.IntWeight` (``PlainLayer(weight, bias, channelwise=...)``)
    or, by a format whose codes are :class:`PackedCodes`, from its packed words
    (:meth:`from_packed`): then :attr:`weight` unpacks them only when a target asks for it, and a
    target that stores the same words takes them from :meth:`packed_codes` as they are. Zero points
    packed along the output rows (compressed-tensors' ``weight_zero_point``, GPTQ's ``qzeros``) may be
    handed over the same way (:meth:`packed_zeros`); :attr:`zero` unpacks them on first use.

    :param weight: codes, scales and zero points (:class:`qplug.int_kernels.IntWeight`: ``q`` in run-time
        column order, ``perm`` the act-order permutation or ``None``).
    :param bias: the layer's bias as the checkpoint stores it, or ``None``.
    :param channelwise: the source format declares one group per row (GPTQ ``group_size=-1``,
        compressed-tensors' ``channel`` strategy), which the target's settings repeat.
    """

    #: ``True`` when this layer's tensors were read for one write alone and are dropped after it (:func:`qplug.convert`
    #: sets it after ``read_int_layer``): the target may then build its tensors in their memory (GPTQ transposes
    #: the packed words in place), after which they no longer hold the source's values.
    reusable: bool = False

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None, channelwise: bool = False) -> None:
        self._weight: IntWeight | None = weight
        self._packed: PackedCodes | None = None
        self._symmetric: bool | None = None
        self._packed_zeros: PackedCodes | None = None
        self.bias = bias
        self.channelwise = channelwise
        #: scales ``[out, groups]``, bits, input columns per group, the act-order permutation (``None``
        #: without): as in :attr:`weight`, without unpacking its codes
        self.scale, self._zero, self.bits = weight.scale, weight.zero, weight.bits
        self.columns_per_group, self.perm = weight.group_size, weight.perm

    @classmethod
    def from_packed(cls, codes: PackedCodes, scale: torch.Tensor, zero: torch.Tensor | PackedCodes,
                    columns_per_group: int, *, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    channelwise: bool = False) -> PlainLayer:
        """A layer whose codes stay packed until a target needs them unpacked.

        :param codes: the codes in checkpoint column order.
        :param scale: ``[out, groups]``.
        :param zero: integer zero points ``[out, groups]``; or, packed as they are stored along the output
            rows, :class:`PackedCodes` of the transposed zero points ``[groups, out]`` (``bits`` as the codes,
            ``out`` a whole number of words): :attr:`zero` then unpacks them (int16) only when asked.
        :param columns_per_group: input columns per group (``in_features`` for one group per row).
        :param perm: the act-order permutation (run-time column ``j`` is checkpoint column ``perm[j]``).
        """
        import math

        out_f, in_f = codes.out_features, codes.in_features
        groups = math.ceil(in_f / columns_per_group)
        packed_zeros = zero if isinstance(zero, PackedCodes) else None
        shapes = [("scale", tuple(scale.shape), (out_f, groups))]
        if packed_zeros is None:
            shapes.append(("zero", tuple(zero.shape), (out_f, groups)))
        elif packed_zeros.bits != codes.bits or out_f * codes.bits % 32:  # a partial last word: padding fields
            raise ValueError(f"PlainLayer zero points packed at {packed_zeros.bits} bits for {out_f} rows of "
                             f"{codes.bits}-bit codes: they must be {codes.bits}-bit, in whole words")
        else:
            shapes.append(("packed zero", tuple(packed_zeros.words.shape), (groups, out_f * codes.bits // 32)))
        for what, have, want in shapes:
            if have != want:
                raise ValueError(f"PlainLayer {what} has shape {have}, expected {want} "
                                 f"for {out_f}x{in_f} codes and {columns_per_group} columns per group")
        if perm is not None and tuple(perm.shape) != (in_f,):
            raise ValueError(f"PlainLayer perm has shape {tuple(perm.shape)}, expected {(in_f,)}")
        layer = cls.__new__(cls)
        layer._weight, layer._packed, layer._symmetric = None, codes, None
        layer.bias, layer.channelwise = bias, channelwise
        layer.scale, layer.bits = scale, codes.bits
        layer._zero, layer._packed_zeros = (None, packed_zeros) if packed_zeros is not None else (zero, None)
        layer.columns_per_group, layer.perm = columns_per_group, perm
        return layer

    @property
    def zero(self) -> torch.Tensor:
        """Integer zero points ``[out, groups]`` (zero points given packed are unpacked on first use, as int16)."""
        if self._zero is None:
            import torch

            self._zero = self._packed_zeros.unpack().t().to(torch.int16).contiguous()
        return self._zero

    def packed_zeros(self) -> PackedCodes | None:
        """The zero points as the source packed them (:class:`PackedCodes` of ``zero`` transposed, ``[groups,
        out]``: GPTQ's ``qzeros`` layout), or ``None`` where the source gave them unpacked."""
        return self._packed_zeros

    @property
    def weight(self) -> IntWeight:
        """The :class:`qplug.int_kernels.IntWeight` (packed codes are unpacked on first use, then kept)."""
        if self._weight is None:
            from qplug.int_kernels import IntWeight

            q = self._packed.unpack()
            q = q.contiguous() if self.perm is None else q.index_select(1, self.perm).contiguous()
            self._weight = IntWeight(q, self.scale, self.zero, self.bits, self.columns_per_group, self.perm)
        return self._weight

    def packed_codes(self) -> PackedCodes | None:
        """The codes as :class:`PackedCodes` (packed on first use where the source gave them unpacked), or
        ``None`` for widths that layout does not hold (3 bits) or rows that fill no whole word."""
        if self._packed is None:
            if self.bits not in PackedCodes.BITS or self.in_features % (32 // self.bits):
                return None
            self._packed = PackedCodes.pack(self.checkpoint_order()[0], self.bits)
        return self._packed

    @property
    def in_features(self) -> int:
        return self._packed.in_features if self._packed is not None else self._weight.q.shape[1]

    @property
    def out_features(self) -> int:
        return self.scale.shape[0]

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is ``2**(bits-1)``, the one symmetric schemes imply without storing it."""
        if self._symmetric is None:  # a pass over the zero points, which writers ask about more than once
            if self._zero is None:  # packed: every word holds 2**(bits-1) in each field
                self._symmetric = bool((self._packed_zeros.words == _repeated_field(1 << (self.bits - 1),
                                                                                     self.bits)).all())
            else:
                self._symmetric = bool((self.zero == 1 << (self.bits - 1)).all())
        return self._symmetric

    @property
    def act_order(self) -> bool:
        """Whether the groups are not contiguous runs of input columns (GPTQ ``desc_act``)."""
        return self.perm is not None

    @property
    def group_size(self) -> int:
        """The group size a format declares: ``-1`` for one group per row."""
        return -1 if self.channelwise else self.columns_per_group

    def check_zeros_fit(self, name: str, to: str) -> None:
        """Refuse zero points outside ``[0, 2**bits)``, which a format storing them in ``bits``-wide fields
        would wrap around."""
        import torch

        if self._zero is None or not self.zero.numel():  # packed zero points: `bits`-wide fields always fit
            return
        low, high = (int(v) for v in torch.aminmax(self.zero))
        top = (1 << self.bits) - 1
        if low < 0 or high > top:
            raise refuse(name, to, f"its zero points span [{low}, {high}], and {to} stores "
                                   f"{self.bits}-bit ones in [0, {top}]")

    def group_index(self) -> torch.Tensor | None:
        """``g_idx`` (int32 ``[in]``, each checkpoint column's group) for act-order, else ``None``."""
        import torch

        if self.perm is None:
            return None
        n = self.perm.numel()
        g_idx = torch.empty(n, dtype=torch.int32, device=self.perm.device)
        g_idx[self.perm] = (torch.arange(n, device=self.perm.device) // self.columns_per_group).to(torch.int32)
        return g_idx

    def checkpoint_order(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(codes [out, in] in checkpoint column order, g_idx)``; ``g_idx`` (int32, each column's group)
        is ``None`` without act-order."""
        import torch

        if self._weight is None:  # only packed: unpack them (in checkpoint order already)
            return self._packed.unpack(), self.group_index()
        w = self._weight
        if w.perm is None:
            return w.q, None
        q = torch.empty_like(w.q)
        q[:, w.perm] = w.q
        return q, self.group_index()


def _repeated_field(value: int, bits: int) -> int:
    """An int32 word (signed, as torch compares it) holding ``value`` in each of its ``bits``-wide fields."""
    word = 0
    for k in range(32 // bits):
        word |= value << (bits * k)
    return word - (1 << 32) if word >= 1 << 31 else word


@attrs.frozen
class WrittenLayer:
    """What a target backend's ``write_int_layer`` gives back for one layer.

    :param tensors: the layer's checkpoint tensors by their name inside the layer (``"qweight"``), in
        the order to write them.
    :param settings: the config fields this layer needs in the target's ``quantization_config``
        (``{"bits": 4, "group_size": 128, "sym": False}``). Every layer must need the same ones; fields
        the caller set as options must agree.
    """

    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]


def refuse(name: str, to: str, why: str) -> ConversionError:
    """The error a ``write_int_layer`` implementation raises: ``cannot convert NAME to TO: WHY``."""
    return ConversionError(f"cannot convert {name} to {to}: {why}")


def exact_cast(tensor: torch.Tensor | None, dtype: torch.dtype, *, name: str, to: str,
               what: str) -> torch.Tensor | None:
    """``tensor`` in ``dtype``, refused (naming the layer and ``what``) when any value would change."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if not bool((cast.to(tensor.dtype) == tensor).all()):
        have, want = (str(d).removeprefix("torch.") for d in (tensor.dtype, dtype))
        raise refuse(name, to, f"its {have} {what} do not all fit {want} exactly ({to} stores {want}; converting "
                               "would change the weights)")
    return cast
