"""Batch-1 decode of quantized models against their float original, side by side (issues #11, #12).

    python benchmarks/decode.py [--small] [--repeats N] [--paths a,b,...] [--prompt 128] [--tokens 32]
                                [--isa avx2]

The model is the random Llama with TinyLlama-1.1B shapes from ``model.py`` (``--small``: the small
variant, a quick check). Every path runs in its own process (``decode_path.py``), the order
reversed on every other repeat, and measures after one warm-up: a 128-token prefill (seconds),
32 greedy decode steps with the KV cache (ms/token), RSS after decoding, peak RSS, the bytes of
quantized and non-quantized tensors in its state dict, and the kernel each quantized layer ran
(``qplug.kernel_report``; "n/a" for layers that do not go through ``qplug.kernels``). Before the
warm-up it times two one-token forwards: the first's extra time is the one-off cost of choosing
kernels and building every layer's run-time layout (or bitsandbytes' own repack), printed per GB
of quantized tensors.

Paths:

* ``bf16``, ``fp32``: transformers, weights in memory;
* ``torch-int4``: every decoder Linear replaced by torch's own int4 CPU kernel
  (``_weight_int4pack_mm_for_cpu``, RTN 4-bit g128, bf16 activations): what torch's built-ins reach;
* ``gptq-4bit-sym``, ``gptq-4bit-asym``, ``gptq-4bit-actorder``, ``gptq-8bit``, ``awq-4bit`` (GEMM):
  qplug checkpoints of round-to-nearest integers (no calibration), loaded with ``qplug.load_quantized``;
* ``ct-w4a16``: the ``gptq-4bit-sym`` checkpoint repacked as compressed-tensors ``pack-quantized``
  (``qplug.convert``: the same integers), target within 1.1x of it;
* ``nf4``, ``fp4`` (double quant, bf16 compute), ``int8`` (LLM.int8, threshold 6.0): qplug checkpoints
  made by quantize-on-load; ``nf4-bnb``, ``int8-bnb``: the same checkpoints on bitsandbytes' own code
  (``qplug.set_kernel(model, "bitsandbytes")``; n/a where no layer declares that kernel);
* ``gptq-4bit-sym-w4a8``, ``awq-4bit-w4a8``: those checkpoints on qplug's opt-in W4A8 GEMV
  (``qplug.set_kernel(model, "qplug-int4-w4a8-cpu")``: activations rounded to int8 for decode, so not
  the exact result; the tokens they generate are compared with the exact path's); ``int8-w8a8``: the
  ``int8`` checkpoint on ``qplug-llm-int8-cpu`` (opt-in: bitsandbytes' inference arithmetic, int8 inputs
  with float outliers, in an int8 x int8 GEMV);
* ``floor``: imports the same libraries and builds nothing (the runtime floor of the RSS target);
* only when asked for (``nox -s bench_gptqmodel``: GPTQModel 7.7 needs torch >= 2.14.1):
  ``gptqmodel-4bit-sym``, ``gptqmodel-4bit-asym``, ``gptqmodel-4bit-actorder``, the same GPTQ
  checkpoints loaded by ``GPTQModel.load(..., backend=BACKEND.GPTQ_TORCH_ATEN)`` (its TorchAtenLinear).

Decode ms/token is the decode loop's time over its steps (what the targets use); the median step
is shown beside it, as a check on a busy machine, and so is the process's CPU time per token (all
threads, OpenMP workers' spinning included), which a virtual machine's stolen time does not stretch
the way it stretches wall time. The checkpoints are built once and cached under
benchmarks/.cache. Ratios are medians of per-repeat ratios of two paths of the same repeat.
``--isa avx2`` runs the children with ``ATEN_CPU_CAPABILITY=avx2`` (torch's dispatch),
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's matmuls, so bfloat16 loses its native dot products) and
``QPLUG_ISA=avx2`` (qplug's C kernels), for AVX2-only figures on an AVX-512 machine.
Writes benchmarks/results/decode.json and decode.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from model import CACHE, model_dir  # noqa: E402

PATHS = ("bf16", "fp32", "torch-int4", "gptq-4bit-sym", "gptq-4bit-asym", "gptq-4bit-actorder", "gptq-8bit",
         "awq-4bit", "ct-w4a16", "nf4", "fp4", "int8", "nf4-bnb", "int8-bnb", "gptq-4bit-sym-w4a8", "awq-4bit-w4a8",
         "int8-w8a8", "floor")
#: paths whose checkpoint is another path's, repacked (qplug.convert: the same integers)
REPACKED = {"ct-w4a16": "gptq-4bit-sym"}
#: also accepted by --paths: GPTQModel's TorchAtenLinear on the same GPTQ checkpoints (nox -s bench_gptqmodel)
GPTQMODEL = ("gptqmodel-4bit-sym", "gptqmodel-4bit-asym", "gptqmodel-4bit-actorder")
FLOATS = ("bf16", "fp32")
QUANTIZED = tuple(p for p in PATHS if p not in (*FLOATS, "torch-int4", "floor"))
#: the checkpoint each quantized path loads (the -bnb rows run another path's checkpoint)
#: opt-in kernels on int8 activations: checkpoint path -> its row on them
W4A8 = {"gptq-4bit-sym": "gptq-4bit-sym-w4a8", "awq-4bit": "awq-4bit-w4a8", "int8": "int8-w8a8"}
CHECKPOINTS = ({p: p for p in QUANTIZED} | {"nf4-bnb": "nf4", "int8-bnb": "int8"} | {v: k for k, v in W4A8.items()}
               | {p: p.replace("gptqmodel-", "gptq-") for p in GPTQMODEL})
FOUR_BIT = ("gptq-4bit-sym", "gptq-4bit-asym", "gptq-4bit-actorder", "awq-4bit", "ct-w4a16")
FASTER_FLOAT = "faster float"  # per repeat, the faster of bf16 and fp32

# (path, compared with, metric, target ratio)
TARGETS = (
    [(p, ref, "decode_ms", t) for p in FOUR_BIT for ref, t in (("bf16", 0.4), ("torch-int4", 1.0))]
    + [(p, "gptq-4bit-sym", "decode_ms", 1.15) for p in ("gptq-4bit-actorder", "gptq-4bit-asym")]
    + [("ct-w4a16", "gptq-4bit-sym", "decode_ms", 1.1)]  # the same weights as compressed-tensors
    + [(p, "bf16", "decode_ms", 0.4) for p in ("gptq-4bit-sym-w4a8", "awq-4bit-w4a8")]  # opt-in, not exact
    + [("int8-w8a8", "bf16", "decode_ms", 0.6)]  # opt-in: bitsandbytes' own inference arithmetic
    + [("gptq-8bit", "bf16", "decode_ms", 0.7)]
    + [(p, "bf16", "decode_ms", 0.45) for p in ("nf4", "fp4")]
    + [("nf4", "nf4-bnb", "decode_ms", 1.0), ("int8", "bf16", "decode_ms", 0.6), ("int8", "int8-bnb", "decode_ms", 1.0)]
    + [(p, FASTER_FLOAT, "prefill_s", 1.0) for p in QUANTIZED]
    # reported, no target: qplug against GPTQModel on the same checkpoint
    + [(CHECKPOINTS[p], p, metric, None) for p in GPTQMODEL for metric in ("decode_ms", "prefill_s")]
)
RSS_SLACK = 1.1  # RSS after decoding <= 1.1 x (quantized + non-quantized tensors + runtime floor)
GIB = 2**30


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def child_env(isa: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if isa:
        env["ATEN_CPU_CAPABILITY"] = isa
        env["QPLUG_ISA"] = isa
        # oneDNN (torch's float matmuls) picks its own ISA: without this, bf16 would still run AVX512-BF16
        env["ONEDNN_MAX_CPU_ISA"] = {"avx2": "AVX2", "default": "SSE41"}.get(isa, "ALL")
    return env


def ensure_checkpoint(name: str, src: Path, env: dict[str, str], stem: str | None = None) -> Path | str:
    """The cached checkpoint ``name`` made from ``src``, built first when missing; on failure, the error
    (its paths fail)."""
    dst = CACHE / f"{stem or src.name}-decode-{name}"
    if not (dst / "config.json").is_file():
        print(f"building the {name} checkpoint in {dst} ...", flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, str(HERE / "decode_path.py"), "build", name, str(src), str(dst)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"  building {name} FAILED:\n{proc.stderr[-3000:]}", flush=True)
            return f"building the {name} checkpoint failed: {proc.stderr.strip()[-3000:]}"
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return dst


def run_path(path: str, target: Path | str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    if isinstance(target, str):  # its checkpoint could not be built
        return {"path": path, "error": target}
    cmd = [sys.executable, str(HERE / "decode_path.py"), "run", path, str(target),
           "--prompt", str(args.prompt), "--tokens", str(args.tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"path": path, "error": proc.stderr.strip()[-3000:] or f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ok(sample: dict | None) -> bool:
    return sample is not None and "error" not in sample and "na" not in sample


def value(samples: dict[str, list[dict]], path: str, repeat: int, metric: str) -> float | None:
    if path == FASTER_FLOAT:
        values = [value(samples, p, repeat, metric) for p in FLOATS]
        values = [v for v in values if v is not None]
        return min(values) if values else None
    runs = samples.get(path, [])
    sample = runs[repeat] if repeat < len(runs) else None
    return sample[metric] if ok(sample) and metric in sample else None


def paired_ratio(samples: dict[str, list[dict]], mine: str, ref: str, metric: str, repeats: int) -> float | None:
    """Median over repeats of mine/ref, both from the same repeat (a slow spell of the machine hits both)."""
    ratios = []
    for r in range(repeats):
        a, b = value(samples, mine, r, metric), value(samples, ref, r, metric)
        if a is not None and b:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def summarize(runs: list[dict]) -> dict:
    good = [s for s in runs if ok(s)]
    if not good:
        bad = next((s for s in runs if "na" in s or "error" in s), {})
        return {"na": bad.get("na") or bad.get("error", "no run")}
    out: dict = {}
    keys = ("decode_ms", "decode_step_ms_median", "decode_cpu_ms", "prefill_s", "rss", "max_rss", "quantized",
            "non_quantized", "load_s", "layouts_s")
    for key in keys:
        values = [s[key] for s in good if key in s]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["kernels"] = good[-1].get("kernels", {})
    out["kernel_reasons"] = good[-1].get("kernel_reasons", {})
    return out


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if not stat:
        return "—"
    m, lo, hi = (stat[k] / scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def kernels_text(kernels: dict[str, int]) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in sorted(kernels.items())) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model with the same structure (quick check)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of: {', '.join(PATHS)} (floor is always added); "
                        f"with GPTQModel installed also {', '.join(GPTQMODEL)}")
    parser.add_argument("--prompt", type=int, default=128, help="prompt (prefill) length in tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--name", default="decode", help="results file name: benchmarks/results/NAME.json, .md")
    parser.add_argument("--isa", choices=("avx2",), default=None,
                        help="run the children with ATEN_CPU_CAPABILITY, QPLUG_ISA and ONEDNN_MAX_CPU_ISA set for this")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS) - set(GPTQMODEL))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS + GPTQMODEL)}")
    if "floor" not in paths:
        paths.append("floor")
    env = child_env(args.isa)

    import torch

    src = model_dir(args.small)
    children = f"ATEN_CPU_CAPABILITY=QPLUG_ISA={args.isa}, ONEDNN_MAX_CPU_ISA" if args.isa else "native ISA"
    header = (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()} "
              f"(children: {children}), "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(header, flush=True)
    targets: dict[str, Path | str] = {}
    for path in paths:
        if path in GPTQMODEL or path in REPACKED:  # built from another path's checkpoint
            base = ensure_checkpoint(REPACKED.get(path) or CHECKPOINTS[path], src, env)
            targets[path] = base if isinstance(base, str) else ensure_checkpoint(path, base, env, stem=src.name)
        elif path in CHECKPOINTS:
            targets[path] = ensure_checkpoint(CHECKPOINTS[path], src, env)
        else:
            targets[path] = src

    samples: dict[str, list[dict]] = {p: [] for p in paths}
    for repeat in range(args.repeats):
        order = paths if repeat % 2 == 0 else list(reversed(paths))  # alternate who goes first
        for path in order:
            sample = run_path(path, targets[path], args, env)
            samples[path].append(sample)
            if "error" in sample:
                print(f"  run {repeat + 1}: {path:<20} FAILED: {sample['error'].splitlines()[-1]}", flush=True)
            elif "na" in sample:
                print(f"  run {repeat + 1}: {path:<20} n/a: {sample['na'][:150]}", flush=True)
            elif path == "floor":
                print(f"  run {repeat + 1}: {path:<20} RSS {sample['rss'] / GIB:.2f} GiB", flush=True)
            else:
                print(f"  run {repeat + 1}: {path:<20} decode {sample['decode_ms']:8.1f} ms/token  prefill "
                      f"{sample['prefill_s']:6.2f} s  RSS {sample['rss'] / GIB:5.2f} GiB (peak "
                      f"{sample['max_rss'] / GIB:5.2f})  [{sample['capability']}] "
                      f"{kernels_text(sample.get('kernels', {}))}", flush=True)
    stats = {p: summarize(s) for p, s in samples.items()}
    child_caps = sorted({s["capability"] for runs in samples.values() for s in runs if "capability" in s})
    floor = stats["floor"].get("rss", {}).get("median")

    shapes = "small model" if args.small else "TinyLlama-1.1B shapes"
    lines = [f"# Decode benchmark ({shapes}, batch 1, {args.prompt}-token prompt, {args.tokens} decode steps, "
             f"{args.repeats} runs each)", "", header + f"; children ran at CPU capability {', '.join(child_caps)}",
             "", "| path | decode ms/token | median step ms | decode CPU ms/token | prefill s | RSS after decode GiB | "
             "peak RSS GiB | quantized GiB | non-quantized GiB | kernels |", "|---" * 10 + "|"]
    for path in paths:
        st = stats[path]
        if path == "floor":
            lines.append(f"| floor | — | — | — | — | {fmt(st.get('rss'), GIB, 2)} | {fmt(st.get('max_rss'), GIB, 2)} "
                         "| — | — | — |")
        elif "na" in st:
            why = (st["na"].splitlines() or ["?"])[-1][:200].replace("|", "/")
            lines.append(f"| {path} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | {why} |")
        else:
            lines.append(f"| {path} | {fmt(st['decode_ms'])} | {fmt(st.get('decode_step_ms_median'))} | "
                         f"{fmt(st.get('decode_cpu_ms'))} | "
                         f"{fmt(st['prefill_s'], digits=2)} | "
                         f"{fmt(st['rss'], GIB, 2)} | {fmt(st['max_rss'], GIB, 2)} | "
                         f"{st['quantized']['median'] / GIB:.3f} | {st['non_quantized']['median'] / GIB:.3f} | "
                         f"{kernels_text(st['kernels'])} |")

    lines += ["", "One-off cost of the first forward (a one-token forward less the next: kernel choice and run-time "
              "layouts, or bitsandbytes' own repack), per GB of quantized tensors:", "",
              "| path | load s | first forward's extra s | s per GB quantized |", "|---|---|---|---|"]
    for path in paths:
        st = stats[path]
        if path != "floor" and "na" not in st and st.get("quantized", {}).get("median") and "layouts_s" in st:
            per_gb = st["layouts_s"]["median"] / (st["quantized"]["median"] / 1e9)
            lines.append(f"| {path} | {fmt(st.get('load_s'), digits=2)} | {fmt(st['layouts_s'], digits=2)} | "
                         f"{per_gb:.2f} |")

    lines += ["", "Ratios (median of per-repeat ratios; faster float = the faster of bf16 and fp32 in that repeat):",
              "", "| path | decode vs bf16 | decode vs faster float | prefill vs bf16 | prefill vs faster float | "
              "decode CPU time vs bf16 |", "|---|---|---|---|---|---|"]
    ratios: dict[str, dict[str, float | None]] = {}
    for path in paths:
        if path == "floor" or "na" in stats[path]:
            continue
        row = {f"{metric} vs {ref}": paired_ratio(samples, path, ref, metric, args.repeats)
               for metric in ("decode_ms", "prefill_s") for ref in ("bf16", FASTER_FLOAT)}
        row["decode_cpu_ms vs bf16"] = paired_ratio(samples, path, "bf16", "decode_cpu_ms", args.repeats)
        ratios[path] = row
        lines.append(f"| {path} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in row.values()) + " |")

    lines += ["", "| target | ratio | target | result |", "|---|---|---|---|"]
    verdicts = []
    for mine, ref, metric, target in TARGETS:
        if mine not in paths or (ref != FASTER_FLOAT and ref not in paths):
            continue
        what = f"{mine} {'decode' if metric == 'decode_ms' else 'prefill'} vs {ref}"
        ratio = paired_ratio(samples, mine, ref, metric, args.repeats)
        if ratio is None:
            result = "n/a"
        else:
            result = "—" if target is None else ("pass" if ratio <= target else "MISS")
        verdicts.append({"what": what, "ratio": ratio, "target": target, "result": result})
        lines.append(f"| {what} | {'n/a' if ratio is None else f'{ratio:.3f}'} | "
                     f"{'report' if target is None else f'≤ {target}'} | {result} |")
    for path in paths:
        st = stats[path]
        if path not in QUANTIZED or "na" in st or floor is None:
            continue
        budget = st["quantized"]["median"] + st["non_quantized"]["median"] + floor
        ratio = st["rss"]["median"] / budget
        what = f"{path} RSS after decode vs quantized + non-quantized + floor ({budget / GIB:.2f} GiB)"
        result = "pass" if ratio <= RSS_SLACK else "MISS"
        verdicts.append({"what": what, "ratio": ratio, "target": RSS_SLACK, "result": result})
        lines.append(f"| {what} | {ratio:.3f} | ≤ {RSS_SLACK} | {result} |")
    agreement = []
    for exact, rounded in W4A8.items():  # greedy tokens shared with the float-activation path
        if exact in paths and rounded in paths and "na" not in stats[rounded] and "na" not in stats[exact]:
            pairs = zip(samples[exact], samples[rounded], strict=True)
            same = [common_prefix(a["tokens"], b["tokens"]) for a, b in pairs]
            agreement.append(f"- {rounded}: the first {min(same)} of {len(samples[exact][0]['tokens'])} greedy "
                             f"tokens equal {exact}'s")
    if agreement:
        lines += ["", "Opt-in rows on int8 activations against the float-activation path:", "", *agreement]
    notes = [f"- {p}: {r}" for p in paths if p not in ("floor",) for r in list(stats[p].get("kernel_reasons", {}))[:1]]
    if notes:
        lines += ["", "Kernel choice (first reason reported per path):", "", *notes]
    report = "\n".join(lines) + "\n"
    print("\n" + report)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"small": args.small, "repeats": args.repeats, "prompt": args.prompt, "tokens": args.tokens,
         "isa": args.isa, "header": header, "child_capabilities": child_caps, "samples": samples,
         "stats": stats, "ratios": ratios, "targets": verdicts, "floor_rss": floor}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(report)
    print(f"results: {RESULTS / (args.name + '.json')}, {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
