"""qplug's own safetensors reader gives exactly what the safetensors library gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import qplug
from qplug.safetensors_io import SafetensorsFile


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
    with SafetensorsFile(tmp_path / "short.safetensors") as fh, pytest.raises(qplug.CheckpointError, match="truncated"):
        fh.get_tensor("w")
    with pytest.raises(qplug.CheckpointError, match=r"junk\.safetensors"):
        SafetensorsFile(tmp_path / "junk.safetensors")
