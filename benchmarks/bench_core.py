"""Core overheads: `qplug backends` cold start, and module replacement on large meta skeletons.

Run with `nox -s bench` (or `python benchmarks/bench_core.py` where qplug and the int8 example
backend are installed). Prints each figure with its target and pass/miss; writes
benchmarks/results/core.json. Nothing here is a timed test: these are measurements.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cold_start(runs: int = 9) -> dict:
    """Wall time of a fresh `python -m qplug backends --json`, and whether torch got imported."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qplug", "backends", "--json"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, runpy; sys.argv=['qplug','backends','--json']\n"
         "try:\n    runpy.run_module('qplug', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('TORCH', 'torch' in sys.modules, file=sys.stderr)"],
        capture_output=True, text=True,
    )
    baseline = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
        "python_startup_median_s": statistics.median(baseline),
        "imports_torch": "TORCH True" in probe.stderr, "target_s": 0.3,
        "pass": statistics.median(times) < 0.3 and "TORCH True" not in probe.stderr,
    }


def replacement_scaling(sizes=(1000, 2500, 5000, 10000)) -> dict:
    """Seconds for qplug to select and replace N nn.Linear modules of a skeleton on the meta device."""
    import torch
    from torch import nn

    import qplug
    from qplug.api import _prepare, _replace_modules

    if "int8-weight" not in qplug.available_backends():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs/examples/qplug-int8/src"))
        from qplug_int8 import plugin

        qplug.register_plugin(plugin)
    from qplug.modules import select_modules

    config = qplug.config_from_dict({"quant_method": "int8-weight"})
    _prepare(config, nn.Sequential(nn.Linear(2, 2)))  # warm: plugin discovery and requirement checks
    rows = []
    for n in sizes:
        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(n)])
        start = time.perf_counter()
        select_modules(model)
        selection_s = time.perf_counter() - start
        start = time.perf_counter()
        cfg, names = _prepare(config, model)
        _replace_modules(cfg, model, names, calibration=None, prequantized=True)
        rows.append({"modules": n, "seconds": time.perf_counter() - start, "selection_seconds": selection_s})
    per_module = [r["seconds"] / r["modules"] for r in rows]
    linear = max(per_module) / min(per_module) < 2.0  # per-module cost flat within 2x from 1k to 10k
    ten_k = rows[-1]["seconds"]
    return {"rows": rows, "per_module_us": [p * 1e6 for p in per_module], "target_10k_s": 1.0,
            "pass": ten_k < 1.0 and linear, "linear_growth": linear}


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    results = {"cold_start": cold_start(), "replacement": replacement_scaling()}
    cs = results["cold_start"]
    print(f"(e) qplug backends cold start: median {cs['median_s']:.3f} s (range {cs['min_s']:.3f}-{cs['max_s']:.3f}; "
          f"bare python {cs['python_startup_median_s']:.3f} s), imports torch: {cs['imports_torch']} "
          f"-> target < 0.3 s: {'pass' if cs['pass'] else 'MISS'}")
    rep = results["replacement"]
    for row, us in zip(rep["rows"], rep["per_module_us"], strict=True):
        print(f"(f) replace {row['modules']:>6} meta Linear modules (int8 example backend): {row['seconds']:.3f} s "
              f"({us:.1f} us/module; core selection alone {row['selection_seconds']:.3f} s)")
    print(f"(f) 10k modules < 1 s and linear growth: {'pass' if rep['pass'] else 'MISS'}")
    (RESULTS / "core.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
