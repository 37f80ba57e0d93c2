"""Measuring a path in a fresh process: its seconds and peak RSS, paths alternated, peaks above a floor.

Shared by the benchmarks that compare a streaming path with another on peak memory (``VmHWM`` in
/proc/self/status, the process's high-water mark, so every measurement needs a process of its own)
and on time (imports excluded: the child starts its clock after them)::

    child = CHILD_HEAD + "<imports; mode = sys.argv[1]; start, cpu_start = clocks; the work>" + CHILD_REPORT
    floor = measure(child, "floor", ...)["peak"]
    rows = alternate(["disk", "whole"], runs, lambda mode: measure(child, mode, ...), floor)

The child defines ``mode``, ``start`` and ``cpu_start``; :data:`CHILD_REPORT` prints the one JSON line
:func:`measure` reads. :func:`verdict` prints a figure against its target with pass/miss, and
:func:`timed_main` runs a script's ``main`` and says how long the whole benchmark took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

GIB = 2**30

#: the child's first lines (what every child needs to report)
CHILD_HEAD = "import json, sys, time\n"

#: the child's last lines: the seconds since ``start``, the CPU seconds since ``cpu_start`` (unlike wall time, not
#: stretched while other jobs hold the cores) and the peak RSS, as one JSON line
CHILD_REPORT = """
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"mode": mode, "seconds": seconds, "cpu": cpu, "peak": peak}))
"""


def measure(child: str, *args: str) -> dict:
    """Run ``child`` (Python source) in a fresh interpreter with ``args``; its ``{"mode", "seconds", "cpu", "peak"}``.

    A failing child stops the benchmark with the end of its stderr.
    """
    proc = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(modes: Iterable[str], runs: int, run_one: Callable[[str], dict], floor: int) -> dict[str, dict]:
    """Each mode ``runs`` times, alternating (so a busy spell hits them alike): per mode the fastest run's
    seconds, the slowest's, the fewest CPU seconds and the highest peak above ``floor``."""
    modes = list(modes)
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(runs):
        for mode in modes:
            results[mode].append(run_one(mode))
    return {mode: {"above": max(r["peak"] for r in rs) - floor, "seconds": min(r["seconds"] for r in rs),
                   "slowest": max(r["seconds"] for r in rs), "cpu": min(r["cpu"] for r in rs)}
            for mode, rs in results.items()}


def verdict(what: str, value: float, target: float) -> bool:
    """Print ``WHAT: VALUEx (target <= TARGET): pass|miss``; whether it passed."""
    passed = value <= target
    print(f"{what}: {value:.2f}x (target <= {target}): {'pass' if passed else 'miss'}")
    return passed


def timed_main(main: Callable[[], int]) -> None:
    """Run ``main``, print how long the benchmark took, exit with its code."""
    started = time.perf_counter()
    code = main()
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    raise SystemExit(code)
