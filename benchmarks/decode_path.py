"""One decode-benchmark path in its own process (``decode.py`` calls this; see its docstring).

    python benchmarks/decode_path.py run PATH MODEL_DIR [--prompt N] [--tokens N]
    python benchmarks/decode_path.py build PATH FLOAT_DIR OUT_DIR

``run`` loads the model the path names, times two one-token forwards (the first builds the run-time
layouts), warms up once, then times a 128-token prefill and 32
greedy decode steps with the KV cache (batch 1), and prints one JSON line: the timings, RSS after
decoding and peak RSS, the bytes of quantized and non-quantized tensors in the state dict, and the
kernel each quantized layer ran. A path that cannot run here (a kernel not available yet) prints
``{"path": ..., "na": reason}``.

``build`` writes the qplug checkpoint a quantized path loads: GPTQ and AWQ layers from
round-to-nearest integers of the float weights (no calibration: this measures speed, not
accuracy), bitsandbytes ones with qplug's quantize-on-load.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

# Every path imports the same libraries, so every path (and the floor) pays the same import RSS.
import bitsandbytes  # noqa: F401
import torch
import transformers
from torch import nn
from transformers import LlamaForCausalLM  # noqa: F401  (transformers imports model code lazily)

import qplug

for _plugin in ("qplug_gptq.linear", "qplug_awq.linear", "qplug_bitsandbytes.modules", "qplug_compressed_tensors"):
    try:  # imported by every path too (a broken plugin fails only the paths that use it)
        __import__(_plugin)
    except ImportError:
        pass

try:  # the core's kernel mechanism; quantized layers may not use it yet (reported "n/a")
    from qplug.kernels import KernelLayer
except ImportError:  # pragma: no cover - older core
    KernelLayer = ()  # type: ignore[assignment,misc]

GROUP = 128
FLOAT_PATHS = {"bf16": torch.bfloat16, "fp32": torch.float32}
GPTQ_PATHS = {  # path: (bits, sym, act-order)
    "gptq-4bit-sym": (4, True, False),
    "gptq-4bit-asym": (4, False, False),
    "gptq-4bit-actorder": (4, True, True),
    "gptq-8bit": (8, True, False),
}
BNB_PATHS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16"},
    "int8": {"load_in_8bit": True, "llm_int8_threshold": 6.0},
}
#: rows that load another path's checkpoint and run it on a kernel asked for by name (qplug.set_kernel):
#: bitsandbytes' own code, or qplug's opt-in GEMVs on int8 activations (W4A8; LLM.int8's inference arithmetic)
KERNEL_PATHS = {"nf4-bnb": ("nf4", "bitsandbytes"), "int8-bnb": ("int8", "bitsandbytes"),
                "gptq-4bit-sym-w4a8": ("gptq-4bit-sym", "qplug-int4-w4a8-cpu"),
                "awq-4bit-w4a8": ("awq-4bit", "qplug-int4-w4a8-cpu"),
                "int8-w8a8": ("int8", "qplug-llm-int8-cpu")}
#: the gptq-4bit-sym checkpoint repacked into another format (qplug.convert)
REPACKED_PATHS = {"ct-w4a16": "compressed-tensors"}
#: GPTQModel (>= 7.7, torch >= 2.14.1) running qplug's GPTQ checkpoints on its TorchAtenLinear (nox -s bench_gptqmodel)
GPTQMODEL_PATHS = {f"gptqmodel-{p.removeprefix('gptq-')}": p
                   for p in ("gptq-4bit-sym", "gptq-4bit-asym", "gptq-4bit-actorder")}


def checkpoint_of(path: str) -> str | None:
    """The cached checkpoint a path loads (``None``: the float model itself)."""
    path = KERNEL_PATHS[path][0] if path in KERNEL_PATHS else GPTQMODEL_PATHS.get(path, path)
    return path if path in GPTQ_PATHS or path in BNB_PATHS or path in REPACKED_PATHS or path == "awq-4bit" else None


# --------------------------------------------------------------------------------------------
# torch's own int4 kernel, applied directly (the reference for what torch built-ins reach)
# --------------------------------------------------------------------------------------------


class AtenInt4Linear(nn.Module):
    """A Linear as round-to-nearest asymmetric 4-bit, g128, run by ``_weight_int4pack_mm_for_cpu``."""

    kernel_name = "aten-int4pack-cpu"

    def __init__(self, linear: nn.Linear, group_size: int = GROUP) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        w = linear.weight.detach().float().view(out_features, in_features // group_size, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-6)
        codes = ((w - low) / scale).round_().clamp_(0, 15).to(torch.int32).view(out_features, in_features)
        # the kernel computes (q - 8) * scale + zero, so the zero is the group minimum plus 8 scales
        zero = low + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scale_zero = torch.stack((scale.squeeze(-1).t(), zero.squeeze(-1).t()), dim=-1)  # [groups, out, 2]
        self.register_buffer("scale_zero", scale_zero.to(torch.bfloat16).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features).to(x.dtype)


def decoder_linears(model: nn.Module) -> list[str]:
    """The Linear layers inside the decoder blocks (what GPTQ and AWQ quantize; not the head)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def load_float(src: Path, dtype: torch.dtype) -> nn.Module:
    """The float model with its weights in memory of its own.

    transformers leaves bf16 tensors as views of the memory-mapped shards: file-backed pages that the
    kernel may drop under page-cache pressure (then every decode step reads them from disk again) and
    that stay mapped, counted in RSS, while any tensor of a shard lives. Copies avoid both.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="cpu").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    release_memory()
    return model


def release_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# building the quantized checkpoints
# --------------------------------------------------------------------------------------------


def rtn_gptq(weight: torch.Tensor, bits: int, sym: bool, g_idx: torch.Tensor):
    """Round-to-nearest GPTQ integers of ``weight [out, in]`` for the groups ``g_idx`` assigns.

    Returns ``intweight [in, out]``, ``zeros [groups, out]``, ``scales [groups, out]`` (GPTQ's grid:
    min/max including 0; symmetric grids centred on ``2**(bits-1)``).
    """
    maxq = 2**bits - 1
    out_features, in_features = weight.shape
    groups = in_features // GROUP
    order = torch.argsort(g_idx, stable=True)  # channels of group 0, then of group 1, ...
    w = weight.detach().float()[:, order].view(out_features, groups, GROUP)
    low = w.amin(-1).clamp(max=0)
    high = w.amax(-1).clamp(min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = torch.where(low < 0, -high, low)
    flat = (low == 0) & (high == 0)
    low, high = low.masked_fill(flat, -1.0), high.masked_fill(flat, 1.0)
    scale = ((high - low) / maxq).half().float()  # the checkpoint stores float16 scales
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-low / scale)
    codes = (torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, maxq).to(torch.int32)
    intweight = torch.empty(out_features, in_features, dtype=torch.int32)
    intweight[:, order] = codes.view(out_features, in_features)
    return intweight.t().contiguous(), zero.to(torch.int32).t().contiguous(), scale.half().t().contiguous()


def act_order_g_idx(in_features: int, seed: int) -> torch.Tensor:
    """``g_idx`` as GPTQ's desc_act writes it: channels taken in a (here random) order, grouped in that order."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // GROUP
    return g_idx


