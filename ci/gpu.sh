#!/usr/bin/env bash
# The one command for a GPU machine (no network: installs nothing, runs from this checkout).
# In <= 8 minutes: versions and device, every test with a CUDA mode (compiled, per-test timeout),
# bench.step on GPT-2 124M/350M against every contender, a short AdamW/Muon/MANGO training run
# at the GPT-2 124M shape with triton-vs-torch loss agreement. Everything goes into ONE folder:
# $OUT when set, else bench/results/gpu_<device>_<time>/ (summary.md first).
#   bash ci/gpu.sh                  # on the GPU machine
#   bash ci/gpu.sh --cpu-dry-run    # the same stages on CPU at tiny sizes, < 2 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-$(command -v python || command -v python3)}" -m bench.gpu "$@"
