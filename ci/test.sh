#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (Triton kernels under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
python -m pytest -q -n 2 tests "$@"
