"""qplug's reading and writing of compressed-tensors layouts, against the library's own code.

Property tests: for random weights, bit widths, strategies, symmetric or not, formats and dtypes,

* qplug's word packing is the library's ``pack_to_int32`` / ``unpack_from_int32`` (both packed dims);
* the tensors qplug writes for a layer are, key by key, what the library's compressor writes for the same
  weight, scale and zero point;
* a layer loaded from the library's compressed tensors dequantizes to exactly the library's decompression.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from hypothesis import given, settings
from hypothesis import strategies as st
from qplug_compressed_tensors.config import Scheme
from qplug_compressed_tensors.linear import CompressedTensorsLinear, _pack_bytes, _unpack_bytes
from qplug_compressed_tensors.quantize import rtn_integers

_SETTINGS = settings(max_examples=40, deadline=None)


@_SETTINGS
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 9), words=st.integers(1, 5), dim=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_word_packing_is_the_librarys(bits, rows, words, dim, seed):
    cols = words * 32 // bits
    gen = torch.Generator().manual_seed(seed)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, cols), generator=gen, dtype=torch.int8)
    value = signed if dim == 1 else signed.t().contiguous()
    theirs = pack_to_int32(value, bits, packed_dim=dim)
    codes = (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)  # unsigned, rows of the packed dim
    ours = _pack_bytes(codes, bits)
    assert torch.equal(ours if dim == 1 else ours.t(), theirs)
    back = _unpack_bytes(theirs if dim == 1 else theirs.t().contiguous(), bits, cols)
    assert torch.equal((back.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), signed)
    if dim == 0 and words == 1 and bits == 4:
        # compressed-tensors 0.20.0-0.20.1 cannot unpack this one itself: its transposed [rows, 1] words stay
        # "contiguous" with stride 2 and .view(torch.uint8) refuses them (found by this test); ours did above
        return
    unpacked = unpack_from_int32(theirs, bits, value.shape, packed_dim=dim)
    assert torch.equal(unpacked if dim == 1 else unpacked.t(), signed)


_layouts = st.fixed_dictionaries({
    "bits": st.sampled_from([4, 8]),
    "strategy": st.sampled_from(["group", "channel", "tensor"]),
    "symmetric": st.booleans(),
    "format": st.sampled_from(["pack-quantized", "int-quantized", "naive-quantized"]),
    "dtype": st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    "out": st.sampled_from([8, 24, 64]),
    "groups": st.integers(1, 3),
    "group_size": st.sampled_from([32, 64]),
    "seed": st.integers(0, 2**16),
})


def _case(layout):
    scheme = Scheme(name="g", targets=("Linear",), format=layout["format"], num_bits=layout["bits"],
                    symmetric=layout["symmetric"], strategy=layout["strategy"],
                    group_size=layout["group_size"] if layout["strategy"] == "group" else None)
    in_f = layout["groups"] * layout["group_size"]
    gen = torch.Generator().manual_seed(layout["seed"])
    weight = (torch.randn(layout["out"], in_f, generator=gen) + 0.3 * torch.rand(layout["out"], 1, generator=gen))
    weight = weight.to(layout["dtype"])
    args = QuantizationArgs(num_bits=scheme.num_bits, type="int", symmetric=scheme.symmetric,
                            strategy=scheme.strategy, group_size=scheme.group_size)
    library_scheme = QuantizationScheme(targets=["Linear"], weights=args, format=layout["format"])
    return scheme, weight, library_scheme


@_SETTINGS
@given(layout=_layouts)
def test_written_tensors_are_the_library_compressors(layout):
    scheme, weight, library_scheme = _case(layout)
    codes, scale, zero = rtn_integers(weight, scheme)
    layer = CompressedTensorsLinear.from_integers(codes, scale, zero, bits=scheme.num_bits, strategy=scheme.strategy,
                                                  group_size=scheme.group_size, format=scheme.format)
    offset = 1 << (scheme.num_bits - 1)
    state = {"weight": weight, "weight_scale": scale}
    if not scheme.symmetric:
        state["weight_zero_point"] = (zero - offset).to(torch.int8)
    theirs = BaseCompressor.get_value_from_registry(scheme.format).compress(state, library_scheme)
    ours = layer.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key


@_SETTINGS
@given(layout=_layouts)
def test_loaded_layer_dequantizes_as_the_library_decompresses(layout):
    scheme, weight, library_scheme = _case(layout)
    _, scale, zero = rtn_integers(weight, scheme)
    offset = 1 << (scheme.num_bits - 1)
    state = {"weight": weight, "weight_scale": scale}
    if not scheme.symmetric:
        state["weight_zero_point"] = (zero - offset).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    compressed = compressor.compress(state, library_scheme)
    if (layout["format"] == "pack-quantized" and not scheme.symmetric and scheme.strategy != "tensor"
            and layout["out"] * layout["bits"] == 32):
        # compressed-tensors 0.20 cannot unpack its own zero points held in one word along `out` (the
        # transposed [groups, 1] words keep a stride > 1 that .view(torch.uint8) refuses; see
        # test_word_packing_is_the_librarys): nothing to compare with
        return
    expected = compressor.decompress(dict(compressed), library_scheme)["weight"]
    layer = CompressedTensorsLinear(weight.shape[1], weight.shape[0], bits=scheme.num_bits, strategy=scheme.strategy,
                                    group_size=scheme.group_size, symmetric=scheme.symmetric, format=scheme.format,
                                    device="meta")
    layer.load_state_dict(compressed, assign=True)
    actual = layer.dequantize_weight()
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)
    # and the kernels' plain form says the same
    from qplug.int_kernels import dequantize

    assert torch.equal(dequantize(layer.int_weight(), torch.float32), layer.dequantize_weight(torch.float32))


def test_a_mis_shaped_tensor_is_named():
    layer = CompressedTensorsLinear(64, 16, bits=4, strategy="group", group_size=32, device="meta")
    state = {"weight_packed": torch.zeros(16, 4, dtype=torch.int32), "weight_scale": torch.ones(16, 2),
             "weight_shape": torch.tensor([16, 64])}
    with pytest.raises(Exception, match=r"weight_packed has shape \(16, 4\), expected \(16, 8\)"):
        layer.load_state_dict(state, assign=True)
    state["weight_packed"] = torch.zeros(16, 8, dtype=torch.int32)
    state["weight_shape"] = torch.tensor([16, 32])
    with pytest.raises(Exception, match=r"weight_shape is \[16, 32\]"):
        layer.load_state_dict(state, assign=True)
