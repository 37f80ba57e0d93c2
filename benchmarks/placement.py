"""Loading a quantized checkpoint with ``device_map``: load time, first forward and peak memory, disk offload
against the model in memory, and whether the logits are identical.

    python benchmarks/placement.py [--small] [--runs 2] [--checkpoint gptq-4bit-sym] [--cpu-share 0.5]

The checkpoint is one of the decode benchmark's (``decode.py``: the random Llama with TinyLlama-1.1B shapes,
``--small`` its small variant; built under benchmarks/.cache/ when missing). Each mode loads it with
``qplug.load_quantized`` in a fresh process (benchmarks/child_runs.py: seconds, CPU seconds and peak RSS,
imports excluded) and runs two forwards of a 16-token prompt (the first builds the kernels' layouts):

* ``memory``: no ``device_map`` (everything in RAM, the default);
* ``cpu-map``: ``device_map="cpu"`` (accelerate's plan and placement, nothing offloaded);
* ``disk-half``: a dict map with every other decoder layer on ``"disk"`` (the rest on the CPU) and an
  ``offload_folder``: those layers are read back by accelerate's hooks at every forward;
* ``disk-auto``: ``device_map="auto"`` with ``max_memory={"cpu": SHARE x the checkpoint's bytes}``: accelerate's
  plan (it keeps room for the largest layer on the CPU, so a small share sends everything to disk).

Issue 15's target for it: the logits of every mode identical to ``memory``'s (pass/miss); the load time
and the forward's are reported, with what the disk mode offloaded. The floor is a process that imports the
same libraries and loads nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from child_runs import CHILD_HEAD, CHILD_REPORT, GIB, measure, timed_main  # noqa: E402
from decode import child_env, ensure_checkpoint  # noqa: E402
from model import model_dir  # noqa: E402

MODES = ("memory", "cpu-map", "disk-half", "disk-auto")

# The child: one load and one forward; the logits go to a file, the figures to one JSON line.
_CHILD = CHILD_HEAD + """
import torch, transformers
import qplug
mode, directory, share, offload, logits_file = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(2)
prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
checkpoint_bytes = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
start, cpu_start = time.perf_counter(), time.process_time()
model = None  # the floor: imports only
if mode == "memory":
    model = qplug.load_quantized(directory)
elif mode == "cpu-map":
    model = qplug.load_quantized(directory, device_map="cpu")
elif mode == "disk-half":
    layers = json.loads((Path(directory) / "config.json").read_text())["num_hidden_layers"]
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu",
                  **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(layers)}}
    model = qplug.load_quantized(directory, device_map=device_map, offload_folder=offload)
elif mode == "disk-auto":
    model = qplug.load_quantized(directory, device_map="auto", max_memory={"cpu": int(share * checkpoint_bytes)},
                                 offload_folder=offload)
loaded = time.perf_counter() - start
placed = getattr(model, "hf_device_map", None) or {}
forwards = []
if model is not None:
    for _ in range(2):
        forward_start = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=prompt).logits
        forwards.append(time.perf_counter() - forward_start)
    torch.save(logits, logits_file)
""" + CHILD_REPORT.replace(
    'print(json.dumps({"mode": mode, "seconds": seconds, "cpu": cpu, "peak": peak}))',
    'print(json.dumps({"mode": mode, "seconds": seconds, "cpu": cpu, "peak": peak, "load": loaded, '
    '"forwards": forwards, "on_disk": sum(1 for d in placed.values() if d == "disk"), "modules": len(placed), '
    '"checkpoint_bytes": checkpoint_bytes}))')
_CHILD = _CHILD.replace("import json, sys, time\n", "import json, sys, time\nfrom pathlib import Path\n", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the decode benchmark's small model (quick check)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each mode, alternated (fastest shown)")
    parser.add_argument("--checkpoint", default="gptq-4bit-sym",
                        help="one of the decode benchmark's quantized checkpoints (default gptq-4bit-sym)")
    parser.add_argument("--cpu-share", type=float, default=0.75,
                        help="disk-auto's max_memory for the CPU, as a share of the checkpoint's bytes")
    args = parser.parse_args()
    import torch

    env = child_env(None)
    target = ensure_checkpoint(args.checkpoint, model_dir(args.small), env)
    if isinstance(target, str):
        print(target)
        return 1
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"checkpoint {args.checkpoint} ({target}); {args.runs} runs per mode, alternated")
    with tempfile.TemporaryDirectory(prefix="qplug-placement-") as tmp:
        floor = measure(_CHILD, "floor", str(target), "0", tmp, str(Path(tmp) / "none.pt"))["peak"]
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for run in range(args.runs):
            for mode in MODES:
                offload = Path(tmp) / f"offload-{mode}-{run}"
                logits = Path(tmp) / f"logits-{mode}-{run}.pt"
                sample = measure(_CHILD, mode, str(target), str(args.cpu_share), str(offload), str(logits))
                sample["logits"] = torch.load(logits)
                results[mode].append(sample)
        reference = results["memory"][0]["logits"]
        print(f"checkpoint {results['memory'][0]['checkpoint_bytes'] / GIB:.3f} GiB; runtime floor "
              f"{floor / GIB:.2f} GiB; disk-auto: max_memory cpu = {args.cpu_share} x the checkpoint")
        print("| mode | load s | first forward s | second forward s | peak above floor GiB | modules placed | "
              "on disk | logits |")
        print("|---|---|---|---|---|---|---|---|")
        identical = True
        rows = {}
        for mode, samples in results.items():
            same = all(torch.equal(s["logits"], reference) for s in samples)
            identical = identical and same
            best = min(samples, key=lambda s: s["load"])
            rows[mode] = {"load": best["load"], "first_forward": min(s["forwards"][0] for s in samples),
                          "second_forward": min(s["forwards"][1] for s in samples),
                          "above": max(s["peak"] for s in samples) - floor, "modules": best["modules"],
                          "on_disk": best["on_disk"], "identical": same}
            row = rows[mode]
            print(f"| {mode} | {best['load']:.2f} (slowest {max(s['load'] for s in samples):.2f}) | "
                  f"{row['first_forward']:.2f} | {row['second_forward']:.2f} | {row['above'] / GIB:.3f} | "
                  f"{best['modules'] or '—'} | {best['on_disk']} | {'identical' if same else 'DIFFER'} |")
        offloaded = rows["disk-half"]["on_disk"] > 0 and rows["disk-auto"]["on_disk"] > 0
        print(f"the disk modes offloaded {rows['disk-half']['on_disk']} and {rows['disk-auto']['on_disk']} modules: "
              f"{'yes' if offloaded else 'NO (nothing offloaded: lower --cpu-share?)'}")
        print(f"logits identical in every mode: {'pass' if identical else 'MISS'}")
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "placement.json").write_text(json.dumps(
            {"checkpoint": args.checkpoint, "small": args.small, "cpu_share": args.cpu_share, "floor": floor,
             "capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}, indent=2) + "\n")
        return 0 if identical and offloaded else 1


if __name__ == "__main__":
    timed_main(main)
