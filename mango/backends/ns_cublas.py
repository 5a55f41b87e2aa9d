"""The cuBLAS engine of the triton backend: one NS bucket's Newton–Schulz as torch batched GEMMs
(`torch_backend.batched_newton_schulz`, textbook or Gram form) on the NS stack the moments kernel
writes, for the large buckets where the per-architecture table (mango.ns_engine) says cuBLAS beats
the tiled Triton kernels.

A `CublasNSBatch` looks to the triton backend like a `mango_kernels.NSBatch`: the same stack the
moments kernel writes d into (the bucket's tensors back to back, one (K, *shape) tensor), a second
buffer for the ping-pong with room for the m×m temporaries (so the NS allocates nothing), and the
result back in the stack where the apply kernel reads it. Every device op is recorded
(`mango_kernels.record`); in a launch dry run nothing runs and the same count is recorded.
"""

from __future__ import annotations

import torch

import mango_kernels as mk
from mango_kernels._launch import dry_run_active

from .. import newton_schulz as _ns
from ..layout import norm_blocks
from .torch_backend import batched_newton_schulz

__all__ = ["CublasNSBatch", "ns_op_count", "temporaries_per_block"]


def temporaries_per_block(method: str) -> int:
    """m×m temporaries per block `batched_newton_schulz` keeps: A and B, or R, P, Q and two products."""
    return 5 if method == "gram" else 2


def ns_op_count(method: str, steps: int, prescale: str = "frobenius") -> int:
    """Device ops of one `batched_newton_schulz` call on buffers with room for its temporaries
    (one slice, out_scale 1): the norm, clamp and scaled copy, then the iteration's GEMMs and
    elementwise ops. The spectral norm counts as one op, as elsewhere in the launch log."""
    ops = 3  # ‖X‖ (or the spectral norm), clamp_min, X / scale into the first buffer
    if method == "textbook":
        return ops + 3 * steps  # X·Xᵀ, b·A + c·A², a·X + B·X
    if steps == 0:
        return ops
    restarts = _ns.gram_restarts(steps)
    ops += 1  # R = X·Xᵀ
    fresh = True
    for k in range(steps):
        if k in restarts and not fresh:
            ops += 2  # X ← Q·X, R = X·Xᵀ
            fresh = True
        ops += 3  # P = b·R + c·R², + a·I, Q ← P (or Q·P)
        fresh = False
        if k + 1 < steps and k + 1 not in restarts:
            ops += 2  # R ← P·R·P
    return ops + 1  # Q·X


def _writes(method: str, steps: int) -> int:
    """How many times the iteration writes X into the other buffer (its parity says where X ends)."""
    if method == "textbook":
        return steps
    return (1 + len(_ns.gram_restarts(steps))) if steps else 0


class CublasNSBatch:
    """One NS bucket's tensors (`numels`, all of the bucket's shape `nb.shape`) run by cuBLAS."""

    engine = "cublas"
    small = ()  # no on-chip items: every block goes through the GEMMs

    def __init__(self, nb, count: int, dtype: torch.dtype, device, method: str = "textbook"):
        self.nb, self.count, self.dtype, self.method = nb, count, dtype, method
        self.device = torch.device(device)
        self.numel = 1
        for s in nb.shape:
            self.numel *= s
        r, c = nb.block_shape
        blocks = count * nb.blocks_per_tensor
        total = count * self.numel
        room = temporaries_per_block(method) * blocks * min(r, c) ** 2
        self.buffer_sizes = {"stack": (total, dtype), "buffer1": (total + room, dtype)}
        self.large = list(range(count))
        self.specs = [None] * count
        self.coefficients, self.eps, self.prescale = (), 1e-7, "frobenius"
        self.share = None  # (first, stop): the tensors this rank runs under DDP's NS split (mango.ddp); None: all

    @staticmethod
    def nbytes_for(nb, count: int, dtype: torch.dtype, method: str) -> int:
        """Bytes of the two buffers a batch of `count` tensors of bucket `nb` takes."""
        b = CublasNSBatch.__new__(CublasNSBatch)
        CublasNSBatch.__init__(b, nb, count, dtype, "cpu", method)
        return sum(n * (torch.finfo(dt).bits // 8) for n, dt in b.buffer_sizes.values())

    def bind(self, alloc=None) -> None:
        alloc = alloc or (lambda n, dt: torch.empty(n, dtype=dt, device=self.device))
        for name, (n, dt) in self.buffer_sizes.items():
            setattr(self, name, alloc(max(n, 1), dt))

    def set_schedule(self, steps, coefficients, eps, prescale_from_sums=None, restarts=None) -> None:
        """The bucket's schedule (one param group: every member has the same; the Gram form's
        restarts are batched_newton_schulz's own)."""
        self.coefficients = tuple(tuple(map(float, c)) for c in coefficients[0])
        self.eps = float(eps[0])
        self.prescale = "spectral" if prescale_from_sums and prescale_from_sums[0] else "frobenius"

    def input_view(self, i: int) -> torch.Tensor:
        return self.stack[i * self.numel : (i + 1) * self.numel]

    output_view = input_view  # the result is copied back into the stack where it is not there already

    def _blocks(self, stack, count: int) -> torch.Tensor:
        nb = self.nb
        X = stack.view(count, *nb.shape)
        return norm_blocks(X, nb.shape, nb.norm, nb.head_dim, **nb.layout)

    def _result_in_place(self, blocks, stack) -> bool:
        """Whether the iteration's result lands in the stack in the blocks' own layout (no copy back):
        an odd number of writes and blocks that are the stack's memory in their orientation."""
        transposed = blocks.stride(-2) == 1 and blocks.stride(-1) != 1 and blocks.shape[-1] > 1
        src = blocks.mT if transposed else blocks
        return _writes(self.method, len(self.coefficients)) % 2 == 1 and src.is_contiguous() and src.data_ptr() == stack.data_ptr()

    def run(self) -> None:
        first, stop = self.share or (0, self.count)
        stack = self.stack[first * self.numel : stop * self.numel]
        blocks = self._blocks(stack, stop - first)
        if blocks.numel() == 0:
            return
        copy_back = not self._result_in_place(blocks, stack)
        mk.record("cublas_ns", ns_op_count(self.method, len(self.coefficients), self.prescale) + copy_back)
        if dry_run_active():
            return
        out = batched_newton_schulz(blocks, self.coefficients, self.prescale, self.eps, dtype=self.dtype, method=self.method,
                                    buffers=(stack, self.buffer1))  # fmt: skip
        if copy_back:
            blocks.copy_(out)
