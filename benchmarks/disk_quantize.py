"""Disk-to-disk NF4 quantization: peak memory flat with depth, time against quantize-on-load + save.

    python benchmarks/disk_quantize.py [--keep DIR]

Builds random Llamas 1024 wide (TinyLlama's proportions: intermediate 2816, 16 heads, 4 KV heads,
vocabulary 32000) with 8 and 48 layers, saved as bf16 safetensors in a temporary directory. Each
measurement runs in a fresh process, which reports its peak RSS (``VmHWM`` in /proc/self/status)
and the seconds the work took (imports excluded):

* ``floor``: the same imports and the backend check, nothing built (the runtime floor);
* ``disk``: ``qplug.quantize_checkpoint(SRC, DST, nf4)``;
* ``load+save``: ``qplug.load_quantized(SRC, quantization_config=nf4)`` then ``qplug.save_quantized``.

Targets (issue 15): disk peak above the floor grows <= 1.3x from 8 to 48 layers; disk time <= 1.1x
load+save. Both runs' outputs are also compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
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
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "bfloat16"}
DEPTHS = (8, 48)
RUNS = 2  # each timed path runs this many times, alternating; the fastest run and the highest peak count
GROWTH_TARGET = 1.3
TIME_TARGET = 1.1
GIB = 2**30

# The child: one measurement, one JSON line.
_CHILD = """
import json, sys, time
import bitsandbytes, torch, transformers
from transformers import LlamaForCausalLM
import qplug
mode, src, dst = sys.argv[1:4]
config = qplug.config_from_dict(json.loads(sys.argv[4]))
qplug.get_plugin_manager().backend_for_config(config).ensure_available()
start = time.perf_counter()
if mode == "disk":
    qplug.quantize_checkpoint(src, dst, config)
elif mode == "load+save":
    qplug.save_quantized(qplug.load_quantized(src, quantization_config=config), dst)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"mode": mode, "seconds": seconds, "peak": peak}))
"""


def measure(mode: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(dst), json.dumps(NF4)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {src.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary dir)")
    args = parser.parse_args()
    import torch

    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="qplug-disk-bench-") as tmp:
        root = args.keep or Path(tmp)
        rows = {}
        for layers in DEPTHS:
            src = build_float_checkpoint(root / f"llama-1024x{layers}-bf16", {**SHAPES, "num_hidden_layers": layers})
            float_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            floor = measure("floor", src, root / "unused")["peak"]
            runs: dict[str, list[dict]] = {"disk": [], "load+save": []}
            for _ in range(RUNS):
                for mode in runs:
                    out = root / f"out-{layers}-{mode}"
                    runs[mode].append(measure(mode, src, out))
            same = digest(root / f"out-{layers}-disk") == digest(root / f"out-{layers}-load+save")
            rows[layers] = {
                "float": float_bytes, "floor": floor, "identical": same,
                **{mode: {"above": max(r["peak"] for r in rs) - floor, "seconds": min(r["seconds"] for r in rs)}
                   for mode, rs in runs.items()},
            }
        print()
        print("| layers | float bf16 | floor | disk: peak above floor | load+save: peak above floor "
              "| disk time | load+save time | outputs identical |")
        print("|---|---|---|---|---|---|---|---|")
        for layers, r in rows.items():
            print(f"| {layers} | {r['float'] / GIB:.2f} GiB | {r['floor'] / GIB:.2f} GiB "
                  f"| {r['disk']['above'] / GIB:.3f} GiB | {r['load+save']['above'] / GIB:.3f} GiB "
                  f"| {r['disk']['seconds']:.1f} s | {r['load+save']['seconds']:.1f} s "
                  f"| {'yes' if r['identical'] else 'NO'} |")
        small, large = rows[DEPTHS[0]], rows[DEPTHS[-1]]
        growth = large["disk"]["above"] / small["disk"]["above"]
        ratio = large["disk"]["seconds"] / large["load+save"]["seconds"]
        print()
        print(f"disk peak above floor, {DEPTHS[-1]}/{DEPTHS[0]} layers: {growth:.2f}x "
              f"(target <= {GROWTH_TARGET}): {'pass' if growth <= GROWTH_TARGET else 'miss'}")
        print(f"disk time / load+save time, {DEPTHS[-1]} layers: {ratio:.2f}x "
              f"(target <= {TIME_TARGET}): {'pass' if ratio <= TIME_TARGET else 'miss'}")
        identical = all(r["identical"] for r in rows.values())
        print(f"disk output byte-identical to load+save: {'yes' if identical else 'NO'}")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    raise SystemExit(code)
