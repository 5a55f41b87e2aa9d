#!/usr/bin/env bash
# Everything a fresh CPU machine needs: the CPU build of torch (from this disk where it lies,
# else PyPI), then mango with its test and bench extras (pytest, triton, matplotlib,
# transformers, accelerate, lightning). The extras are installed against a constraint that pins
# the torch just installed, so no dependency can swap the CPU build for a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" || python -m pip install --quiet "torch>=2.4"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"
python -m pip install --quiet --disable-pip-version-check -c "$constraints" -e ".[test,bench]"
# torchvision, for the tests that build its models: privately under build/third_party (PyPI's wheel
# is a CUDA build; beside the CPU torch only its pure-Python models are usable, see
# tests/third_party.py), at the minor version that matches torch (2.13 -> 0.28).
tv="$(python -c 'import torch; print("0.%d.*" % (int(torch.__version__.split(".")[1]) + 15))')"
python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target build/third_party "torchvision==$tv"
