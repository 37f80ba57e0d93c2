"""Shared fixtures: a tiny seeded Llama, its float checkpoint, transformers' bnb path."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import bitsandbytes  # noqa: F401
import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from bnb_testlib import TINY, make_tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    """The reference float model (do not mutate: use ``fresh_model``)."""
    return make_tiny_llama()


@pytest.fixture
def fresh_model(tiny_model):
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="session")
def float_checkpoint(tiny_model, tmp_path_factory):
    """Directory holding ``tiny_model`` saved by transformers (float32 safetensors)."""
    path = tmp_path_factory.mktemp("float-ckpt")
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def input_ids():
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=generator)


@pytest.fixture
def hf_quantized(float_checkpoint):
    """``hf_quantized(**bnb_kwargs)``: the float checkpoint loaded by transformers' bnb path."""

    def load(path=None, **kwargs):
        config = transformers.BitsAndBytesConfig(**kwargs) if kwargs else None
        extra = {"quantization_config": config} if config is not None else {}
        return transformers.AutoModelForCausalLM.from_pretrained(
            path or float_checkpoint, dtype=torch.float32, **extra
        ).eval()

    return load




@pytest.fixture
def bnb_kernel(monkeypatch):
    """qplug's bitsandbytes layers run bitsandbytes' own forward (``QPLUG_KERNEL=bitsandbytes``).

    That is the forward transformers' modules run, so logits compare bit for bit with a
    transformers-made model, and on AVX512-BF16 CPUs the in-place repack that this plugin's exact
    export guards against really happens. (qplug's own CPU kernels agree with it within the
    tolerances test_cpu_kernels.py states, not bit for bit: another summation order.)
    """
    monkeypatch.setenv("QPLUG_KERNEL", "bitsandbytes")
