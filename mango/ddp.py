"""DDP with the Newton–Schulz work split across ranks: `Mango(..., process_group=group)`.

Under DDP every rank holds whole parameters and, after DDP's all-reduce, the same gradients, so
every rank could run the whole step, and without `process_group` it does. With a process group,
each NS-bound tensor (a matrix, a fused QKV's batch of head blocks, an MoE weight's batch of
experts) gets one owner rank, assigned once per plan by a deterministic greedy balance of NS FLOPs
(`mango.distributed.assign_owners`: every rank computes the same assignment). A step then runs

    moments, l2, sign, ...   on every rank, for every tensor (elementwise: cheap, identical)
    Newton–Schulz            on the owner only, for the tensors it owns
    all-gather               of the NS results in the NS operand dtype (one per NS bucket on the
                             torch backend, one per round and dtype on the triton backend)
    apply                    on every rank, for every tensor

The owner runs exactly the single-process NS of its tensors (the same batched code on the same
values), so the step equals the single-process step and every rank ends bit-identical. Very tall
matrices (a vocabulary head) are split by rows over every rank instead (`row_split_ns`: a Gram
all-reduce per NS step), so one large matrix does not bound the busiest rank. Each rank's tensors
of one NS bucket are consecutive in the bucket (`assign_plan`), so on the triton backend a
cuBLAS bucket runs its op program cut to the rank's slice of its members, in the bucket's own
buffers (`mango.backends.ns_cublas`: a rank's share). Per NS engine of the triton
backend (mango.ns_engine):

    triton_small, triton_tiled   the kernels run every item, with 0 NS steps for others' tensors
                                 (except the tiled Gram form's large items, which iterate as one
                                 host batch with one schedule: those run on every rank)
    cublas                       the GEMMs on the owner's slice of the bucket; tall matrices row-split
                                 (read from the stack where the moments kernel wrote them, written
                                 where the apply kernel reads the result: `output_view`)
    torch (float64 NS)           the owner's tensors; tall matrices row-split

The collectives per step follow the NS shape buckets, not the depth. The nonfinite check reduces
its flags over the group, so every rank skips (or raises) alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .backends.torch_backend import TEMP_FLOOR_BYTES, TorchBackend, batched_newton_schulz
from .config import NS_NORMS, ns_schedule
from .distributed import CommStats, assign_owners, ns_flops, row_sharded_ns_flops, use_row_sharded_ns
from .layout import norm_blocks
from .ns_engine import choose_for_bucket

__all__ = ["resolve_process_group", "assign_plan", "SplitTorchBackend", "split_triton_backend", "NSGather", "row_split_newton_schulz"]

# owner codes besides a rank (nb.cache["mango.ddp.owners"])
ROW_SPLIT = -1  # split by rows over every rank (`row_split_ns`)
EVERY_RANK = -2  # run whole on every rank (the tiled kernels' Gram-form large items)


def resolve_process_group(group):
    """The ProcessGroup a `process_group=` argument names (a ProcessGroup or a 1-D DeviceMesh), or None."""
    if group is None:
        return None
    if not dist.is_available():
        raise ValueError("mango: process_group needs torch.distributed, which this torch build lacks")
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(group, (DeviceMesh, dist.ProcessGroup)):
        raise ValueError(f"mango: process_group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("mango: process_group needs torch.distributed initialized (dist.init_process_group) first")
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"mango: process_group is a {group.ndim}-D DeviceMesh; pass a 1-D mesh (or one of its dimensions, mesh['dp'])")
        return group.get_group()
    return group


def row_split(rows: int, world: int) -> list:
    """Rows per rank of a row-split tall matrix (torch.chunk's split, as fully_shard makes it)."""
    chunk = -(-rows // world) if rows else 0
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def row_split_ns(nb, group, world: int) -> bool:
    """Very tall whole matrices (a vocabulary head) are row-split across all ranks instead of owned by
    one: gathering one on an owner would leave that rank with its whole NS (mango.distributed.use_row_sharded_ns)."""
    return nb.orientation == "out_in" and not nb.experts and use_row_sharded_ns(nb.shape, nb.norm, group["ns_prescale"], len(ns_schedule(group)), world)


def torch_placement(nb, group, world: int) -> str:
    """Where the torch backend runs an NS bucket's tensors: "rows" (row-split) or "owner"."""
    return "rows" if row_split_ns(nb, group, world) else "owner"


def assign_plan(opt, plan, world: int, placement=torch_placement) -> list:
    """Owner of every NS-bound tensor of the plan, balanced by NS FLOPs; stored per norm bucket as
    nb.cache["mango.ddp.owners"] (one code per entry of nb.slots: a rank, ROW_SPLIT or EVERY_RANK, as
    `placement(nb, group, world)` says: "owner", "rows" or "all"). Owned tensors are assigned by
    `assign_owners` around the work every rank has (row-split shares, tensors run everywhere), then
    each bucket's owners are put in rank order, so a rank's tensors of a bucket are consecutive
    (same shape, same cost: the loads do not change). Returns each rank's load."""
    jobs, base = [], [0.0] * world
    for bucket in plan.buckets:
        group = opt.param_groups[bucket.group_index]
        steps = len(ns_schedule(group))
        for nb in bucket.norm_buckets:
            if nb.norm not in NS_NORMS:
                continue
            where = placement(nb, group, world)
            owners = nb.cache["mango.ddp.owners"] = [0] * len(nb.slots)
            for j, i in enumerate(nb.slots):
                shape = tuple(bucket.slots[i].param.shape)
                cost = ns_flops(shape, nb.block_shape, max(steps, 1)) if bucket.slots[i].param.numel() else 0.0  # every head or expert block
                if where == "rows":
                    owners[j] = ROW_SPLIT
                    for q, n in enumerate(row_split(shape[0], world)):
                        base[q] += row_sharded_ns_flops(n, math.prod(shape[1:]), steps)
                elif where == "all":
                    owners[j] = EVERY_RANK
                    base = [b + cost for b in base]
                else:
                    jobs.append((nb, j, cost))
    owners, loads = assign_owners([c for _, _, c in jobs], world, base)
    by_bucket: dict = {}
    for (nb, j, _), q in zip(jobs, owners):
        by_bucket.setdefault(id(nb), (nb, [], []))[1].append(j)
        by_bucket[id(nb)][2].append(q)
    for nb, slots, ranks in by_bucket.values():
        for j, q in zip(slots, sorted(ranks)):
            nb.cache["mango.ddp.owners"][j] = q
    return loads


def row_split_newton_schulz(pg, comm, views, coefficients, eps: float, dtype, out_scale=1.0) -> tuple:
    """NS of tall matrices every rank holds whole, split by rows over the ranks: the iteration on a
    tall X is X ← a·X + X·B with B = b·A + c·A² and A = XᵀX = Σ_ranks X_rᵀX_r, so each step
    all-reduces the cols×cols partial Gram matrices (of every matrix in one call, summed in fp32 or
    fp64) and every rank updates its own rows. The Frobenius pre-scale is every rank's own (each
    holds the whole matrix): the single-process value. The textbook iteration whatever form one
    process would use (the Gram form is the same polynomial). `views`: the (rows, cols) matrices,
    any dtype; the iteration runs in `dtype`. Returns this rank's rows of the results (K, rows_r, cols)
    and the rows per rank."""
    P, me = dist.get_world_size(pg), dist.get_rank(pg)
    rows, cols = views[0].shape
    split = row_split(rows, P)
    r0 = sum(split[:me])
    scale = torch.stack([torch.linalg.vector_norm(v.to(dtype)) for v in views]).clamp_min(eps).to(dtype)
    Y = torch.stack([v[r0 : r0 + split[me]].to(dtype) for v in views]) / scale[:, None, None]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for t, (a, b, c) in enumerate(coefficients):
        A = torch.bmm(Y.mT, Y).to(acc)
        dist.all_reduce(A, group=pg)
        n = A.numel() * A.element_size()
        wire = (2 * (P - 1) * n) // P
        comm.record("all_reduce", "NS Gram", P, n, wire, wire)
        A = A.to(dtype)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        last = out_scale if t == len(coefficients) - 1 else 1.0
        Y = torch.baddbmm(Y, Y, B, beta=a * last, alpha=last)
    if not coefficients and out_scale != 1.0:
        Y = Y * out_scale
    comm.ns_flops += len(views) * row_sharded_ns_flops(split[me], cols, len(coefficients))
    return Y, split


class NSGather:
    """One all-gather of NS results: every rank packs the results it owns into a send buffer (its
    share, padded to the largest share), all-gathers, and every rank copies each result from its
    owner's segment. Buffers are kept by layout across steps."""

    def __init__(self, pg, comm: CommStats):
        self.pg, self.comm = pg, comm
        self.world, self.rank = dist.get_world_size(pg), dist.get_rank(pg)
        self._buffers: dict = {}

    def __call__(self, owners, results, dests) -> None:
        """owners[j]: rank of job j; results[j]: its result on its owner (None elsewhere); dests[j]:
        where every rank wants it (any strides; the shape every rank agrees on). One dtype."""
        if not dests:
            return
        dtype, device = dests[0].dtype, dests[0].device
        sizes = [d.numel() for d in dests]
        share = [0] * self.world
        offset = []
        for q, n in zip(owners, sizes):
            offset.append(share[q])
            share[q] += n
        chunk = max(share)
        if chunk == 0:
            return
        key = (dtype, device, chunk)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = (torch.empty(chunk, dtype=dtype, device=device), torch.empty(self.world * chunk, dtype=dtype, device=device))
        send, recv = bufs
        mine = [j for j, q in enumerate(owners) if q == self.rank and sizes[j]]
        if mine:
            torch._foreach_copy_([send[offset[j] : offset[j] + sizes[j]].view(dests[j].shape) for j in mine], [results[j] for j in mine])
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name, where torch has it
        gather_into(recv, send, group=self.pg)
        esize = send.element_size()
        wire = (self.world - 1) * chunk * esize
        self.comm.record("all_gather", "NS results", self.world, chunk * esize, wire, wire)
        live = [j for j in range(len(dests)) if sizes[j]]
        srcs = [recv[owners[j] * chunk + offset[j] : owners[j] * chunk + offset[j] + sizes[j]].view(dests[j].shape) for j in live]
        torch._foreach_copy_([dests[j] for j in live], srcs)


def _reduced_nonfinite_flags(pg, comm, flags: torch.Tensor) -> torch.Tensor:
    """Per-tensor NaN/Inf flags, max-reduced over the group so every rank decides the step alike
    (one rank skipping while another runs would leave the other waiting in the all-gather)."""
    f = flags.to(torch.float32)
    dist.all_reduce(f, op=dist.ReduceOp.MAX, group=pg)
    n = f.numel() * f.element_size()
    P = dist.get_world_size(pg)
    wire = (2 * (P - 1) * n) // P
    comm.record("all_reduce", "nonfinite flags", P, n, wire, wire)
    return f > 0


class SplitTorchBackend(TorchBackend):
    """The torch backend with each NS bucket's tensors orthogonalized by their owners and all-gathered."""

    traceable = False  # its step all-gathers per bucket: it runs eagerly (behind a graph break when compiled)

    def __init__(self, pg):
        super().__init__()
        self.pg = pg
        self.comm = CommStats()
        self.gather = NSGather(pg, self.comm)
        self.ns_loads: list = []  # planned NS FLOPs per rank of the current plan

    def step(self, opt, plan, grads_by_bucket) -> None:
        loads = plan.cache.get("mango.ddp.loads")
        if loads is None:
            loads = plan.cache["mango.ddp.loads"] = assign_plan(opt, plan, self.gather.world)
        self.ns_loads = loads
        self.comm.last_step = []
        self.comm.ns_flops = 0.0
        self.comm.steps += 1
        super().step(opt, plan, grads_by_bucket)

    def nonfinite_flags(self, bucket, grads) -> torch.Tensor:
        from .optimizer import Mango

        return _reduced_nonfinite_flags(self.pg, self.comm, Mango._nonfinite_flags(grads))

    def orthogonalize(self, group, bucket, unit, X: torch.Tensor, scale: float = 1.0, buffers=None) -> torch.Tensor:
        """The owner's share: NS of the tensors this rank owns (the single-process code on a copy of
        their rows, which keeps each matrix's memory layout); then every rank's result lands in the
        unit's second buffer in norm-block form, as the single-process NS leaves it."""
        nb = unit.nb
        owners = nb.cache.get("mango.ddp.owners")
        blocks = norm_blocks(X, nb.shape, nb.norm, nb.head_dim, **nb.layout)
        if owners is None or blocks.numel() == 0 or buffers is None:
            return super().orthogonalize(group, bucket, unit, X, scale, buffers)
        if owners and owners[0] == -1:
            return self._row_split_ns(group, bucket, unit, X, scale, buffers)
        me = self.gather.rank
        mine = [j for j, q in enumerate(owners) if q == me]
        results = [None] * len(owners)
        if mine:
            idx = torch.tensor(mine, device=X.device)
            owned = X.index_select(0, idx)
            r, c = nb.block_shape
            limit = max(self._budget // 16, TEMP_FLOOR_BYTES) if self._budget else None
            out = batched_newton_schulz(norm_blocks(owned, nb.shape, nb.norm, nb.head_dim, **nb.layout), ns_schedule(group),
                                        group["ns_prescale"], group["ns_eps"], dtype=X.dtype, out_scale=scale,
                                        method=choose_for_bucket(nb, bucket, group, "torch").method, max_temp_bytes=limit)  # fmt: skip
            for pos, j in enumerate(mine):
                results[j] = out[pos]
            self.comm.ns_flops += len(mine) * ns_flops(nb.shape, nb.block_shape, len(ns_schedule(group)))
        R = buffers[1].view(-1)[: blocks.numel()].view(blocks.shape)
        self.gather(owners, results, list(R.unbind(0)))
        self._ns_in_second = True  # the apply sweep's chunk buffer must not overlap R
        return R

    def _row_split_ns(self, group, bucket, unit, X, scale, buffers) -> torch.Tensor:
        """NS of the unit's tall matrices split by rows over the ranks (`row_split_newton_schulz`);
        one all-gather assembles the rows in the unit's second buffer."""
        nb = unit.nb
        K, rows, cols = X.shape[0], nb.shape[0], math.prod(nb.shape[1:])
        Y, split = row_split_newton_schulz(self.pg, self.comm, list(X.view(K, rows, cols).unbind(0)), ns_schedule(group),
                                           group["ns_eps"], X.dtype, scale)  # fmt: skip
        R = buffers[1].view(-1)[: K * rows * cols].view(K, rows, cols)
        owners, results, dests = _row_blocks(R.unbind(0), Y, split, self.gather.rank)
        self.gather(owners, results, dests)
        self._ns_in_second = True
        return R.view(norm_blocks(X, nb.shape, nb.norm, nb.head_dim, **nb.layout).shape)


def _row_blocks(dests, Y, split, me) -> tuple:
    """The all-gather jobs of row-split results: rank q's rows of every destination matrix."""
    owners, results, out = [], [], []
    for k, d in enumerate(dests):
        lo = 0
        for q, n in enumerate(split):
            owners.append(q)
            results.append(Y[k] if q == me else None)
            out.append(d[lo : lo + n])
            lo += n
    return owners, results, out


def split_triton_backend(pg):
    """The triton backend with each NS engine's work split by owner (see the module docstring) and
    the results all-gathered into every rank's NS buffers, per round."""
    from .backends.triton_backend import TritonBackend

    class SplitTritonBackend(TritonBackend):
        def __init__(self):
            super().__init__()
            self.pg = pg
            self.comm = CommStats()
            self.gather = NSGather(pg, self.comm)
            self.ns_loads: list = []

        def _program(self, opt, plan):
            lgs = super()._program(opt, plan)
            cached = plan.cache.get("mango.ddp.loads")
            if cached is None or cached[0] is not lgs:  # launch groups built anew (a setting changed): place again
                kinds = _engine_kinds(lgs)
                place = lambda nb, group, world: _triton_placement(kinds.get(id(nb)), nb, group, world)  # noqa: E731
                cached = plan.cache["mango.ddp.loads"] = (lgs, assign_plan(opt, plan, self.gather.world, place))
                for lg in lgs:
                    for r in lg.rounds:
                        r.split = _TritonRoundSplit(self, r)
            self.ns_loads = cached[1]
            return lgs

        def step(self, opt, plan, grads_by_bucket) -> None:
            self.comm.last_step = []
            self.comm.ns_flops = 0.0
            self.comm.steps += 1
            super().step(opt, plan, grads_by_bucket)

        def nonfinite_flags(self, bucket, grads) -> torch.Tensor:
            return _reduced_nonfinite_flags(self.pg, self.comm, super().nonfinite_flags(bucket, grads).cpu())

    return SplitTritonBackend()


def _engine_kinds(launch_groups) -> dict:
    """What runs each NS bucket's tensors on the triton backend, by id(nb): "kernels" (the Triton NS
    kernels), "one_batch" (the tiled kernels' Gram-form large items: one host batch, one schedule),
    "gemms" (cuBLAS batched GEMMs on the NS stack, or torch's float64 NS in the work buffer)."""
    import mango_kernels as mk

    kinds = {}
    for lg in launch_groups:
        for r in lg.rounds:
            for e in r.entries:
                if e.ns_dtype is None:
                    continue
                if not e.ns_kernel or not isinstance(e.batch, mk.NSBatch):
                    kinds[id(e.nb)] = "gemms"
                elif e.ns_method == "gram" and e.batch.spec_is_large[e.spec]:
                    kinds[id(e.nb)] = "one_batch"
                else:
                    kinds[id(e.nb)] = "kernels"
    return kinds


def _triton_placement(kind, nb, group, world: int) -> str:
    """Where the triton backend runs an NS bucket's tensors: every rank for a tiled Gram batch (one
    schedule for all its large items), row-split for tall matrices where torch GEMMs run them (the
    kernels keep one owner: a row split would change the engine), else on one owner each."""
    if kind == "one_batch":
        return "all"
    if kind == "gemms" and row_split_ns(nb, group, world):
        return "rows"
    return "owner"


class _TritonRoundSplit:
    """What a triton round asks of the split: whether this rank runs an entry's NS, each cuBLAS
    batch's share (set here, once), and the exchange after the round's NS."""

    def __init__(self, backend, rnd):
        self.backend = backend
        self.rank = backend.gather.rank
        self.owner = {}  # table row -> owner code, for the round's NS entries
        for e in rnd.entries:
            owners = e.nb.cache.get("mango.ddp.owners")
            if owners is not None and e.ns_dtype is not None:
                self.owner[e.row] = owners[e.nb.slots.index(e.slot_index)]
        for batch, members in rnd.ns_batches:
            if getattr(batch, "engine", None) == "cublas":
                mine = [n for n, e in enumerate(members) if self.owner.get(e.row) == self.rank]
                batch.share = (mine[0], mine[-1] + 1) if mine else (0, 0)
                if mine != list(range(*batch.share)):  # assign_plan orders each bucket's owners
                    raise RuntimeError(f"mango: rank {self.rank}'s tensors of a cuBLAS NS bucket are not consecutive: {mine}")

    def owns(self, e) -> bool:
        q = self.owner.get(e.row)
        return q is None or q == EVERY_RANK or q == self.rank

    def exchange(self, rnd, groups) -> None:
        """Row-split the round's tall matrices, then all-gather its NS results (kernel outputs and
        cuBLAS stacks in their NS dtype, torch-run float64 NS in the work buffer), one collective per dtype."""
        by_dtype: dict = {}
        rows_by_nb: dict = {}

        def add(view, owner, result):
            jobs = by_dtype.setdefault(view.dtype, ([], [], []))
            jobs[0].append(owner)
            jobs[1].append(result)
            jobs[2].append(view)

        for e in rnd.entries:
            q = self.owner.get(e.row)
            if q is None or e.numel == 0:
                continue
            if q == EVERY_RANK or q == self.rank:
                group = groups[e.bucket.group_index]
                self.backend.comm.ns_flops += ns_flops(e.nb.shape, e.nb.block_shape, len(ns_schedule(group)))
            if q == EVERY_RANK:
                continue
            view = e.batch.output_view(e.spec) if e.ns_kernel else rnd.work[e.work_offset : e.work_offset + e.numel]
            if q == ROW_SPLIT:  # no rank's batch ran it: its d is still where the moments kernel wrote it
                source = e.batch.input_view(e.spec) if e.ns_kernel else view
                rows_by_nb.setdefault(id(e.nb), []).append((e, source, view))
            else:
                add(view, q, view if q == self.rank else None)
        for members in rows_by_nb.values():
            e = members[0][0]
            group = groups[e.bucket.group_index]
            rows, cols = e.nb.shape[0], math.prod(e.nb.shape[1:])
            mats = [source.view(rows, cols) for _, source, _ in members]
            dests = [view.view(rows, cols) for _, _, view in members]  # a cuBLAS bucket in place: X's second place
            Y, split = row_split_newton_schulz(self.backend.pg, self.backend.comm, mats, ns_schedule(group), group["ns_eps"], e.ns_dtype)
            for owner, result, dest in zip(*_row_blocks(dests, Y.to(dests[0].dtype), split, self.rank)):
                add(dest, owner, result)
        for owners, results, dests in by_dtype.values():
            self.backend.gather(owners, results, dests)
