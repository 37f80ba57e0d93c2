"""Streaming quantize-on-load and checkpoint loading, qplug vs transformers, side by side.

    python benchmarks/run.py [--small] [--repeats N]

Builds (once) a random Llama with TinyLlama-1.1B shapes in 3 bf16 shards, then runs every path in
its own process, alternating qplug and transformers, N times each. Prints median and range of wall
time and max RSS per path, the qplug / transformers ratios measured in this run with their
targets (pass/miss; each ratio is the median of the per-repeat ratios of two paths that ran back
to back), and the memory model's expected peak against the measured one. Writes
benchmarks/results/streaming.json, streaming.md and (with matplotlib) streaming.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from model import CACHE, model_dir  # noqa: E402

# (qplug path, reference path, metric, target ratio, what)
TARGETS = [
    ("qplug-nf4", "transformers-nf4", "seconds", 0.3, "(a) NF4+double-quant quantize-on-load, time"),
    ("qplug-nf4", "transformers-nf4", "max_rss", 0.5, "(a) NF4+double-quant quantize-on-load, max RSS"),
    ("qplug-nf4-bnb", "transformers-nf4", "seconds", None, "(a) same, bitsandbytes' own quantize_4bit, time"),
    ("qplug-nf4-bnb", "transformers-nf4", "max_rss", None, "(a) same, bitsandbytes' own quantize_4bit, max RSS"),
    ("qplug-int8", "transformers-int8", "max_rss", 0.5, "(b) int8 quantize-on-load, max RSS"),
    ("qplug-int8", "transformers-int8", "seconds", None, "(b) int8 quantize-on-load, time"),
    ("qplug-int8-bnb", "transformers-int8", "seconds", None, "(b) same, bitsandbytes' own int8 quantizer, time"),
    # Not one of the targets ((d), the in-memory overhead, is: bench_bnb.py). On two cores
    # bitsandbytes' quantizer already uses both, so the reader thread competes rather than overlaps.
    ("qplug-nf4-bnb", "loop-nf4", "seconds", None, "(a') the same, bitsandbytes' quantizer, vs the plain library loop"),
    ("qplug-load-nf4", "read-bytes", "seconds", 1.2, "(c) loading the saved NF4 checkpoint vs reading its bytes"),
    ("qplug-load-nf4", "transformers-load-nf4", "seconds", None, "(c) loading the saved NF4 checkpoint vs HF"),
]
ROUNDS = [
    ("transformers-nf4", "qplug-nf4", "qplug-nf4-bnb", "loop-nf4"),
    ("transformers-int8", "qplug-int8", "qplug-int8-bnb"),
    ("read-bytes", "qplug-load-nf4", "transformers-load-nf4"),
    ("floor",),
]


def run_path(path: str, src: Path, extra: Path | None = None) -> dict:
    cmd = [sys.executable, str(HERE / "paths.py"), path, str(src)] + ([str(extra)] if extra else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(samples: list[dict]) -> dict:
    out = {}
    for key in ("seconds", "max_rss"):
        values = [s[key] for s in samples]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def memory_model(src: Path, floor: float) -> dict:
    """Expected peak of quantize-on-load = floor + quantized + max(non-quantized, in-flight + kept for reuse)."""
    from qplug.checkpoint import weight_files
    from qplug.safetensors_io import SafetensorsFile

    quantized = plain = largest = 0
    for path in weight_files(src):
        with SafetensorsFile(path) as fh:
            for name in fh.keys():
                size = fh.nbytes(name)
                numel = size // 2  # bf16
                if name.endswith("proj.weight"):
                    quantized += numel * 4.127 / 8  # NF4 + double-quant statistics
                    largest = max(largest, size)
                else:
                    plain += size
    # In flight: the Linear being quantized and the next one being read (bf16 each). qplug's
    # compiled quantizer works block by block, so it adds no float copy (bitsandbytes' own
    # quantize_4bit would add a float32 working copy, 2x the bf16 size).
    in_flight = largest * 2
    # While streaming, up to this much freed memory is kept for reuse (qplug.streaming); it is handed
    # back before the non-quantized tensors are read, so the two never add up.
    from qplug.streaming import _RELEASE_EVERY_BYTES as kept

    return {"floor": floor, "non_quantized": plain, "quantized": quantized, "in_flight": in_flight, "kept": kept,
            "expected_peak": floor + quantized + max(plain, in_flight + kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model with the same structure (quick check)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    src = model_dir(args.small)
    saved = CACHE / (src.name + "-qplug-nf4")
    if not (saved / "config.json").is_file():
        run_path("qplug-nf4", src, saved)
    samples: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for round_ in ROUNDS:
            order = round_ if repeat % 2 == 0 else tuple(reversed(round_))  # alternate who goes first
            for path in order:
                target = saved if path in {"qplug-load-nf4", "transformers-load-nf4", "read-bytes"} else src
                samples.setdefault(path, []).append(run_path(path, target))
                print(f"  run {repeat + 1}: {path:<24} {samples[path][-1]['seconds']:7.2f} s "
                      f"{samples[path][-1]['max_rss'] / 2**30:6.2f} GiB", flush=True)
    stats = {path: summarize(s) for path, s in samples.items()}
    model = memory_model(src, stats["floor"]["max_rss"]["median"])

    shapes = "small model" if args.small else "TinyLlama-1.1B shapes"
    title = f"# Streaming benchmark ({shapes}, {args.repeats} runs each)"
    lines = [title, "", "| path | time median (range) | max RSS median (range) |", "|---|---|---|"]
    for path, st in stats.items():
        t, r = st["seconds"], st["max_rss"]
        lines.append(f"| {path} | {t['median']:.2f} s ({t['min']:.2f}–{t['max']:.2f}) | "
                     f"{r['median'] / 2**30:.2f} GiB ({r['min'] / 2**30:.2f}–{r['max'] / 2**30:.2f}) |")
    lines += ["", "| target | ratio | target | result |", "|---|---|---|---|"]
    verdicts = []
    for mine, ref, metric, target, what in TARGETS:
        # Median of the per-repeat ratios: the two paths of a repeat ran back to back, so a slow
        # spell of the shared machine hits both; medians of each path alone are noisier.
        ratio = statistics.median(a[metric] / b[metric] for a, b in zip(samples[mine], samples[ref], strict=True))
        verdict = "—" if target is None else ("pass" if ratio <= target else "MISS")
        verdicts.append({"what": what, "ratio": ratio, "target": target, "result": verdict})
        lines.append(f"| {what} | {ratio:.3f} | {'≤ ' + str(target) if target else 'report'} | {verdict} |")
    measured = stats["qplug-nf4"]["max_rss"]["median"]
    lines += ["", "Memory model for qplug NF4 quantize-on-load (GiB): "
              + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in model.items())
              + f"; measured {measured / 2**30:.2f} ({measured / model['expected_peak']:.2f} of expected)"]
    report = "\n".join(lines) + "\n"
    print("\n" + report)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(
        {"small": args.small, "repeats": args.repeats, "samples": samples, "stats": stats,
         "targets": verdicts, "memory_model": model}, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'qplug[plot]')")
        return
    names = list(stats)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, scale, unit in ((axes[0], "seconds", 1, "s"), (axes[1], "max_rss", 2**30, "GiB")):
        ax.barh(names, [stats[n][metric]["median"] / scale for n in names])
        ax.set_xlabel(f"median {metric} ({unit})")
    fig.tight_layout()
    fig.savefig(RESULTS / "streaming.png", dpi=100)
    print(f"chart: {RESULTS / 'streaming.png'}")


if __name__ == "__main__":
    main()
