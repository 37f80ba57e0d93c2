"""C kernels built on the user's machine: compiled once, cached on disk, loaded with :mod:`ctypes`.

A :class:`NativeLibrary` is one C source file shipped inside a package. At first use it is compiled
by the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; about 2 s for ``cpu_kernels.c`` at -O3 on a
2-vCPU Zen 4, measured) into
``$QPLUG_CACHE_DIR`` (default ``$XDG_CACHE_HOME/qplug`` or ``~/.cache/qplug``), keyed by the
source, the compiler, its flags and the CPU, and written atomically; later processes load the
cached library in milliseconds. Without a compiler, or when the build or the load fails,
:meth:`NativeLibrary.get` returns ``None`` (once, with a warning naming the library) and callers
take their portable path.

:data:`CPU_KERNELS` is qplug's own (``cpu_kernels.c``): 4-bit code-book GEMV and dequantization
(bitsandbytes' NF4/FP4, and affine integer weights as the code book 0..15 with zero points) and an
int8 row-wise GEMV, each with AVX-512, AVX2+FMA and portable paths chosen per call (:func:`isa`).
Backends declare kernels on them through :mod:`qplug.int_kernels` or their own layer code.
:func:`transposed` copies 32-bit matrices transposed (GPTQ's packed words are the transpose of other
formats') by cache-sized tiles.
"""

from __future__ import annotations

import ctypes
import functools
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

from qplug.environment import env_text

__all__ = [
    "CACHE_ENV_VAR",
    "CPU_KERNELS",
    "DTYPE_CODES",
    "ISAS",
    "ISA_ENV_VAR",
    "NativeLibrary",
    "isa",
    "native_bf16_matmul",
    "run_in_ranges",
    "transposed",
]

log = logging.getLogger(__name__)

#: Where compiled kernels are kept (default ``$XDG_CACHE_HOME/qplug`` or ``~/.cache/qplug``).
CACHE_ENV_VAR = "QPLUG_CACHE_DIR"
#: The ``dtype`` argument of every kernel.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: The instruction-set paths of :data:`CPU_KERNELS`, by name (``QPLUG_ISA_*`` in the C source).
ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
#: Forces one of :data:`ISAS` (a path the CPU cannot run makes the kernels refuse, naming it).
ISA_ENV_VAR = "QPLUG_ISA"
_OLD_ISA_ENV_VAR = "QPLUG_BNB_ISA"  # its name while only qplug-bitsandbytes had kernels; still honoured

# Tried in order; the first that builds and loads is used. No -ffast-math: the float arithmetic must be
# IEEE; and no contraction of a*b+c into one FMA, which would change bitsandbytes' double-quant scales by
# a rounding. SIMD paths are target-attribute functions, so the plain "-O3" builds have them too.
# -fopenmp: libgomp resolves to the copy torch loaded, so parallel kernels share torch's threads.
_FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp"),
    ("-O3", "-ffp-contract=off", "-fopenmp"),
    ("-O3", "-march=native", "-ffp-contract=off"),
    ("-O3", "-ffp-contract=off"),
)

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1  # the process that made _pool: a forked child inherits the object but none of its threads


