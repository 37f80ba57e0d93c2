"""AWQ backend benchmarks (CPU).

1. Quantization time of one Llama decoder block: qplug's AWQ search vs autoawq 0.2.9's
   ``AutoAWQForCausalLM.quantize`` on the same seeded one-block model and calibration tokens
   (both in float32; autoawq is skipped, and said so, when it is not installed).
2. Forward latency of a 4096x4096 AWQ GEMM layer (group 128) against ``nn.Linear`` in float32:
   qplug's fused PyTorch path, the same with the dequantized weight cached, and autoawq's
   ``WQLinear_GEMM`` (float16 inputs: its only CPU path) when installed.

Usage::

    python plugins/qplug-awq/benchmarks/bench_awq.py [--hidden 512] [--intermediate 1408] [--repeat 5] [--threads N]

Prints median wall times; the machine's load changes them, so ratios measured in one run are
the figures to compare.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def autoawq_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import awq  # noqa: F401
    except Exception:
        return False
    return True


def one_block_model(hidden: int, intermediate: int, heads: int):
    from qplug.testing import tiny_llama

    return tiny_llama(seed=0, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=1, vocab_size=512, max_position_embeddings=512)


def bench_quantization(args) -> None:
    from qplug_awq.config import AwqConfig

    import qplug

    calib = torch.randint(0, 512, (args.samples, args.seq), generator=torch.Generator().manual_seed(5))
    print(f"== one-block AWQ quantization: hidden {args.hidden}, intermediate {args.intermediate}, "
          f"calibration {args.samples}x{args.seq} tokens, group 128, float32, {torch.get_num_threads()} threads")

    def run_qplug():
        model = one_block_model(args.hidden, args.intermediate, args.heads)
        start = time.perf_counter()
        qplug.quantize(model, AwqConfig(group_size=128), calibration=calib)
        return time.perf_counter() - start

    ours = statistics.median(run_qplug() for _ in range(args.quant_repeat))
    print(f"qplug   : {ours:8.2f} s")
    if not autoawq_available():
        print("autoawq : not installed (pip install autoawq==0.2.9 --no-deps; see the README)")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq import AutoAWQForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float"
        one_block_model(args.hidden, args.intermediate, args.heads).save_pretrained(path)

        def run_autoawq():
            model = AutoAWQForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.quantize(None, quant_config={"zero_point": True, "q_group_size": 128, "w_bit": 4,
                                                   "version": "GEMM"},
                               calib_data=[row.tolist() for row in calib], max_calib_seq_len=args.seq,
                               max_calib_samples=args.samples)
            return time.perf_counter() - start

        theirs = statistics.median(run_autoawq() for _ in range(args.quant_repeat))
    print(f"autoawq : {theirs:8.2f} s")
    print(f"ratio qplug / autoawq: {ours / theirs:.2f}")


@torch.no_grad()
def bench_forward(args) -> None:
    from qplug_awq.linear import AwqLinear

    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False)
    ours = AwqLinear.from_linear(linear, group_size=128)  # float32 inputs: dequant-blocked
    cached = AwqLinear.from_linear(linear, group_size=128)
    cached.cache_weight = True
    print(f"\n== forward latency, 4096x4096 linear, AWQ GEMM g128, CPU, {torch.get_num_threads()} threads "
          f"(median of {args.repeat}, ms)")
    header = (f"{'tokens':>6} | {'float32':>9} | {'awq fp32':>9} | {'ratio':>6} | {'awq cached':>10} | "
              f"{'bf16':>9} | {'awq bf16':>9} | {'ratio':>6}")
    print(header)
    dense_bf16 = nn.Linear(4096, 4096, bias=False).to(torch.bfloat16)
    for tokens in args.tokens:
        x = torch.randn(1, tokens, 4096)
        xb = x.bfloat16()
        row = [median_ms(lambda x=x: linear(x), args.repeat), median_ms(lambda x=x: ours(x), args.repeat)]
        line = f"{tokens:>6} | {row[0]:9.2f} | {row[1]:9.2f} | {row[1] / row[0]:6.2f} | "
        line += f"{median_ms(lambda x=x: cached(x), args.repeat):10.2f} | "
        bf = [median_ms(lambda xb=xb: dense_bf16(xb), args.repeat), median_ms(lambda xb=xb: ours(xb), args.repeat)]
        line += f"{bf[0]:9.2f} | {bf[1]:9.2f} | {bf[1] / bf[0]:6.2f}"  # ours runs tinygemm-int4-cpu here
        print(line)
    print(f"weights: float32 {4096 * 4096 * 4 / 2**20:.0f} MiB, AWQ "
          f"{sum(t.numel() * t.element_size() for t in ours.state_dict().values()) / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--quant-repeat", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--skip-quantization", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        # on a loaded machine every parallel region waits for a busy core (compare --threads 1)
        torch.set_num_threads(args.threads)
    if not args.skip_quantization:
        bench_quantization(args)
    bench_forward(args)


if __name__ == "__main__":
    main()