def build_gptqmodel_view(ckpt: Path, dst: Path) -> None:
    """``dst``: links to the files of the GPTQ checkpoint ``ckpt`` plus a tokenizer, which GPTQModel.load requires.

    The model is random, so any tokenizer of its vocabulary size will do: one word per token id.
    config.json is a copy that names a GPTQModel release as producer (``meta.quantizer``): GPTQModel
    loads asymmetric v1 checkpoints only from producers it knows write v1 zero points as ``zero - 1``,
    which is what qplug writes (the greedy tokens of both paths are the same).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    config = json.loads((ckpt / "config.json").read_text())
    vocab = config["vocab_size"]
    tmp = dst.with_name(dst.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (tmp / f.name).exists():
            (tmp / f.name).symlink_to(f.resolve())
    meta = config["quantization_config"].get("meta") or {}
    config["quantization_config"]["meta"] = {**meta, "quantizer": ["gptqmodel:7.7.0"]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    words = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tokenizer = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="t2",
                                                bos_token="t1")
    fast.save_pretrained(tmp)
    os.replace(tmp, dst)


def build(path: str, src: Path, dst: Path) -> None:
    from qplug.modules import get_submodule, set_submodule

    if path in GPTQMODEL_PATHS:  # src: the qplug GPTQ checkpoint
        build_gptqmodel_view(src, dst)
        return
    if path in REPACKED_PATHS:  # src: the qplug GPTQ checkpoint, its integers repacked
        qplug.convert(src, dst, to=REPACKED_PATHS[path])
        return
    if path in BNB_PATHS:
        model = qplug.load_quantized(src, quantization_config={"quant_method": "bitsandbytes", **BNB_PATHS[path]})
        qplug.save_quantized(model, dst)
        return
    model = load_float(src, torch.bfloat16)
    if path in GPTQ_PATHS:
        from qplug_gptq.linear import GPTQLinear

        bits, sym, act_order = GPTQ_PATHS[path]
        config = qplug.get_config_class("gptq")(bits=bits, group_size=GROUP, sym=sym, desc_act=act_order)
        for i, name in enumerate(decoder_linears(model)):
            linear = get_submodule(model, name)
            in_features = linear.in_features
            g_idx = act_order_g_idx(in_features, seed=i) if act_order else torch.arange(in_features) // GROUP
            intweight, zeros, scales = rtn_gptq(linear.weight, bits, sym, g_idx)
            layer = GPTQLinear.from_integers(intweight, zeros, scales, g_idx, bits=bits, group_size=GROUP,
                                             checkpoint_format="gptq", sym=sym, weight_dtype=linear.weight.dtype)
            set_submodule(model, name, layer)
    elif path == "awq-4bit":
        from qplug_awq.linear import AwqLinear

        config = qplug.get_config_class("awq")(bits=4, group_size=GROUP, zero_point=True, version="gemm")
        for name in decoder_linears(model):
            set_submodule(model, name, AwqLinear.from_linear(get_submodule(model, name), bits=4, group_size=GROUP,
                                                             zero_point=True, version="gemm"))
    else:
        raise SystemExit(f"no checkpoint to build for path {path!r}")
    model.qplug_config = config  # what qplug.quantize records; save_quantized writes it as quantization_config
    qplug.save_quantized(model, dst)


# --------------------------------------------------------------------------------------------
# running a path
# --------------------------------------------------------------------------------------------


class NotAvailable(Exception):
    """This path cannot run on the current code (reported as an n/a row, not a failure)."""


def load(path: str, model_dir: Path) -> nn.Module:
    if path in FLOAT_PATHS:
        return load_float(model_dir, FLOAT_PATHS[path])
    if path == "torch-int4":
        from qplug.modules import get_submodule, set_submodule

        model = load_float(model_dir, torch.bfloat16)
        for name in decoder_linears(model):
            set_submodule(model, name, AtenInt4Linear(get_submodule(model, name)))
        release_memory()
        return model
    if path in GPTQMODEL_PATHS:
        try:
            from gptqmodel import BACKEND, GPTQModel
        except ImportError as exc:
            raise NotAvailable(f"gptqmodel does not import here ({exc}); nox -s bench_gptqmodel installs it") from exc
        loaded = GPTQModel.load(str(model_dir), backend=BACKEND.GPTQ_TORCH_ATEN, device="cpu", dtype=torch.bfloat16)
        return loaded.model.eval()
    model = qplug.load_quantized(model_dir)
    if path in KERNEL_PATHS:
        kernel = KERNEL_PATHS[path][1]
        try:
            qplug.set_kernel(model, kernel)
        except (qplug.KernelUnavailableError, AttributeError) as exc:
            raise NotAvailable(f"set_kernel(model, {kernel!r}): {exc}") from exc
    return model


def is_quantized(module: nn.Module) -> bool:
    """A leaf module holding integer (packed) tensors: a quantized layer, whatever its backend."""
    if isinstance(module, KernelLayer) or isinstance(module, AtenInt4Linear):
        return True
    if any(True for _ in module.children()):
        return False
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(not t.is_floating_point() for t in tensors)


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the state dict's tensors, split into those of quantized layers and the rest."""
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if n and is_quantized(m))
    sizes = {"quantized": 0, "non_quantized": 0}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel()) if t.numel() else (id(t), 0)
        if key in seen:  # tied tensors counted once
            continue
        seen.add(key)
        sizes["quantized" if name.startswith(prefixes) else "non_quantized"] += t.numel() * t.element_size()
    return sizes


