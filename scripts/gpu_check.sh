#!/usr/bin/env bash
# The project's GPU check: every CUDA-marked test of the three backends, and the GPU timings.
#
# For a machine with an NVIDIA GPU and no network. Wheels come from a local folder
# (WHEELHOUSE, default ./wheelhouse) when it exists; otherwise the packages already installed in
# the current Python are used. Finishes in a few minutes; prints which kernels ran and their speed
# against fp16/bf16. qplug and its plugins are installed from this checkout unless they already
# import (installed from wheels, say).
#
#   bash scripts/gpu_check.sh            # from the repository root
#
# As run on an H200 with torch preinstalled (2026-11-27): wheels of bitsandbytes, autoawq (+ datasets,
# dill, multiprocess) and the four qplug distributions unpacked with
# `pip install --no-index --no-deps --target /tmp/site *.whl`, then `PYTHONPATH=/tmp/site bash scripts/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ -d "${WHEELHOUSE:-wheelhouse}" ]; then
  "$python" -m venv /tmp/qplug-gpu-venv && python=/tmp/qplug-gpu-venv/bin/python
  "$python" -m pip install --quiet --no-index --find-links "${WHEELHOUSE:-wheelhouse}" \
    torch bitsandbytes transformers accelerate peft pytest hypothesis safetensors pluggy attrs rich tqdm packaging
fi
# Install this checkout unless the four distributions are already installed (from wheels, say).
"$python" -c "import qplug, qplug_bitsandbytes, qplug_gptq, qplug_awq" 2>/dev/null ||
  "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation \
    -e . -e plugins/qplug-bitsandbytes -e plugins/qplug-gptq -e plugins/qplug-awq || exit 2

"$python" - <<'PY' || { echo "gpu_check: no usable CUDA device"; exit 2; }
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

status=0
for plugin in qplug-bitsandbytes qplug-gptq qplug-awq; do
  echo "== CUDA tests: $plugin"
  (cd "plugins/$plugin" && timeout 600 "$python" -m pytest -q -m cuda -rA -s -p no:cacheprovider tests) || status=1
done
echo "== timings"
timeout 300 "$python" scripts/gpu_bench.py || status=1
timeout 300 "$python" plugins/qplug-bitsandbytes/benchmarks/bench_bnb.py --device cuda --rounds 3 || status=1
exit $status
