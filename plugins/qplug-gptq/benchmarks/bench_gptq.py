"""Benchmarks of the qplug GPTQ backend (CPU).

1. Quantizing one linear layer with GPTQ (Hessian, error feedback, packing), qplug vs
   auto-gptq 0.7.1 on the same weights and calibration data (when auto-gptq imports).
2. Forward latency of a 4096x4096 GPTQ linear layer vs the float ``nn.Linear``.

    python plugins/qplug-gptq/benchmarks/bench_gptq.py [--layer 2048] [--tokens 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from qplug_gptq import autogptq
from qplug_gptq.algorithm import LayerGPTQ
from qplug_gptq.linear import GPTQLinear
from torch import nn


def _median_seconds(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_quantize(size: int, tokens: int, bits: int, group_size: int, desc_act: bool, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(size, size, bias=False).half()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(size, size, generator=gen) / size**0.5)
    weight = linear.weight.detach().clone()
    calib = [torch.randn(1, 128, size, generator=gen).half() for _ in range(max(1, tokens // 128))]
    kw = dict(bits=bits, group_size=group_size, damp_percent=0.1, desc_act=desc_act, static_groups=False, sym=True)

    def ours():
        layer = LayerGPTQ(weight, "bench")
        for x in calib:
            layer.add_batch(x)
        r = layer.quantize(**kw)
        return GPTQLinear.from_integers(
            r.intweight, r.zeros, r.scales.half(), r.g_idx, bits=bits, group_size=group_size
        )

    result = {
        "layer": f"{size}x{size}",
        "calibration_tokens": len(calib) * 128,
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
    }
    runners = {"qplug": ours}
    if autogptq.available():
        from auto_gptq.nn_modules.qlinear.qlinear_cuda import QuantLinear
        from auto_gptq.quantization import GPTQ

        if not torch.cuda.is_available():
            torch.cuda.synchronize = lambda *a, **k: None  # auto-gptq calls it unconditionally

        def theirs():
            lin = nn.Linear(size, size, bias=False).half()
            lin.weight.data = weight.clone()
            g = GPTQ(lin)
            g.quantizer.configure(bits, perchannel=True, sym=True, mse=False)
            for x in calib:
                g.add_batch(x, None)
            scale, zero, g_idx = g.fasterquant(percdamp=0.1, group_size=group_size, actorder=desc_act)
            q = QuantLinear(bits, group_size, size, size, False, weight_dtype=torch.float16)
            q.pack(lin, scale, zero, g_idx)
            return q

        runners["autogptq"] = theirs
    else:
        result["autogptq"] = f"not importable ({autogptq.import_error()})"
    # alternate the two, so a busy machine slows both alike; one untimed warm-up each
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(repeat + 1):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        result[f"{name}_s"] = statistics.median(ts)
    if "autogptq_s" in result:
        result["autogptq_over_qplug"] = result["autogptq_s"] / result["qplug_s"]
    return result


def bench_forward(size: int, batches: tuple[int, ...], repeat: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    bits, gs = 4, 128
    q = torch.randint(0, 16, (size, size), generator=gen)
    z = torch.full((size // gs, size), 8)
    s = (torch.rand(size // gs, size, generator=gen) * 0.01).half()
    g_idx = torch.arange(size, dtype=torch.int32) // gs
    qlin = GPTQLinear.from_integers(q, z, s, g_idx, bits=bits, group_size=gs, weight_dtype=torch.float32)
    flin = qlin.to_linear()
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, size, generator=gen)
            row = {"layer": f"{size}x{size}", "tokens": b, "dtype": "float32"}
            row["float_ms"] = 1e3 * _median_seconds(lambda x=x: flin(x), repeat)
            qlin.cache_weight = True
            row["gptq_cached_ms"] = 1e3 * _median_seconds(lambda x=x: qlin(x), repeat)
            qlin.cache_weight = False
            row["gptq_uncached_ms"] = 1e3 * _median_seconds(lambda x=x: qlin(x), max(3, repeat // 5))
            qlin.cache_weight = True
            if autogptq.available() and b <= 32:  # its fp16 CPU path is minutes at 512 tokens
                agq = autogptq.from_gptq_linear(qlin, desc_act=False)
                xh = x.half()
                row["autogptq_fp16_ms"] = 1e3 * _median_seconds(lambda agq=agq, xh=xh: agq(xh), max(3, repeat // 5))
            row["cached_over_float"] = row["gptq_cached_ms"] / row["float_ms"]
            rows.append(row)
    packed = sum(t.numel() * t.element_size() for t in (qlin.qweight, qlin.qzeros, qlin.scales, qlin.g_idx))
    rows.append(
        {
            "stored_bytes_gptq": packed,
            "stored_bytes_float32": size * size * 4,
            "note": "the cached path also holds a float32 copy of the weight while in use",
        }
    )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=2048, help="size of the square layer quantized (default 2048)")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    p.add_argument("--forward-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of quantization (median)")
    p.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice); 1 is steadiest on a busy machine"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it goes, also into a file
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, auto-gptq: "
        f"{'yes' if autogptq.available() else 'no'}"
    )
    print("\n== one-layer GPTQ quantization (median seconds; includes packing) ==")
    quant = []
    for act in (False, True):
        r = bench_quantize(args.layer, args.tokens, 4, 128, act, args.repeat)
        quant.append(r)
        line = (
            f"{r['layer']} {r['bits']}-bit g{r['group_size']} desc_act={r['desc_act']!s:5} "
            f"calib={r['calibration_tokens']} tok: qplug {r['qplug_s']:.2f}s"
        )
        if "autogptq_s" in r:
            line += f", auto-gptq {r['autogptq_s']:.2f}s, ratio auto-gptq/qplug {r['autogptq_over_qplug']:.2f}x"
        else:
            line += f" ({r['autogptq']})"
        print(line)
    fwd = bench_forward(args.forward_size, (1, 32, 512), repeat=20)
    print(f"\n== forward latency, {args.forward_size}x{args.forward_size} 4-bit g128 vs float (median ms, CPU) ==")
    for r in fwd[:-1]:
        line = (
            f"tokens={r['tokens']:4d}: float {r['float_ms']:.3f} ms, gptq cached {r['gptq_cached_ms']:.3f} ms "
            f"({r['cached_over_float']:.2f}x), gptq uncached {r['gptq_uncached_ms']:.1f} ms"
        )
        if "autogptq_fp16_ms" in r:
            line += f", auto-gptq QuantLinear (fp16 torch path) {r['autogptq_fp16_ms']:.1f} ms"
        print(line)
    print(
        f"stored: gptq {fwd[-1]['stored_bytes_gptq'] / 2**20:.1f} MiB vs float32 "
        f"{fwd[-1]['stored_bytes_float32'] / 2**20:.1f} MiB"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"quantize": quant, "forward": fwd}, fh, indent=2)


if __name__ == "__main__":
    main()
