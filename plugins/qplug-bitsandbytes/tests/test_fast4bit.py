"""qplug_bitsandbytes.fast4bit.quantize_4bit against bitsandbytes.functional.quantize_4bit, byte for byte.

The C kernel is built (or found in the disk cache) once for the session (``warmed`` fixture).
"""

from __future__ import annotations

import logging

import bitsandbytes.functional as F
import pytest
import torch
from bnb_testlib import HAVE_CC
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qplug_bitsandbytes import _native, fast4bit

from qplug import native

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@pytest.fixture(scope="session")
def warmed():
    """Build or load the kernel once per session."""
    return fast4bit.warm_up()


@pytest.fixture(autouse=True)
def _fast_path_on(monkeypatch, warmed):
    monkeypatch.delenv(fast4bit.ENV_VAR, raising=False)


# ---------------------------------------------------------------------------------------------------------- helpers


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def assert_tensor_bytes_equal(a, b, what):
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.device == b.device, what
    assert torch.equal(_bytes(a), _bytes(b)), f"{what}: bytes differ"


def assert_same_result(mine, ref):
    (p, s), (rp, rs) = mine, ref
    assert_tensor_bytes_equal(p, rp, "packed")
    for name in ("absmax", "code"):
        assert_tensor_bytes_equal(getattr(s, name), getattr(rs, name), name)
    for name in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        assert getattr(s, name) == getattr(rs, name), name
    assert s.nested == rs.nested
    if rs.nested:
        assert_tensor_bytes_equal(s.offset, rs.offset, "offset")
        for name in ("absmax", "code"):
            assert_tensor_bytes_equal(getattr(s.state2, name), getattr(rs.state2, name), f"state2.{name}")
        for name in ("blocksize", "dtype", "quant_type", "nested"):
            assert getattr(s.state2, name) == getattr(rs.state2, name), f"state2.{name}"
    # and everything bitsandbytes serializes (quant_map, nested_*, the packed quant_state header)
    d, rd = s.as_dict(packed=True), rs.as_dict(packed=True)
    assert d.keys() == rd.keys()
    for k in rd:
        assert_tensor_bytes_equal(d[k], rd[k], k)


def both(A, **kw):
    """(mine, bitsandbytes'); if bitsandbytes raises, mine must raise the same exception type."""
    try:
        ref = F.quantize_4bit(A, **kw)
    except Exception as exc:
        with pytest.raises(type(exc)):
            fast4bit.quantize_4bit(A, **kw)
        return None, None
    return fast4bit.quantize_4bit(A, **kw), ref


def _bounds(quant_type):
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    return _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))[0]


_TIES: dict = {}


