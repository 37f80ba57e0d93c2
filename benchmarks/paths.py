"""One benchmark path, run in its own process: `python benchmarks/paths.py PATH MODEL_DIR [EXTRA_DIR]`.

Prints one JSON line: the path, the seconds the work took (imports excluded, the same imports on
every path), and the process's max RSS. `run.py` calls this for every path, alternating qplug and
transformers.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import bitsandbytes  # noqa: F401  (imported by every path, so every path pays the same floor)
import torch
import transformers
from transformers import LlamaForCausalLM  # noqa: F401  (transformers imports model code lazily: not timed)

import qplug

NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
       "bnb_4bit_compute_dtype": "bfloat16"}
INT8 = {"load_in_8bit": True}


def _hf_config(settings: dict) -> transformers.BitsAndBytesConfig:
    settings = dict(settings)
    if "bnb_4bit_compute_dtype" in settings:
        settings["bnb_4bit_compute_dtype"] = getattr(torch, settings["bnb_4bit_compute_dtype"])
    return transformers.BitsAndBytesConfig(**settings)


def transformers_quantize(src: Path, settings: dict):
    return transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=_hf_config(settings), device_map="cpu", dtype=torch.bfloat16
    )


def qplug_quantize(src: Path, settings: dict, library_quantizer: bool = False):
    if library_quantizer:  # bitsandbytes' own quantizers instead of qplug's compiled CPU kernels
        os.environ["QPLUG_BNB_FAST4BIT"] = os.environ["QPLUG_BNB_FAST8BIT"] = "0"
    return qplug.load_quantized(src, quantization_config={"quant_method": "bitsandbytes", **settings})


def plain_loop_nf4(src: Path):
    """What the library alone does: read each tensor, quantize_4bit the Linear weights, drop the source."""
    import bitsandbytes.functional as F

    from qplug.checkpoint import weight_files
    from qplug.safetensors_io import SafetensorsFile

    kept = {}
    for path in weight_files(src):
        with SafetensorsFile(path) as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                if name.endswith("proj.weight"):
                    kept[name] = F.quantize_4bit(tensor, blocksize=64, compress_statistics=True, quant_type="nf4")
                else:
                    kept[name] = tensor
    return kept


def read_bytes(src: Path):
    """The I/O floor for loading a checkpoint: every byte of its weight files read into memory."""
    from qplug.checkpoint import weight_files

    return [p.read_bytes() for p in weight_files(src)]


PATHS = {
    "transformers-nf4": lambda src: transformers_quantize(src, NF4),
    "qplug-nf4": lambda src: qplug_quantize(src, NF4),
    "qplug-nf4-bnb": lambda src: qplug_quantize(src, NF4, library_quantizer=True),
    "transformers-int8": lambda src: transformers_quantize(src, INT8),
    "qplug-int8": lambda src: qplug_quantize(src, INT8),
    "qplug-int8-bnb": lambda src: qplug_quantize(src, INT8, library_quantizer=True),
    "loop-nf4": plain_loop_nf4,
    "transformers-load-nf4": lambda src: transformers.AutoModelForCausalLM.from_pretrained(src, device_map="cpu"),
    "qplug-load-nf4": lambda src: qplug.load_quantized(src),
    "read-bytes": read_bytes,
    "floor": lambda src: None,
}


def main() -> None:
    path, src = sys.argv[1], Path(sys.argv[2])
    start = time.perf_counter()
    result = PATHS[path](src)
    seconds = time.perf_counter() - start
    if len(sys.argv) > 3 and result is not None:  # save what was made, for the load benchmarks
        qplug.save_quantized(result, sys.argv[3])
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"path": path, "seconds": seconds, "max_rss": max_rss}))


if __name__ == "__main__":
    main()
