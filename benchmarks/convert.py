"""Converting a quantized checkpoint: time against reading and writing the same bytes, peak memory flat with depth.

    python benchmarks/convert.py [--keep DIR] [--to gptq|awq|compressed-tensors]

Builds random Llamas 1024 wide (TinyLlama's proportions: intermediate 2816, 16 heads, 4 KV heads,
vocabulary 32000) with 4 and 16 layers as bf16 safetensors, quantizes each to compressed-tensors
W4A16 (asymmetric, groups of 128, bfloat16 scales; ``qplug.quantize_checkpoint``), then measures, each
in a fresh process that reports its peak RSS (``VmHWM``) and the seconds the work took (imports excluded):

* ``floor``: the same imports (torch, transformers, the three backends' modules and compressed-tensors)
  and the backends' checks, nothing read (the runtime floor);
* ``convert``: ``qplug.convert(SRC, DST, to=...)`` (default GPTQ v1);
* ``read+write``: every tensor of SRC read into memory (``qplug.checkpoint.CheckpointWeights``) and
  written unchanged into an atomic staging directory with ``qplug.shards.ShardWriter``: the same I/O
  as the conversion, with no conversion.

Targets (issue 16): convert time <= 1.5x read+write at the larger depth; convert's peak above the
floor flat with depth (grows <= 1.3x from 4 to 16 layers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import build_float_checkpoint  # benchmarks/model.py

SHAPES = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
          "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}
W4A16_ASYM = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                       "group_size": 128}}}}
DEPTHS = (4, 16)
RUNS = 2  # each timed path runs this many times, alternating; the fastest run and the highest peak count
GROWTH_TARGET = 1.3
TIME_TARGET = 1.5
GIB = 2**30

# The child: one measurement, one JSON line.
_CHILD = """
import contextlib, json, sys, time
import torch, transformers
from transformers import LlamaForCausalLM
import qplug
mode, src, dst, to = sys.argv[1:5]
for name in ("gptq", "awq", "compressed-tensors"):
    qplug.get_plugin_manager().get_backend(name).ensure_available()
# the libraries a conversion uses, imported before the clock starts (as torch and transformers are)
import compressed_tensors, qplug_awq.linear, qplug_compressed_tensors.linear, qplug_gptq.linear
start = time.perf_counter()
if mode == "convert":
    qplug.convert(src, dst, to=to)
elif mode == "read+write":
    from pathlib import Path
    from qplug._io import atomic_directory
    from qplug.checkpoint import CheckpointWeights
    from qplug.shards import ShardWriter
    with contextlib.ExitStack() as stack:
        weights = CheckpointWeights(src, stack)
        with atomic_directory(Path(dst)) as staging, ShardWriter(staging, max_shard_size="50GB") as writer:
            for name in weights.names():
                writer.add(name, weights.get(name))
            writer.finish()
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"mode": mode, "seconds": seconds, "peak": peak}))
"""


def measure(mode: str, src: Path, dst: Path, to: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(dst), to],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {src.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quantized_checkpoint(root: Path, layers: int) -> Path:
    import qplug

    target = root / f"llama-1024x{layers}-ct-w4a16-asym"
    if not (target / "config.json").is_file():
        src = build_float_checkpoint(root / f"llama-1024x{layers}-bf16", {**SHAPES, "num_hidden_layers": layers})
        qplug.quantize_checkpoint(src, target, W4A16_ASYM)  # bf16 scales, as the model's dtype
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary dir)")
    parser.add_argument("--to", default="gptq", help="the target format (default: gptq)")
    args = parser.parse_args()
    import torch

    from qplug import progress

    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"qplug.convert to {args.to}")
    with tempfile.TemporaryDirectory(prefix="qplug-convert-bench-") as tmp, progress.enabled(False):
        root = args.keep or Path(tmp)
        rows = {}
        for layers in DEPTHS:
            src = quantized_checkpoint(root, layers)
            nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            floor = measure("floor", src, root / "unused", args.to)["peak"]
            runs: dict[str, list[dict]] = {"convert": [], "read+write": []}
            for _ in range(RUNS):
                for mode in runs:
                    runs[mode].append(measure(mode, src, root / f"out-{layers}-{mode}", args.to))
            rows[layers] = {
                "bytes": nbytes, "floor": floor,
                **{mode: {"above": max(r["peak"] for r in rs) - floor, "seconds": min(r["seconds"] for r in rs)}
                   for mode, rs in runs.items()},
            }
        print()
        print("| layers | SRC safetensors | floor | convert: peak above floor | read+write: peak above floor "
              "| convert time | read+write time | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for layers, r in rows.items():
            print(f"| {layers} | {r['bytes'] / GIB:.3f} GiB | {r['floor'] / GIB:.2f} GiB "
                  f"| {r['convert']['above'] / GIB:.3f} GiB | {r['read+write']['above'] / GIB:.3f} GiB "
                  f"| {r['convert']['seconds']:.2f} s | {r['read+write']['seconds']:.2f} s "
                  f"| {r['convert']['seconds'] / r['read+write']['seconds']:.2f}x |")
        small, large = rows[DEPTHS[0]], rows[DEPTHS[-1]]
        growth = large["convert"]["above"] / small["convert"]["above"]
        ratio = large["convert"]["seconds"] / large["read+write"]["seconds"]
        print()
        print(f"convert peak above floor, {DEPTHS[-1]}/{DEPTHS[0]} layers: {growth:.2f}x "
              f"(target <= {GROWTH_TARGET}): {'pass' if growth <= GROWTH_TARGET else 'miss'}")
        print(f"convert time / read+write time, {DEPTHS[-1]} layers: {ratio:.2f}x "
              f"(target <= {TIME_TARGET}): {'pass' if ratio <= TIME_TARGET else 'miss'}")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    raise SystemExit(code)
