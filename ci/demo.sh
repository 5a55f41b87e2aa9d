#!/usr/bin/env bash
# Set up a fresh machine and run the main job: the GPT training comparison (CPU-sized by default).
# Extra arguments go to bench.train, e.g. `bash ci/demo.sh --size gpt2` on a GPU. Results go to
# bench/results/local/ (ignored by git); `--update-results` regenerates the committed bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
python -m bench.train "$@"
