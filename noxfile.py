"""Every session a developer or CI runs. `nox -l` lists them; `nox` runs the default set (the tests).

Each environment installs torch==2.13.0 (the CPU wheel) before anything else, so no requirement
can pull a multi-GB CUDA build; the packages themselves accept newer torch releases.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests", "bitsandbytes", "gptq", "gptq_autogptq", "awq", "awq_autoawq", "compressed_tensors",
                        "lint", "docs"]

TORCH = "torch==2.13.0"
EXAMPLE_PLUGIN = "docs/examples/qplug-int8"


def _install_core(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


def _pytest(session: nox.Session, *paths: str) -> None:
    # A fixed Hypothesis seed: the sessions (and so CI) draw the same examples on every machine, so a
    # green run here is a green run there. Plain `pytest` keeps drawing new ones to find new bugs.
    session.run("python", "-m", "pytest", "-q", "--hypothesis-seed=0", *paths, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Core tests: configs, plugin manager, model operations, contract kit, CLI (with the int8 example backend)."""
    _install_core(session, "test")
    session.install("--no-deps", EXAMPLE_PLUGIN)
    _pytest(session, "tests")


@nox.session
def bitsandbytes(session: nox.Session) -> None:
    """qplug-bitsandbytes against bitsandbytes' real CPU kernels and transformers' own bnb path."""
    _install_core(session, "test")
    session.install("-e", "plugins/qplug-bitsandbytes[transformers]", "peft")  # [transformers]: accelerate
    _pytest(session, "plugins/qplug-bitsandbytes/tests")


@nox.session
def gptq(session: nox.Session) -> None:
    """qplug-gptq with current transformers and no auto-gptq: loading, running, quantizing on its own."""
    _install_core(session, "test")
    session.install("-e", "plugins/qplug-gptq")
    _pytest(session, "plugins/qplug-gptq/tests")


@nox.session(name="gptq_autogptq")
def gptq_autogptq(session: nox.Session) -> None:
    """qplug-gptq against auto-gptq 0.7.1 itself, and transformers<4.50 loading its checkpoints (peft<0.11)."""
    session.install(TORCH)
    # [transformers-v4]: auto-gptq 0.7.1 with the pins it imports with (transformers<4.50, peft<0.11) and
    # optimum 1.24, through which transformers 4 loads GPTQ; its prebuilt wheel falls back to torch code here.
    session.install("-e", ".[accelerate]", "-e", "plugins/qplug-gptq[transformers-v4]", "pytest>=8",
                    "hypothesis>=6.100")
    _pytest(session, "plugins/qplug-gptq/tests")


@nox.session
def awq(session: nox.Session) -> None:
    """qplug-awq without autoawq: loading an autoawq-made fixture, running and quantizing on its own."""
    _install_core(session, "test")
    session.install("-e", "plugins/qplug-awq[test]")
    _pytest(session, "plugins/qplug-awq/tests")


@nox.session(name="awq_autoawq")
def awq_autoawq(session: nox.Session) -> None:
    """qplug-awq against autoawq 0.2.9 itself (installed without triton or an unpinned torch)."""
    _install_core(session, "test")
    session.install("-e", "plugins/qplug-awq[test]")
    # autoawq's own requirements pull triton and an unpinned torch: install it bare, then what it imports.
    session.install("--no-deps", "autoawq==0.2.9")
    session.install("accelerate", "datasets", "zstandard", "huggingface_hub>=0.26.5", "tokenizers", "typing_extensions")
    _pytest(session, "plugins/qplug-awq/tests")


