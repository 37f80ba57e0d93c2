"""qplug.quantize vs. calling bitsandbytes directly: time and peak memory, side by side.

Both quantize the same seeded Llama-architecture model (same weights, built from a config) with
the same settings. "direct" is the plain loop a user would write against bitsandbytes alone:
for every ``nn.Linear`` but the head, build a ``bnb.nn.Linear4bit`` (or ``Linear8bitLt``), hand it
the float weight as a ``Params4bit`` (``Int8Params``) and let ``.to(device)`` quantize it.

Memory: every measurement runs in a fresh worker process, alternating the two methods, so one
method's freed-but-cached memory never counts against the other; the figure is the process's peak
resident set (CPU, ``VmHWM``) or ``torch.cuda.max_memory_allocated`` (``--device cuda``), also
shown as the increase over the resident size just before quantizing. The workers hash the
resulting state dicts, so the report says whether both methods produced identical tensors.

Time: the wall time of the quantize call alone (the model is built before the clock starts).
Besides the per-process figures, one process runs ``--pairs`` back-to-back pairs of the two
methods on fresh copies of the model; on a shared machine the median of the per-pair ratios is
the robust figure, and the one checked against the target.

    python plugins/qplug-bitsandbytes/benchmarks/bench_bnb.py            # NF4 + double quant, 5 rounds
    python plugins/qplug-bitsandbytes/benchmarks/bench_bnb.py --format int8 --rounds 3
    python plugins/qplug-bitsandbytes/benchmarks/bench_bnb.py --json results.json
    python plugins/qplug-bitsandbytes/benchmarks/bench_bnb.py --fast-kernels   # qplug with its CPU kernels

Both methods quantize with bitsandbytes' own code unless ``--fast-kernels`` is given (qplug's
default on CPU is its C kernels, which write the same bytes faster; that would hide the overhead
this benchmark is for).

Target: both ratios (qplug / direct) at most 1.05.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FORMATS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype="bfloat16"),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
# A small but realistically shaped decoder: ~100M parameters in its linear layers (0.4 GB float32).
MODEL = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
             tie_word_embeddings=False)
TARGET = 1.05


# --------------------------------------------------------------------------------------------
# worker: one measurement
# --------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _build_model(device: str, layers: int):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(**{**MODEL, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def _direct(model, settings: dict) -> None:
    """What one writes with bitsandbytes alone (the way its docs and transformers do it)."""
    import bitsandbytes as bnb
    import torch

    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    for name in names:
        linear = model.get_submodule(name)
        device = linear.weight.device
        parent_name, _, child = name.rpartition(".")
        if settings.get("load_in_8bit"):
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                      has_fp16_weights=False, threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False,
                                           has_fp16_weights=False).to(device)
        else:
            compute = getattr(torch, settings.get("bnb_4bit_compute_dtype", "float32"))
            double = settings.get("bnb_4bit_use_double_quant", False)
            quant_type = settings["bnb_4bit_quant_type"]
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                    compute_dtype=compute, compress_statistics=double, quant_type=quant_type,
                                    device="meta")
            new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double,
                                           quant_type=quant_type, module=new).to(device)
        if linear.bias is not None:
            new.bias = linear.bias
        new.requires_grad_(False)
        setattr(model.get_submodule(parent_name), child, new)


def _qplug(model, settings: dict) -> None:
    import qplug

    qplug.quantize(model, qplug.config_from_dict({"quant_method": "bitsandbytes", **settings}))


def _digest(model) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def worker(method: str, fmt: str, device: str, layers: int) -> dict:
    # Imports and plugin discovery are one-time start-up costs, kept outside the measurement
    # for both methods alike.
    import bitsandbytes  # noqa: F401
    import qplug_bitsandbytes.modules  # noqa: F401
    import torch

    import qplug
    import qplug.modules

    qplug.available_backends()
    settings = FORMATS[fmt]
    model = _build_model(device, layers)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status("VmRSS")
    start = time.perf_counter()
    (_qplug if method == "qplug" else _direct)(model, settings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status("VmHWM")
    return {"method": method, "seconds": seconds, "peak": peak, "before": before, "digest": _digest(model)}


def timing_worker(fmt: str, device: str, layers: int, pairs: int) -> dict:
    """Paired timings in one process: each pair runs both methods back to back on fresh copies.

    On a shared machine the load drifts; a ratio taken within a pair sees nearly the same load
    for both methods, so the median of the per-pair ratios is the robust time figure.
    """
    import copy

    import bitsandbytes  # noqa: F401
    import qplug_bitsandbytes.modules  # noqa: F401
    import torch

    import qplug
    import qplug.modules

    qplug.available_backends()
    settings = FORMATS[fmt]
    base = _build_model(device, layers)
    times: dict[str, list[float]] = {"direct": [], "qplug": []}
    for index in range(pairs):
        order = ("direct", "qplug") if index % 2 == 0 else ("qplug", "direct")
        for method in order:
            model = copy.deepcopy(base)
            gc.collect()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            (_qplug if method == "qplug" else _direct)(model, settings)
            if device == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - start)
            del model
    return times


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _run_worker(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--format", args.format, "--device", args.device,
           "--layers", str(args.layers), "--pairs", str(args.pairs)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.threads))}
    if not args.fast_kernels:  # the same quantizer both ways: what is left is qplug's own overhead
        env.update(QPLUG_BNB_FAST4BIT="0", QPLUG_BNB_FAST8BIT="0")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:9.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=sorted(FORMATS), default="nf4-dq")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per method (alternating)")
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the workers")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--pairs", type=int, default=6, help="back-to-back timing pairs in one process")
    parser.add_argument("--fast-kernels", action="store_true",
                        help="let qplug use its CPU quantization kernels (default: bitsandbytes' quantizers both ways)")
    parser.add_argument("--worker", choices=("qplug", "direct", "timing"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "timing":
        print(json.dumps(timing_worker(args.format, args.device, args.layers, args.pairs)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.format, args.device, args.layers)))
        return 0

    results: dict[str, list[dict]] = {"direct": [], "qplug": []}
    for round_ in range(args.rounds):
        order = ("direct", "qplug") if round_ % 2 == 0 else ("qplug", "direct")
        for method in order:
            results[method].append(_run_worker(method, args))

    paired = _run_worker("timing", args) if args.pairs else {"direct": [], "qplug": []}
    pair_ratios = [q / d for q, d in zip(paired["qplug"], paired["direct"], strict=True)]

    digests = {r["digest"] for rs in results.values() for r in rs}
    hidden, inner = MODEL["hidden_size"], MODEL["intermediate_size"]
    linear_params = args.layers * (4 * hidden**2 + 3 * hidden * inner)
    print(f"bitsandbytes {args.format} on {args.device}: Llama, {args.layers} layers, "
          f"{linear_params / 1e6:.0f}M linear parameters, {args.rounds} rounds per method, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', args.threads)}, "
          f"qplug quantizes with {'its CPU kernels' if args.fast_kernels else 'bitsandbytes (as direct does)'}")
    print(f"identical quantized tensors from both methods: {'yes' if len(digests) == 1 else 'NO'}")
    header = f"{'':26}{'direct bnb':>16}{'qplug':>16}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    rows = {}
    for label, key, agg, fmt in (
        ("time, best (process)", "seconds", min, lambda v: f"{v:13.3f} s"),
        ("time, median (process)", "seconds", statistics.median, lambda v: f"{v:13.3f} s"),
        ("peak memory, median", "peak", statistics.median, _mib),
        ("peak over start, median", None, statistics.median, _mib),
    ):
        if key is None:
            d = agg([r["peak"] - r["before"] for r in results["direct"]])
            q = agg([r["peak"] - r["before"] for r in results["qplug"]])
        else:
            d = agg([r[key] for r in results["direct"]])
            q = agg([r[key] for r in results["qplug"]])
        rows[label] = q / d if d else float("nan")
        print(f"{label:26}{fmt(d):>16}{fmt(q):>16}{rows[label]:9.3f}")
    if pair_ratios:
        d, q = statistics.median(paired["direct"]), statistics.median(paired["qplug"])
        rows["time, paired"] = statistics.median(pair_ratios)
        print(f"{'time, median (paired)':26}{f'{d:13.3f} s':>16}{f'{q:13.3f} s':>16}{rows['time, paired']:9.3f}"
              f"   (median of {len(pair_ratios)} per-pair ratios)")
    time_ratio = rows.get("time, paired", rows["time, best (process)"])
    memory_ratio = rows["peak memory, median"]
    ok = time_ratio <= TARGET and memory_ratio <= TARGET and len(digests) == 1
    print(f"target <= {TARGET}: time {time_ratio:.3f}, peak memory {memory_ratio:.3f} -> "
          f"{'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "paired": paired}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
