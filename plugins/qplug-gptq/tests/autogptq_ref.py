"""Reference GPTQ checkpoints made by auto-gptq 0.7.1 itself (run where auto-gptq imports).

auto-gptq was written for CUDA: on a CPU-only torch its ``from_pretrained`` refuses to run,
and ``quantize`` moves each decoder layer to ``cuda:0`` and calls ``torch.cuda.synchronize()``.
So we wrap the float model in its ``LlamaGPTQForCausalLM`` directly, and :func:`cpu_shims`
points its device constant at the CPU and makes ``synchronize`` a no-op where CUDA is absent;
nothing of its arithmetic is replaced.

Also a script: ``python tests/autogptq_ref.py`` rewrites the committed fixtures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"

#: Shapes of the fixture model: every dimension a multiple of 32 (GPTQ packing) and tiny.
FIXTURE_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

#: The fixtures committed beside this file: name -> auto-gptq BaseQuantizeConfig kwargs.
FIXTURE_CONFIGS = {
    "llama-4bit-g32-actorder": {"bits": 4, "group_size": 32, "desc_act": True, "sym": True},
    "llama-3bit-g32-asym": {"bits": 3, "group_size": 32, "desc_act": False, "sym": False},
}


def cpu_shims() -> None:
    if torch.cuda.is_available():
        return
    import auto_gptq.modeling._base as base

    torch.cuda.synchronize = lambda *a, **k: None
    base.CUDA_0 = base.CPU


def seeded_llama(seed: int = 0, dtype=torch.float16, **shape):
    """A LlamaForCausalLM with seeded weights (std 1/sqrt(fan_in)), built from a config."""
    import transformers

    config = transformers.LlamaConfig(**{**FIXTURE_LLAMA, **shape})
    gen = torch.Generator().manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model.to(dtype).eval()


def calibration_ids(vocab: int, n: int = 16, length: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def eval_ids(vocab: int, seed: int = 11) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def make_checkpoint(
    out: Path,
    *,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    damp_percent: float = 0.1,
    seed: int = 0,
    static_groups: bool = False,
    shape: dict | None = None,
) -> Path:
    """Quantize the seeded tiny Llama with auto-gptq and save it with auto-gptq (safetensors)."""
    from auto_gptq import BaseQuantizeConfig
    from auto_gptq.modeling.llama import LlamaGPTQForCausalLM

    cpu_shims()
    model = seeded_llama(seed, **(shape or {}))
    model.seqlen = model.config.max_position_embeddings  # what from_pretrained sets
    qcfg = BaseQuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        damp_percent=damp_percent,
        static_groups=static_groups,
    )
    # from_pretrained refuses without CUDA (and only loads from disk); the wrapper itself does not care.
    agm = LlamaGPTQForCausalLM(model, False, qcfg)
    ids = calibration_ids(model.config.vocab_size)
    agm.quantize(
        [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones(1, r.numel(), dtype=torch.long)} for r in ids]
    )
    out.mkdir(parents=True, exist_ok=True)
    agm.save_quantized(str(out), use_safetensors=True)
    return out


def autogptq_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint run by auto-gptq's own modules (its PyTorch path on CPU)."""
    from auto_gptq import AutoGPTQForCausalLM

    cpu_shims()
    agm = AutoGPTQForCausalLM.from_quantized(
        str(directory),
        device="cpu",
        use_safetensors=True,
        use_triton=False,
        disable_exllama=True,
        disable_exllamav2=True,
        torch_dtype=torch.float16,
    )
    with torch.no_grad():
        return agm.model(ids).logits.float()


def write_fixtures() -> None:
    from safetensors.torch import save_file

    for name, kw in FIXTURE_CONFIGS.items():
        d = FIXTURES / name
        make_checkpoint(d, **kw)
        ids = eval_ids(FIXTURE_LLAMA["vocab_size"])
        logits = autogptq_logits(d, ids)
        # beside the checkpoint, not in it: a loader reads every *.safetensors in a checkpoint directory
        save_file({"input_ids": ids, "logits": logits}, str(FIXTURES / f"{name}.reference.safetensors"))
        import auto_gptq
        import transformers

        (FIXTURES / f"{name}.provenance.json").write_text(
            json.dumps(
                {
                    "made_by": f"auto-gptq {auto_gptq.__version__}, transformers {transformers.__version__}, "
                    f"torch {torch.__version__}",
                    "script": "plugins/qplug-gptq/tests/autogptq_ref.py",
                    "quantize_config": kw,
                    "reference_logits": "auto-gptq's own QuantLinear modules (PyTorch path), "
                    "float16 activations, logits as float32",
                },
                indent=2,
            )
            + "\n"
        )
        print(name, sorted(p.name for p in d.iterdir()), sum(p.stat().st_size for p in d.iterdir()), "bytes")


if __name__ == "__main__":
    sys.exit(write_fixtures())
