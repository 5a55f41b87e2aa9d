"""FSDP2 (DTensor row shards) on the triton backend: the fused kernels on local shards, NS on owners.

`ShardedTorchBackend` (mango.distributed) localizes the plan: one rank-local bucket per (param
group, shard group), over the local shards, with each sharded norm bucket's rows per rank and NS
owners. This backend hands all those local buckets to one triton launch group, so the moments
and apply kernels cover every local shard of the step in the same few launches as on one GPU,
and gives its round a hook for what needs more than the local rows:

    l2 (whole tensor), trust ratio ‖W‖,   the kernels' local sums of squares, all-reduced (one
    NovoGrad's ‖g‖²                        all-reduce for the round's sums, another for ‖g‖²; a rank
                                           with no rows of a tensor sets its 0-d v from that here)
    l2_split, l2_col of a Conv1D           on the work buffer: partial sums per head block / operator
                                           row joined into that all-reduce, then scaled
    ns, ns_split                           d in the work buffer; the distributed backend's exchange
                                           (one all_to_all pair per NS dtype to the owner rank and
                                           back; very tall matrices row-sharded) runs the NS there

Experts sharded on the expert dimension are whole on their rank: their NS runs in the kernels.
Sharded buckets run in one round (the round order then cannot differ between ranks, whose local
sizes do), so the collectives per step are one all-reduce and one all_to_all pair per NS dtype,
plus the row-sharded NS's Gram all-reduces, whatever the depth. State layout and DTensor state
are the torch path's: DCP checkpoints load under either backend.
"""

from __future__ import annotations

import torch

from .backends.torch_backend import _safe_inverse
from .backends.triton_backend import TritonBackend, _cross_shard, _torch_row_norm
from .distributed import ShardedTorchBackend
from .dtensor import local_tensor
from .ns_engine import choose_for_bucket
from .plan import Plan

__all__ = ["ShardedTritonBackend"]


class _OwnerNS(ShardedTorchBackend):
    """The distributed backend's localization and exchange, with the NS operand dtype the triton
    backend picks (bf16 for "auto"), so an FSDP2 step orthogonalizes in the dtype one GPU would."""

    def ns_exchange_dtype(self, group, bucket, nb):
        return choose_for_bucket(nb, bucket, group, "triton").dtype


class ShardedTritonBackend:
    """Triton kernels on FSDP2 local shards; see the module docstring."""

    name = "triton"

    def __init__(self):
        self.owners = _OwnerNS()
        self.comm = self.owners.comm
        self.kernels = TritonBackend(memory_budget=float("inf"))

    @property
    def ns_loads(self):
        return self.owners.ns_loads

    def step(self, opt, plan, grads_by_bucket) -> None:
        o = self.owners
        lp = plan.cache.get("mango.distributed")
        if lp is None:
            lp = plan.cache["mango.distributed"] = o._localize(opt, plan)
        if not lp.grads_checked:
            o._check_grads(lp, grads_by_bucket)
        local = plan.cache.get("mango.sharded_triton")
        if local is None:
            local = plan.cache["mango.sharded_triton"] = Plan(key=plan.key, buckets=[e.bucket for e in lp.entries])
        o.comm.last_step = []
        o.comm.ns_flops = o.comm.ns_seconds = 0.0
        o.comm.steps += 1
        o._lp = lp
        o.ns_loads = lp.ns_loads
        o._prefetch, o._prefetched = [], {}
        grads = [[local_tensor(grads_by_bucket[e.source][i]) for i in e.positions] for e in lp.entries]
        for lg in self.kernels._program(opt, local):
            for r in lg.rounds:
                if r.shard is None:
                    r.shard = _RoundShard(o, lp, r)
        self.kernels.step(opt, local, grads)
        for e in lp.entries:
            if not e.synced:
                o._sync_state(e)

    def nonfinite_flags(self, bucket, grads) -> torch.Tensor:
        return self.owners.nonfinite_flags(bucket, grads)


def _novograd_v_without_rows(e, group, g_sq) -> None:
    """NovoGrad's v of a tensor with no rows on this rank: the moments kernel, which writes v, has no
    tile of it here, yet v is one value every rank keeps (0-d state), so update it as the kernel does:
    v = ‖g‖² on the first step, else β2·v + c·‖g‖²."""
    v = e.slot.state["exp_avg_sq"]
    b2 = group["beta2"]
    coef = (1 - b2) if group["second_moment"] == "ema" else 1.0
    g_sq = g_sq.to(v.dtype)
    first = (e.slot.state["step"] == 1).to(v.device)
    v.copy_(torch.where(first, g_sq, b2 * v + coef * g_sq))


