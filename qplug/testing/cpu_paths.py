"""Running a CPU kernel test on every instruction-set path of qplug's C kernels.

One build holds AVX-512, AVX2 and portable code, and a machine runs the best it has unless ``QPLUG_ISA``
caps it; a kernel test that only runs the best path leaves the others untested on that machine::

    from qplug.testing.cpu_paths import cpu_paths, forcing_cpu_path

    @pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
    def test_my_kernel(path):
        if path not in cpu_paths():
            pytest.skip(f"this CPU (or build) does not run the {path} path")
        with forcing_cpu_path(path):
            ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from qplug import native

__all__ = ["cpu_paths", "forcing_cpu_path"]


def cpu_paths() -> list[str]:
    """The instruction-set paths this CPU and build run (``[]`` without the C kernels), lowest first."""
    best, _ = native.isa()
    if best is None:
        return []
    return [name for name, code in sorted(native.ISAS.items(), key=lambda item: item[1]) if code <= native.ISAS[best]]


@contextlib.contextmanager
def forcing_cpu_path(path: str) -> Iterator[None]:
    """``QPLUG_ISA=path`` inside the block, the old value restored after (hypothesis tests cannot use pytest's
    function-scoped ``monkeypatch``)."""
    old = os.environ.get(native.ISA_ENV_VAR)
    os.environ[native.ISA_ENV_VAR] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(native.ISA_ENV_VAR, None)
        else:
            os.environ[native.ISA_ENV_VAR] = old
