"""Helpers shared by the AWQ tests (a module, not a conftest, so tests can import it)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "tiny-llama-awq-g64"
SCRIPTS = HERE.parent / "scripts"


def autoawq_importable() -> bool:
    """Whether autoawq's modules import here (the ``autoawq`` marker's condition)."""
    if importlib.util.find_spec("awq") is None:
        return False
    from qplug_awq.autoawq import autoawq_importable as importable

    return importable()


def gptqmodel_import_error() -> str | None:
    """Why ``gptqmodel`` does not import here, or None (the ``gptqmodel`` marker's condition)."""
    if importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel is not installed (nox -s transformers_gptqmodel installs it, with torch 2.14.1)"
    try:
        import gptqmodel  # noqa: F401
    except Exception as exc:  # any failure to import is a reason to skip, shown in the report
        return f"gptqmodel does not import: {exc!r}"
    return None


def calibration(samples: int = 4, length: int = 32, seed: int = 5, vocab: int = 256) -> torch.Tensor:
    """Seeded calibration token ids."""
    return torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(seed))


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def make_fixture_module():
    """``scripts/make_fixture.py`` as a module (its autoawq helpers)."""
    spec = importlib.util.spec_from_file_location("make_fixture", SCRIPTS / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module
