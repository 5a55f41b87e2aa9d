"""The step plan: which tensors are updated together, built once and cached.

A step touches ~150 tensors for GPT-2; looking up roles, norms, shapes and state for each
of them every step would put a Python loop in the hot path. The plan does that work once,
groups tensors so every later stage is one batched call per bucket, and is rebuilt only
when the set of tensors with gradients, the state objects or a structural setting changes.

    Plan
    └── ElementwiseBucket   same param group, device and compute dtype: one moments pass
        └── NormBucket      same norm and (for matrix norms) same matrix shape: one
                            normalization call (a batched NS, a batched row norm, ...)
                            and one apply pass
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .dtensor import is_dtensor
from .layout import block_shape
from .reference import compute_dtype, shape_factor

# Group settings that change the plan's structure; everything else is read every step.
STRUCTURAL_KEYS = (
    "role", "norm", "head_dim", "preconditioner", "beta_offset", "ns_dtype", "shape_scale", "orientation", "experts", "ns_method",
    "ns_engine",
)  # fmt: skip


@dataclass
class Slot:
    """One parameter that has a gradient this step, with everything resolved about it."""

    param: torch.Tensor
    name: str
    group_index: int
    role: str
    norm: str
    state: dict


@dataclass
class NormBucket:
    """Tensors normalized by one batched call: same norm, and for matrix norms the same shape.

    For matrix norms the blocks are those of `mango.layout.norm_blocks`: each tensor holds
    `blocks_per_tensor` blocks of `block_shape` = (rows, cols) of the operator (per expert, in
    (out, in) orientation, one head block for the split norms; (head_dim, 1) for a split bias)."""

    norm: str
    slots: list  # indices into the ElementwiseBucket's slot list
    shape: tuple  # parameter (storage) shape for matrix norms, None for elementwise norms
    block_shape: tuple = None  # (rows, cols) of one block
    shape_factor: float = 1.0
    head_dim: int = None
    orientation: str = "out_in"
    experts: bool = False
    blocks_per_tensor: int = 1
    row_offset: int = 0  # first row of these tensors within the whole tensor (a row shard under FSDP2)
    global_rows: int = None  # rows of the whole tensor, where the tensors here are row shards
    cache: dict = field(default_factory=dict)  # backend-specific data (e.g. Triton tables)
    ns_choice: object = None  # NS buckets: how their NS runs (mango.ns_engine.NSChoice), set at plan time

    @property
    def layout(self) -> dict:
        """Keyword arguments of the mango.layout functions for this bucket's tensors."""
        return dict(orientation=self.orientation, experts=self.experts)


@dataclass
class ElementwiseBucket:
    group_index: int
    device: torch.device
    dtype: torch.dtype  # compute / state dtype
    slots: list  # Slot objects
    norm_buckets: list
    cache: dict = field(default_factory=dict)

    def column(self, key):
        """Per-slot state tensors (e.g. all "exp_avg"), in slot order."""
        return [s.state[key] for s in self.slots]


@dataclass
class Plan:
    key: tuple
    buckets: list
    cache: dict = field(default_factory=dict)
    sharded: bool = False  # some parameter is a DTensor (FSDP2): mango.distributed's backend runs the step


def build_plan(key, groups, slots_by_group) -> Plan:
    """Bucket the active slots; `slots_by_group[i]` lists the Slot objects of param group i."""
    buckets = []
    for gi, slots in enumerate(slots_by_group):
        group = groups[gi]
        by_dev_dtype: dict = {}
        for slot in slots:
            k = (slot.param.device, compute_dtype(slot.param))
            by_dev_dtype.setdefault(k, []).append(slot)
        for (device, dtype), eslots in by_dev_dtype.items():
            nbs: dict = {}
            for i, slot in enumerate(eslots):
                # norms whose blocks depend on the layout (l2 too with experts: one unit vector per expert)
                matrix = slot.norm in ("ns", "ns_split", "l2_col", "l2_split") or (slot.norm == "l2" and group["experts"])
                shape = tuple(slot.param.shape) if matrix else None
                if shape is not None and slot.param.numel() == 0:
                    continue  # nothing to normalize or update; its step count still advances
                nb = nbs.get((slot.norm, shape))
                if nb is None:
                    nb = NormBucket(norm=slot.norm, slots=[], shape=shape)
                    if matrix:
                        layout = dict(orientation=group["orientation"], experts=group["experts"])
                        n, r, c = block_shape(shape, slot.norm, group["head_dim"], **layout)
                        nb.block_shape, nb.blocks_per_tensor, nb.head_dim = (r, c), n, group["head_dim"]
                        nb.orientation, nb.experts = layout["orientation"], layout["experts"]
                        nb.shape_factor = shape_factor(slot.norm, shape, group["head_dim"], group["shape_scale"], **layout)
                    nbs[(slot.norm, shape)] = nb
                nb.slots.append(i)
            buckets.append(ElementwiseBucket(gi, device, dtype, eslots, list(nbs.values())))
    sharded = any(is_dtensor(s.param) for slots in slots_by_group for s in slots)
    return Plan(key=key, buckets=buckets, sharded=sharded)


def structural_key(group) -> tuple:
    return tuple(repr(group[k]) for k in STRUCTURAL_KEYS)

