#!/usr/bin/env bash
# Everything a fresh CPU machine needs: the CPU build of torch (from this disk where it lies,
# else PyPI), then mango with its test and bench extras (pytest, triton, matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" || python -m pip install --quiet "torch>=2.4"
python -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
