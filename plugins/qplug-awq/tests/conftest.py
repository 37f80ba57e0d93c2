"""Shared fixtures and markers for the AWQ backend's tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

# The test models are tiny: a second intra-op thread only adds synchronisation, and on a
# loaded 2-core machine its spin-waits made AWQ's search 5-30x slower (measured: 0.4 s vs 3-14 s
# per quantization of the tiny Llama).
torch.set_num_threads(1)

from awq_testlib import autoawq_importable, gptqmodel_import_error  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not autoawq_importable():
        skips["autoawq"] = pytest.mark.skip(reason="autoawq is not importable (pip install 'qplug-awq[autoawq]')")
    if any("gptqmodel" in item.keywords for item in items) and (why := gptqmodel_import_error()) is not None:
        skips["gptqmodel"] = pytest.mark.skip(reason=why)
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    """Each test sees freshly discovered plugins (run-time registrations do not leak)."""
    from qplug.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(autouse=True)
def _torch_kernel(monkeypatch):
    """Tests choose kernels explicitly; an exported QPLUG_KERNEL must not change them."""
    monkeypatch.delenv("QPLUG_KERNEL", raising=False)
