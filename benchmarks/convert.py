"""Converting a quantized checkpoint: time against reading and writing the same bytes, peak memory flat with depth.

    python benchmarks/convert.py [--tinyllama] [--depths 4,16] [--runs 2] [--threads N] [--keep DIR]
                                 [--to gptq|awq|compressed-tensors]

Builds random Llamas as bf16 safetensors, by default 1024 wide (TinyLlama's proportions: intermediate
2816, 16 heads, 4 KV heads, vocabulary 32000) with 4 and 16 layers; ``--tinyllama``: TinyLlama-1.1B's
own shapes (benchmarks/model.py: 2048 wide, intermediate 5632, 32 heads, 4 KV heads) with 4 and 22
layers, the 22 being the 1.1B model. Each is quantized to compressed-tensors W4A16 (asymmetric,
groups of 128, bfloat16 scales; ``qplug.quantize_checkpoint``), then measured, each in a fresh process
that reports its peak RSS (``VmHWM``), the seconds the work took and its CPU seconds (imports excluded;
benchmarks/child_runs.py; the fewest CPU seconds of the runs are shown, which other jobs on the machine
do not stretch as they stretch wall time):

* ``floor``: the same imports (torch, transformers, the three backends' modules and compressed-tensors)
  and the backends' checks, nothing read (the runtime floor);
* ``convert``: ``qplug.convert(SRC, DST, to=...)`` (default GPTQ v1);
* ``read+write``: every tensor of SRC read into memory (``qplug.checkpoint.CheckpointWeights``) and
  written unchanged into an atomic staging directory with ``qplug.shards.ShardWriter``: the same I/O
  as the conversion, with no conversion.

Targets (issue 16): convert time <= 1.5x read+write at the larger depth; convert's peak above the
floor flat with depth (grows <= 1.3x from the smaller depth to the larger).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_runs import CHILD_HEAD, CHILD_REPORT, GIB, alternate, measure, timed_main, verdict  # benchmarks/
from model import TINYLLAMA_SHAPES, build_float_checkpoint  # benchmarks/model.py

SHAPES = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
          "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}
W4A16_ASYM = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                       "group_size": 128}}}}
GROWTH_TARGET = 1.3
TIME_TARGET = 1.5

# The child: one measurement, one JSON line.
_CHILD = CHILD_HEAD + """
import contextlib
import torch, transformers
from transformers import LlamaForCausalLM
import qplug
mode, src, dst, to, threads = sys.argv[1:6]
if int(threads):
    torch.set_num_threads(int(threads))
for name in ("gptq", "awq", "compressed-tensors"):
    qplug.get_plugin_manager().get_backend(name).ensure_available()
# the libraries a conversion uses, imported before the clock starts (as torch and transformers are)
import compressed_tensors, qplug_awq.linear, qplug_compressed_tensors.linear, qplug_gptq.linear
start, cpu_start = time.perf_counter(), time.process_time()
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
""" + CHILD_REPORT


def quantized_checkpoint(root: Path, shapes: dict, layers: int) -> Path:
    import qplug

    width = shapes["hidden_size"]
    target = root / f"llama-{width}x{layers}-ct-w4a16-asym"
    if not (target / "config.json").is_file():
        src = build_float_checkpoint(root / f"llama-{width}x{layers}-bf16", {**shapes, "num_hidden_layers": layers})
        qplug.quantize_checkpoint(src, target, W4A16_ASYM)  # bf16 scales, as the model's dtype
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tinyllama", action="store_true",
                        help="TinyLlama-1.1B's shapes, 2048 wide, at 4 and 22 layers (default: 1024 wide, 4 and 16)")
    parser.add_argument("--depths", help="comma-separated layer counts (default 4,16; 4,22 with --tinyllama)")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs of each timed path, alternating (default 2); the fastest run and the highest "
                             "peak count")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in each measured process (default 0: torch's choice); 1 keeps "
                             "OpenMP from stalling on a machine others are using")
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary dir)")
    parser.add_argument("--to", default="gptq", help="the target format (default: gptq)")
    args = parser.parse_args()
    import torch

    from qplug import progress

    shapes = {k: v for k, v in TINYLLAMA_SHAPES.items() if k != "num_hidden_layers"} if args.tinyllama else SHAPES
    depths = [int(d) for d in (args.depths or ("4,22" if args.tinyllama else "4,16")).split(",")]
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"qplug.convert to {args.to}, hidden {shapes['hidden_size']}, depths {depths}, {args.runs} runs each, "
          f"threads {args.threads or torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="qplug-convert-bench-") as tmp, progress.enabled(False):
        root = args.keep or Path(tmp)
        rows = {}
        for layers in depths:
            src = quantized_checkpoint(root, shapes, layers)
            nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            floor = measure(_CHILD, "floor", str(src), str(root / "unused"), args.to, str(args.threads))["peak"]
            measured = alternate(["convert", "read+write"], args.runs,
                                 lambda mode, src=src, layers=layers: measure(
                                     _CHILD, mode, str(src), str(root / f"out-{layers}-{mode}"), args.to,
                                     str(args.threads)),
                                 floor)
            rows[layers] = {"bytes": nbytes, "floor": floor, **measured}
        print()
        print("| layers | SRC safetensors | floor | convert: peak above floor | read+write: peak above floor "
              "| convert time (fastest-slowest) | read+write time | ratio | convert CPU | read+write CPU "
              "| CPU ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for layers, r in rows.items():
            c, rw = r["convert"], r["read+write"]
            print(f"| {layers} | {r['bytes'] / GIB:.3f} GiB | {r['floor'] / GIB:.2f} GiB "
                  f"| {c['above'] / GIB:.3f} GiB | {rw['above'] / GIB:.3f} GiB "
                  f"| {c['seconds']:.2f}-{c['slowest']:.2f} s | {rw['seconds']:.2f}-{rw['slowest']:.2f} s "
                  f"| {c['seconds'] / rw['seconds']:.2f}x | {c['cpu']:.2f} s | {rw['cpu']:.2f} s "
                  f"| {c['cpu'] / rw['cpu']:.2f}x |")
        print()
        small, large = rows[depths[0]], rows[depths[-1]]
        print()
        verdict(f"convert peak above floor, {depths[-1]}/{depths[0]} layers",
                large["convert"]["above"] / small["convert"]["above"], GROWTH_TARGET)
        verdict(f"convert time / read+write time, {depths[-1]} layers",
                large["convert"]["seconds"] / large["read+write"]["seconds"], TIME_TARGET)
    return 0


if __name__ == "__main__":
    timed_main(main)
