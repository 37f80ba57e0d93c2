"""Shared fixtures for the compressed-tensors backend's tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # compressed-tensors' progress bars

import torch

# tiny models: a second intra-op thread only adds synchronisation on a loaded 2-core machine
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    """Each test sees freshly discovered plugins (run-time registrations do not leak)."""
    from qplug.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(autouse=True)
def _no_kernel_request(monkeypatch):
    """Tests choose kernels explicitly; an exported QPLUG_KERNEL must not change them."""
    monkeypatch.delenv("QPLUG_KERNEL", raising=False)
