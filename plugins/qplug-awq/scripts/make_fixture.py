"""Make the test fixture with autoawq itself: a tiny seeded Llama, AWQ-quantized and saved by
autoawq 0.2.9, plus reference logits computed by autoawq's own ``WQLinear_GEMM`` modules.

Run in an environment with autoawq (see the README), from the repository root::

    python plugins/qplug-awq/scripts/make_fixture.py plugins/qplug-awq/tests/fixtures/tiny-llama-awq-g64

No model hub: the float model is built from ``qplug.testing.tiny_llama`` and the calibration
tokens are seeded. Writes ``config.json`` and ``model.safetensors`` (autoawq's checkpoint) and
``reference.safetensors`` (``tokens`` and autoawq's ``logits``, float32).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from qplug.testing import tiny_llama

# seeded calibration tokens and test tokens; the tests rebuild them with the same seeds
CALIBRATION_SEED, CALIBRATION_SHAPE = 5, (8, 64)
TOKENS_SEED, TOKENS_SHAPE = 1, (2, 16)


def calibration_tokens() -> torch.Tensor:
    return torch.randint(0, 256, CALIBRATION_SHAPE, generator=torch.Generator().manual_seed(CALIBRATION_SEED))


def test_tokens() -> torch.Tensor:
    return torch.randint(0, 256, TOKENS_SHAPE, generator=torch.Generator().manual_seed(TOKENS_SEED))


def autoawq_quantize(
    float_dir: Path, out_dir: Path, group_size: int, version: str = "GEMM", calib: torch.Tensor | None = None
) -> None:
    """Quantize the float checkpoint in ``float_dir`` with autoawq and save it to ``out_dir``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(float_dir), torch_dtype=torch.float16)
    calib = calibration_tokens() if calib is None else calib
    model.quantize(
        None,
        quant_config={"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": version},
        calib_data=[row.tolist() for row in calib],  # token ids: no dataset download, no tokenizer
        max_calib_seq_len=calib.shape[1],
        max_calib_samples=calib.shape[0],
    )
    model.save_quantized(str(out_dir))


def autoawq_model(quant_dir: Path) -> torch.nn.Module:
    """The checkpoint in ``quant_dir`` as autoawq runs it: a float16 Llama whose linear layers are
    autoawq's own ``WQLinear_GEMM``/``WQLinear_GEMV``, filled from the safetensors file.

    autoawq's ``from_quantized`` cannot be used on a CPU: it forces its IPEX kernel there (and
    IPEX has no build for this torch). This does what it does otherwise, with autoawq's own
    module-replacement routine and modules.
    """
    import transformers
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq.models._config import AwqConfig as AutoAwqQuantConfig
        from awq.models.llama import LlamaAWQForCausalLM

    config = transformers.AutoConfig.from_pretrained(str(quant_dir))
    hf_quant = config.quantization_config
    quant = AutoAwqQuantConfig.from_dict({
        "zero_point": hf_quant["zero_point"], "w_bit": hf_quant["bits"], "q_group_size": hf_quant["group_size"],
        "version": hf_quant["version"], "modules_to_not_convert": hf_quant.get("modules_to_not_convert"),
    })
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config).to(torch.float16)
    LlamaAWQForCausalLM._load_quantized_modules(
        LlamaAWQForCausalLM, model, quant, quant.version, use_exllama=False, use_exllama_v2=False, use_ipex=False
    )
    model.load_state_dict(load_file(str(quant_dir / "model.safetensors")), strict=True, assign=True)
    return model.eval()


def autoawq_logits(quant_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of autoawq's own modules (not fused) on ``tokens``, as float32."""
    with torch.no_grad():
        return autoawq_model(quant_dir)(tokens).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        float_dir = Path(tmp) / "float"
        tiny_llama(seed=0, dtype=torch.float16).save_pretrained(float_dir)
        if args.out.exists():
            shutil.rmtree(args.out)
        autoawq_quantize(float_dir, args.out, args.group_size)
    tokens = test_tokens()
    logits = autoawq_logits(args.out, tokens)
    save_file({"tokens": tokens, "logits": logits.contiguous()}, str(args.out / "reference.safetensors"))
    for extra in ("generation_config.json",):
        (args.out / extra).unlink(missing_ok=True)
    print(f"wrote {args.out}: {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