def kernels_used(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """``(Counter of the kernel each quantized layer ran, Counter of the reasons)``; "n/a" where a layer
    does not go through qplug.kernels yet."""
    kernels: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    report = {}
    if KernelLayer:
        try:
            report = qplug.kernel_report(model)
        except AttributeError:
            report = {}
    for name, module in model.named_modules():
        if not name or not is_quantized(module):
            continue
        if isinstance(module, AtenInt4Linear):
            kernels[module.kernel_name] += 1
        elif type(module).__module__.startswith("gptqmodel."):
            kernels[f"gptqmodel {type(module).__name__}"] += 1
        elif name in report:
            kernels[str(report[name]["kernel"])] += 1
            if report[name]["reason"]:
                reasons[str(report[name]["reason"])] += 1
        else:
            kernels[f"n/a ({type(module).__name__})"] += 1
    return dict(kernels), dict(reasons.most_common(5))


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS: ``VmHWM``, the high-water mark of its own address space.

    ``getrusage``'s max RSS would do, but Linux carries it over ``fork`` + ``exec``: a child starts at
    its parent's RSS (1.1 GiB in a run that had just built the float model in the parent).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def generate(model: nn.Module, prompt: torch.Tensor, tokens: int) -> tuple[float, list[float], list[int], float]:
    """Greedy: one prefill of ``prompt``, then ``tokens`` decode steps with the KV cache.

    Returns (prefill seconds, seconds of each decode step, the generated token ids, the process's CPU seconds
    over the decode steps).
    """
    import inspect

    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    cache = DynamicCache()  # filled in place by every forward
    # transformers 5.2x names it `cache` (`past_key_values` is deprecated); logits of the last position
    # only, as model.generate asks for
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True,
              **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=prompt, **kwargs)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - start
        steps, ids = [], [int(token)]
        cpu_start = time.process_time()
        for _ in range(tokens):
            start = time.perf_counter()
            out = model(input_ids=token, **kwargs)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - start)
            ids.append(int(token))
        cpu = time.process_time() - cpu_start
    return prefill, steps, ids, cpu


