"""GPU architectures on which a committed `bash ci/gpu.sh` run has validated the Triton kernels.

Until a GPU run's results folder is committed whose kernel and backend tests passed compiled on
a device (every failure understood, none of them in a kernel), the kernels are known only from
the interpreter (TRITON_INTERPRET=1 on CPU) and from ahead-of-time compilation
(`python -m bench.aot`), so the Triton backend warns once per process on any architecture not
listed here (see `mango.backends`). Add an entry only together with that results folder, and the
table of validated architectures in docs/benchmarks.md.
"""

from __future__ import annotations

# (major, minor) compute capability -> "device, date, results folder" of the validating run
VALIDATED: dict = {
    # 138/143 CUDA-mode tests; the 5 failures were test assumptions and a tile-height rounding
    # difference between rounds, not kernel faults (docs/benchmarks.md: "Validated GPU architectures")
    (9, 0): "NVIDIA H200, 2026-12-04, bench/results/gpu_nvidia-h200_20261204T182152",
}


def is_validated(capability) -> bool:
    return tuple(capability) in VALIDATED
