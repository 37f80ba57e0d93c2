"""qplug-bitsandbytes' C quantizers (``quantizers.c``, beside this file), built and loaded by :mod:`qplug.native`.

:func:`library` returns ``None`` (once, with a warning) where they cannot be had: callers then use
bitsandbytes' own quantizers. The inference kernels are qplug's (:data:`qplug.native.CPU_KERNELS`).
"""

from __future__ import annotations

import ctypes

from qplug.native import CACHE_ENV_VAR, DTYPE_CODES, NativeLibrary, run_in_ranges

__all__ = ["CACHE_ENV_VAR", "DTYPE_CODES", "QUANTIZERS", "library", "run_in_ranges", "unavailable_reason"]


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qplug_quantize_4bit.restype = ctypes.c_int
    lib.qplug_quantize_4bit.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, ctypes.c_int32, ptr, ptr]
    lib.qplug_int8_rowwise.restype = i64
    lib.qplug_int8_rowwise.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr]


QUANTIZERS = NativeLibrary("qplug_bitsandbytes", "quantizers.c", _declare, "qplug-bitsandbytes' CPU quantizers")


def library() -> ctypes.CDLL | None:
    """The loaded quantizers (built on first call), or ``None`` where they cannot be had."""
    return QUANTIZERS.get()


def unavailable_reason() -> str | None:
    """Why the quantizers could not be built or loaded in this process (``None`` if they were, or were not tried)."""
    return QUANTIZERS.unavailable_reason()
