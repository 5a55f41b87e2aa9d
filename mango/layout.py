"""From a stored parameter to the operators its matrix norms act on (the roles, docs/guide.md).

The dual norms of MANGO are norms of *linear operators* (out, in): the spectral norm that
Newton–Schulz approximates, the per-output-neuron l2 of `l2_col`, the head blocks of a fused QKV
projection, the √(rows/cols) shape factor. How a framework *stores* a weight is another matter:

    orientation  experts   stored as          operators (one per expert)    e.g.
    "out_in"     False     (out, in, ...)     1 × (out, in·...)             nn.Linear, conv kernels
    "in_out"     False     (in, out)          1 × transpose                 HF GPT-2 Conv1D
    "out_in"     True      (E, out, in, ...)  E × (out, in·...)             Mixtral / Qwen3-MoE experts
    "in_out"     True      (E, in, out)       E × transpose                 GPT-OSS experts

A 1-D tensor (a bias) is one (n, 1) column: its rows are its elements, so a head split of a
fused-QKV bias is a split of its elements. Every function here returns *views* where the input
is a contiguous buffer (the backends rely on this: head blocks of a Conv1D are a strided batch,
never a copy); the reference calls them on plain tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["operator_shape", "operators", "norm_blocks", "block_shape", "shape_factor_of"]


def operator_shape(shape, orientation: str = "out_in", experts: bool = False) -> tuple[int, int, int]:
    """(number of operators, rows, cols) of a tensor of this storage shape."""
    shape = tuple(shape)
    n, inner = (shape[0], shape[1:]) if experts else (1, shape)
    if len(inner) == 0:
        return n, 1, 1
    if orientation == "in_out":
        if len(inner) != 2:
            raise ValueError(f"mango: orientation='in_out' needs a 2-D matrix per operator, got storage shape {shape}")
        return n, inner[1], inner[0]
    return n, inner[0], math.prod(inner[1:])


def operators(t: torch.Tensor, shape, orientation: str = "out_in", experts: bool = False) -> torch.Tensor:
    """View of `t` (shape `(*lead, *shape)`) as `(*lead, E, rows, cols)` operators (E = 1 without experts)."""
    shape = tuple(shape)
    lead = tuple(t.shape[: t.dim() - len(shape)])
    n, r, c = operator_shape(shape, orientation, experts)
    if orientation == "in_out":
        return t.reshape(*lead, n, c, r).mT
    return t.reshape(*lead, n, r, c)


def norm_blocks(t: torch.Tensor, shape, norm: str, head_dim=None, orientation="out_in", experts=False) -> torch.Tensor:
    """View of `t` as the independent blocks a matrix norm normalizes, `(*lead, B..., r, c)`:

        ns        one block per operator                              (..., E, rows, cols)
        ns_split  head blocks of head_dim operator rows               (..., E, rows/hd, hd, cols)
        l2_split  head blocks, as above (each normalized as a whole)
        l2_col    operators (each row normalized on its own)          (..., E, rows, cols)
        l2        one block per operator (E × whole tensor)           (..., E, rows, cols)
    """
    ops = operators(t, shape, orientation, experts)
    if norm in ("ns_split", "l2_split"):
        rows = ops.shape[-2]
        return ops.unflatten(-2, (rows // head_dim, head_dim))
    return ops


def block_shape(shape, norm: str, head_dim=None, orientation="out_in", experts=False) -> tuple[int, int, int]:
    """(number of blocks, block rows, block cols) of `norm_blocks` for one tensor."""
    n, r, c = operator_shape(shape, orientation, experts)
    if norm in ("ns_split", "l2_split"):
        return n * (r // head_dim), head_dim, c
    return n, r, c


def shape_factor_of(r: int, c: int, shape_scale) -> float:
    """k for NS norms from one (rows, cols) block: Muon's √max(1, rows/cols) ("original") or
    0.2·√max(rows, cols) ("match_rms_adamw"); None: 1. An empty block (a 0-row or 0-col
    tensor) has no update to scale: 1."""
    if shape_scale is None or r == 0 or c == 0:
        return 1.0
    if shape_scale == "original":
        return math.sqrt(max(1.0, r / c))
    if shape_scale == "match_rms_adamw":
        return 0.2 * math.sqrt(max(r, c))
    raise ValueError(f"mango: invalid shape_scale={shape_scale!r}")
