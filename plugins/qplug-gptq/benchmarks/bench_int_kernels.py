"""Micro-benchmark: one GPTQ layer on each qplug.int_kernels kernel against a bf16 ``F.linear``.

    python plugins/qplug-gptq/benchmarks/bench_int_kernels.py [--threads N] [--out 5632 --in 2048]
                                                              [--dtype bfloat16 float16 float32] [--batch 1 128]

Guidance only (not a timed test): prints the best of ``--repeat`` runs per (kernel, batch), and the
one-off cost of building each kernel's layout, per GB of checkpoint tensors.
"""

from __future__ import annotations

import argparse
import time

import torch
from qplug_gptq import packing
from qplug_gptq.linear import GPTQLinear
from torch.nn import functional as F

import qplug


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layer(in_f: int, out_f: int, bits: int, group_size: int, act_order: bool) -> GPTQLinear:
    g = torch.Generator().manual_seed(0)
    groups = 1 if group_size == -1 else in_f // group_size
    q = torch.randint(0, 2**bits, (in_f, out_f), generator=g)
    z = torch.randint(0, 2**bits, (groups, out_f), generator=g)
    s = (torch.rand(groups, out_f, generator=g) * 0.01 + 1e-3).half()
    g_idx = packing.default_g_idx(in_f, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return GPTQLinear.from_integers(q, z, s, g_idx, bits=bits, group_size=group_size, sym=False, bias=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--in", dest="in_f", type=int, default=2048)
    p.add_argument("--out", dest="out_f", type=int, default=5632)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.out_f}x{args.in_f}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads")
    cases = [(4, 128, False), (4, 128, True), (8, 128, False), (8, -1, False), (3, 128, False)]
    for dtype in (getattr(torch, name) for name in args.dtype):
        dense = torch.randn(args.out_f, args.in_f, dtype=dtype)
        for bits, gs, act in cases:
            mod = layer(args.in_f, args.out_f, bits, gs, act)
            size_gb = sum(t.numel() * t.element_size() for t in mod.state_dict().values()) / 1e9
            names = [k.name for k in mod.kernels if k.refuses(mod, torch.device("cpu"), dtype) is None]
            for name in names:
                qplug.set_kernel(mod, name)
                start = time.perf_counter()
                qplug.prepare_kernels(mod, dtype)
                build = time.perf_counter() - start
                for batch in args.batch:
                    x = torch.randn(batch, args.in_f, dtype=dtype)
                    with torch.no_grad():
                        t_dense = best_ms(lambda x=x, dense=dense: F.linear(x, dense), args.repeat)
                        t_kernel = best_ms(lambda x=x, mod=mod: mod(x), args.repeat)
                    print(f"{str(dtype)[6:]:8s} {bits}-bit g{gs}{' act-order' if act else ''} {name:18s} "
                          f"batch {batch:4d}: {t_kernel:8.3f} ms  (F.linear {t_dense:8.3f} ms, "
                          f"{t_kernel / t_dense:5.2f}x)  layout build {build / size_gb:6.1f} s/GB")


if __name__ == "__main__":
    main()
