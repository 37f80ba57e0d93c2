"""GPU timings: a 4096x4096 linear layer quantized by each backend vs the same layer in fp16/bf16.

Run by scripts/gpu_check.sh on a machine with an NVIDIA GPU. For each backend it quantizes a
one-layer model through qplug (so the backend picks its kernel as it would for a user), moves
it to the GPU, and prints the module that ran and the median forward time against the float layer.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

import qplug

SIZE, TOKENS, REPEATS = 4096, 16, 50
CASES = [
    ("bitsandbytes", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                      "bnb_4bit_compute_dtype": "bfloat16"}, torch.bfloat16),
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128}, torch.float16),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 128}, torch.float16),
]


def timed(module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        for _ in range(5):
            module(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    for name, config, dtype in CASES:
        if name not in qplug.available_backends():
            print(f"{name}: not available here")
            continue
        layer = nn.Sequential(nn.Linear(SIZE, SIZE, bias=False)).to(dtype)
        x = torch.randn(TOKENS, SIZE, dtype=dtype, device="cuda")
        float_ms = timed(layer.to("cuda"), x)
        model = nn.Sequential(nn.Linear(SIZE, SIZE, bias=False)).to(dtype)
        calibration = torch.randn(8, SIZE, dtype=dtype)
        try:
            qplug.quantize(model, config, calibration=calibration)
            model = model.to("cuda")
            quant_ms = timed(model, x)
        except Exception as exc:  # report and go on to the next backend
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        kernel = type(model[0]).__module__ + "." + type(model[0]).__name__
        print(f"{name}: {kernel}: {quant_ms:.3f} ms vs {dtype} {float_ms:.3f} ms "
              f"({quant_ms / float_ms:.2f}x) for {TOKENS}x{SIZE} @ {SIZE}x{SIZE}")


if __name__ == "__main__":
    main()