class NativeLibrary:
    """One C source of ``package`` (``source``, shipped as package data), built and loaded at first use.

    :param declare: sets ``restype``/``argtypes`` of the functions callers use.
    :param what: how warnings name it ("qplug's CPU kernels").
    """

    def __init__(self, package: str, source: str, declare: Callable[[ctypes.CDLL], None], what: str) -> None:
        self.package, self.source, self.declare, self.what = package, source, declare, what
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._unavailable: str | None = None  # why it cannot be used in this process

    def __repr__(self) -> str:
        return f"NativeLibrary({self.package}/{self.source})"

    def unavailable_reason(self) -> str | None:
        """Why the library could not be built or loaded here (``None`` if it was, or was not tried)."""
        return self._unavailable

    def get(self) -> ctypes.CDLL | None:
        """The loaded library (built on first call), or ``None`` where it cannot be had."""
        if self._library is not None or self._unavailable is not None:
            return self._library
        with self._lock:
            if self._library is not None or self._unavailable is not None:
                return self._library
            try:
                self._library = self._load()
            except Exception as exc:  # no compiler, failed builds, unloadable library: the caller's fallback
                self._unavailable = f"{type(exc).__name__}: {exc}"
                log.warning("%s unavailable (%s)", self.what, self._unavailable.splitlines()[0])
        return self._library

    def _load(self) -> ctypes.CDLL:
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
        source = resources.files(self.package).joinpath(self.source).read_bytes()
        errors = []
        for flags in _FLAG_SETS:
            try:
                lib = ctypes.CDLL(str(_build(source, Path(self.source).stem, compiler, flags)))
                self.declare(lib)
                return lib
            except (OSError, RuntimeError, AttributeError) as exc:  # these flags fail here: the next set
                errors.append(f"{' '.join(flags)}: {exc}")
        raise RuntimeError(f"could not build or load {self.source}: " + " | ".join(errors))


def _declare_cpu_kernels(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.qplug_cpu_isa.restype = c_int
    lib.qplug_cpu_isa.argtypes = []
    lib.qplug_dequant_4bit.restype = c_int
    lib.qplug_dequant_4bit.argtypes = [c_int, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, f32, c_int,
                                       ptr, i64]
    lib.qplug_gemv_4bit_input.restype = c_int
    lib.qplug_gemv_4bit_input.argtypes = [ptr, c_int, i64, i64, ptr, ptr]
    lib.qplug_gemv_4bit.restype = c_int
    lib.qplug_gemv_4bit.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                                    f32, ptr, i64]
    lib.qplug_gemv_int8.restype = c_int
    lib.qplug_gemv_int8.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64]
    lib.qplug_gemv_int8_grouped.restype = c_int
    lib.qplug_gemv_int8_grouped.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64]
    lib.qplug_w4a8_input.restype = c_int
    lib.qplug_w4a8_input.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.qplug_gemv_w4a8.restype = c_int
    lib.qplug_gemv_w4a8.argtypes = [c_int, i64, i64, ptr, ptr, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
    lib.qplug_llm_int8_input.restype = c_int
    lib.qplug_llm_int8_input.argtypes = [ptr, c_int, i64, i64, f32, ptr, ptr, ptr]
    lib.qplug_gemv_llm_int8.restype = c_int
    lib.qplug_gemv_llm_int8.argtypes = [c_int, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, i64]
    lib.qplug_openmp.restype = c_int
    lib.qplug_openmp.argtypes = []
    lib.qplug_w4_slots.restype = c_int
    lib.qplug_w4_slots.argtypes = []
    # (isa, threads, weight slots, x, x dtype, M, perm, bias, out, out dtype)
    lib.qplug_linear_4bit.restype = c_int
    lib.qplug_linear_4bit.argtypes = [c_int, c_int, ptr, ptr, c_int, i64, ptr, ptr, ptr, c_int]
    lib.qplug_linear_w4a8.restype = c_int
    lib.qplug_linear_w4a8.argtypes = [c_int, c_int, ptr, ptr, c_int, i64, ptr, ptr, ptr, c_int]
    # (isa, threads, CB, scale, N, K, x, x dtype, M, out, out dtype)
    lib.qplug_linear_int8.restype = c_int
    lib.qplug_linear_int8.argtypes = [c_int, c_int, ptr, ptr, i64, i64, ptr, c_int, i64, ptr, c_int]
    # (isa, threads, q, scale, zero, group, N, K, x, x dtype, M, perm, bias, out, out dtype)
    lib.qplug_linear_int8_grouped.restype = c_int
    lib.qplug_linear_int8_grouped.argtypes = [c_int, c_int, ptr, ptr, ptr, i64, i64, i64, ptr, c_int, i64, ptr, ptr,
                                              ptr, c_int]
    lib.qplug_transpose32.restype = c_int
    lib.qplug_transpose32.argtypes = [c_int, ptr, i64, i64, i64, ptr]
    lib.qplug_unpack_nibbles.restype = c_int
    lib.qplug_unpack_nibbles.argtypes = [c_int, ptr, i64, ptr]
    lib.qplug_unpack_nibbles_permuted.restype = c_int
    lib.qplug_unpack_nibbles_permuted.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    # the same kernels over `threads` ranges on the OpenMP pool: (isa, threads, <the rest>)
    for name in ("qplug_gemv_4bit", "qplug_gemv_int8", "qplug_gemv_int8_grouped", "qplug_gemv_w4a8",
                 "qplug_gemv_llm_int8"):
        parallel = getattr(lib, f"{name}_parallel")
        parallel.restype = c_int
        parallel.argtypes = [c_int, c_int, *getattr(lib, name).argtypes[3:]]
    lib.qplug_dequant_4bit_parallel.restype = c_int
    lib.qplug_dequant_4bit_parallel.argtypes = [c_int, c_int, *lib.qplug_dequant_4bit.argtypes[1:]]
    # tile dequantizers, rows (or blocks) [first, first + count): (isa, first, count, ...);
    # their _parallel entry points: (isa, threads, first, count, ...)
    lib.qplug_dequant_int8.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, ptr, c_int, ptr, i64]
    lib.qplug_dequant_int4pack.argtypes = [c_int, i64, i64, ptr, i64, i64, ptr, i64, i64, c_int, ptr, i64, i64]
    for name in ("qplug_dequant_int8", "qplug_dequant_int4pack"):
        getattr(lib, name).restype = c_int
        parallel = getattr(lib, f"{name}_parallel")
        parallel.restype = c_int
        parallel.argtypes = [c_int, c_int, *getattr(lib, name).argtypes[1:]]


