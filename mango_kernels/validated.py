"""GPU architectures on which a committed `bash ci/gpu.sh` run has validated the Triton kernels.

Until a GPU run's results folder is committed with every kernel and backend test passing
compiled on a device, the kernels are known only from the interpreter (TRITON_INTERPRET=1 on
CPU) and from ahead-of-time compilation (`python -m bench.aot`), so the Triton backend warns
once per process on any architecture not listed here (see `mango.backends`). Add an entry only
together with that results folder, and the README's table of validated architectures.
"""

from __future__ import annotations

# (major, minor) compute capability -> "device, date, results folder" of the validating run
VALIDATED: dict = {}


def is_validated(capability) -> bool:
    return tuple(capability) in VALIDATED
