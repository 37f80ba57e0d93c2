"""GPU timings: a two-block Llama with TinyLlama-1.1B widths, quantized by each backend, vs float16.

Run by scripts/gpu_check.sh on a machine with an NVIDIA GPU. For each backend it builds the
model on the GPU, quantizes it through ``qplug.quantize`` (so the backend picks its kernel as it
would for a user; GPTQ and AWQ calibrate on seeded token ids), and prints the quantize time, the
Linear class that ran, and the median forward time for a decode step (1 token) and a prefill
(512 tokens) against the same float16 model.
"""

from __future__ import annotations

import statistics
import time

import torch

import qplug
from qplug.testing import tiny_llama

SHAPES = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    num_hidden_layers=2,
    vocab_size=32000,
    max_position_embeddings=1024,
)
CASES = [
    (
        "bitsandbytes",
        {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "float16",
        },
    ),
    ("bitsandbytes", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128}),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 128}),
]
TOKENS = (1, 512)
REPEATS = 20


def forward_ms(model: torch.nn.Module, tokens: int) -> float:
    ids = torch.randint(
        0, SHAPES["vocab_size"], (1, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    with torch.no_grad():
        for _ in range(3):
            model(ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    reference = tiny_llama(0, dtype=torch.float16, **SHAPES).cuda()
    baseline = {tokens: forward_ms(reference, tokens) for tokens in TOKENS}
    print("float16: " + ", ".join(f"{t} token(s) {ms:.2f} ms" for t, ms in baseline.items()))
    del reference
    calibration = torch.randint(0, SHAPES["vocab_size"], (16, 128), generator=torch.Generator().manual_seed(5))
    for name, config in CASES:
        if name not in qplug.available_backends():
            print(f"{name}: not available here")
            continue
        model = tiny_llama(0, dtype=torch.float16, **SHAPES).cuda()
        try:
            start = time.perf_counter()
            qplug.quantize(model, config, calibration=calibration.cuda())
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            layer = model.model.layers[0].mlp.up_proj
            kernel = f"{type(layer).__module__}.{type(layer).__name__}"
            timings = {tokens: forward_ms(model, tokens) for tokens in TOKENS}
        except Exception as exc:  # report and go on to the next backend
            print(f"{name} {config}: failed: {type(exc).__name__}: {exc}")
            continue
        ratios = ", ".join(f"{t} token(s) {ms:.2f} ms ({ms / baseline[t]:.2f}x fp16)" for t, ms in timings.items())
        label = {k: v for k, v in config.items() if k != "quant_method"}
        print(f"{name} {label}: quantized in {seconds:.1f} s; {kernel}: {ratios}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
