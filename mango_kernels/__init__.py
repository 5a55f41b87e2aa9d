"""mango_kernels: the fused Triton kernels of a MANGO step and their launch helpers.

A step is a handful of launches, each covering every tensor of the step (multi-tensor):

    [novograd_prepass + segment_sums]   only when a novograd tensor is present
    moments                             v, m, Nesterov d (bf16 into the NS stack), Σd², ΣW², flags
    segment_sums                        per-tensor / per-head-block / per-row sums of squares
    ns_small                            all NS steps for every matrix with ≤ 128 rows (heads)
    ns_xxt, ns_poly, ns_update × steps  NS for the larger matrices, all shapes in one grid
    apply                               Δ, lr·k, trust ratio, offset momentum, weight decay, W

Where each part lives:

    elementwise, tables    the moments / segment-sum / apply kernels and their pointer tables
    ns_common              what every NS kernel shares: item table, operand rounding, polynomial, pre-scale
    ns_small, ns_tiled     the on-chip and the tiled NS kernels, each launcher with a float64 `_ref`
    ns_batch               the NS host side: items, buffers, launches (NSBatch, NSSpec, ns_buffers)
    resources              on-chip limits and shared memory per kernel and GPU (plain Python)
    aot                    ahead-of-time compilation of captured launches for a GPU target

Multi-tensor scheme: int64 pointer tables (raw `data_ptr()`s + run-time dtype codes) and a tile
table built once per plan; see `mango_kernels.tables` for why. Launches are counted by
`launch_count()` / `count_launches()` (see `mango_kernels._launch`).

This package has no torch.optim dependency: `mango.backends.triton_backend` maps the
optimizer's plan onto these tables. Its names are imported on first use, so the plain-Python
modules (`resources`) import without triton.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "._launch": ("INTERPRET", "LaunchLog", "LaunchProgram", "count_launches", "host_ops", "launch_count", "record", "recording"),
    ".elementwise": ("DEFAULT_BLOCK", "launch_apply", "launch_moments", "launch_novograd_prepass", "launch_segment_sums",
                     "nonfinite_flags", "nonfinite_layout"),
    ".ns_common": ("NS_DTYPES",),
    ".ns_batch": ("NSBatch", "NSConfig", "NSSpec", "newton_schulz", "ns_buffer_bytes", "ns_buffers", "prescale_only"),
    ".tables": ("DTYPE_CODES", "ElementwiseLayout", "TensorLayout", "TensorTable"),
}  # fmt: skip
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = list(_HOME_OF)


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mango_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
