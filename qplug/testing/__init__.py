"""Test helpers for qplug backends: the contract kit and tiny seeded models.

Backend authors subclass :class:`BackendContractTests` (needs pytest) and build test models
with :func:`tiny_llama` (needs transformers)::

    from qplug.testing import BackendContractTests, tiny_llama
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendContractTests",
    "default_tolerance",
    "example_tokens",
    "load_float_model",
    "relative_error",
    "tiny_llama",
    "tiny_llama_config",
]


def __getattr__(name: str) -> Any:
    # pytest is only needed by the contract kit; tiny models only need transformers.
    if name in {"BackendContractTests", "default_tolerance", "relative_error"}:
        from qplug.testing import contract

        return getattr(contract, name)
    if name in {"tiny_llama", "tiny_llama_config", "example_tokens", "load_float_model", "TINY_LLAMA"}:
        from qplug.testing import models

        return getattr(models, name)
    raise AttributeError(f"module 'qplug.testing' has no attribute {name!r}")
