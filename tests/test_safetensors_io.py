"""qplug's own safetensors reader: exactly what the safetensors library gives for valid files, and a
named :class:`qplug.CheckpointError` for anything else, found before any tensor memory is allocated."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qplug
from qplug import safetensors_io
from qplug.checkpoint import read_tensors
from qplug.safetensors_io import SafetensorsFile
from qplug.testing import example_tokens, tiny_llama


def test_every_dtype_and_shape_reads_back_identically(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "bf16": torch.randn(7, generator=generator).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=generator).half(),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=generator),
        "u8": torch.randint(0, 255, (4, 1), dtype=torch.uint8, generator=generator),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3,), dtype=torch.int32, generator=generator),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(6, generator=generator).to(torch.float8_e4m3fn),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    expected = load_file(tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as fh:
        assert fh.metadata == {"k": "v"}
        assert sorted(fh.keys()) == sorted(tensors)
        for name, tensor in expected.items():
            got = fh.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_truncated_and_garbage_files_are_named(tmp_path):
    save_file({"w": torch.ones(100)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(qplug.CheckpointError, match=r"short\.safetensors: tensor 'w'.*truncated"):
        SafetensorsFile(tmp_path / "short.safetensors")
    with pytest.raises(qplug.CheckpointError, match=r"junk\.safetensors"):
        SafetensorsFile(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------------------------
# Raw files: a header and a data buffer, written by hand
# --------------------------------------------------------------------------------------------


def write_raw(path, header, data: bytes = b"") -> None:
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    raw = text.encode() if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def split(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def rewrite_header(path, change) -> None:
    """Apply ``change(header)`` to a safetensors file's header, keeping its data bytes."""
    header, data = split(path)
    header = change(header) or header
    write_raw(path, header, data)


def two_tensors(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float32)}, path)
    return path


def entry(header, name, **changes):
    header[name].update(changes)
    return header


# Item 3 of issue 13: malformed headers are named CheckpointErrors, never raw exceptions.
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: [h], "header is a JSON list"),
        (lambda h: "null", "header is a JSON NoneType"),
        (lambda h: {**h, "a": [1, 2]}, "tensor 'a': header entry is a JSON list"),
        (lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "dtype"} if k == "a" else v) for k, v in h.items()},
         "tensor 'a': header entry has no 'dtype'"),
        (lambda h: entry(h, "a", dtype="Q7"), "tensor 'a': unsupported dtype 'Q7'"),
        (lambda h: entry(h, "a", dtype=7), "tensor 'a': unsupported dtype 7"),
        (lambda h: entry(h, "a", data_offsets=[0, 8, 16]), r"data_offsets \[0, 8, 16\] is not a list"),
        (lambda h: entry(h, "a", data_offsets=["0", "16"]), "data_offsets .* is not a list of two"),
        (lambda h: entry(h, "a", data_offsets=[0, 1e400]), "tensor 'a': data_offsets"),
        (lambda h: entry(h, "a", shape=[-128]), r"tensor 'a': shape \[-128\] is not a list"),
        (lambda h: entry(h, "a", shape=[True, 4]), "tensor 'a': shape .* is not a list"),
        (lambda h: entry(h, "a", shape=[2**20, 2**20]), r"tensor 'a': 16 bytes for shape \[1048576, 1048576\]"),
        (lambda h: entry(h, "a", shape=[2**62, 2**62]), "tensor 'a': shape .* is not a list"),
        (lambda h: {**h, "__metadata__": {"k": 5}}, "__metadata__ must be an object of strings"),
        (lambda h: '{"a": 1, "a": 2}', "key 'a' appears twice"),
        (lambda h: "[" * 100000 + "]" * 100000, "not valid JSON"),
        (lambda h: b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_malformed_headers_are_named_errors(tmp_path, change, message):
    path = two_tensors(tmp_path)
    rewrite_header(path, change)
    with pytest.raises(qplug.CheckpointError, match=message):
        SafetensorsFile(path)


# Item 2 of issue 13: offsets must lie in bounds, not overlap and leave no hole.
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: entry(h, "b", data_offsets=[-8, 0]), r"tensor 'b': data_offsets \[-8, 0\] lie outside"),
        (lambda h: entry(h, "b", data_offsets=[16, 32]), r"tensor 'b': data_offsets \[16, 32\] lie outside"),
        (lambda h: entry(h, "b", data_offsets=[8, 16]), "overlap those of 'a'|bytes .* belong to no tensor"),
        (lambda h: entry(h, "a", data_offsets=[0, 12], shape=[3]), r"tensor 'b': bytes \[12, 16\) before it"),
        (lambda h: entry(h, "b", data_offsets=[16, 20], shape=[1]), r"cover 20 bytes .* holds 24"),
    ],
    ids=["before-data", "past-end", "overlap", "hole", "trailing"],
)
def test_offsets_out_of_bounds_overlapping_or_leaving_holes_are_refused(tmp_path, change, message):
    path = two_tensors(tmp_path)
    rewrite_header(path, change)
    with pytest.raises(qplug.CheckpointError, match=message):
        SafetensorsFile(path)


