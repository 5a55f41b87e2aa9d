"""mango under torch.distributed: DDP works unchanged; FSDP2 (DTensor) parameters get a sharded backend.

DDP
    Every rank holds whole parameters and, after DDP's all-reduce, the same gradients, so every
    rank runs the same deterministic step and ends with identical parameters and state. Nothing
    here is involved (with `process_group=`, mango.ddp splits the NS work across the ranks).

FSDP2 (`torch.distributed.fsdp.fully_shard`), HSDP and other DTensor parameters
    A parameter sharded by rows (`Shard(0)` on one mesh dimension, `Replicate()` on any others,
    as `fully_shard` makes them) holds a contiguous block of rows on each rank of its shard group,
    possibly uneven or empty. `ShardedTorchBackend` runs the torch backend unchanged on the local
    shards and overrides its three whole-tensor stages with collectives on the shard group:

    moments, sign, none,   on the local shards; no communication.
    offset, apply
    l2, trust ratio,       local sums of squares, all-reduced together: one all-reduce serves every
    novograd, l2_split     tensor of a round (below). l2_split sums per head block, so a shard
                           boundary that cuts a head is exact. l2_col rows are whole under Shard(0).
    ns, ns_split           each matrix is assigned to an owner rank (greedy, balanced by NS FLOPs);
                           one all_to_all gathers the rows of every matrix of a round on its owner,
                           the owner runs the torch backend's batched NS per shape bucket, and one
                           all_to_all scatters the rows back. Rows travel in the NS operand dtype
                           (bf16 on CUDA), so the owner computes exactly the single-process NS.
    ns, very tall          (rows > ns_steps·cols, e.g. a vocabulary head) row-sharded instead: each
                           NS step all-reduces the cols×cols Gram matrix XᵀX and every rank updates
                           its own rows; less traffic than gathering it, and its FLOPs split evenly.

    Rounds. The torch backend steps one bucket (param group) at a time. To batch collectives across
    groups, each sharded bucket's step runs as a coroutine (a helper thread; one thread runs at a
    time) that pauses at a whole-tensor stage; once every bucket has paused, one all-reduce and one
    all_to_all pair serve all of them. Rounds = the largest number of communicating norm buckets
    in one group (3 for a GPT with mango.param_groups: the three hidden-matrix shapes), so the
    collectives per step do not grow with depth.

    Optimizer state of a DTensor parameter is a DTensor placed like it, so
    `torch.distributed.checkpoint` saves and loads it sharded; whole (single-process) state loaded
    into a sharded optimizer is cut to each rank's rows.

Unsupported placements (Shard(d) with d > 0 as in tensor parallelism, Partial, interleaved
sharding of dim 0 as in FSDP + TP) raise a ValueError naming the parameter. The triton backend
runs DTensor parameters through `mango.sharded_triton`, which uses this backend's localization
and exchange around the fused kernels.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import newton_schulz as _ns
from .backends.torch_backend import TorchBackend, batched_newton_schulz
from .config import NS_NORMS, ns_schedule
from .dtensor import is_dtensor, local_tensor
from .layout import norm_blocks
from .ns_engine import choose_for_bucket

if TYPE_CHECKING:  # the annotation only
    from .plan import ElementwiseBucket
from .reference import init_state as _plain_init_state

__all__ = [
    "is_dtensor",
    "local_tensor",
    "shard_dim",
    "check_param",
    "init_state",
    "ShardedTorchBackend",
    "CommStats",
    "ns_flops",
    "row_sharded_ns_flops",
    "use_row_sharded_ns",
    "assign_owners",
]


# ----------------------------------------------------------------------------------------
# DTensor helpers (torch.distributed.tensor is imported lazily: it costs ~1 s)
# ----------------------------------------------------------------------------------------


def _placement_error(name, p, why) -> ValueError:
    return ValueError(
        f"mango: parameter {name} is a DTensor with placements {tuple(p.placements)} on a "
        f"{p.device_mesh.ndim}-D device mesh: {why}. mango supports Shard(0) on one mesh dimension "
        f"(what torch.distributed.fsdp.fully_shard makes) with Replicate() on the others (HSDP), or "
        f"Replicate() only. Use fully_shard's default placements, or keep this parameter replicated."
    )


def shard_dim(name: str, p) -> int | None:
    """The mesh dimension p is sharded on by rows (Shard(0)), None if p is replicated; raises for anything else."""
    from torch.distributed.tensor import Replicate, Shard

    dim = None
    for i, pl in enumerate(p.placements):
        if type(pl) is Replicate:
            continue
        if type(pl) is Shard and pl.dim == 0:
            if dim is not None:
                raise _placement_error(name, p, "dimension 0 is sharded on more than one mesh dimension")
            dim = i
            continue
        if isinstance(pl, Shard):
            what = f"Shard({pl.dim})" if type(pl) is Shard else repr(pl)
            raise _placement_error(
                name, p, f"{what} splits columns or interleaves rows, so no rank holds whole rows (tensor parallelism is not supported)"
            )
        raise _placement_error(name, p, f"placement {pl!r} is not supported (partial values must be reduced before the step)")
    if dim is not None and p.dim() == 0:
        raise _placement_error(name, p, "a 0-d tensor cannot be sharded")
    return dim


def check_param(name: str, p) -> None:
    """Called for every parameter handed to Mango: a clear error for DTensor placements mango cannot handle."""
    if is_dtensor(p):
        shard_dim(name, p)


def init_state(param, settings: dict) -> dict:
    """Fresh optimizer state; for a DTensor parameter, elementwise state are DTensors with its placements
    (so torch.distributed.checkpoint shards them) and 0-d entries stay plain (replicated) tensors."""
    if not is_dtensor(param):
        return _plain_init_state(param, settings)
    from torch.distributed.tensor import DTensor

    state = _plain_init_state(local_tensor(param), settings)
    for key, value in state.items():
        if key != "step" and value.dim() > 0:
            state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
    return state


# ----------------------------------------------------------------------------------------
# Newton–Schulz cost and owner assignment
# ----------------------------------------------------------------------------------------


def row_sharded_ns_flops(rows: int, cols: int, steps: int) -> float:
    """FLOPs one rank runs for the row-sharded NS of a tall matrix of which it holds `rows` rows of
    `cols`: its share of XᵀX and X·B, plus the small A·A every rank computes (a textbook step whose
    cols×cols Gram matrix is summed over the ranks)."""
    return float(steps * _ns.textbook_step_flops(cols, rows))


def use_row_sharded_ns(shape, norm: str, prescale: str, steps: int, world: int) -> bool:
    """Row-sharded NS instead of gather/scatter: for a matrix at least `steps` times taller than wide,
    all-reducing the cols×cols Gram matrix each NS step moves less than gathering the matrix on an
    owner (per rank: 2·steps·cols² vs the owner's 2·rows·cols) and splits its FLOPs evenly. Used for
    whole-matrix "ns" with Frobenius pre-scaling (vocabulary heads, tall embeddings)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return world > 1 and norm == "ns" and prescale == "frobenius" and steps > 0 and rows > steps * cols


def ns_flops(shape, block_shape, steps: int) -> float:
    """FLOPs of textbook Newton–Schulz on one matrix of `shape` split into `block_shape` blocks."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    r, c = block_shape
    blocks = (rows * cols) // max(1, r * c)
    return float(blocks * _ns.textbook_flops(r, c, steps))


def assign_owners(costs, world: int, loads=None) -> tuple[list[int], list[float]]:
    """Greedy longest-processing-time assignment: each job (largest first) to the least-loaded rank,
    starting from `loads` (work the ranks already have; zeros by default).

    Deterministic (ties broken by job index, then rank), so every rank computes the same answer.
    Returns (owner of each job, load of each rank)."""
    loads = list(loads) if loads is not None else [0.0] * world
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        q = min(range(world), key=lambda r: (loads[r], r))
        owners[j] = q
        loads[q] += costs[j]
    return owners, loads


# ----------------------------------------------------------------------------------------
# communication accounting
# ----------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """What this rank communicated. `last_step` lists the collectives of the latest step; `totals` sums
    payload and wire bytes per collective kind since creation (or `reset()`).

    payload_bytes: the buffer handed to the collective on this rank.
    sent_bytes / recv_bytes: bytes that leave / reach this rank over the network. all_to_all: the
    segments for / from other ranks exactly; all_reduce: the ring algorithm's 2·(P−1)/P·payload
    each way (NCCL and gloo both use ring or similar bandwidth-optimal algorithms at these sizes)."""

    last_step: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    steps: int = 0
    plan: list = field(default_factory=list)  # one-off collectives of plan building (shard sizes)
    ns_flops: float = 0.0  # Newton–Schulz FLOPs this rank ran in the latest step (owned matrices + row-sharded share)
    ns_seconds: float = 0.0  # and the time they took (measured only when the backend's `profile` is set)

    def reset(self) -> None:
        self.last_step, self.totals, self.steps, self.plan = [], {}, 0, []

    def record(self, op: str, what: str, group_size: int, payload: int, sent: int, recv: int) -> None:
        self.last_step.append(dict(op=op, what=what, group_size=group_size, payload_bytes=payload, sent_bytes=sent, recv_bytes=recv))
        t = self.totals.setdefault(op, dict(calls=0, payload_bytes=0, sent_bytes=0, recv_bytes=0))
        t["calls"] += 1
        t["payload_bytes"] += payload
        t["sent_bytes"] += sent
        t["recv_bytes"] += recv

    def step_summary(self) -> dict:
        """Per-kind totals of the latest step: {op: {calls, payload_bytes, sent_bytes, recv_bytes}}."""
        out: dict = {}
        for r in self.last_step:
            t = out.setdefault(r["op"], dict(calls=0, payload_bytes=0, sent_bytes=0, recv_bytes=0))
            t["calls"] += 1
            for k in ("payload_bytes", "sent_bytes", "recv_bytes"):
                t[k] += r[k]
        return out


# ----------------------------------------------------------------------------------------
# the rank-local view of a plan
# ----------------------------------------------------------------------------------------


@dataclass
class _ShardInfo:
    """How a sharded norm bucket's tensors are split: rows per rank of the shard group (same for all)."""

    pg: object
    world: int
    rank: int
    rows: list  # rows held by each rank
    offsets: list  # first global row of each rank
    shape: tuple  # global tensor shape
    block_shape: tuple  # global (r, c) blocks of the norm
    cols: int  # prod(shape[1:])
    owners: list = None  # NS: owner rank of each tensor of the bucket ("owner" mode)
    ns_mode: str = "owner"  # NS: "owner" (gather, NS, scatter) or "row_sharded" (see _row_sharded_newton_schulz)

    @property
    def local_rows(self) -> int:
        return self.rows[self.rank]

    @property
    def local_shape(self) -> tuple:
        return (self.rows[self.rank], *self.shape[1:])


@dataclass
class _Entry:
    """One rank-local elementwise bucket: all its tensors sharded on the same group (pg), or all whole (pg None)."""

    bucket: ElementwiseBucket  # over local tensors; the torch backend runs on it unchanged
    source: int  # index of the plan bucket it comes from
    positions: list  # positions of its slots in that bucket
    pg: object
    params: list  # the (DTensor) parameters, slot order
    states: list  # their optimizer-state dicts (opt.state[p])
    plan: object = None  # a one-bucket Plan the torch backend runs (kept: backends may cache in plan.cache)
    synced: bool = False


class _LocalPlan:
    def __init__(self, entries, ns_loads):
        self.entries = entries
        self.ns_loads = ns_loads  # {group rank list (tuple): NS FLOPs per rank}
        self.exchanges: dict = {}  # cached all_to_all layouts, by the tuple of NS buckets served together
        self.grads_checked = False


def _group_ranks(pg) -> tuple:
    try:
        return tuple(dist.get_process_group_ranks(pg))
    except Exception:  # pragma: no cover - very old torch
        return tuple(range(dist.get_world_size(pg)))


# ----------------------------------------------------------------------------------------
# coroutines: a bucket's step runs on a helper thread, but only one thread runs at a time
# ----------------------------------------------------------------------------------------


class _Worker:
    """A helper thread that runs jobs as coroutines: `start(fn)` runs fn(worker) until fn calls
    `wait_for(request)` (or returns); `resume(result)` continues it, `wait_for` returning `result`.
    Control passes back and forth through two plain locks, so exactly one of the caller and the
    worker runs at any time (no concurrent torch calls, no oversubscription). Workers are kept and
    reused across steps."""

    def __init__(self):
        self._go = threading.Lock()
        self._go.acquire()
        self._back = threading.Lock()
        self._back.acquire()
        self.fn = None
        self.request = None
        self.result = None
        self.done = True
        self.exc = None
        threading.Thread(target=self._loop, name="mango-bucket-step", daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            if self.fn is None:  # stop()
                return
            try:
                self.fn(self)
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                self.exc = e
            finally:
                self.fn = None
                self.done = True
                self.request = None
                self._back.release()

    def stop(self) -> None:
        """End an idle worker's thread."""
        self.fn = None
        self._go.release()

    def start(self, fn) -> None:
        self.fn, self.done, self.exc, self.request = fn, False, None, None
        self._go.release()
        self._back.acquire()

    def resume(self, result) -> None:
        self.result = result
        self._go.release()
        self._back.acquire()
        self.result = None

    def wait_for(self, request):
        self.request = request
        self._back.release()
        self._go.acquire()
        return self.result


# ----------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------


def _method(group, bucket, nb) -> str:
    """The NS form of a bucket's blocks: the plan's choice (mango.ns_engine), read, not made again."""
    return choose_for_bucket(nb, bucket, group, "torch").method


class ShardedTorchBackend(TorchBackend):
    """The torch backend on rank-local shards of DTensor (FSDP2) parameters; see the module docstring."""

    name = "torch"

    def __init__(self):
        super().__init__()
        self.comm = CommStats()
        self._tls = threading.local()
        self._workers: list = []  # idle coroutine threads
        self._lp = None
        self._prefetch: list = []  # sums of squares to add to the next all-reduce: (key, tensors, request)
        self._prefetched: dict = {}  # their norms, by the ids of the tensors a hook will ask about
        self.ns_loads: dict = {}  # {ranks of a shard group: planned NS FLOPs per rank} of the current plan
        self.profile = False  # time the owner-side Newton–Schulz (synchronizes CUDA; for bench/comm.py)

    def __del__(self):
        for w in getattr(self, "_workers", ()):
            w.stop()

    # --------------------------------------------------------------------------------
    # the step
    # --------------------------------------------------------------------------------
    def step(self, opt, plan, grads_by_bucket) -> None:
        lp = plan.cache.get("mango.distributed")
        if lp is None:
            lp = plan.cache["mango.distributed"] = self._localize(opt, plan)
        if not lp.grads_checked:
            self._check_grads(lp, grads_by_bucket)
        self.comm.last_step = []
        self.comm.ns_flops = self.comm.ns_seconds = 0.0
        self.comm.steps += 1
        jobs = []
        for e in lp.entries:
            grads = grads_by_bucket[e.source]
            jobs.append((e, [local_tensor(grads[i]) for i in e.positions]))
        self._lp = lp
        self.ns_loads = lp.ns_loads
        sharded = [(e, g) for e, g in jobs if e.pg is not None]
        self._prefetch_trust_norms(opt, [e for e, _ in sharded])
        for e, g in jobs:
            if e.pg is None:
                self._run_bucket(opt, e, g, None)
        if len(sharded) == 1:
            self._run_bucket(opt, *sharded[0], None)
        elif sharded:
            self._run_batched(opt, sharded)
        for e, _ in jobs:
            if not e.synced:
                self._sync_state(e)

    def _prefetch_trust_norms(self, opt, entries) -> None:
        """Trust-ratio norms ‖W‖ depend only on the parameters before the step: their sums of squares
        join the step's first all-reduce instead of taking a round of their own."""
        self._prefetch, self._prefetched = [], {}
        for e in entries:
            if not opt.param_groups[e.bucket.group_index]["trust_ratio"]:
                continue
            for nb in e.bucket.norm_buckets:
                ts = [e.bucket.slots[i].param for i in nb.slots]
                sq = torch.stack(torch._foreach_norm(ts, 2, dtype=e.bucket.dtype)) ** 2
                self._prefetch.append((tuple(map(id, ts)), ts, ("sum", e, sq)))

    def _clock(self) -> float:
        import time

        if self._lp is not None and self._lp.entries and self._lp.entries[0].bucket.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _check_grads(lp, grads_by_bucket) -> None:
        """Once per plan: gradients of DTensor params must be DTensors placed like them (FSDP2's are)."""
        for e in lp.entries:
            grads = grads_by_bucket[e.source]
            for slot, p, i in zip(e.bucket.slots, e.params, e.positions):
                g = grads[i]
                if is_dtensor(p) and (not is_dtensor(g) or tuple(g.placements) != tuple(p.placements)):
                    what = f"a DTensor with placements {tuple(g.placements)}" if is_dtensor(g) else f"a plain {tuple(g.shape)} tensor"
                    raise ValueError(
                        f"mango: parameter {slot.name} is a DTensor with placements {tuple(p.placements)} but its gradient is "
                        f"{what}; the gradient must be sharded like the parameter (as FSDP2 leaves it)"
                    )
        lp.grads_checked = True

    def _run_bucket(self, opt, entry, grads, co) -> None:
        self._tls.entry, self._tls.co = entry, co
        try:
            TorchBackend.step(self, opt, entry.plan, [grads])
        finally:
            self._tls.entry, self._tls.co = None, None

    def _run_batched(self, opt, jobs) -> None:
        """Run every sharded bucket's step as a coroutine; serve their paused requests together, in
        rounds: each round, every unfinished bucket has made exactly one request (the same on every
        rank: the plan is), and one all-reduce plus one all_to_all pair serve them all."""
        device = jobs[0][0].bucket.device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

        def job(entry, grads):
            def fn(worker):
                with contextlib.ExitStack() as stack:
                    stack.enter_context(torch.no_grad())
                    if stream is not None:
                        stack.enter_context(torch.cuda.device(device))
                        stack.enter_context(torch.cuda.stream(stream))
                    self._run_bucket(opt, entry, grads, worker)

            return fn

        while len(self._workers) < len(jobs):
            self._workers.append(_Worker())
        workers = [self._workers.pop() for _ in jobs]
        clean = False
        try:
            for w, (e, g) in zip(workers, jobs):
                w.start(job(e, g))
            while True:
                live = [w for w in workers if not w.done]
                if not live:
                    break
                results = self._serve([w.request for w in live])
                for w, r in zip(live, results):
                    w.resume(r)
            clean = True
        finally:
            if clean:  # a worker left paused by an exception here is abandoned, never reused
                self._workers.extend(workers)
        for w in workers:
            if w.exc is not None:
                exc, w.exc = w.exc, None
                raise exc

    def _request(self, kind, payload):
        entry = self._tls.entry
        req = (kind, entry, payload)
        co = self._tls.co
        if co is None:
            return self._serve([req])[0]
        return co.wait_for(req)

    # --------------------------------------------------------------------------------
    # whole-tensor stages (the torch backend's hooks)
    # --------------------------------------------------------------------------------
    def _entry(self):
        return getattr(self._tls, "entry", None)

    def tensor_norms(self, tensors) -> torch.Tensor:
        entry = self._entry()
        if entry is None or entry.pg is None:
            return super().tensor_norms(tensors)
        hit = self._prefetched.pop(tuple(map(id, tensors)), None)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
            return hit[1]
        if not tensors:
            return torch.zeros(0, dtype=entry.bucket.dtype, device=entry.bucket.device)
        sq = torch.stack(torch._foreach_norm(tensors, 2, dtype=entry.bucket.dtype)) ** 2  # bf16 params: fp32 sums
        return self._request("sum", sq).sqrt()

    def _workspace_key(self, device):
        """One workspace per bucket: buckets' steps interleave (they pause at collectives), so a
        buffer shared between them would be overwritten while a paused step still needs it."""
        return (device, id(self._entry()))

    def finish_sums(self, unit, sums: torch.Tensor) -> torch.Tensor:
        """Per-segment sums of squares: all-reduced over the shard group, except where every segment
        is whole on this rank (l2_col rows under Shard(0), anything per expert)."""
        nb, entry = unit.nb, self._entry()
        if entry is None or entry.pg is None or nb.experts or (nb.norm == "l2_col" and nb.orientation == "out_in"):
            return sums
        return self._request("sum", sums)

    def orthogonalize(self, group, bucket, unit, X, scale=1.0, buffers=None):
        """NS of row shards: gathered on owner ranks (or row-sharded for very tall matrices); returns
        this rank's rows of scale × the result, one storage-layout tensor per parameter. Experts are
        whole on their rank (Shard(0) splits the expert dimension), so their NS stays local."""
        nb = unit.nb
        info = nb.cache.get("mango.distributed")
        if info is None or nb.experts:
            return super().orthogonalize(group, bucket, unit, X, scale, buffers)
        result = self._request("ns", (group, bucket, nb, list(X.unbind(0))))
        return result if scale == 1.0 else [t * scale for t in result]

    def copy_ns_result(self, L, unit, chunk, t, result) -> None:
        if not isinstance(result, list):
            return super().copy_ns_result(L, unit, chunk, t, result)
        views = self._piece_views(L, chunk, t)
        torch._foreach_copy_(views, [result[pc.k - unit.k0][pc.r0 : pc.r1] for pc in chunk])

    def nonfinite_flags(self, bucket, grads) -> torch.Tensor:
        """Per-parameter NaN/Inf flags, reduced (max) over each shard group so every rank decides alike."""
        local = [local_tensor(g) for g in grads]
        probe = [g if g.numel() else g.new_zeros(1) for g in local]
        flags = (~torch.isfinite(torch.stack(torch._foreach_norm(probe, float("inf"))))).to(torch.float32)
        groups = bucket.cache.get("mango.distributed.flag_groups")
        if groups is None:
            by_pg: dict = {}
            for i, s in enumerate(bucket.slots):
                if is_dtensor(s.param):
                    d = shard_dim(s.name, s.param)
                    if d is not None:
                        by_pg.setdefault(s.param.device_mesh.get_group(d), []).append(i)
            groups = bucket.cache["mango.distributed.flag_groups"] = [(pg, torch.tensor(idx, device=flags.device)) for pg, idx in by_pg.items()]
        for pg, sel in groups:
            part = flags.index_select(0, sel)
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=pg)
            self.comm.record("all_reduce", "nonfinite flags", dist.get_world_size(pg), *self._ring_bytes(part, pg))
            flags.index_copy_(0, sel, part)
        return flags > 0

    # --------------------------------------------------------------------------------
    # serving requests: one all-reduce per shard group, one all_to_all pair per (group, NS dtype)
    # --------------------------------------------------------------------------------
    @staticmethod
    def _ring_bytes(t, pg):
        P = dist.get_world_size(pg)
        n = t.numel() * t.element_size()
        wire = (2 * (P - 1) * n) // P
        return n, wire, wire

    def _serve(self, requests) -> list:
        n = len(requests)
        results = [None] * n
        sums: dict = {}
        ns: dict = {}
        row_sharded: dict = {}
        requests = list(requests)  # + prefetched trust-ratio sums, + pre-scaling sums of row-sharded NS
        prefetch, self._prefetch = self._prefetch, []
        for _, _, req in prefetch:
            requests.append(req)
        for i, (kind, entry, payload) in enumerate(list(requests)):
            if kind == "sum":
                sums.setdefault(entry.pg, []).append(i)
                continue
            group, bucket, nb, d = payload
            dt = self.ns_exchange_dtype(group, bucket, nb)
            if nb.cache["mango.distributed"].ns_mode == "row_sharded":
                # its Frobenius pre-scaling joins this round's sums of squares
                info = nb.cache["mango.distributed"]
                X = torch.stack(d).view(len(d), info.local_rows, info.cols).to(dt)
                acc = torch.float64 if dt == torch.float64 else torch.float32
                requests.append(("sum", entry, torch.linalg.vector_norm(X, dim=(-2, -1), dtype=acc) ** 2))
                sums.setdefault(entry.pg, []).append(len(requests) - 1)
                row_sharded.setdefault((entry.pg, dt), []).append((i, len(requests) - 1, X))
            else:
                ns.setdefault((entry.pg, dt), []).append(i)
        results += [None] * (len(requests) - len(results))
        for pg, idx in sums.items():
            parts = [requests[i][2] for i in idx]
            dt = parts[0].dtype
            for p in parts:
                dt = torch.promote_types(dt, p.dtype)
            flat = torch.cat([p.reshape(-1).to(dt) for p in parts])
            dist.all_reduce(flat, group=pg)
            self.comm.record("all_reduce", "sums of squares", dist.get_world_size(pg), *self._ring_bytes(flat, pg))
            for i, piece in zip(idx, flat.split([p.numel() for p in parts])):
                results[i] = piece.view_as(requests[i][2]).to(requests[i][2].dtype)
        for k, (key, ts, _) in enumerate(prefetch):
            self._prefetched[key] = (ts, results[n + k].sqrt())
        for (pg, dt), idx in ns.items():
            outs = self._newton_schulz_exchange(pg, dt, [requests[i][2] for i in idx])
            for i, out in zip(idx, outs):
                results[i] = out
        for (pg, dt), jobs in row_sharded.items():
            outs = self._row_sharded_newton_schulz(pg, dt, [(requests[i][2], X, results[j]) for i, j, X in jobs])
            for (i, _, _), out in zip(jobs, outs):
                results[i] = out
        return results[:n]

    def ns_exchange_dtype(self, group, bucket, nb) -> torch.dtype:
        """The dtype rows travel and the owner orthogonalizes in: the torch backend's NS dtype."""
        return choose_for_bucket(nb, bucket, group, "torch").dtype

    def _row_sharded_newton_schulz(self, pg, dtype, items) -> list:
        """Newton–Schulz on row-sharded tall matrices without gathering them.

        With X (rows > cols) split by rows over the ranks, the torch backend's iteration on Z = Xᵀ,
        A = Z·Zᵀ, B = b·A + c·A·A, Z ← a·Z + B·Z, is X ← a·X + X·Bᵀ with A = XᵀX = Σ_ranks X_rᵀX_r:
        each step all-reduces the cols×cols partial Gram matrices (of every matrix served here, in
        one call), every rank forms B, and updates its own rows. Same polynomial, same pre-scaling
        (the Frobenius norm from this round's sums of squares); only the sums run in another order.
        Gram matrices are summed in fp32 when the NS dtype is lower."""
        coeffs_of, Xs = [], []
        for (group, bucket, nb, d), X, sumsq in items:
            eps = group["ns_eps"]
            X = X / sumsq.sqrt().clamp_min(eps).to(X.dtype)[:, None, None]
            Xs.append(X)
            coeffs_of.append(ns_schedule(group))
        t0 = self._clock() if self.profile else 0.0
        steps = len(coeffs_of[0])
        if any(len(c) != steps for c in coeffs_of):  # different step counts: serve one at a time
            return [self._row_sharded_newton_schulz(pg, dtype, [it])[0] for it in items]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        P = dist.get_world_size(pg)
        for t in range(steps):
            parts = [torch.bmm(X.mT, X) for X in Xs]
            flat = torch.cat([a.reshape(-1).to(acc) for a in parts])
            dist.all_reduce(flat, group=pg)
            self.comm.record("all_reduce", "NS Gram", P, *self._ring_bytes(flat, pg))
            for k, (A, piece) in enumerate(zip(parts, flat.split([a.numel() for a in parts]))):
                A = piece.view_as(A).to(dtype)
                a, b, c = coeffs_of[k][t]
                B = torch.baddbmm(A, A, A, beta=b, alpha=c)
                Xs[k] = torch.baddbmm(Xs[k], Xs[k], B.mT, beta=a, alpha=1.0)
                info = items[k][0][2].cache["mango.distributed"]
                self.comm.ns_flops += Xs[k].shape[0] * row_sharded_ns_flops(info.local_rows, info.cols, 1)
        if self.profile:
            self.comm.ns_seconds += self._clock() - t0
        out = []
        for ((group, bucket, nb, d), _, _), X in zip(items, Xs):
            info = nb.cache["mango.distributed"]
            out.append(list(X.to(bucket.dtype).view(len(d), *info.local_shape).unbind(0)))
        return out

    def _newton_schulz_exchange(self, pg, dtype, items) -> list:
        """Gather every matrix of `items` on its owner (one all_to_all), NS there per norm bucket,
        scatter the rows back (one all_to_all). Returns each item's local shards of the result."""
        key = (tuple(id(nb) for _, _, nb, _ in items), dtype)
        ex = self._lp.exchanges.get(key)
        if ex is None:
            ex = self._lp.exchanges[key] = _Exchange([nb for _, _, nb, _ in items], dtype, items[0][1].device)
        torch._foreach_copy_(ex.pack_views, [t for _, _, _, d in items for t in d])
        dist.all_to_all_single(ex.owned, ex.shards, ex.owned_splits, ex.shard_splits, group=pg)
        esize = ex.shards.element_size()
        sent = (sum(ex.shard_splits) - ex.shard_splits[ex.rank]) * esize
        recv = (sum(ex.owned_splits) - ex.owned_splits[ex.rank]) * esize
        self.comm.record("all_to_all", "NS gather", ex.world, ex.shards.numel() * esize, sent, recv)
        t0 = self._clock() if self.profile else 0.0
        for (group, bucket, nb, _), blocks in zip(items, ex.owned_views):
            info = nb.cache["mango.distributed"]
            if not blocks or blocks[0].shape[0] == 0:
                continue
            pieces = [b[:, :n] for b, n in zip(blocks, info.rows)]
            X = torch.cat(pieces, dim=1)  # (owned, rows, cols): whole tensors in storage layout
            coeffs = ns_schedule(group)
            owned = X.view(X.shape[0], *info.shape)
            Y = batched_newton_schulz(norm_blocks(owned, info.shape, nb.norm, nb.head_dim, **nb.layout), coeffs,
                                      group["ns_prescale"], group["ns_eps"], method=_method(group, bucket, nb))  # fmt: skip
            norm_blocks(owned, info.shape, nb.norm, nb.head_dim, **nb.layout).copy_(Y)  # back in storage layout
            torch._foreach_copy_(pieces, list(X.split(info.rows, dim=1)))
            self.comm.ns_flops += X.shape[0] * ns_flops(info.shape, info.block_shape, len(coeffs))
        if self.profile:
            self.comm.ns_seconds += self._clock() - t0
        dist.all_to_all_single(ex.shards, ex.owned, ex.shard_splits, ex.owned_splits, group=pg)
        self.comm.record("all_to_all", "NS scatter", ex.world, ex.owned.numel() * esize, recv, sent)
        return [[v.to(bucket.dtype) for v in views] for (_, bucket, _, _), views in zip(items, ex.item_views)]

    # --------------------------------------------------------------------------------
    # building the rank-local plan
    # --------------------------------------------------------------------------------
    def _localize(self, opt, plan) -> _LocalPlan:
        entries = []
        for bi, bucket in enumerate(plan.buckets):
            parts: dict = {}
            for i, s in enumerate(bucket.slots):
                pg = None
                if is_dtensor(s.param):
                    d = shard_dim(s.name, s.param)
                    if d is not None:
                        pg = s.param.device_mesh.get_group(d)
                parts.setdefault(pg, []).append(i)
            for pg, positions in parts.items():
                entries.append((bi, bucket, pg, positions))
        # rows per rank of every sharded tensor: one all_gather per shard group, once per plan
        rows_of: dict = {}
        by_pg: dict = {}
        for bi, bucket, pg, positions in entries:
            if pg is not None:
                by_pg.setdefault(pg, []).extend(bucket.slots[i] for i in positions)
        for pg, slots in by_pg.items():
            mine = torch.tensor([local_tensor(s.param).shape[0] for s in slots], dtype=torch.int64)
            dev = slots[0].param.device
            mine = mine.to(dev)
            P = dist.get_world_size(pg)
            allr = [torch.empty_like(mine) for _ in range(P)]
            dist.all_gather(allr, mine, group=pg)
            n = mine.numel() * mine.element_size()
            self.comm.plan.append(
                dict(op="all_gather", what="shard sizes", group_size=P, payload_bytes=n, sent_bytes=n * (P - 1), recv_bytes=n * (P - 1))
            )
            table = torch.stack(allr).cpu().tolist()  # [rank][slot]
            for j, s in enumerate(slots):
                rows = [table[q][j] for q in range(P)]
                if sum(rows) != s.param.shape[0]:
                    raise RuntimeError(f"mango: parameter {s.name}: shards hold {rows} rows, not {s.param.shape[0]}")
                rows_of[id(s.param)] = rows
        out = []
        ns_jobs: dict = {}  # pg -> [(info, cost)]
        for bi, bucket, pg, positions in entries:
            out.append(self._local_entry(opt, plan, bi, bucket, pg, positions, rows_of, ns_jobs))
        ns_loads = {}
        for pg, jobs in ns_jobs.items():
            P = dist.get_world_size(pg)
            owners, loads = assign_owners([c for _, _, c in jobs["jobs"]], P, jobs["base"])
            for (info, k, _), q in zip(jobs["jobs"], owners):
                info.owners[k] = q
            ns_loads[_group_ranks(pg)] = loads
        return _LocalPlan(out, ns_loads)

    def _local_entry(self, opt, plan, bi, bucket, pg, positions, rows_of, ns_jobs) -> _Entry:
        from torch.distributed.tensor import DTensor

        from .plan import ElementwiseBucket, NormBucket, Plan, Slot

        group = opt.param_groups[bucket.group_index]
        new_index = {old: new for new, old in enumerate(positions)}
        slots, params, states = [], [], []
        for i in positions:
            s = bucket.slots[i]
            p = s.param
            lp = local_tensor(p)
            local_state = {}
            for key, value in list(s.state.items()):
                if is_dtensor(value):
                    if not is_dtensor(p) or tuple(value.placements) != tuple(p.placements) or value.shape != p.shape:
                        raise ValueError(f"mango: parameter {s.name}: state {key!r} is a DTensor placed unlike the parameter")
                    local_state[key] = local_tensor(value)
                elif is_dtensor(p) and value.dim() > 0 and tuple(value.shape) == tuple(p.shape) and tuple(lp.shape) != tuple(p.shape):
                    # whole state (e.g. a single-process checkpoint): keep this rank's rows
                    rows = rows_of[id(p)]
                    me = dist.get_rank(pg)
                    mine = value.detach().narrow(0, sum(rows[:me]), rows[me]).to(device=lp.device).clone()
                    s.state[key] = DTensor.from_local(mine, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
                    local_state[key] = mine
                else:
                    local_state[key] = value
            slots.append(Slot(lp, s.name, s.group_index, s.role, s.norm, local_state))
            params.append(p)
            states.append(s.state)
        nbs = []
        for nb in bucket.norm_buckets:
            idx = [new_index[i] for i in nb.slots if i in new_index]
            if not idx:
                continue
            layout = dict(head_dim=nb.head_dim, orientation=nb.orientation, experts=nb.experts, blocks_per_tensor=nb.blocks_per_tensor)
            if pg is None:
                nbs.append(NormBucket(nb.norm, idx, nb.shape, nb.block_shape, nb.shape_factor, **layout))
                continue
            P, me = dist.get_world_size(pg), dist.get_rank(pg)
            info = None
            if nb.shape is not None:  # matrix norms: rows per rank, same for every tensor of the bucket
                rows = rows_of[id(params[idx[0]])]
                for k in idx:
                    if rows_of[id(params[k])] != rows:
                        raise RuntimeError(
                            f"mango: parameters {slots[idx[0]].name} and {slots[k].name} have the same shape "
                            f"but different shard sizes {rows} / {rows_of[id(params[k])]}"
                        )
                offsets = [sum(rows[:q]) for q in range(P)]
                info = _ShardInfo(pg, P, me, rows, offsets, tuple(nb.shape), tuple(nb.block_shape), math.prod(nb.shape[1:]))
                if nb.norm in NS_NORMS and not nb.experts:  # experts: whole on their rank, NS stays local
                    steps = len(ns_schedule(group))
                    jobs = ns_jobs.setdefault(pg, dict(jobs=[], base=[0.0] * P))
                    if use_row_sharded_ns(nb.shape, nb.norm, group["ns_prescale"], steps, P):
                        info.ns_mode = "row_sharded"
                        for q in range(P):
                            jobs["base"][q] += len(idx) * row_sharded_ns_flops(rows[q], info.cols, steps)
                    else:
                        info.owners = [0] * len(idx)
                        cost = ns_flops(nb.shape, nb.block_shape, steps)
                        for k in range(len(idx)):
                            jobs["jobs"].append((info, k, cost))
            # the torch backend sees a plan of the local shards: local shapes, the whole tensors'
            # blocks (for the NS form and dtype), and where the rows sit in the whole tensor
            local_shape = tuple(slots[idx[0]].param.shape) if nb.shape is not None else None  # may hold 0 rows
            local_nb = NormBucket(nb.norm, idx, local_shape, nb.block_shape, nb.shape_factor, **layout)
            if info is not None:
                local_nb.cache["mango.distributed"] = info
                local_nb.row_offset, local_nb.global_rows = info.offsets[me], info.shape[0]
            nbs.append(local_nb)
        lb = ElementwiseBucket(bucket.group_index, bucket.device, bucket.dtype, slots, nbs)
        return _Entry(lb, bi, positions, pg, params, states, plan=Plan(key=plan.key, buckets=[lb]))

    @staticmethod
    def _sync_state(entry) -> None:
        """The torch backend may move state into its own buffers (views replacing the entries of the
        local state dicts); point the optimizer's state (DTensors for DTensor params) at them."""
        from torch.distributed.tensor import DTensor

        for slot, p, st in zip(entry.bucket.slots, entry.params, entry.states):
            for key, lv in slot.state.items():
                cur = st.get(key)
                if is_dtensor(cur):
                    if local_tensor(cur) is not lv:
                        st[key] = DTensor.from_local(lv, cur.device_mesh, cur.placements, run_check=False, shape=cur.shape, stride=cur.stride())
                elif cur is not lv:
                    st[key] = lv
        entry.synced = True



class _Exchange:
    """Buffers and views of one NS gather/scatter: `shards` holds this rank's rows of every matrix,
    grouped by owner rank (all_to_all input); `owned` holds every rank's rows of the matrices this
    rank owns, grouped by source rank. Each block is padded to the largest shard so a bucket's
    blocks from one source are one (owned, rows_max, cols) view."""

    def __init__(self, nbs, dtype, device):
        infos = [nb.cache["mango.distributed"] for nb in nbs]
        P, me = infos[0].world, infos[0].rank
        self.world, self.rank = P, me
        shard_splits = [0] * P
        shard_slots = []  # (item, k, offset)
        for q in range(P):
            for j, info in enumerate(infos):
                block = max(info.rows) * info.cols
                for k, owner in enumerate(info.owners):
                    if owner == q:
                        shard_slots.append((j, k, sum(shard_splits) , block))
                        shard_splits[q] += block
        owned_splits = [0] * P
        owned_blocks = []  # (q, item, offset, n_owned)
        for q in range(P):
            for j, info in enumerate(infos):
                n_owned = sum(1 for o in info.owners if o == me)
                size = n_owned * max(info.rows) * info.cols
                owned_blocks.append((q, j, sum(owned_splits), n_owned))
                owned_splits[q] += size
        self.shard_splits, self.owned_splits = shard_splits, owned_splits
        self.shards = torch.empty(sum(shard_splits), dtype=dtype, device=device)
        self.owned = torch.empty(sum(owned_splits), dtype=dtype, device=device)
        self.item_views = [[None] * len(info.owners) for info in infos]
        for j, k, off, block in shard_slots:
            info = infos[j]
            chunk = max(info.rows)
            self.item_views[j][k] = self.shards[off : off + block].view(chunk, info.cols)[: info.local_rows].view(info.local_shape)
        self.pack_views = [v for views in self.item_views for v in views]
        self.owned_views = [[None] * P for _ in infos]
        for q, j, off, n_owned in owned_blocks:
            info = infos[j]
            chunk = max(info.rows)
            self.owned_views[j][q] = self.owned[off : off + n_owned * chunk * info.cols].view(n_owned, chunk, info.cols)
