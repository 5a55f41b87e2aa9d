"""The Gram form of the tiled Triton engine: its m×m iteration, as torch batched matmuls between
the Triton launches.

For large items (more rows than the on-chip Gram kernel holds) a `mango_kernels.NSBatch` of the
Gram form computes R = X·Xᵀ with its `ns_xxt` launch and Q·X with `ns_update`; the iteration in
between (mango.newton_schulz: P = a·I + b·R + c·R², Q ← Q·P, R ← P·R·P) runs here, on the m×m
workspaces, one call per product for all items of the same size, in the NS dtype (cuBLAS on a
GPU). The triton backend hands `iterate_large` to each Gram-form batch it builds.
"""

from __future__ import annotations

import torch

import mango_kernels as mk

__all__ = ["iterate_large"]


def iterate_large(batch) -> None:
    """The Gram form of `batch`'s large items: R by `ns_xxt`, the m×m iteration as batched matmuls
    (one per product for all items of a size), Q·X by `ns_update` at each restart and at the end.
    Per item size m: R (the current Gram matrix), Q, and the pre-scale s not yet applied to X.
    The large items share one schedule (`NSBatch.set_schedule` checks it) with at least one step."""
    s = batch.specs[batch.items[batch.large[0]].spec]
    steps, coefficients, restarts = s.steps, s.coefficients, s.restarts
    rewrite = 0
    batch.launch_xxt(rewrite)
    Rs, Qs, scales = {}, {}, {}
    for m, ks in batch.large_by_rows.items():  # R of the pre-scaled X: s²·X·Xᵀ
        A = batch.workspace_view(batch.workspace_a, m, ks)
        scales[m] = _inverse_scales(batch, ks, A)
        Rs[m] = (A * scales[m][:, None, None] ** 2).to(batch.dtype)
        mk.record("ns_gram_prepare", 5)
    for k, (a, b, c) in enumerate(coefficients):
        if k in restarts:  # X ← Q·X (× s the first time), R = X·Xᵀ, Q = I
            _store_q(batch, Qs, scales)
            batch.launch_update(rewrite, 0)
            rewrite += 1
            batch.launch_xxt(rewrite)
            Rs = {m: batch.workspace_view(batch.workspace_a, m, ks).to(batch.dtype) for m, ks in batch.large_by_rows.items()}
            Qs, scales = {}, {}
            mk.record("ns_gram_prepare", len(Rs))
        for m in batch.large_by_rows:
            R, q = Rs[m], Qs.get(m)
            P = torch.baddbmm(R, R, R, beta=b, alpha=c)  # Z = b·R + c·R²
            P.diagonal(dim1=-2, dim2=-1).add_(a)
            Qs[m] = P if q is None else torch.bmm(q, P)
            update = k + 1 < steps and k + 1 not in restarts
            if update:
                Rs[m] = torch.bmm(torch.bmm(P, R), P)
            mk.record("ns_gram_iterate", 2 + (q is not None) + 2 * update)
    _store_q(batch, Qs, scales)
    batch.launch_update(rewrite, 0)


def _inverse_scales(batch, ks, A) -> torch.Tensor:
    """1 / max(‖X‖, ε) per item: ‖X‖² = trace(A) of the unscaled Gram matrix, or the host's sums."""
    specs = [batch.specs[batch.items[k].spec] for k in ks]
    eps = torch.tensor([s.eps for s in specs], dtype=torch.float32, device=A.device)
    from_sums = torch.tensor([s.prescale_from_sums for s in specs], device=A.device)
    seg = torch.tensor([s.segment + batch.items[k].block for s, k in zip(specs, ks)], device=A.device)
    sq = torch.where(from_sums, batch.sums[seg], A.diagonal(dim1=-2, dim2=-1).sum(-1))
    return 1.0 / torch.maximum(sq.sqrt(), eps)


def _store_q(batch, Qs: dict, scales: dict) -> None:
    """Q of every large item into workspace B (the NS dtype), × the pre-scale s (in fp32, then
    rounded once) where X does not carry it yet."""
    for m, ks in batch.large_by_rows.items():
        W = batch.workspace_view(batch.workspace_b, m, ks)
        q = Qs.get(m)
        q = torch.eye(m, device=W.device).expand_as(W) if q is None else q.float()
        W.copy_(q * scales[m][:, None, None] if m in scales else q)
        mk.record("ns_gram_store", 2 if m in scales else 1)
