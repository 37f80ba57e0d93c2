"""bitsandbytes' CPU quantize_4bit vs qplug_bitsandbytes.fast4bit.quantize_4bit, side by side
(and bitsandbytes' LLM.int8 weight quantization vs qplug_bitsandbytes.fast8bit).

Time: for each tensor (5632x2048 and 2048x2048, bf16 by default), after a warm-up, ``--rounds`` back-to-back
pairs (bitsandbytes, fast; order alternating); reported are the median of each method's times and the median of
the per-pair ratios (the robust figure on a shared machine). Every round also checks that the packed bytes and
the absmax are identical.

Build cost (one time per machine): two fresh worker processes time their first call against a second call with
the same shape, with a private, initially empty kernel cache (``QPLUG_CACHE_DIR``): the first worker runs the C
compiler ("cold"), the second loads the library the first one left ("warm"). ``--no-compile-cost`` skips this.

    python plugins/qplug-bitsandbytes/benchmarks/bench_fast4bit.py
    python plugins/qplug-bitsandbytes/benchmarks/bench_fast4bit.py --quant-type fp4 --double-quant --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = ((5632, 2048), (2048, 2048))


def _worker(args) -> None:
    """Fresh process: time the first (building or loading) call and a second one; print JSON."""
    t0 = time.perf_counter()
    import bitsandbytes.functional  # noqa: F401  (imported by the first call otherwise: not a build cost)
    import torch
    from qplug_bitsandbytes import fast4bit

    t_import = time.perf_counter() - t0
    A = torch.randn(*SHAPES[0]).to(getattr(torch, args.dtype))
    kw = dict(blocksize=args.blocksize, quant_type=args.quant_type, compress_statistics=args.double_quant)
    t0 = time.perf_counter()
    fast4bit.quantize_4bit(A, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast4bit.quantize_4bit(A, **kw)
    second = time.perf_counter() - t0
    print(json.dumps(dict(import_s=t_import, first_s=first, second_s=second, broken=fast4bit.unavailable_reason())))


def _compile_costs(args) -> dict[str, dict]:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_fast4bit_cache_") as cache:
        env = dict(os.environ, QPLUG_CACHE_DIR=cache)
        env.pop("QPLUG_BNB_FAST4BIT", None)
        cmd = [sys.executable, __file__, "--worker", "--dtype", args.dtype, "--quant-type", args.quant_type]
        cmd += ["--blocksize", str(args.blocksize)] + (["--double-quant"] if args.double_quant else [])
        for label in ("cold", "warm"):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out[label] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _compare_row(shape, library, fast, same, rounds: int) -> None:
    """Time ``library()`` and ``fast()`` in alternating back-to-back pairs; print one table row."""
    fns = {"bnb": library, "fast": fast}
    for fn in fns.values():  # warm-up
        fn()
    times = {"bnb": [], "fast": []}
    identical = True
    for r in range(rounds):
        res = {}
        for name in ("bnb", "fast") if r % 2 == 0 else ("fast", "bnb"):
            t0 = time.perf_counter()
            res[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
        identical &= same(res["fast"], res["bnb"])
    b, f = statistics.median(times["bnb"]), statistics.median(times["fast"])
    pair = statistics.median(x / y for x, y in zip(times["bnb"], times["fast"], strict=True))
    n = shape[0] * shape[1] / 1e6
    print(
        f"{shape[0]:>5}x{shape[1]:<5} {n:8.2f} | {b * 1e3:8.1f} {f * 1e3:8.1f} | {b / f:7.1f}x {pair:6.1f}x | "
        f"{n / b:8.0f} {n / f:9.0f} | {identical}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--double-quant", action="store_true", help="compress_statistics=True")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile-cost", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)

    costs = None if args.no_compile_cost else _compile_costs(args)  # before this process loads torch: quieter

    import bitsandbytes as bnb
    import torch
    from bitsandbytes import functional as F
    from qplug_bitsandbytes import fast4bit

    dtype = getattr(torch, args.dtype)
    kw = dict(blocksize=args.blocksize, quant_type=args.quant_type, compress_statistics=args.double_quant)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, {args.quant_type}, "
        f"blocksize {args.blocksize}, double quant {args.double_quant}, {args.rounds} rounds"
    )
    fast4bit.warm_up((dtype,))
    if not fast4bit.fast_path_available(dtype):
        print(f"fast path unavailable: {fast4bit.unavailable_reason() or 'disabled by ' + fast4bit.ENV_VAR}")

    print(
        f"{'shape':>11} {'Mweights':>8} | {'bnb ms':>8} {'fast ms':>8} | {'speed-up':>8} {'(pairs)':>7} | "
        f"{'Mw/s bnb':>8} {'Mw/s fast':>9} | identical"
    )
    def four_bit_equal(mine, ref):
        (p, state), (rp, rstate) = mine, ref
        return torch.equal(p, rp) and torch.equal(state.absmax, rstate.absmax)

    for shape in SHAPES:
        A = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        library, fast = (lambda A=A: F.quantize_4bit(A, **kw)), (lambda A=A: fast4bit.quantize_4bit(A, **kw))
        _compare_row(shape, library, fast, four_bit_equal, args.rounds)

    print("LLM.int8 weights: bitsandbytes' Int8Params(...).to('cpu') vs fast8bit.quantize_weight")
    from qplug_bitsandbytes import fast8bit

    def library_int8(A):
        param = bnb.nn.Int8Params(A.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
        return param.CB, param.SCB

    def int8_equal(mine, ref):
        return all(torch.equal(a, b) for a, b in zip(mine, ref, strict=True))

    for shape in SHAPES:
        A = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        library, fast = (lambda A=A: library_int8(A)), (lambda A=A: fast8bit.quantize_weight(A))
        _compare_row(shape, library, fast, int8_equal, args.rounds)

    if costs:
        print(f"one-time build cost ({args.dtype}, fresh process, first call minus a second call of the same shape):")
        for label, c in costs.items():
            what = "empty kernel cache: runs the C compiler" if label == "cold" else "loads the cold run's library"
            print(
                f"  {label:>4}: {c['first_s'] - c['second_s']:6.1f} s  (first call {c['first_s']:.2f} s, "
                f"second {c['second_s'] * 1e3:.0f} ms; import {c['import_s']:.1f} s; {what})"
                + (f"  FAST PATH BROKEN: {c['broken']}" if c["broken"] else "")
            )


if __name__ == "__main__":
    main()
