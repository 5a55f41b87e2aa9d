"""Step backends. Each one implements `step(optimizer, plan, grads_by_bucket)` on the shared state layout."""

from __future__ import annotations

import os
import warnings

import torch

from .reference_backend import ReferenceBackend
from .torch_backend import TorchBackend


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)
    or during a launch dry run (`mango_kernels.count_launches(dry_run=True)`: nothing executes,
    which is how `mango_kernels.aot` captures a GPU step's launches on a CPU-only machine)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    from mango_kernels._launch import dry_run_active

    return device.type == "cpu" and dry_run_active()


_warned_architectures: set = set()


def warn_if_unvalidated(device: torch.device) -> None:
    """Once per process and GPU architecture: say that no committed GPU run has validated the
    Triton kernels there (`mango_kernels.validated`), and name the alternative."""
    from mango_kernels.validated import is_validated

    capability = tuple(torch.cuda.get_device_capability(device))
    if is_validated(capability) or capability in _warned_architectures:
        return
    _warned_architectures.add(capability)
    warnings.warn(
        f"mango: the Triton kernels have not been validated on this GPU architecture ({torch.cuda.get_device_name(device)}, "
        f"sm_{capability[0]}{capability[1]}): they are tested under the Triton interpreter and compiled ahead of time, but "
        f"no committed GPU run has checked them on such a device yet (docs/benchmarks.md: 'GPU run'). "
        f"backend='torch' runs the same math without them.",
        stacklevel=3,
    )


def make_backend(name: str, device: torch.device, sharded: bool = False, process_group=None):
    """Instantiate a backend by name; "auto" is triton on CUDA (when importable), torch elsewhere.
    sharded: the plan has DTensor (FSDP2) parameters: the sharded variants (mango.distributed, mango.sharded_triton).
    process_group: whole (DDP) parameters with the NS split across this group's ranks (mango.ddp)."""
    if process_group is not None:
        return _split_backend(name, device, sharded, process_group)
    if sharded:
        if name == "auto":
            name = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
        if name == "torch":
            from ..distributed import ShardedTorchBackend

            return ShardedTorchBackend()
        if name == "triton":
            make_backend("triton", device)  # the same checks and warnings as for whole parameters
            from ..sharded_triton import ShardedTritonBackend

            return ShardedTritonBackend()
        raise ValueError(
            f"mango: backend={name!r} does not support DTensor (FSDP2) parameters; use backend='torch', 'triton' or "
            f"'auto' (the elementwise stages run on local shards, Newton–Schulz on owner ranks)"
        )
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        if not triton_usable(device):
            raise RuntimeError(
                f"mango: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and an "
                f"importable triton; parameters are on {device}. Use backend='torch' or 'auto'."
            )
        from .triton_backend import TritonBackend

        if device.type == "cuda":
            warn_if_unvalidated(device)
        return TritonBackend()
    raise ValueError(f"mango: invalid backend={name!r}: must be one of ('auto', 'torch', 'triton', 'reference')")


def _split_backend(name: str, device: torch.device, sharded: bool, process_group):
    from .. import ddp

    if sharded:
        raise ValueError(
            "mango: process_group splits the Newton–Schulz work of whole (DDP) parameters; these parameters are "
            "DTensors (FSDP2), whose NS already runs on owner ranks of their shard group: drop process_group"
        )
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if name == "torch":
        return ddp.SplitTorchBackend(process_group)
    if name == "triton":
        make_backend("triton", device)  # the same checks and warnings as without a group
        return ddp.split_triton_backend(process_group)
    raise ValueError(f"mango: backend={name!r} does not split the Newton–Schulz work across ranks; use backend='torch', 'triton' or 'auto' with process_group")