#: qplug's CPU inference kernels (``qplug/cpu_kernels.c``).
CPU_KERNELS = NativeLibrary("qplug", "cpu_kernels.c", _declare_cpu_kernels, "qplug's CPU kernels")


def isa() -> tuple[str | None, str | None]:
    """``(path name, None)``: the instruction-set path :data:`CPU_KERNELS` run here, or ``(None, why not)``.

    The best path the CPU runs, unless ``QPLUG_ISA`` asks for another.
    """
    lib = CPU_KERNELS.get()
    if lib is None:
        return None, f"qplug's C kernels are unavailable ({CPU_KERNELS.unavailable_reason()})"
    # asked on every forward of every layer: the answer is cached per library and environment
    return _isa_of(lib, env_text(ISA_ENV_VAR), env_text(_OLD_ISA_ENV_VAR))


@functools.lru_cache(maxsize=16)
def _isa_of(lib: ctypes.CDLL, requested: str, requested_old: str) -> tuple[str | None, str | None]:
    best = int(lib.qplug_cpu_isa())
    names = {v: k for k, v in ISAS.items()}
    variable, wanted = (ISA_ENV_VAR, requested) if requested.strip() else (_OLD_ISA_ENV_VAR, requested_old)
    wanted = wanted.strip().lower()
    if not wanted:
        return names[best], None
    if wanted not in ISAS:
        return None, f"{variable}={wanted!r} is not one of {sorted(ISAS)}"
    if ISAS[wanted] > best:
        return None, f"{variable}={wanted} but this CPU runs at most {names[best]}"
    return wanted, None


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX): then bf16 matmuls beat float32.
    Not where ``QPLUG_ISA`` caps the kernels below AVX-512 (an AVX2-only CPU, as far as qplug chooses)."""
    return _cpu_has_bf16_dot_products() and isa()[0] not in ("avx2", "portable")


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16_dot_products() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def openmp() -> bool:
    """Whether :data:`CPU_KERNELS` was built with OpenMP: its ``_parallel`` entry points then run on the
    thread pool torch uses."""
    lib = CPU_KERNELS.get()
    return lib is not None and _openmp_of(lib)


@functools.lru_cache(maxsize=4)
def _openmp_of(lib: ctypes.CDLL) -> bool:  # asked per call of every kernel: one ctypes call per library
    return bool(lib.qplug_openmp())


def transposed(tensor: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """``tensor.t().contiguous()``: the same values, bit for bit, copied by tiles where the copy is needed.

    For a 2-D CPU tensor of 4-byte elements whose rows are contiguous (packed int32 words), the copy runs
    in :data:`CPU_KERNELS` (one thread: it runs between reads and writes that hold the other cores),
    about three times faster than torch's strided copy on a 2-core AVX2 machine. Anything else, or
    without the C kernels, is torch's own copy. A tensor whose transpose is already contiguous is
    returned as that view.

    :param in_place: the result takes ``tensor``'s own memory (``tensor`` must be contiguous), which then
        no longer holds ``tensor``'s values: for a caller that owns ``tensor`` and drops it. The tiles go
        to a scratch buffer this thread keeps (up to 64 MiB; larger tensors get fresh memory) and are
        copied back: a fresh buffer's page faults cost more than that copy (the 1.1B model's 0.5 GB of
        GPTQ words, ~120k faults, took about a third of a conversion's CPU time on a 2-core VM).
    """
    view = tensor.t()
    if view.is_contiguous():
        return view
    rows, cols = tensor.shape
    lib = CPU_KERNELS.get()
    native = (lib is not None and tensor.device.type == "cpu" and tensor.element_size() == 4
              and tensor.stride(1) == 1 and tensor.numel() >= _TRANSPOSE_MIN and isa()[0] is not None)
    in_place = (in_place and tensor.is_contiguous() and tensor.device.type == "cpu"
                and tensor.numel() * tensor.element_size() <= _SCRATCH_MAX_BYTES)
    out = _scratch(tensor.numel(), tensor.dtype).view(cols, rows) if in_place else torch.empty(
        (cols, rows), dtype=tensor.dtype, device=tensor.device)
    if native:
        status = lib.qplug_transpose32(ISAS[isa()[0]], tensor.data_ptr(), rows, cols, tensor.stride(0),
                                       out.data_ptr())
        if status:
            raise RuntimeError(f"qplug_transpose32 refused a {rows}x{cols} tensor with row stride {tensor.stride(0)}")
    else:
        out.copy_(view)
    if not in_place:
        return out
    tensor.view(-1).copy_(out.view(-1))
    return tensor.view(cols, rows)


def unpacked_nibbles(packed: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[..., n]`` -> uint8 ``[..., 2 n]``: each byte's low nibble, then its high one; with ``perm``
    (int64 ``[k]``), each row's codes in that order instead (``[..., k]``: ``unpacked[..., perm]``).

    In :data:`CPU_KERNELS` for a contiguous CPU tensor (SIMD where the CPU has it; a 5632x2048 layer's codes
    in about a millisecond), else with torch's operations.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpacked_nibbles takes uint8 bytes, got {packed.dtype}")
    lib = CPU_KERNELS.get()
    path = isa()[0] if lib is not None else None
    if path is None or packed.device.type != "cpu" or not packed.is_contiguous():
        codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
        return codes if perm is None else codes.index_select(-1, perm.to(codes.device))
    if perm is None:
        out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.uint8)
        status = lib.qplug_unpack_nibbles(ISAS[path], packed.data_ptr(), packed.numel(), out.data_ptr())
    else:
        order = perm.to(torch.int64).contiguous()
        out = torch.empty(*packed.shape[:-1], order.numel(), dtype=torch.uint8)
        row_bytes = packed.shape[-1]
        status = lib.qplug_unpack_nibbles_permuted(packed.data_ptr(), packed.numel() // max(row_bytes, 1), row_bytes,
                                                   order.data_ptr(), order.numel(), out.data_ptr())
    if status:
        raise ValueError(f"qplug_unpack_nibbles refused {tuple(packed.shape)} bytes"
                         + ("" if perm is None else f" with an order of {perm.numel()} codes outside its rows"))
    return out


_TRANSPOSE_MIN = 4096  # elements; below, a ctypes call costs more than torch's copy
_SCRATCH_MAX_BYTES = 64 * 2**20
_scratch_of_thread = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` elements of this thread's scratch buffer (grown as needed, kept while the thread lives)."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buffer = getattr(_scratch_of_thread, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch_of_thread.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype)


def threads_for(total: int, min_per_thread: int) -> int:
    """How many of ``torch.get_num_threads()`` threads to split ``total`` items over, each at least
    ``min_per_thread`` (a hand-off costs more than a few microseconds of work)."""
    return max(1, min(torch.get_num_threads(), total // max(1, min_per_thread)))


def run_parallel(lib: ctypes.CDLL, name: str, total: int, min_per_thread: int, *args,
                 inline_first: bool = False) -> list[int]:
    """``lib.<name>`` over ``total`` rows: its ``_parallel`` entry point on the OpenMP pool torch uses,
    where the library was built with OpenMP (``name_parallel(isa, threads, *args[1:])``), else
    :func:`run_in_ranges` with ``name(isa, first, count, *args[1:])``. ``args[0]`` is the ISA code."""
    if _openmp_of(lib):
        return [getattr(lib, f"{name}_parallel")(args[0], threads_for(total, min_per_thread), *args[1:])]
    kernel = getattr(lib, name)
    return run_in_ranges(lambda first, count: kernel(args[0], first, count, *args[1:]), total, min_per_thread,
                         inline_first=inline_first)


def run_rows(lib: ctypes.CDLL, name: str, first: int, count: int, min_per_thread: int, isa_code: int, *args) -> None:
    """``lib.<name>(isa, first, count, *args)`` over rows ``[first, first + count)`` split across threads (its
    ``_parallel`` entry point on torch's OpenMP pool where the build has OpenMP); raises on a non-zero status."""
    if _openmp_of(lib):
        status = [getattr(lib, f"{name}_parallel")(isa_code, threads_for(count, min_per_thread), first, count, *args)]
    else:
        kernel = getattr(lib, name)
        status = run_in_ranges(lambda start, n: kernel(isa_code, first + start, n, *args), count, min_per_thread)
    if any(status):
        from qplug.errors import KernelUnavailableError

        raise KernelUnavailableError(f"{name} returned {status}")


def run_in_ranges(kernel: Callable[..., int], total: int, min_per_thread: int, *args,
                  inline_first: bool = False) -> list[int]:
    """``kernel(first, count, *args)`` over ``[0, total)`` split across ``torch.get_num_threads()`` threads.

    Returns each call's result. ctypes releases the GIL during a call, so the ranges run in parallel.
    ``inline_first`` runs the first range on the calling thread: for sub-millisecond calls between torch
    operations (the GEMVs), where torch's OpenMP workers still spin on the cores and a hand-off to the
    pool waits for them (measured: 0.9 -> 0.55 ms for a 5632x2048 4-bit GEMV after a float32 matmul).
    """
    global _pool, _pool_pid
    threads = threads_for(total, min_per_thread)
    if threads == 1:
        return [kernel(0, total, *args)]
    if _pool is None or _pool_pid != os.getpid():
        with _pool_lock:
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


def _build(source: bytes, stem: str, compiler: str, flags: tuple[str, ...]) -> Path:
    """The library built from ``source`` with ``flags``: from the cache, else compiled into it."""
    fallback_dir = Path(tempfile.gettempdir()) / f"qplug-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    parts = (_compiler_identity(compiler), " ".join(flags), _cpu_signature())
    key = hashlib.sha256(b"\0".join([source, *(part.encode() for part in parts)])).hexdigest()[:24]
    errors = []
    for directory in (_cache_dir(), fallback_dir):
        target = directory / f"{stem}-{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as work:
                src = Path(work) / f"{stem}.c"
                src.write_bytes(source)
                built = Path(work) / "kernels.so"
                cmd = [compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(src)]
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if result.returncode != 0:  # these flags fail whatever the directory
                    raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()[-500:]}")
                os.replace(built, target)  # atomic: concurrent builders never see half a file
            return target
        except OSError as exc:  # unwritable cache directory: try the next one
            errors.append(f"{directory}: {exc}")
    raise RuntimeError(" | ".join(errors))