def run(path: str, model_dir: Path, prompt_len: int, tokens: int) -> dict:
    info = {"path": path, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "isa_env": {k: os.environ.get(k) for k in
                                                            ("ATEN_CPU_CAPABILITY", "QPLUG_ISA", "ONEDNN_MAX_CPU_ISA")}}
    if path == "floor":
        return {**info, "rss": current_rss(), "max_rss": peak_rss(),
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    start = time.perf_counter()
    try:
        model = load(path, model_dir)
    except NotAvailable as exc:
        return {**info, "na": str(exc)}
    load_s = time.perf_counter() - start
    sizes = tensor_bytes(model)  # before any forward: bitsandbytes repacks some layouts on the first one
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    # the one-off cost of the first forward (kernel choice and every layer's run-time layout; bitsandbytes'
    # own repack), as one one-token forward against the next
    one_token = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            model(prompt[:, :1])
        one_token.append(time.perf_counter() - start)
    start = time.perf_counter()
    generate(model, prompt, min(tokens, 4))  # warm-up: oneDNN primitives, the prompt's shapes
    warmup_s = time.perf_counter() - start
    prefill, steps, ids, cpu = generate(model, prompt, tokens)
    kernels, reasons = kernels_used(model)
    return {
        **info,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "first_forward_s": one_token[0],
        "layouts_s": one_token[0] - one_token[1],
        "prefill_s": prefill,
        "decode_ms": 1000 * sum(steps) / len(steps),
        "decode_step_ms_median": 1000 * sorted(steps)[len(steps) // 2],
        # all threads' CPU time: what the host's steal does not stretch (OpenMP workers' spinning included)
        "decode_cpu_ms": 1000 * cpu / len(steps),
        "rss": current_rss(),
        "max_rss": peak_rss(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **sizes,
        "kernels": kernels,
        "kernel_reasons": reasons,
        "tokens": ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("path")
    p_run.add_argument("model_dir", type=Path)
    p_run.add_argument("--prompt", type=int, default=128)
    p_run.add_argument("--tokens", type=int, default=32)
    p_build = sub.add_parser("build")
    p_build.add_argument("path")
    p_build.add_argument("src", type=Path)
    p_build.add_argument("dst", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.path, args.src, args.dst)
        print(json.dumps({"built": str(args.dst)}))
    else:
        print(json.dumps(run(args.path, args.model_dir, args.prompt, args.tokens)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
