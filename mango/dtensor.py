"""DTensor detection without importing torch.distributed.tensor (it costs ~1 s when unused).

The plan, the optimizer and mango.distributed all need to ask "is this a DTensor?"; keeping the
question here lets the plan stay independent of the distributed backend."""

from __future__ import annotations

import sys

import torch

__all__ = ["is_dtensor", "local_tensor"]


def is_dtensor(t) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (without importing DTensor when unused)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local data of a DTensor (shares storage: in-place ops update the DTensor); t itself otherwise."""
    return t._local_tensor if is_dtensor(t) else t
