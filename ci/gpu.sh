#!/usr/bin/env bash
# The one command for a GPU machine (no network: installs nothing but the peer wheels carried in
# .whl/ — bash ci/fetch_wheels.sh fetches them beforehand — and runs from this checkout).
# In <= 7 minutes: versions and device, every test with a CUDA mode (compiled, per-test timeout),
# the host time of a triton step, every NS engine on the sets' NS buckets (the ARCH_TABLE entry),
# bench.step on bench GPT-2 124M, HF GPT-2 124M/350M and a Llama-3.2-1B-shaped model against every
# contender (the captured step and its replay check included), FSDP2 in a world of one on the sharded
# triton backend against the plain triton step, a short AdamW/Muon/MANGO training run at the GPT-2
# 124M shape with triton-vs-torch loss agreement. Everything goes into ONE folder:
# $OUT when set, else bench/results/gpu_<device>_<time>/ (summary.md first).
#   bash ci/gpu.sh                  # on the GPU machine
#   bash ci/gpu.sh --cpu-dry-run    # the same stages on CPU at tiny sizes, ~2.5 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-$(command -v python || command -v python3)}" -m bench.gpu "$@"