class _RoundShard:
    """A triton round's cross-shard work (see the module docstring). Every rank builds the same
    requests in the same order: entries follow the plan, not the local sizes, and an entry with no
    local rows still asks (with zeros)."""

    def __init__(self, owners, lp, rnd):
        self.owners = owners
        self.entry_of = {id(e.bucket): e for e in lp.entries}
        self.local_index = {e.row: k for k, e in enumerate(rnd.entries)}
        self.work = lambda e: rnd.work[e.work_offset : e.work_offset + e.numel].view(e.slot.param.shape)

    def _dist(self, e):
        return self.entry_of[id(e.bucket)]

    def _sharded(self, e) -> bool:
        return self._dist(e).pg is not None

    def handles(self, e) -> bool:
        """Entries normalized here (the round's own torch loop leaves them alone): cross-shard NS,
        l2_split and transposed l2_col."""
        nb = e.nb
        return self._sharded(e) and _cross_shard(nb) and (e.ns_dtype is not None or nb.norm == "l2_split" or _torch_row_norm(nb))

    def _segment_requests(self, rnd, picks, requests, finish) -> None:
        """One "sum" request per shard group for sums[g] of each (entry, segment g); g = -1 (no local
        rows, so no segment here) adds 0."""
        sums = rnd.ws["sums"]
        by_entry: dict = {}
        for e, g in picks:
            by_entry.setdefault(id(self._dist(e)), (self._dist(e), []))[1].append((e, g))
        for de, pairs in by_entry.values():
            vals = torch.stack([sums[g] if g >= 0 else sums.new_zeros(()) for _, g in pairs])
            requests.append(("sum", de, vals))
            finish.append(("segments", pairs))

    def _finish_segments(self, rnd, pairs, total) -> None:
        """The group totals back into the round's segment sums, where this rank has the segment."""
        live = [(g, k) for k, (_, g) in enumerate(pairs) if g >= 0]
        if live:
            sums = rnd.ws["sums"]
            idx = torch.tensor([g for g, _ in live], dtype=torch.long, device=sums.device)
            sums.index_copy_(0, idx, total[[k for _, k in live]].to(sums.dtype))

    def after_prepass(self, rnd, groups) -> None:
        """NovoGrad's per-tensor ‖g‖² of sharded tensors, summed over their shard group before the moments."""
        layout = rnd.layout
        picks = [(e, int(layout.g_segment[self.local_index[e.row]])) for e in rnd.entries
                 if self._sharded(e) and groups[e.bucket.group_index]["preconditioner"] == "novograd"]  # fmt: skip
        requests, finish = [], []
        self._segment_requests(rnd, picks, requests, finish)
        if requests:
            for (_, pairs), total in zip(finish, self.owners._serve(requests)):
                self._finish_segments(rnd, pairs, total)
                for (e, g), g_sq in zip(pairs, total):
                    if g < 0:
                        _novograd_v_without_rows(e, groups[e.bucket.group_index], g_sq)

    def exchange(self, rnd, groups) -> None:
        """One serve for the round: sums of squares (l2, trust ratio, l2_split / Conv1D l2_col
        partials) and the NS of every cross-shard bucket; the results land in the work buffer."""
        layout = rnd.layout
        requests, finish, picks = [], [], []
        for e in rnd.entries:
            if not self._sharded(e):
                continue
            k = self.local_index[e.row]
            if e.nb.norm == "l2" and not e.nb.experts:
                picks.append((e, int(layout.d_segment_base[k]) if e.numel else -1))
            if groups[e.bucket.group_index]["trust_ratio"]:
                picks.append((e, int(layout.w_segment[k])))
        self._segment_requests(rnd, picks, requests, finish)
        ns_members: dict = {}
        for e in rnd.entries:
            if not self.handles(e):
                continue
            if e.ns_dtype is None:  # l2_split / transposed l2_col: partial sums of the work buffer
                requests.append(("sum", self._dist(e), self._partial_sums(e)))
                finish.append(("rows", e))
            else:
                ns_members.setdefault(id(e.nb), []).append(e)
        for members in ns_members.values():
            nb = members[0].nb
            members.sort(key=lambda e: nb.slots.index(e.slot_index))
            group = groups[members[0].bucket.group_index]
            requests.append(("ns", self._dist(members[0]), (group, members[0].bucket, nb, [self.work(e) for e in members])))
            finish.append(("ns", members))
        if not requests:
            return
        for (what, data), res in zip(finish, self.owners._serve(requests)):
            if what == "segments":
                self._finish_segments(rnd, data, res)
            elif what == "rows":
                self._scale_rows(data, res)
            else:
                torch._foreach_copy_([self.work(e) for e in data], list(res))

    # -- l2_split / transposed l2_col across shards ---------------------------------------------
    def _partial_sums(self, e) -> torch.Tensor:
        """Σd² per global head block (l2_split) or per operator row (l2_col on (in, out) storage)."""
        nb = e.nb
        d = self.work(e)
        if nb.norm == "l2_split":
            hd = nb.head_dim
            rows = d.reshape(d.shape[0], -1).square().sum(-1) if d.numel() else d.new_zeros(0)
            out = d.new_zeros(nb.global_rows)
            out[nb.row_offset : nb.row_offset + rows.numel()] = rows
            return out.view(-1, hd).sum(-1)
        return d.square().sum(0)  # (in, out) storage: operator rows are columns

    def _scale_rows(self, e, sums) -> None:
        nb = e.nb
        d = self.work(e)
        if d.numel() == 0:
            return
        inv = _safe_inverse(sums.sqrt())
        if nb.norm == "l2_split":
            per_row = inv.repeat_interleave(nb.head_dim)[nb.row_offset : nb.row_offset + d.shape[0]]
            d.mul_(per_row.view(-1, *([1] * (d.dim() - 1))))
        else:
            d.mul_(inv)
