#!/usr/bin/env bash
# The peer wheels of bench/gpu/wheels.txt, into .whl/ (ignored by git), for the GPU machine: it has
# no network, Python 3.12 on x86-64 Linux (the last GPU run's run.log). Run on a machine with
# network before the device call, carry `.whl` with it; `bash ci/gpu.sh` installs them first
# (bench/gpu/wheels.py) and reports any peer still missing as n/a with the reason.
#   bash ci/fetch_wheels.sh                          # Python 3.12 wheels
#   WHEEL_PYTHON_VERSION=3.13 bash ci/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
rm -rf .whl
mkdir -p .whl
sed -e 's/#.*//' -e 's/[[:space:]]//g' bench/gpu/wheels.txt | grep -v '^$' | while read -r requirement; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$requirement"
done
ls -l .whl
du -sh .whl  # what the device call carries: well under its 64 MiB
