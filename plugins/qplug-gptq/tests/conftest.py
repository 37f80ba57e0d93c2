"""Shared fixtures and markers of the qplug-gptq tests.

``@pytest.mark.autogptq`` tests need auto-gptq 0.7.1 (the reference implementation) and run in
the environment that pins ``transformers<4.50`` and ``peft<0.11``; they are skipped only where
auto-gptq does not import. ``@pytest.mark.cuda`` tests are skipped only where no GPU is present.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # autogptq_ref.py, shared with the fixture script

FIXTURES = Path(__file__).parent / "fixtures"

# The models here are tiny: one thread does their matmuls fastest, and on a shared machine
# OpenMP threads waiting on busy cores made single quantizations swing from 0.2 s to 15 s.
torch.set_num_threads(1)


def _autogptq_error() -> str | None:
    from qplug_gptq import autogptq

    return autogptq.import_error()


def _gptqmodel_error() -> str | None:
    if importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel is not installed (nox -s transformers_gptqmodel installs it, with torch 2.14.1)"
    try:
        import gptqmodel  # noqa: F401
    except Exception as exc:  # any failure to import is a reason to skip, shown in the report
        return f"gptqmodel does not import: {exc!r}"
    return None


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so --strict-markers holds whichever ini file is found
    config.addinivalue_line("markers", "autogptq: needs auto-gptq 0.7.1 importable (skipped only when it is not)")
    config.addinivalue_line(
        "markers", "gptqmodel: transformers 5 loads through GPTQModel (skipped only when `gptqmodel` does not import)"
    )
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (skipped only when none is present)")


def pytest_collection_modifyitems(config, items):
    agq = _autogptq_error()
    gm = _gptqmodel_error() if any("gptqmodel" in item.keywords for item in items) else None
    for item in items:
        if "gptqmodel" in item.keywords and gm is not None:
            item.add_marker(pytest.mark.skip(reason=gm))
        if "autogptq" in item.keywords and agq is not None:
            item.add_marker(pytest.mark.skip(reason=f"auto-gptq does not import here: {agq}"))
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_kernel(monkeypatch):
    # Tests choose kernels explicitly; a developer's QPLUG_GPTQ_KERNEL / QPLUG_KERNEL must not change them.
    monkeypatch.delenv("QPLUG_GPTQ_KERNEL", raising=False)
    monkeypatch.delenv("QPLUG_KERNEL", raising=False)