def tie_pairs(dtype, quant_type):
    """float32 [k, 2] (absmax a, x) pairs, both representable in ``dtype`` with a in [1, 2), such that
    float32(x * float32(1 / a)) equals one of the 15 bounds exactly: x lands on a bucketize threshold."""
    key = (dtype, quant_type)
    if key not in _TIES:
        idt = torch.int32 if dtype == torch.float32 else torch.int16
        one, two = (torch.tensor(v, dtype=dtype).view(idt).item() for v in (1.0, 2.0))
        a = torch.arange(one, two, max(1, (two - one) // 4096), dtype=idt).view(dtype)
        r = 1.0 / a.float()
        found = []
        for b in _bounds(quant_type).tolist():
            guess = (b * a.float()).to(dtype).view(idt)
            for d in range(-3, 4):
                x = (guess + d).view(dtype).float()
                hit = (x * r) == b
                found.append(torch.stack([a[hit].float(), x[hit]], 1))
        _TIES[key] = torch.cat(found)
    return _TIES[key]


def _finfo(dtype):
    fi = torch.finfo(dtype)
    return fi.max, fi.tiny, fi.smallest_normal * fi.eps  # largest, smallest normal, smallest subnormal


@st.composite
def cases(draw, even_last_dim=False, max_blocksize=4096):
    dtype = draw(st.sampled_from(DTYPES))
    quant_type = draw(st.sampled_from(QUANT_TYPES))
    blocksize = draw(st.sampled_from([b for b in BLOCKSIZES if b <= max_blocksize]))
    compress = draw(st.booleans())
    storage = draw(st.sampled_from((torch.uint8, torch.bfloat16)))
    nblocks = draw(st.integers(0, max(2, 16384 // blocksize)))
    numel = max(1, nblocks * blocksize + draw(st.sampled_from((0, 0, 1, 2, 3, blocksize // 2, blocksize - 1))))
    layout = draw(st.sampled_from(("1d", "2d", "3d")))
    if layout == "1d" or numel < 4:
        shape = (numel,)
    else:
        rows = draw(st.sampled_from([d for d in (2, 3, 4, 5, 6, 7, 8, 12, 16) if numel % d == 0] or [1]))
        shape = (rows, numel // rows) if layout == "2d" or rows == 1 else (1, rows, numel // rows)
    if even_last_dim and shape[-1] % 2:
        shape = (*shape[:-1], shape[-1] + 1)
        numel = int(torch.Size(shape).numel())

    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    big, tiny, sub = _finfo(dtype)
    exp = draw(st.integers(-8, 8)) if dtype == torch.float16 else draw(st.integers(-30, 30))
    A = torch.randn(numel, generator=g, dtype=torch.float64) * (2.0**exp)
    nb = -(-numel // blocksize)
    for kind, blk, pos in draw(
        st.lists(
            st.tuples(
                st.sampled_from(("zero", "ties", "ties", "extreme", "subnormal", "constant", "neg_zero")),
                st.integers(0, nb - 1),
                st.integers(0, blocksize - 1),
            ),
            max_size=6,
        )
    ):
        lo, hi = blk * blocksize, min(numel, (blk + 1) * blocksize)
        n = hi - lo
        if kind == "zero":
            A[lo:hi] = 0.0
        elif kind == "neg_zero":
            A[lo:hi] = -0.0
        elif kind == "constant":
            A[lo:hi] = float(torch.randn(1, generator=g)) * 2.0**exp
        elif kind == "subnormal":
            A[lo:hi] = torch.randint(-3, 4, (n,), generator=g).double() * sub
        elif kind == "extreme":
            A[lo + pos % n] = big if pos % 2 else -big
            A[lo + (pos * 7) % n] = tiny
        elif kind == "ties":  # the block's absmax a, every other element on a threshold (or 0)
            pairs = tie_pairs(dtype, quant_type)
            if len(pairs) == 0:
                continue
            a = float(pairs[int(torch.randint(0, len(pairs), (1,), generator=g)), 0])
            xs = pairs[pairs[:, 0] == a, 1].double()  # every threshold value known for this absmax
            vals = xs[torch.randint(0, len(xs), (n,), generator=g)]
            sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
            k = 2.0 ** draw(st.integers(-6, 6) if dtype == torch.float16 else st.integers(-40, 40))
            A[lo:hi] = vals * sign * k
            A[lo + pos % n] = a * k * (1 if pos % 2 else -1)
    A = A.to(dtype).reshape(shape)
    assert torch.isfinite(A).all()
    kwargs = dict(blocksize=blocksize, compress_statistics=compress, quant_type=quant_type, quant_storage=storage)
    return A, kwargs


PROP = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------------------------------------------------ tests


def test_fast_path_builds(warmed):
    if not HAVE_CC:
        pytest.skip("no C compiler: the fast path is expected to fall back")
    assert warmed == {dt: True for dt in DTYPES}, fast4bit.unavailable_reason()


@PROP
@given(cases())
def test_bytes_equal_bitsandbytes(case):
    A, kw = case
    mine, ref = both(A, **kw)
    if ref is not None:
        assert_same_result(mine, ref)
    assert fast4bit.unavailable_reason() is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases(even_last_dim=True, max_blocksize=1024))
def test_dequantize_identical(case):
    # (even last dim, blocksize < 2048: bitsandbytes' native CPU dequantizer; its other path compiles per shape)
    A, kw = case
    mine, ref = both(A, **kw)
    if ref is None:
        return
    out, rout = F.dequantize_4bit(mine[0], mine[1]), F.dequantize_4bit(ref[0], ref[1])
    assert_tensor_bytes_equal(out, rout, "dequantized")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_exact_ties_and_specials(dtype, quant_type):
    """Every threshold hit exactly (power-of-two absmax for float32), ±0, all-zero blocks, NaN and inf blocks."""
    b = _bounds(quant_type)
    rows = []
    for k in (1.0, 2.0**-3, 2.0**5):
        v = torch.cat([torch.tensor([1.0]), b, -b, torch.nextafter(b, torch.tensor(2.0)), torch.nextafter(b, -b - 2)])
        rows.append(torch.cat([v, torch.zeros(64 - v.numel() % 64)]) * k)
    rows += [torch.zeros(64), torch.full((64,), -0.0), torch.randn(64 * 3), torch.randn(37)]
    A = torch.cat(rows)
    A[-100] = float("inf")
    A[-150] = float("nan")
    A[-160] = -float("nan")
    A = A.to(dtype)
    for compress in (False, True):
        mine, ref = both(A, blocksize=64, quant_type=quant_type, compress_statistics=compress)
        if compress:  # the NaN block makes the nested state NaN everywhere: compare bytes of packed/absmax only
            assert_tensor_bytes_equal(mine[0], ref[0], "packed")
            assert_tensor_bytes_equal(mine[1].absmax, ref[1].absmax, "absmax")
        else:
            assert_same_result(mine, ref)


@pytest.mark.parametrize("shape", [(512, 1024), (96, 4096 + 17), (3, 5, 4096), (4097, 64)])  # last: uneven thread split
def test_larger_tensors(shape):
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        A = torch.randn(shape, generator=g).to(dtype)
        for quant_type in QUANT_TYPES:
            for blocksize, compress in ((64, True), (4096, False)):
                kw = dict(blocksize=blocksize, quant_type=quant_type, compress_statistics=compress)
                assert_same_result(*both(A, **kw))


def test_noncontiguous_and_requires_grad():
    A = torch.randn(256, 130, dtype=torch.bfloat16).t()
    assert_same_result(*both(A, quant_type="nf4"))
    W = torch.nn.Parameter(torch.randn(64, 128))
    assert_same_result(*both(W, quant_type="fp4", compress_statistics=True))


def _fresh_process_state(monkeypatch, cache_dir):
    """As if in a new process, with ``cache_dir`` as the kernel cache."""
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(cache_dir))
    monkeypatch.setattr(_native.QUANTIZERS, "_library", None)
    monkeypatch.setattr(_native.QUANTIZERS, "_unavailable", None)


def _count_compiler_runs(monkeypatch):
    runs = []
    real = native.subprocess.run

    def counting(cmd, *args, **kwargs):
        if "--version" not in cmd:
            runs.append(cmd)
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting)
    return runs


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_builds_once_per_machine_not_per_shape_or_process(monkeypatch, tmp_path):
    runs = _count_compiler_runs(monkeypatch)
    _fresh_process_state(monkeypatch, tmp_path)
    assert fast4bit.fast_path_available(torch.bfloat16)
    assert len(runs) == 1 and len(list(tmp_path.glob("quantizers-*.so"))) == 1

    g = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        for blocksize in (32, 64, 256, 4096):
            for rows in (2, 3, 17, 300):
                A = torch.randn(rows * blocksize + 5, generator=g).to(dtype)
                assert_same_result(*both(A, blocksize=blocksize, quant_type="nf4"))
                assert_same_result(*both(A, blocksize=blocksize, quant_type="fp4", compress_statistics=True))
    _fresh_process_state(monkeypatch, tmp_path)  # "next process": loads the cached library
    assert fast4bit.fast_path_available(torch.float16)
    assert len(runs) == 1
    assert fast4bit.unavailable_reason() is None


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_unwritable_cache_dir_builds_elsewhere(monkeypatch, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    _fresh_process_state(monkeypatch, not_a_dir / "cache")
    A = torch.randn(64, 128, dtype=torch.bfloat16)
    assert_same_result(*both(A, quant_type="nf4"))
    assert fast4bit.unavailable_reason() is None


def test_env_var_routes_to_bitsandbytes(monkeypatch):
    calls = []
    real = F.quantize_4bit

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the compiled kernel ran although QPLUG_BNB_FAST4BIT=0")

    monkeypatch.setattr(F, "quantize_4bit", spy)
    monkeypatch.setattr(fast4bit, "_run_kernel", no_kernel)
    A = torch.randn(64, 96, dtype=torch.bfloat16)
    for value in ("0", "false", "off"):
        monkeypatch.setenv(fast4bit.ENV_VAR, value)
        assert not fast4bit.fast_path_enabled()
        mine = fast4bit.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert_same_result(mine, real(A, blocksize=64, quant_type="nf4", compress_statistics=True))
    assert len(calls) == 3 and calls[0]["quant_type"] == "nf4" and calls[0]["compress_statistics"] is True
    monkeypatch.setenv(fast4bit.ENV_VAR, "1")
    assert fast4bit.fast_path_enabled()


@pytest.mark.parametrize("compiler", ["/bin/false", None], ids=["build-fails", "no-compiler"])
def test_build_failure_falls_back(monkeypatch, caplog, tmp_path, compiler):
    _fresh_process_state(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "_compiler", lambda: compiler)
    runs = _count_compiler_runs(monkeypatch)
    A = torch.randn(32, 64, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert_same_result(*both(A, quant_type="fp4"))
    assert "CPU quantizers unavailable" in caplog.text
    assert fast4bit.unavailable_reason() is not None and not fast4bit.fast_path_available(torch.float16)
    attempts = len(runs)
    assert_same_result(*both(A, quant_type="nf4"))  # stays on bitsandbytes, no second attempt
    assert len(runs) == attempts


def test_other_inputs_fall_back():
    for A in (torch.randn(100, 3, dtype=torch.float64), torch.randn(10), torch.randn(64)):  # dtype, < 2 blocks
        assert not fast4bit._fast_path_applies(A, 64, "nf4")
        assert_same_result(*both(A.float(), quant_type="nf4"))
    assert not fast4bit._fast_path_applies(torch.empty(256, 64, device="meta"), 64, "nf4")
    both(torch.randn(256, 64, dtype=torch.float64), quant_type="nf4")  # bitsandbytes' ValueError, both ways
    both(torch.randn(256, 64), blocksize=48)
    both(torch.randn(256, 64), quant_type="int4")


def test_inference_and_grad_modes_give_the_same_bytes():
    A = torch.randn(300, 128).to(torch.bfloat16)
    with torch.inference_mode():
        assert_same_result(*both(A, quant_type="nf4"))
        B = torch.randn(300, 128).to(torch.bfloat16)  # an inference tensor
        assert_same_result(*both(B, quant_type="fp4"))
    with torch.no_grad():
        assert_same_result(*both(B, quant_type="nf4", compress_statistics=True))
    assert fast4bit.unavailable_reason() is None


_FORK_INPUT = None  # set before forking: the child sees it without pickling a tensor


def _quantize_in_child(_=None) -> tuple[bytes, bytes]:
    # Only the kernel's parallel ranges (with small torch ops around them): torch's own OpenMP ops on
    # large tensors can hang in a forked child whatever qplug does.
    flat = _FORK_INPUT.reshape(-1)
    packed, absmax = fast4bit._run_kernel(flat, flat.numel() // 64, 64, "nf4")
    return packed.numpy().tobytes(), absmax.numpy().tobytes()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork") or not HAVE_CC, reason="needs fork and a C compiler")
def test_parallel_ranges_work_in_a_forked_child(monkeypatch):
    """A child forked after the kernel ran inherits the thread pool object but none of its threads."""
    import multiprocessing

    A = torch.randn(4096, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)  # > 1 range
    monkeypatch.setitem(globals(), "_FORK_INPUT", A)
    expected = _quantize_in_child()  # the parent makes its pool
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_quantize_in_child).get(timeout=60) == expected


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_portable_build_gives_the_same_bytes(monkeypatch, tmp_path):
    """The build without -march=native (the fallback flags; scalar float16 conversions) writes the same bytes."""
    import bitsandbytes as bnb
    from qplug_bitsandbytes import fast8bit

    _fresh_process_state(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "_FLAG_SETS", (("-O3",),))
    g = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        A = torch.randn(300, 200, generator=g).to(dtype)
        for quant_type in QUANT_TYPES:
            assert_same_result(*both(A, blocksize=64, quant_type=quant_type, compress_statistics=True))
        library = bnb.nn.Int8Params(A.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
        CB, SCB = fast8bit.quantize_weight(A)
        assert torch.equal(CB, library.CB) and torch.equal(SCB, library.SCB)
    assert fast4bit.unavailable_reason() is None
    assert [p.name.startswith("quantizers-") for p in tmp_path.glob("*.so")] == [True]