@nox.session(name="compressed_tensors")
def compressed_tensors(session: nox.Session) -> None:
    """qplug-compressed-tensors against the compressed-tensors library's packers and compressors, llm-compressor-made
    fixtures and transformers' own loading; calibrated quantization through qplug-gptq."""
    _install_core(session, "test")
    # works with torch >= 2.10; 0.20.0's unpack_from_int32 fails on one-word rows packed along dim 0 (the
    # property test comparing qplug's packing with the library's found it), fixed in 0.20.1
    session.install("compressed-tensors==0.20.1")
    # convert's tests write GPTQ and AWQ checkpoints: both backends installed
    session.install("-e", "plugins/qplug-gptq", "-e", "plugins/qplug-awq",
                    "-e", "plugins/qplug-compressed-tensors[test]")
    _pytest(session, "plugins/qplug-compressed-tensors/tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the core, the plugins, the tests and the docs examples."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs (user guide, plugin-author guide, hook reference) with warnings as errors."""
    session.install(TORCH)
    session.install("-e", ".", "sphinx>=7", "myst-parser>=2")
    session.run("sphinx-build", "-W", "--keep-going", "-q", "-b", "html", "docs", "docs/_build/html")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: quantize a tiny seeded Llama with every installed backend and print what happened."""
    _install_core(session, "transformers", "plot")  # `qplug demo --plot demo.png`, the help's own example
    # [transformers]: accelerate, so transformers' from_pretrained loads the bitsandbytes checkpoints here too
    session.install("-e", "plugins/qplug-bitsandbytes[transformers]", "-e", "plugins/qplug-gptq",
                    "-e", "plugins/qplug-awq")
    session.run("qplug", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Figures and ratios measured side by side (never timed tests): core, streaming, decode, then each backend."""
    _install_core(session, "transformers", "plot")
    session.install("--no-deps", EXAMPLE_PLUGIN)
    session.install("-e", "plugins/qplug-bitsandbytes", "-e", "plugins/qplug-gptq", "-e", "plugins/qplug-awq",
                    "-e", "plugins/qplug-compressed-tensors")
    session.run("python", "benchmarks/bench_core.py")
    session.run("python", "benchmarks/run.py", *session.posargs)  # e.g. `nox -s bench -- --small`
    session.run("python", "benchmarks/decode.py", *session.posargs)  # batch-1 decode of every quantized path
    # device_map in memory, on the CPU and half on disk: load time, forwards, peak, identical logits
    session.run("python", "benchmarks/placement.py", *[arg for arg in session.posargs if arg == "--small"])
    for script in ("plugins/qplug-bitsandbytes/benchmarks/bench_bnb.py", "plugins/qplug-gptq/benchmarks/bench_gptq.py",
                   "plugins/qplug-awq/benchmarks/bench_awq.py"):
        session.run("python", script)


@nox.session(name="transformers_gptqmodel")
def transformers_gptqmodel(session: nox.Session) -> None:
    """transformers 5 loads qplug's GPTQ and AWQ checkpoints through GPTQModel 7.7 (on torch 2.14.1; not in `nox`)."""
    # GPTQModel 7.7 needs torch >= 2.14.1: the CUDA build, about 5.5 GB (it runs on the CPU too).
    session.install("torch==2.14.1")
    session.install("-e", ".[test]")
    session.install("-e", "plugins/qplug-gptq[transformers,test]", "-e", "plugins/qplug-awq[transformers,test]")
    # GPTQModel and the `kernels` package reach for the model hub while loading; offline nothing waits on it.
    session.env["HF_HUB_OFFLINE"] = "1"
    session.run("python", "-c", "import gptqmodel")  # the tests skip where it does not import: fail here instead
    _pytest(session, "-m", "gptqmodel", "plugins/qplug-gptq/tests")
    _pytest(session, "-m", "gptqmodel", "plugins/qplug-awq/tests")


GPTQMODEL_BENCH_PATHS = ("bf16,torch-int4,gptq-4bit-sym,gptqmodel-4bit-sym,gptq-4bit-asym,gptqmodel-4bit-asym,"
                         "gptq-4bit-actorder,gptqmodel-4bit-actorder")


@nox.session(name="bench_gptqmodel")
def bench_gptqmodel(session: nox.Session) -> None:
    """qplug's GPTQ decode beside GPTQModel 7.7's TorchAtenLinear on the same checkpoints (both on torch 2.14.1)."""
    # GPTQModel 7.7 needs torch >= 2.14.1: the CUDA build (it runs on the CPU too), the only 2.14.1 wheel here.
    session.install("torch==2.14.1")
    session.install("-e", ".[transformers]")
    session.install("-e", "plugins/qplug-bitsandbytes", "-e", "plugins/qplug-gptq", "-e", "plugins/qplug-awq")
    session.install("gptqmodel==7.7.0")
    session.run("python", "benchmarks/decode.py", "--paths", GPTQMODEL_BENCH_PATHS, "--name", "decode_gptqmodel",
                *session.posargs)  # e.g. `nox -s bench_gptqmodel -- --small --repeats 1`
