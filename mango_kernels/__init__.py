"""mango_kernels: the fused Triton kernels of a MANGO step and their launch helpers.

A step is a handful of launches, each covering every tensor of the step (multi-tensor):

    [novograd_prepass + segment_sums]   only when a novograd tensor is present
    moments                             v, m, Nesterov d (bf16 into the NS stack), Σd², ΣW², flags
    segment_sums                        per-tensor / per-head-block / per-row sums of squares
    ns_small                            all NS steps for every matrix with ≤ 128 rows (heads)
    ns_gram, ns_poly, ns_update × steps  NS for the larger matrices, all shapes in one grid
    apply                               Δ, lr·k, trust ratio, offset momentum, weight decay, W

Multi-tensor scheme: int64 pointer tables (raw `data_ptr()`s + run-time dtype codes) and a tile
table built once per plan; see `mango_kernels.tables` for why. Launches are counted by
`launch_count()` / `count_launches()` (see `mango_kernels._launch`).

This package has no torch.optim dependency: `mango.backends.triton_backend` maps the
optimizer's plan onto these tables.
"""

from ._launch import INTERPRET, LaunchLog, LaunchProgram, count_launches, host_ops, launch_count, record, recording
from .elementwise import (
    DEFAULT_BLOCK,
    launch_apply,
    launch_moments,
    launch_novograd_prepass,
    launch_segment_sums,
    nonfinite_flags,
    nonfinite_layout,
)
from .ns import NS_DTYPES, NSBatch, NSConfig, NSSpec, newton_schulz, ns_buffer_bytes, ns_buffers, prescale_only
from .tables import DTYPE_CODES, ElementwiseLayout, TensorLayout, TensorTable

__all__ = [
    "INTERPRET",
    "LaunchLog",
    "count_launches",
    "launch_count",
    "record",
    "host_ops",
    "DEFAULT_BLOCK",
    "launch_apply",
    "launch_moments",
    "launch_novograd_prepass",
    "launch_segment_sums",
    "nonfinite_flags",
    "nonfinite_layout",
    "NS_DTYPES",
    "NSBatch",
    "ns_buffer_bytes",
    "ns_buffers",
    "NSConfig",
    "NSSpec",
    "newton_schulz",
    "prescale_only",
    "DTYPE_CODES",
    "ElementwiseLayout",
    "TensorLayout",
    "TensorTable",
]
