"""Build, cache and load qplug-bitsandbytes' C kernels (``cpu_kernels.c``, beside this file).

The kernels are compiled once per machine by the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``; about 0.1 s) into ``$QPLUG_CACHE_DIR`` (default ``~/.cache/qplug``), keyed
by the source, the compiler, its flags and the CPU, and loaded with :mod:`ctypes`; later
processes load the cached library in milliseconds. If there is no compiler, the build fails or
the library does not load, :func:`library` returns ``None`` (once, with a warning) and callers
use bitsandbytes' own code.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch

__all__ = ["CACHE_ENV_VAR", "DTYPE_CODES", "library", "run_in_ranges", "unavailable_reason"]

log = logging.getLogger(__name__)

#: Where the compiled kernels are kept (default ``$XDG_CACHE_HOME/qplug`` or ``~/.cache/qplug``).
CACHE_ENV_VAR = "QPLUG_CACHE_DIR"
#: The ``dtype`` argument of every kernel.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_SOURCE = "cpu_kernels.c"
# Tried in order; the first that builds is used. No -ffast-math: the float arithmetic must be IEEE; and
# no contraction of a*b+c into one FMA, which would change bitsandbytes' double-quant scales by a rounding.
# The inference kernels' SIMD paths are target-attribute functions, so the plain "-O3" build has them too.
_FLAG_SETS = (("-O3", "-march=native", "-ffp-contract=off"), ("-O3", "-ffp-contract=off"))

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernels cannot be used in this process
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1  # the process that made _pool: a forked child inherits the object but none of its threads


def unavailable_reason() -> str | None:
    """Why the kernels could not be built or loaded in this process (``None`` if they were, or were not tried)."""
    return _unavailable


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on first call), or ``None`` where they cannot be had."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    with _lock:
        if _library is not None or _unavailable is not None:
            return _library
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
            source = resources.files(__package__).joinpath(_SOURCE).read_bytes()
            lib = ctypes.CDLL(str(_build(source, compiler)))
            _declare(lib)
            _library = lib
        except Exception as exc:  # no compiler, failed build, unloadable library: bitsandbytes from now on
            _unavailable = f"{type(exc).__name__}: {exc}"
            log.warning(
                "qplug-bitsandbytes CPU kernels unavailable (%s); using bitsandbytes' own quantizers",
                _unavailable.splitlines()[0],
            )
    return _library


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qplug_quantize_4bit.restype = ctypes.c_int
    lib.qplug_quantize_4bit.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, ctypes.c_int32, ptr, ptr]
    lib.qplug_int8_rowwise.restype = i64
    lib.qplug_int8_rowwise.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr]
    f32, c_int = ctypes.c_float, ctypes.c_int
    lib.qplug_cpu_isa.restype = c_int
    lib.qplug_cpu_isa.argtypes = []
    lib.qplug_dequant_4bit.restype = c_int
    lib.qplug_dequant_4bit.argtypes = [c_int, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, f32, c_int, ptr, i64]
    lib.qplug_gemv_4bit_input.restype = c_int
    lib.qplug_gemv_4bit_input.argtypes = [ptr, c_int, i64, i64, ptr]
    lib.qplug_gemv_4bit.restype = c_int
    lib.qplug_gemv_4bit.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, f32,
                                    ptr, i64]
    lib.qplug_gemv_int8.restype = c_int
    lib.qplug_gemv_int8.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64]


def run_in_ranges(kernel: Callable[..., int], total: int, min_per_thread: int, *args,
                  inline_first: bool = False) -> list[int]:
    """``kernel(first, count, *args)`` over ``[0, total)`` split across ``torch.get_num_threads()`` threads.

    Returns each call's result. ctypes releases the GIL during a call, so the ranges run in parallel.
    ``inline_first`` runs the first range on the calling thread: for sub-millisecond calls between torch
    operations (the GEMVs), where torch's OpenMP workers still spin on the cores and a hand-off to the
    pool waits for them (measured: 0.9 -> 0.55 ms for a 5632x2048 4-bit GEMV after a float32 matmul).
    """
    global _pool, _pool_pid
    threads = max(1, min(torch.get_num_threads(), total // max(1, min_per_thread)))
    if threads == 1:
        return [kernel(0, total, *args)]
    if _pool is None or _pool_pid != os.getpid():
        with _lock:
            if _pool is None or _pool_pid != os.getpid():
                _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="qplug-kernel")
                _pool_pid = os.getpid()
    per = -(-total // threads)
    starts = range(per, total, per) if inline_first else range(0, total, per)
    # Otherwise every range on the pool: measured steadier for the (long) quantizer calls.
    futures = [_pool.submit(kernel, start, min(per, total - start), *args) for start in starts]
    first = [kernel(0, min(per, total), *args)] if inline_first else []
    return first + [future.result() for future in futures]


def _cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qplug"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _compiler_identity(compiler: str) -> str:
    """Which compiler binary this is, without running it: the resolved path, its size and mtime."""
    real = os.path.realpath(compiler)
    stat = os.stat(real)
    return f"{real}:{stat.st_size}:{stat.st_mtime_ns}"


def _build(source: bytes, compiler: str) -> Path:
    fallback_dir = Path(tempfile.gettempdir()) / f"qplug-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    errors = []
    for flags in _FLAG_SETS:
        parts = (_compiler_identity(compiler), " ".join(flags), _cpu_signature())
        key = hashlib.sha256(b"\0".join([source, *(part.encode() for part in parts)])).hexdigest()[:24]
        for directory in (_cache_dir(), fallback_dir):
            target = directory / f"cpu_kernels-{key}.so"
            if target.exists():
                return target
            try:
                directory.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=directory) as work:
                    src = Path(work) / _SOURCE
                    src.write_bytes(source)
                    built = Path(work) / "kernels.so"
                    cmd = [compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(src)]
                    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if result.returncode != 0:
                        errors.append(f"{' '.join(cmd)}: {result.stderr.strip()[-500:]}")
                        break  # these flags fail whatever the directory: try the next set
                    os.replace(built, target)  # atomic: concurrent builders never see half a file
                return target
            except OSError as exc:  # unwritable cache directory: try the next one
                errors.append(f"{directory}: {exc}")
    raise RuntimeError("could not build the CPU kernels: " + " | ".join(errors))
