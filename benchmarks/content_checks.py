"""Cost of the content checks qplug runs when a checkpoint loads (issue 13).

Usage: `python benchmarks/content_checks.py DIR... [--runs N]`.

For each quantized checkpoint DIR (e.g. the TinyLlama-shaped ones `benchmarks/decode.py` caches under
`benchmarks/.cache/`), loads it ``--runs`` times with the checks on, timing the whole
``qplug.load_quantized`` call and, inside it, every call of :func:`qplug.checks.check_tensor` and of
the bitsandbytes quant-state validation; then the same number of loads with those checks replaced by
no-ops, alternating. Prints one JSON line per checkpoint: median load seconds with and without the
checks, median seconds inside the checks, and that as a share of the load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import qplug
import qplug.checks

_spent = [0.0]


def _timed(fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[0] += time.perf_counter() - started
    return wrapper


@contextlib.contextmanager
def _patched(replace):
    """Replace the check functions (core and bitsandbytes') by ``replace(original)`` for the block."""
    targets = [(qplug.checks, "check_tensor")]
    with contextlib.suppress(ImportError):
        import qplug_bitsandbytes.checks as bnb_checks

        targets += [(bnb_checks, "check_tensor"), (bnb_checks, "quant_state_problem")]
    originals = [(module, name, getattr(module, name)) for module, name in targets]
    for module, name, original in originals:
        setattr(module, name, replace(original))
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _load_seconds(directory: Path) -> float:
    started = time.perf_counter()
    model = qplug.load_quantized(directory)
    seconds = time.perf_counter() - started
    del model
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for directory in args.dirs:
        _load_seconds(directory)  # warm the page cache and the imports
        on, off, inside = [], [], []
        for _ in range(args.runs):
            _spent[0] = 0.0
            with _patched(_timed):
                on.append(_load_seconds(directory))
            inside.append(_spent[0])
            with _patched(lambda original: (lambda *a, **k: None)):
                off.append(_load_seconds(directory))
        print(json.dumps({
            "checkpoint": directory.name,
            "load_s_with_checks": round(statistics.median(on), 3),
            "load_s_without_checks": round(statistics.median(off), 3),
            "checks_s": round(statistics.median(inside), 4),
            "checks_share_of_load": round(statistics.median(i / t for i, t in zip(inside, on, strict=True)), 4),
            "runs_with": [round(t, 3) for t in on], "runs_without": [round(t, 3) for t in off],
            "runs_checks": [round(t, 4) for t in inside],
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
