"""Step backends. Each one implements `step(optimizer, plan, grads_by_bucket)` on the shared state layout."""

from __future__ import annotations

import os

import torch

from .reference_backend import ReferenceBackend
from .torch_backend import TorchBackend


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def make_backend(name: str, device: torch.device):
    """Instantiate a backend by name; "auto" is triton on CUDA (when importable), torch elsewhere."""
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

        return TritonBackend()
    raise ValueError(f"mango: invalid backend={name!r}: must be one of ('auto', 'torch', 'triton', 'reference')")