def test_no_memory_is_allocated_for_a_shape_the_file_cannot_hold(tmp_path, monkeypatch):
    path = two_tensors(tmp_path)
    rewrite_header(path, lambda h: entry(h, "a", shape=[2**20, 2**20], dtype="F32"))  # 4 TB
    allocated = []
    monkeypatch.setattr(safetensors_io, "_allocate", lambda *args: allocated.append(args))
    with pytest.raises(qplug.CheckpointError, match="tensor 'a'"):
        SafetensorsFile(path)
    assert allocated == []


# --------------------------------------------------------------------------------------------
# Whole checkpoints: a tiny quantized Llama, tampered the ways an attacker would
# --------------------------------------------------------------------------------------------


@pytest.fixture
def int8_checkpoint(int8_plugin, tmp_path):
    model = tiny_llama(seed=0)
    qplug.quantize(model, {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def test_a_norm_pointed_into_another_tensor_or_the_header_is_refused(int8_checkpoint):
    directory, _ = int8_checkpoint
    path = directory / "model.safetensors"
    original = path.read_bytes()
    norm, other = "model.norm.weight", "model.embed_tokens.weight"
    for target in ("other", "header"):
        def point(header, target=target):
            start, end = header[norm]["data_offsets"]
            if target == "other":
                other_start = header[other]["data_offsets"][0]
                header[norm]["data_offsets"] = [other_start, other_start + end - start]
            else:
                header[norm]["data_offsets"] = [start - end - 64, -64]
        path.write_bytes(original)
        rewrite_header(path, point)
        with pytest.raises(qplug.CheckpointError, match=rf"model\.safetensors: tensor '{norm}'|overlap"):
            qplug.load_quantized(directory)


def shard(directory, names_per_file: dict[str, list[str]]):
    """Split ``model.safetensors`` into shards with an index, as transformers writes them."""
    tensors = load_file(directory / "model.safetensors")
    metadata = SafetensorsFile(directory / "model.safetensors").metadata
    os.remove(directory / "model.safetensors")
    weight_map = {}
    for file_name, names in names_per_file.items():
        save_file({n: tensors[n] for n in names}, directory / file_name, metadata=metadata)
        weight_map.update(dict.fromkeys(names, file_name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def halves(directory):
    names = sorted(load_file(directory / "model.safetensors"))
    return {"model-1.safetensors": names[: len(names) // 2], "model-2.safetensors": names[len(names) // 2 :]}


def test_a_sharded_checkpoint_loads(int8_checkpoint):
    directory, model = int8_checkpoint
    shard(directory, halves(directory))
    tokens = example_tokens(model)
    assert torch.equal(qplug.load_quantized(directory)(tokens).logits, model(tokens).logits)


# Item 4 of issue 13: index entries stay inside the checkpoint; no tensor has two copies.
def test_index_entries_outside_the_directory_are_refused(int8_checkpoint, tmp_path):
    directory, _ = int8_checkpoint
    parts = halves(directory)
    shard(directory, parts)
    outside = tmp_path / "outside.safetensors"
    os.replace(directory / "model-2.safetensors", outside)
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    for name in ("../outside.safetensors", str(outside), "./model-1.safetensors"):
        data["weight_map"] = {n: (name if f == "model-2.safetensors" else f) for n, f in data["weight_map"].items()}
        index.write_text(json.dumps(data))
        with pytest.raises(qplug.CheckpointError, match=r"index\.json: tensor '.*' is mapped to .*(absolute|leaves)"):
            qplug.load_quantized(directory)
        data = json.loads(index.read_text())
        data["weight_map"] = {n: "model-2.safetensors" if f == name else f for n, f in data["weight_map"].items()}


def test_a_stale_copy_of_a_tensor_in_another_shard_is_refused(int8_checkpoint):
    directory, _ = int8_checkpoint
    parts = halves(directory)
    stale = parts["model-2.safetensors"][0]
    weight_map = shard(directory, parts)
    tensors = load_file(directory / "model-1.safetensors")
    save_file({**tensors, stale: torch.zeros_like(load_file(directory / "model-2.safetensors")[stale])},
              directory / "model-1.safetensors")
    with pytest.raises(qplug.CheckpointError, match=rf"model-1\.safetensors: holds tensor '{stale}'.*model-2"):
        qplug.load_quantized(directory)
    # Without the index, two files holding one tensor are refused too.
    os.remove(directory / "model.safetensors.index.json")
    with pytest.raises(qplug.CheckpointError, match=rf"tensor '{stale}' is in both"):
        qplug.load_quantized(directory)
    assert weight_map[stale] == "model-2.safetensors"


@pytest.mark.parametrize("problem", ["index-list", "missing-shard", "dangling-link", "directory", "index-lacks"])
def test_broken_checkpoint_layouts_are_named_errors(int8_checkpoint, problem):
    directory, _ = int8_checkpoint
    if problem == "directory":
        os.remove(directory / "model.safetensors")
        (directory / "model.safetensors").mkdir()
        message = r"model\.safetensors: not a regular file"
    elif problem == "dangling-link":
        os.remove(directory / "model.safetensors")
        os.symlink(directory / "gone.safetensors", directory / "model.safetensors")
        message = r"model\.safetensors: weight file is a dangling symbolic link"
    else:
        weight_map = shard(directory, halves(directory))
        index = directory / "model.safetensors.index.json"
        if problem == "index-list":
            index.write_text(json.dumps([weight_map]))
            message = r"index\.json: the index is a JSON list, not an object"
        elif problem == "missing-shard":
            os.remove(directory / "model-2.safetensors")
            message = r"index\.json: tensor '.*' is in 'model-2\.safetensors', which is missing"
        else:
            name = next(iter(weight_map))
            index.write_text(json.dumps({"weight_map": {**weight_map, "model.ghost": weight_map[name]}}))
            message = r"model-\d\.safetensors: lacks tensor 'model\.ghost'"
    with pytest.raises(qplug.CheckpointError, match=message):
        qplug.load_quantized(directory)


@pytest.mark.parametrize("tied", ["{not json", "[1, 2]", '{"a": 5}'])
def test_invalid_tied_metadata_is_a_named_error(int8_checkpoint, tied):
    directory, _ = int8_checkpoint
    path = directory / "model.safetensors"
    rewrite_header(path, lambda h: h.update({"__metadata__": {**h["__metadata__"], "qplug.tied": tied}}))
    with pytest.raises(qplug.CheckpointError, match=r"model\.safetensors: metadata 'qplug\.tied'"):
        qplug.load_quantized(directory)


# --------------------------------------------------------------------------------------------
# Fuzzing: mutate the headers and bytes of a real checkpoint
# --------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _mutations(draw, header: dict, data_size: int):
    """A header and data buffer derived from ``header`` by a few random edits."""
    header = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        if not header:
            break
        name = draw(st.sampled_from(sorted(header)))
        kind = draw(st.sampled_from(["value", "offset", "shape", "dtype", "entry", "drop", "metadata"]))
        if name == "__metadata__" and kind != "drop":
            kind = "metadata"
        elif not isinstance(header[name], dict) and kind in ("value", "offset", "shape", "dtype"):
            kind = "entry"
        if kind == "value":
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            header[name][key] = draw(_json_values)
        elif kind == "offset":
            bound = st.integers(-16, data_size + 16)
            header[name]["data_offsets"] = [draw(bound), draw(bound)]
        elif kind == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
        elif kind == "dtype":
            header[name]["dtype"] = draw(st.sampled_from([*safetensors_io._DTYPES, "F4", "", "f32"]))
        elif kind == "entry":
            header[name] = draw(_json_values)
        elif kind == "drop":
            header.pop(name)
        else:
            header["__metadata__"] = draw(st.dictionaries(st.sampled_from(["qplug.tied", "format", "x"]),
                                                          _json_values | st.text(max_size=20), max_size=3))
    return header


def _file_bytes(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """The tensors of a real tiny quantized checkpoint (a few of each kind, to keep the fuzz fast)."""
    import sys
    from pathlib import Path

    from qplug.manager import reset_plugin_manager

    src = str(Path(__file__).resolve().parents[1] / "docs" / "examples" / "qplug-int8" / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from qplug_int8 import plugin

    reset_plugin_manager()
    if "int8-weight" not in qplug.get_plugin_manager().backend_names():
        qplug.register_plugin(plugin)
    model = tiny_llama(seed=0, num_hidden_layers=1)
    qplug.quantize(model, {"quant_method": "int8-weight"})
    directory = tmp_path_factory.mktemp("fuzz") / "ckpt"
    qplug.save_quantized(model, directory)
    reset_plugin_manager()
    return _Checkpoint(*split(directory / "model.safetensors"))


class _Checkpoint(tuple):
    """``(header, data)`` of a real checkpoint, with a short repr for Hypothesis' reports."""

    def __new__(cls, header, data):
        return super().__new__(cls, (header, data))

    def __repr__(self) -> str:
        return f"<checkpoint: {len(self[0])} header entries, {len(self[1])} data bytes>"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzed")


# 4000 examples take about 15 s on a 2-core machine: bounded for CI, the same examples on every run
# with the sessions' fixed seed.
@settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzzed_checkpoints_raise_only_qplug_errors_and_never_allocate_past_the_file(real_checkpoint, fuzz_dir, data):
    # Each example is a mutated copy of a real checkpoint: structured edits of its JSON header, then
    # raw byte flips, truncation or extension anywhere in the file. Reading every tensor (through the
    # same path load_quantized takes) either works or raises a QPlugError; every allocation fits the file.
    header, payload = real_checkpoint
    if data.draw(st.booleans(), label="edit header"):
        header = data.draw(_mutations(header, len(payload)), label="header")
    raw = bytearray(_file_bytes(header, payload))
    for _ in range(data.draw(st.integers(0, 3), label="byte flips")):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from(["none", "truncate", "extend"]), label="length")
    if cut == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif cut == "extend":
        raw += bytes(data.draw(st.integers(1, 64)))
    directory = fuzz_dir
    path = directory / "model.safetensors"
    path.write_bytes(bytes(raw))
    size = len(raw)
    biggest = []

    def bounded(shape, dtype, nbytes):
        out = torch.empty(shape, dtype=dtype)
        assert out.numel() * out.element_size() <= size, (shape, dtype, size)
        biggest.append(nbytes)
        return out

    original = safetensors_io._allocate
    safetensors_io._allocate = bounded
    try:
        try:
            tensors, tied = read_tensors(directory, threads=1)
        except qplug.QPlugError:
            event("refused")
            return
        event("read")
        assert sum(biggest) <= size
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        assert isinstance(tied, dict)
    finally:
        safetensors_io._allocate = original
        path.unlink()


def test_headers_are_read_without_torch(tmp_path):
    """Finding a checkpoint's files and reading their headers imports no torch (the CLI describes
    checkpoints this way); reading a tensor does."""
    import subprocess
    import sys

    save_file({"b": torch.ones(2, 3, dtype=torch.float16), "a": torch.zeros(4, dtype=torch.uint8)},
              tmp_path / "model.safetensors")
    code = (
        "import contextlib, json, sys\n"
        "from qplug.checkpoint import CheckpointWeights\n"
        "with contextlib.ExitStack() as stack:\n"
        f"    weights = CheckpointWeights({str(tmp_path)!r}, stack)\n"
        "    out = {n: [fh.dtype_name(n), list(fh.shape(n)), fh.nbytes(n)] for n, fh in weights.where.items()}\n"
        "    out['torch_before'] = 'torch' in sys.modules\n"
        "    weights.get('b')\n"
        "    out['torch_after'] = 'torch' in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(proc.stdout) == {"a": ["U8", [4], 4], "b": ["F16", [2, 3], 12],
                                       "torch_before": False, "torch_after": True}
