"""One quantized linear layer on the CPU: qplug's kernels (each instruction-set path) vs bitsandbytes' own
forward vs a float ``F.linear`` on the same layer (issue #12's micro-benchmark; whole-model decode is
``benchmarks/decode.py``).

For each layer shape (out x in) and batch (rows of ``x``), every method is timed ``--rounds`` times in
interleaved rounds (each round runs every method once, ``--inner`` calls each, after a warm-up), and the median
per call is reported with its ratio to bf16 ``F.linear`` -- medians of interleaved rounds, because other work
on a shared machine moves single timings. Each qplug row is also checked against bitsandbytes' dequantize +
float32 matmul.

    python plugins/qplug-bitsandbytes/benchmarks/bench_cpu_linear.py
    python plugins/qplug-bitsandbytes/benchmarks/bench_cpu_linear.py --format int8 --dtype bfloat16 --batch 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

SHAPES = ((5632, 2048), (2048, 5632), (2048, 2048))
FORMATS = {
    "nf4-dq": dict(quant_type="nf4", double_quant=True),
    "nf4": dict(quant_type="nf4", double_quant=False),
    "fp4": dict(quant_type="fp4", double_quant=False),
    "int8": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=sorted(FORMATS), nargs="+", default=["nf4-dq", "int8"])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--shape", type=str, nargs="+", default=[f"{n}x{k}" for n, k in SHAPES])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=0, help="calls per timing (default: by batch)")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes' own forward (slow)")
    args = parser.parse_args()

    import bitsandbytes as bnb  # noqa: F401
    import torch
    from qplug_bitsandbytes import cpu_linear, modules

    import qplug
    from qplug import native

    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, kernels built: {native.CPU_KERNELS.get() is not None}, "
          f"best ISA path: {cpu_linear.isa()[0]}, bf16 matmul native: {native.native_bf16_matmul()}")
    print(f"{'format':7} {'shape':>10} {'batch':>5} {'method':22} {'ms/call':>9} {'x bf16':>7} {'rel.err':>8}")
    isas = [name for name, code in sorted(cpu_linear.ISAS.items(), key=lambda kv: -kv[1])
            if code <= cpu_linear.ISAS[cpu_linear.isa()[0]]]
    for fmt in args.format:
        for shape in args.shape:
            n, k = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            linear = torch.nn.Linear(k, n, bias=False).to(dtype)
            if FORMATS[fmt] is None:
                layer = modules.quantize_8bit(linear).eval()
            else:
                layer = modules.quantize_4bit(linear, compute_dtype=dtype, **FORMATS[fmt]).eval()
            w_bf16 = linear.weight.detach().to(torch.bfloat16)
            w_f32 = linear.weight.detach().float()
            reference_weight = layer.float_weight(torch.float32)
            for batch in args.batch:
                x = torch.randn(batch, k).to(dtype)
                reference = x.float() @ reference_weight.T
                inner = args.inner or (20 if batch <= 8 else 3)

                qplug.set_kernel(layer, "qplug-4bit-cpu" if FORMATS[fmt] else "qplug-int8-cpu")

                def run_qplug(isa_name, layer=layer, x=x):
                    def call():
                        os.environ[cpu_linear.ISA_ENV_VAR] = isa_name
                        return layer(x)
                    return call

                methods = {
                    "F.linear bf16": lambda x=x, w=w_bf16: torch.nn.functional.linear(x.to(torch.bfloat16), w),
                    "F.linear fp32": lambda x=x, w=w_f32: torch.nn.functional.linear(x.float(), w),
                }
                for name in isas:
                    methods[f"qplug {name}"] = run_qplug(name)
                if not args.no_bnb:
                    # A copy of its own: switching one layer between kernels rebuilds its layout each time
                    # (and undoes bitsandbytes' repack), which would be timed instead of the kernels.
                    bnb_layer = copy.deepcopy(layer)
                    qplug.set_kernel(bnb_layer, "bitsandbytes")
                    methods["bitsandbytes"] = lambda x=x, layer=bnb_layer: layer(x)
                times: dict[str, list[float]] = {m: [] for m in methods}
                errors = {}
                with torch.no_grad():
                    for name, fn in methods.items():  # warm-up: builds layouts, bitsandbytes' repack
                        if name == "bitsandbytes":
                            os.environ.pop(cpu_linear.ISA_ENV_VAR, None)
                        out = fn()
                        if name.startswith(("qplug", "bitsandbytes")):
                            errors[name] = ((out.float() - reference).norm() / reference.norm()).item()
                    for _ in range(args.rounds):
                        for name, fn in methods.items():
                            t0 = time.perf_counter()
                            for _ in range(inner):
                                fn()
                            times[name].append((time.perf_counter() - t0) / inner)
                os.environ.pop(cpu_linear.ISA_ENV_VAR, None)
                base = statistics.median(times["F.linear bf16"])
                for name, ts in times.items():
                    med = statistics.median(ts)
                    err = f"{errors[name]:8.1e}" if name in errors else ""
                    print(f"{fmt:7} {shape:>10} {batch:5d} {name:22} {med * 1e3:9.3f} {med / base:7.2f} {err}")


if __name__ == "__main__":
    main()
