"""The Triton backend: a MANGO step in a few multi-tensor kernel launches (the backends and the
kernel design, docs/design.md).

It does the math of `mango.backends.torch_backend` stage by stage, but every stage covers all
tensors of the step at once:

    [novograd_prepass, segment_sums]    only with a novograd group
    moments         v, m, d for every tensor (d straight into the NS stack when NS-bound)
    segment_sums    ‖d‖² per tensor / head block / row, ‖W‖² for trust ratio
    ns_small        all NS steps of every matrix with ≤ 128 rows (attention heads), one launch
    ns_xxt/poly/update × ns_steps    NS of the larger matrices on the Triton tiled kernels, or
    cublas_gemm/op  their NS on the cuBLAS engine (`ns_cublas`): each bucket's GEMMs on its stack
    apply           Δ, lr·k, trust ratio, offset momentum, weight decay, write W

per round; where each NS bucket runs is `mango.ns_engine`'s choice, stored on the bucket.

The memory budget bounds what a step may use beyond the state by 2× the largest NS bucket (in its NS
dtype), so the tensors are packed into **rounds** that each fit it: the NS stacks and the tiled
kernels' second buffers and m×m workspaces of a round, the scratch its cuBLAS buckets share (they
run one after another: the largest need, not the sum), and the direction buffer of its non-NS
tensors, are views into one arena the size of the largest round, reused by every round. A round
runs moments → NS → apply for its tensors only. A plan whose buffers fit the budget is one round
(4 + 3·ns_steps launches on the tiled kernels, 19 with the default 5 steps, plus one table copy
where the table changed). A cuBLAS bucket is never cut: it runs once per step, whole; one that
alone fills the budget runs in place in exactly 2× its stack (`ns_cublas`), in a round of its own.
The number of rounds follows the number of distinct shape buckets, not the depth (see
`mango_kernels.count_launches`). A single tensor whose own NS buffers exceed the budget gets a
round of its own, the one case above the budget.

Everything that depends only on the plan (tile tables, segment tables, NS item and tile
tables, work buffers, the cuBLAS programs) is built once into a `_LaunchGroup` cached in
`plan.cache`; a step then refreshes the tensor table (addresses of params, grads and state, which
may change between steps, and the group hyperparameters, which schedulers change) with one
host→device copy where it changed, and each round makes again the launches and cuBLAS ops its last
step recorded (`mango_kernels.LaunchProgram`).

Torch is used, outside the hot path, for: float64 Newton–Schulz (float64 params with
ns_dtype "auto", or ns_dtype=float64: `torch_backend.batched_newton_schulz`), the spectral
pre-scale option (`newton_schulz.spectral_norm` fills the pre-scale slots), ns_steps=0 on large
matrices, copies in/out of non-contiguous params and grads, and the step counters (0-d
tensors, on the CPU unless a checkpoint put them on the device: then one foreach add). Every
such device op is counted in the launch log. ns_dtype="auto" means bf16 NS here on any device
(the kernels' design point); float64 params get float64 NS.
"""

from __future__ import annotations

import itertools
import operator

import torch

import mango_kernels as mk
from mango_kernels.tables import (
    DTYPE_CODES,
    FCOL,
    FLAG_FIRST_STEP,
    FLAG_FUSED,
    FLAG_OFFSET,
    FLAG_TRUST,
    FLAG_TRUST_RAW,
    ICOL,
    NORM_NONE,
    NORM_PRECOMPUTED,
    NORM_SEGMENT_L2,
    NF,
    NI,
    NORM_SIGN,
    PRECONDITIONER_CODES,
    ElementwiseLayout,
    TensorLayout,
    TensorTable,
)

from ..config import ns_schedule
from ..layout import norm_blocks, operator_shape
from ..ns_engine import choose_for_bucket
from ..newton_schulz import gram_restarts, spectral_norm
from .arena import Arena, itemsize, span
from .ns_cublas import CublasNSBatch
from .ns_gram_host import iterate_large
from .torch_backend import _safe_inverse, batched_newton_schulz

_NORM_KIND = {"none": NORM_NONE, "sign": NORM_SIGN, "l2": NORM_SEGMENT_L2, "l2_split": NORM_SEGMENT_L2, "l2_col": NORM_SEGMENT_L2}


# the group settings a step's table and NS schedules read (a change refreshes them); with lr and
# ns_coefficients, which `_settings_key` reads apart
_TABLE_SETTINGS = (
    "beta1", "beta2", "eps", "weight_decay", "preconditioner", "second_moment", "ema_momentum", "nesterov", "maximize",
    "beta_offset", "trust_ratio", "trust_clamp", "bias_correction", "ns_steps", "ns_eps", "ns_prescale",
)  # fmt: skip
_TABLE_VALUES = operator.itemgetter(*_TABLE_SETTINGS)


_IMMUTABLE_COEFFICIENTS: dict = {}  # id -> a tuple value that is its own frozen form (held: the id stays its)


def _frozen_coefficients(value):
    """ns_coefficients as a value that compares by content and cannot change under the cache
    (a name, one triple, or one triple per step). A tuple of numbers or of tuples of numbers is
    already that; it is recognised by identity after its first walk (a step reads every group's)."""
    if type(value) is str:
        return value
    held = _IMMUTABLE_COEFFICIENTS.get(id(value))
    if held is not None and held is value:
        return value
    if isinstance(value, (list, tuple)):
        frozen = tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in value)
        if _numbers_all_the_way_down(value):
            if len(_IMMUTABLE_COEFFICIENTS) > 256:
                _IMMUTABLE_COEFFICIENTS.clear()
            _IMMUTABLE_COEFFICIENTS[id(value)] = value
        return frozen
    return value


def _numbers_all_the_way_down(value) -> bool:
    """A tuple of Python numbers or of tuples of them: nothing in it can change."""
    number = (int, float)
    return type(value) is tuple and all(
        type(c) in number or (type(c) is tuple and all(type(x) in number for x in c)) for c in value
    )


def _lr_key(lr, capturable: bool):
    """A capturable lr (a tensor) by identity: its value is read on the device."""
    if isinstance(lr, torch.Tensor):
        return id(lr) if capturable else lr.item()
    return lr


def ns_blocks(nb, numel: int) -> list:
    """The NS items of one tensor of norm bucket `nb` as (offset, rows, cols, row stride, col stride)
    in its storage: one per operator (expert), or per head block; transposed storage (Conv1D) gives
    column blocks with a unit row stride. mango.layout is the source of these strides."""
    n, r, c = operator_shape(nb.shape, **nb.layout)
    if numel == 0:  # e.g. an FSDP2 rank that holds none of a tensor's experts
        return []
    per = numel // n
    sr, sc = (1, r) if nb.orientation == "in_out" else (c, 1)  # element (i, j) of the operator at i·sr + j·sc
    rows, heads = (nb.head_dim, r // nb.head_dim) if nb.norm == "ns_split" else (r, 1)
    return [(e * per + h * rows * sr, rows, c, sr, sc) for e in range(n) for h in range(heads)]


def _torch_row_norm(nb) -> bool:
    """l2_col whose operator rows are not contiguous in storage (transposed): done by torch."""
    return nb.norm == "l2_col" and nb.orientation == "in_out"


def _cross_shard(nb) -> bool:
    """Row shards (FSDP2) whose NS blocks or head blocks span ranks: their NS and l2_split run in
    the round's `shard` hook (mango.sharded_triton) on the work buffer, not in the kernels."""
    return nb.cache.get("mango.distributed") is not None and not nb.experts


def _cross_shard_ns(e) -> bool:
    return getattr(e, "ns_dtype", None) is not None and _cross_shard(e.nb)


class _Entry:
    """One tensor of a launch group: its slot, norm bucket, and where its d and Δ live."""

    def __init__(self, bucket_pos, bucket, nb, slot_index):
        self.bucket_pos = bucket_pos  # index of the bucket within the launch group
        self.bucket = bucket
        self.nb = nb
        self.slot = bucket.slots[slot_index]
        self.slot_index = slot_index
        self.numel = self.slot.param.numel()
        self.ns_choice = None  # NS-bound entries: the bucket's mango.ns_engine.NSChoice (engine, form, dtype)
        self.ns_dtype = None  # its dtype, for NS-bound entries
        self.ns_method = None  # its form: "textbook" or "gram"
        self.ns_kernel = False  # d in an NS stack: the Triton kernels' or the cuBLAS engine's (else torch, in the work buffer)
        self.torch_norm = False  # Δ by torch in the work buffer (l2_col on a transposed layout)
        self.fused = False  # none/sign without trust ratio: applied in the moments pass, no direction buffer
        self.ns_spec = None  # its items in the NS stack (mk.NSSpec), for NS-kernel entries
        self.spec = None  # index into its NS batch
        self.batch = None  # its NSBatch
        self.work_offset = None  # offset in its round's direction work buffer (non-kernel-NS entries)
        self.param_copy = None  # contiguous stand-in for a non-contiguous param
        self.row = None  # row in the tensor table


_ARENA_ALIGN = 256  # bytes: every view of the arena starts at a multiple (vector loads, any dtype)


def _span(requests) -> int:
    """Bytes of arena that `requests` [(numel, dtype)] take when carved one after another."""
    return span(requests, _ARENA_ALIGN)


def _segment_len(e) -> int:
    """Elements per reduction segment of the moments pass: a tensor or expert (l2), a head block
    of a split bias (l2_split), an operator row (l2_col, rows contiguous). NS items pre-scale from
    their own data, so NS tensors need none."""
    nb, norm = e.nb, e.nb.norm
    if e.numel == 0 or e.torch_norm:
        return 0
    if norm == "l2":
        return e.numel // e.slot.param.shape[0] if nb.experts else e.numel
    if norm in ("l2_split", "l2_col"):
        return nb.block_shape[0] * nb.block_shape[1] if norm == "l2_split" else nb.block_shape[1]
    return 0


def _needs_work(e) -> bool:
    """Whether an entry's direction lives in its round's work buffer (not an NS stack, not fused)."""
    return not e.ns_kernel and not e.fused


def _pack_rounds(entries, cost, budget: int, scratch=None) -> list:
    """Entries packed into rounds of at most `budget` bytes: each NS norm bucket whole where it fits
    (its same-shape NS items stay one batch), and the direction buffers of the other tensors
    together, first-fit by decreasing size; a unit over the budget is cut into runs of consecutive
    tensors, a tensor over it alone gets a round of its own. `scratch` {id(nb): bytes}: buckets that
    also need a scratch their round shares (the cuBLAS engine's: the round holds the largest, not the
    sum); they are never cut. Entries that cost nothing (fused none/sign, empty) join the first round."""
    scratch = scratch or {}
    units: dict = {}
    for e in entries:  # the non-NS tensors as one unit: their l2 sums in one round, one segment-sums launch
        if cost[e.row]:  # a cross-shard NS bucket stays whole in one round: its exchange serves all its tensors
            units.setdefault(id(e.nb) if e.ns_kernel or _cross_shard_ns(e) else "work", []).append(e)
    pieces = []
    for key, unit in units.items():
        if key in scratch or sum(cost[e.row] for e in unit) <= budget:
            pieces.append((unit, scratch.get(key, 0)))
            continue
        run, used = [], 0
        for e in unit:
            if run and used + cost[e.row] > budget:
                pieces.append((run, 0))
                run, used = [], 0
            run.append(e)
            used += cost[e.row]
        pieces.append((run, 0))
    rounds, used, shared = [], [], []
    for piece, need in sorted(pieces, key=lambda p: -(sum(cost[e.row] for e in p[0]) + p[1])):  # stable: plan order among equals
        size = sum(cost[e.row] for e in piece)
        for i in range(len(rounds)):
            if used[i] + size + max(shared[i], need) <= budget:
                rounds[i].extend(piece)
                used[i] += size
                shared[i] = max(shared[i], need)
                break
        else:
            rounds.append(list(piece))
            used.append(size)
            shared.append(need)
    free_entries = [e for e in entries if not cost[e.row]]
    if not rounds:
        return [free_entries]
    rounds[0].extend(free_entries)
    return [sorted(r, key=lambda e: e.row) for r in rounds]


def _share_small_tile_heights(rounds, groups) -> None:
    """Every round's NS batch of one kind (dtype, form, schedule) runs its small items in the tile
    height one round would use: the largest small item's of that kind in the whole group. On a GPU
    a block reduction or dot follows the tile's thread layout, so the same item in a 16-row tile
    and in a 32-row tile can round differently in its last bits (fp32 NS shows it; the interpreter's
    numpy ops do not); with one height per kind, rounds compute exactly what one round computes."""
    height: dict = {}
    kinds = []
    for r in rounds:
        for batch, members in r.ns_batches:
            e = members[0]
            sched = ns_schedule(groups[e.bucket.group_index]) if e.ns_method == "gram" else None
            kind = (e.ns_dtype, e.ns_method, sched)
            kinds.append((batch, kind))
            if batch.small:
                height[kind] = max(height.get(kind, 0), batch.small_block_r)
    for batch, kind in kinds:
        if batch.small:
            batch.small_block_r = height[kind]


def _with_tiles(config, tiles):
    """`config` with the tiled kernels' tile sizes the engine choice gives (they fit the target)."""
    import dataclasses

    return dataclasses.replace(config, block_m=tiles[0], block_n=tiles[1], block_k=tiles[2])


class _Round:
    """The tensors of one round: their tile layout and kernel scratch, their NS batches (one per NS
    dtype and form, and for the Gram form per schedule: its large items iterate as one batch) and the
    direction work buffer of the others. The big buffers are bound to the arena afterwards."""

    def __init__(self, entries, groups, device, compute_dtype, ns_config, block, in_place=frozenset()):
        self.entries = entries
        self.device, self.dtype = device, compute_dtype
        self.split = None  # DDP with the NS split across ranks (mango.ddp): who runs which NS, and the exchange
        self.shard = None  # FSDP2 row shards (mango.sharded_triton): cross-shard sums, NS on owner ranks
        specs = []
        for e in entries:
            group = groups[e.bucket.group_index]
            specs.append(
                TensorLayout(
                    numel=e.numel,
                    segment_len=_segment_len(e),
                    trust_ratio=bool(group["trust_ratio"]) and e.numel > 0,
                    novograd=group["preconditioner"] == "novograd" and e.numel > 0,
                )
            )
        self.layout = ElementwiseLayout(specs, block, device, rows=[e.row for e in entries])
        self.ws = self.layout.workspaces(compute_dtype)
        self.has_novograd = self.layout.n_pre_segments > 0
        self.work_elems = 0
        self.has_work = any(map(_needs_work, entries))  # (empty tensors too: they get an address)
        for e in entries:
            if _needs_work(e):
                e.work_offset = self.work_elems
                self.work_elems += -(-e.numel // 16) * 16  # 16-element aligned, for vector loads
        self.forget_program()
        self.ns_batches = []
        by_key: dict = {}
        for e in entries:
            if e.ns_kernel:
                group = groups[e.bucket.group_index]
                sched = ns_schedule(group) if e.ns_method == "gram" else None
                engine = id(e.nb) if e.ns_choice.engine == "cublas" else e.ns_choice.tiles  # cuBLAS: one batch per bucket
                by_key.setdefault((e.ns_dtype, e.ns_method, sched, engine), []).append(e)
        for (dtype, method, _, _), members in by_key.items():
            choice = members[0].ns_choice
            if choice.engine == "cublas":
                nb = members[0].nb
                batch = CublasNSBatch(nb, len(members), dtype, device, method, in_place=id(nb) in in_place)
            else:
                config = ns_config if choice.tiles is None else _with_tiles(ns_config, choice.tiles)
                batch = mk.NSBatch([e.ns_spec for e in members], dtype, device, config, method=method, bind=False, large_gram=iterate_large)
            for n, e in enumerate(members):
                e.spec, e.batch = n, batch
            self.ns_batches.append((batch, members))

    def scratch_bytes(self) -> int:
        """The scratch the round's cuBLAS batches share (they run one after another): the largest need."""
        return max([b.scratch_numel * itemsize(b.dtype) for b, _ in self.ns_batches if isinstance(b, CublasNSBatch)], default=0)

    def requests(self) -> list:
        """The (numel, dtype) of every big buffer of the round, in binding order."""
        reqs = [(max(self.work_elems, 1), self.dtype)] if self.has_work else []
        for batch, _ in self.ns_batches:
            reqs += [(max(n, 1), dt) for n, dt in batch.buffer_sizes.values()]
        if self.scratch_bytes():
            reqs.append((self.scratch_bytes(), torch.uint8))
        return reqs

    def bind(self, arena: Arena, identities: dict) -> None:
        """Every big buffer a view of the arena; the cuBLAS batches' identities from `identities`
        (one per size and dtype, shared by every round)."""
        alloc = arena.allocator()
        self.work = alloc(max(self.work_elems, 1), self.dtype) if self.has_work else None
        for batch, _ in self.ns_batches:
            if isinstance(batch, CublasNSBatch):
                batch.bind(alloc, identities)
            else:
                batch.bind(alloc)
        if self.scratch_bytes():
            scratch = alloc(self.scratch_bytes(), torch.uint8)
            for batch, _ in self.ns_batches:
                if isinstance(batch, CublasNSBatch) and not batch.in_place:
                    batch.bind_scratch(scratch)

    def set_ns_schedules(self, groups) -> None:
        for batch, members in self.ns_batches:
            steps, coefficients, eps, spectral, restarts = [], [], [], [], []
            for e in members:
                group = groups[e.bucket.group_index]
                co = ns_schedule(group)
                steps.append(len(co) if self.split is None or self.split.owns(e) else 0)  # another rank's: skipped here
                coefficients.append(co)
                eps.append(group["ns_eps"])
                spectral.append(group["ns_prescale"] == "spectral")
                restarts.append(gram_restarts(steps[-1]))
            batch.set_schedule(steps, coefficients, eps, spectral, restarts)

    def run(self, tables, groups, aligned: bool) -> None:
        """moments → segment sums → NS → apply, for this round's tensors. A round whose step is
        kernel launches only (no torch op or collective between them) makes the launches of its last step again
        while its settings and tables stay the same (`program`, dropped by `forget_program`)."""
        if self.program_aligned == aligned and self.program is not None:
            if self.program is False:  # torch ops between the launches: the host code each step
                self._run(tables, groups, aligned)
            else:
                self.program.replay()
            return
        with mk.recording() as program:
            self._run(tables, groups, aligned)
        # a round that exchanges NS work with other ranks (DDP split, FSDP2 shards) makes collectives
        # between its launches: it runs its host code each step
        exchanges = self.split is not None or self.shard is not None
        self.program = program if program.replayable and not exchanges else False
        self.program_aligned = aligned

    def forget_program(self) -> None:
        self.program, self.program_aligned = None, None

    def _run(self, tables, groups, aligned: bool) -> None:
        layout, ws, dtype = self.layout, self.ws, self.dtype
        if layout.n_tiles == 0:
            return
        if self.has_novograd:
            mk.launch_novograd_prepass(tables, layout, ws, dtype, aligned)
        if self.has_novograd and self.shard is not None:
            self.shard.after_prepass(self, groups)
        mk.launch_moments(tables, layout, ws, dtype, aligned)
        if layout.n_post_segments:
            mk.launch_segment_sums(layout.post_segments, ws["partials"], ws["sums"], 0, dtype)
        self._newton_schulz(groups)
        mk.launch_apply(tables, layout, ws, dtype, aligned)

    def set_step_lists(self, groups) -> None:
        """Which entries need host work in the NS stage under the current settings (a spectral
        pre-scale, zero NS steps, torch NS or row norms), so the step loops only over those."""
        def mine(e) -> bool:  # under a DDP split, a rank's host NS work is for the matrices it owns
            return self.split is None or self.split.owns(e)

        self.spectral = [[e for e in members if groups[e.bucket.group_index]["ns_prescale"] == "spectral" and mine(e)]
                         for _, members in self.ns_batches]  # fmt: skip
        self.zero_steps = [[] if isinstance(batch, CublasNSBatch) else [e.spec for e in members if batch.specs[e.spec].steps == 0 and mine(e)]
                           for batch, members in self.ns_batches]  # fmt: skip
        torch_ns = [e for e in self.entries if (e.ns_dtype is not None and not e.ns_kernel and mine(e)) or e.torch_norm]
        self.torch_entries = [e for e in torch_ns if self.shard is None or not self.shard.handles(e)]  # FSDP2: owner ranks

    def _newton_schulz(self, groups) -> None:
        for (batch, _), spectral, zero_steps in zip(self.ns_batches, self.spectral, self.zero_steps):
            if isinstance(batch, CublasNSBatch):  # pre-scale (either kind) and all steps in its GEMMs
                batch.run()
                continue
            for e in spectral:  # option, not the hot path: torch fills the batch's sums
                blocks = torch.stack(batch.block_views(e.spec)).float()
                s = batch.specs[e.spec]
                batch.sums[s.segment : s.segment + s.n_blocks] = spectral_norm(blocks).square()
                mk.record("spectral_norm")
            batch.run()
            if zero_steps:
                mk.prescale_only(batch, zero_steps)
        for e in self.torch_entries:  # float64 NS, and l2_col of transposed layouts: torch, on the work buffer
            group = groups[e.bucket.group_index]
            nb = e.nb
            d = self.work[e.work_offset : e.work_offset + e.numel].view(nb.shape)
            blocks = norm_blocks(d, nb.shape, nb.norm, nb.head_dim, **nb.layout)
            if e.torch_norm:
                blocks.mul_(_safe_inverse(torch.linalg.vector_norm(blocks, dim=-1, keepdim=True)))
                mk.record("torch_row_norm")
                continue
            out = batched_newton_schulz(blocks.to(e.ns_dtype), ns_schedule(group), group["ns_prescale"], group["ns_eps"],
                                        method=e.ns_method)  # fmt: skip
            blocks.copy_(out)
            mk.record("torch_newton_schulz")
        if self.split is not None:
            self.split.exchange(self, groups)
        if self.shard is not None:
            self.shard.exchange(self, groups)

    def nonfinite_tiles(self, bad: torch.Tensor) -> None:
        """Mark in `bad` (one per table row) the tensors whose tiles flagged a NaN/Inf gradient."""
        n = self.layout.n_tiles
        if n:
            rows = self.layout.tiles_host[:, 0]
            bad.scatter_reduce_(0, rows, self.ws["tile_flags"][:n].cpu().to(torch.int64), "amax")


class _LaunchGroup:
    """All buckets of one (device, compute dtype): one tensor table, uploaded once per step, and
    the rounds that run one after another (moments, NS, apply each), sharing one arena."""

    def __init__(self, buckets, groups, device, compute_dtype, ns_config, block, memory_budget=None, capturable=False):
        self.buckets = buckets
        self.capturable = capturable
        self.device = device
        self.dtype = compute_dtype
        self.entries = []
        for pos, bucket in enumerate(buckets):
            group = groups[bucket.group_index]
            for nb in bucket.norm_buckets:
                for i in nb.slots:
                    e = _Entry(pos, bucket, nb, i)
                    if nb.norm in ("ns", "ns_split"):
                        e.ns_choice = choose_for_bucket(nb, bucket, group, "triton")
                        e.ns_method, e.ns_dtype = e.ns_choice.method, e.ns_choice.dtype
                        e.ns_kernel = e.ns_choice.engine != "torch" and e.ns_dtype in mk.NS_DTYPES and not _cross_shard(nb)
                        if e.ns_kernel:
                            e.ns_spec = mk.NSSpec(e.numel, ns_blocks(nb, e.numel))
                    e.torch_norm = (_torch_row_norm(nb) or (_cross_shard(nb) and nb.norm == "l2_split")) and e.numel > 0
                    e.fused = nb.norm in ("none", "sign") and not group["trust_ratio"]
                    if not e.slot.param.is_contiguous():
                        e.param_copy = torch.empty(e.slot.param.shape, dtype=e.slot.param.dtype, device=device)
                    e.row = len(self.entries)
                    self.entries.append(e)
        cost = [self._cost(e, ns_config) for e in self.entries]
        self.spec_budget = self._budget()
        self.budget = self.spec_budget if memory_budget is None else memory_budget
        # a round's buffers each start on an aligned byte: room for that padding (at most one batch
        # per NS dtype, form and group in a round, 4 buffers each, the work buffer and the scratch)
        batches = len({(e.ns_dtype, e.ns_method, e.bucket.group_index, id(e.nb) if e.ns_choice.engine == "cublas" else e.ns_choice.tiles)
                       for e in self.entries if e.ns_kernel})  # fmt: skip
        capacity = self.budget - _ARENA_ALIGN * (2 + 4 * batches)
        scratch, in_place = self._cublas_memory(cost, capacity)
        self.rounds = [_Round(es, groups, device, compute_dtype, ns_config, block, in_place)
                       for es in _pack_rounds(self.entries, cost, capacity, scratch)]  # fmt: skip
        _share_small_tile_heights(self.rounds, groups)
        self.arena = Arena(max(_span(r.requests()) for r in self.rounds), device, _ARENA_ALIGN)
        identities: dict = {}
        for r in self.rounds:
            r.bind(self.arena, identities)
        self.table = TensorTable(len(self.entries), device)
        self._init_static_columns(groups)

    # -- plan-time structure ---------------------------------------------------------------
    def _cost(self, e, ns_config) -> int:
        """Arena bytes an entry takes in its round: its NS stack stretch (with the tiled kernels' second
        buffer and m×m workspaces), or its direction in the work buffer. A cuBLAS bucket's scratch is
        the round's, shared (`_cublas_memory`)."""
        if e.numel == 0:
            return 0
        if e.ns_kernel and e.ns_choice.engine == "cublas":
            return e.numel * (torch.finfo(e.ns_dtype).bits // 8)
        if e.ns_kernel:
            return mk.ns_buffer_bytes([e.ns_spec], e.ns_dtype, e.ns_method, ns_config)
        if _needs_work(e):
            return -(-e.numel // 16) * 16 * (torch.finfo(self.dtype).bits // 8)
        return 0

    def _cublas_memory(self, cost, capacity: int):
        """Per cuBLAS bucket, the scratch it needs from its round ({id(nb): bytes}, 0 in place); a
        bucket whose stack and scratch exceed `capacity` runs in place instead, in 2× its stack (its
        entries' `cost` doubled), where its blocks allow it (mango.backends.ns_cublas). Returns
        (scratch, the ids of the buckets in place)."""
        members: dict = {}
        for e in self.entries:
            if e.ns_kernel and e.ns_choice.engine == "cublas" and e.numel:
                members.setdefault(id(e.nb), []).append(e)
        scratch, in_place = {}, set()
        for key, es in members.items():
            stack, need, whole = CublasNSBatch.sizes(es[0].nb, len(es), es[0].ns_dtype, es[0].ns_method)
            if stack + need > capacity and whole is not None:
                in_place.add(key)
                scratch[key] = 0  # whole too, in a round of its own
                for e in es:
                    cost[e.row] *= 2
            else:
                scratch[key] = need
        return scratch, frozenset(in_place)

    def _budget(self) -> int:
        """The memory budget: 2× the largest bucket, in the dtype its direction is held in (the NS dtype for NS
        buckets; the compute dtype for the work buffer of the others, e.g. LAMB's l2 tensors)."""
        by_bucket: dict = {}
        for e in self.entries:
            if e.ns_kernel:
                word = torch.finfo(e.ns_dtype).bits // 8
            elif _needs_work(e):
                word = torch.finfo(self.dtype).bits // 8
            else:
                continue
            by_bucket[id(e.nb)] = by_bucket.get(id(e.nb), 0) + e.numel * word
        return 2 * max(by_bucket.values(), default=0)

    def memory(self) -> dict:
        """Bytes of the big work buffers (the arena every round's buffers are views of) against the
        budget the rounds were packed to and the memory budget, and what each round takes of it."""
        return dict(
            budget=self.budget,
            spec_budget=self.spec_budget,
            arena=self.arena.buffer.numel(),
            rounds=len(self.rounds),
            round_bytes=[_span(r.requests()) for r in self.rounds],
        )

    def _init_static_columns(self, groups) -> None:
        t = self.table
        ints = t.ints
        for r in self.rounds:
            for local, e in enumerate(r.entries):
                ints[e.row, ICOL.W_SEGMENT] = int(r.layout.w_segment[local])
                ints[e.row, ICOL.G_SEGMENT] = int(r.layout.g_segment[local])
                if e.ns_kernel:
                    ints[e.row, ICOL.DIRECTION] = e.batch.input_view(e.spec).data_ptr()
                elif not e.fused:
                    ints[e.row, ICOL.DIRECTION] = ints[e.row, ICOL.DELTA] = r.work[e.work_offset :].data_ptr()
        for row, e in enumerate(self.entries):
            group = groups[e.bucket.group_index]
            ints[row, ICOL.NUMEL] = e.numel
            ints[row, ICOL.PRECONDITIONER] = PRECONDITIONER_CODES[group["preconditioner"]]
            if e.ns_kernel:
                ints[row, ICOL.DIRECTION_DTYPE] = DTYPE_CODES[e.ns_dtype]
                ints[row, ICOL.DELTA_DTYPE] = DTYPE_CODES[e.ns_dtype]
                ints[row, ICOL.NORM_KIND] = NORM_PRECOMPUTED
            elif e.fused:
                ints[row, ICOL.DIRECTION] = ints[row, ICOL.DELTA] = 0
                ints[row, ICOL.DIRECTION_DTYPE] = ints[row, ICOL.DELTA_DTYPE] = DTYPE_CODES[self.dtype]
                ints[row, ICOL.NORM_KIND] = _NORM_KIND[e.nb.norm]
            else:
                ints[row, ICOL.DIRECTION_DTYPE] = ints[row, ICOL.DELTA_DTYPE] = DTYPE_CODES[self.dtype]
                precomputed = e.ns_dtype is not None or e.torch_norm
                ints[row, ICOL.NORM_KIND] = NORM_PRECOMPUTED if precomputed else _NORM_KIND[e.nb.norm]
        self.bucket_of_entry = torch.tensor([e.bucket_pos for e in self.entries], dtype=torch.long)
        self.shape_factor = torch.tensor([e.nb.shape_factor for e in self.entries], dtype=torch.float64)
        self.has_offset = torch.tensor(["offset" in e.slot.state for e in self.entries], dtype=torch.bool)
        self.is_l2 = torch.tensor([e.nb.norm == "l2" for e in self.entries], dtype=torch.bool)
        self.fused = torch.tensor([e.fused for e in self.entries], dtype=torch.bool)
        self.params = [e.slot.param for e in self.entries]
        self.states = [e.slot.state for e in self.entries]
        self.group_indices = sorted({b.group_index for b in self.buckets})
        self.lr_index = torch.tensor([self.group_indices.index(e.bucket.group_index) for e in self.entries], dtype=torch.long)
        self.ns_entries = [e for e in self.entries if e.ns_kernel]
        self.copied = [e for e in self.entries if e.param_copy is not None]
        self.settings_key = self.grad_ptrs = self.param_ptrs = None
        self._bind_step_counters()

    # -- per-step tables ---------------------------------------------------------------------
    # A step refreshes only what changed: the float columns and NS schedules when a setting the
    # table reads changed (one tuple comparison per group), addresses when a pointer changed (one
    # list comparison), the bias-correction columns every step where they apply (vectorized, from
    # a host-side copy of the step count: no sync). The table goes to the device only when it
    # changed. With `capturable`, lr and the step count live on the device and the columns they
    # feed are written there by a few torch ops, so a captured step replays with the current lr.

    def _bind_step_counters(self) -> None:
        """Every slot's state["step"] (empty tensors' too) becomes a view of one flat counter: one
        add per step. The host keeps its own copy of the count for the bias corrections (read once, here)."""
        slots = [s for b in self.buckets for s in b.slots]
        position = {id(s): k for k, s in enumerate(slots)}
        self.entry_step = torch.tensor([position[id(e.slot)] for e in self.entries], dtype=torch.long)
        steps = [s.state["step"] for s in slots]
        device = self.device if self.capturable else (steps[0].device if steps else torch.device("cpu"))
        self.step_count = torch.stack(steps).reshape(-1).to(device=device, dtype=torch.float32) if steps else torch.zeros(0)
        for k, s in enumerate(slots):
            s.state["step"] = self.step_count[k]
        self.step_count_host = None if self.capturable else self.step_count.to(device="cpu", dtype=torch.float64)

    def _bucket_floats(self, group) -> list:
        """The float columns shared by a bucket's tensors, from its group's current settings."""
        pre = group["preconditioner"]
        b1, eps, wd = group["beta1"], group["eps"], group["weight_decay"]
        lr = 0.0 if self.capturable else float(group["lr"])  # capturable: written on the device each step
        b2 = group["beta2"] if pre is not None else 0.0  # not validated (may be None) without a preconditioner
        c = (1 - b1) if (pre == "adam" or group["ema_momentum"]) else 1.0
        bo = group["beta_offset"] or 0.0
        row = [0.0] * NF
        row[FCOL.BETA1], row[FCOL.BETA2], row[FCOL.EPS] = b1, b2, eps
        row[FCOL.V_COEF] = (1 - b2) if group["second_moment"] == "ema" else 1.0
        row[FCOL.M_COEF] = c
        row[FCOL.NESTEROV_M], row[FCOL.NESTEROV_X] = (b1, c) if group["nesterov"] else (1.0, 0.0)
        row[FCOL.BIAS1] = row[FCOL.BIAS2] = 1.0
        row[FCOL.GRAD_SIGN] = -1.0 if group["maximize"] else 1.0
        row[FCOL.WEIGHT_DECAY_U] = wd if pre == "novograd" else 0.0
        row[FCOL.LR_K] = lr
        row[FCOL.BETA_OFFSET], row[FCOL.ONE_MINUS_BETA_OFFSET] = bo, 1 - bo
        row[FCOL.DECAY] = 0.0 if pre == "novograd" else lr * wd
        row[FCOL.TRUST_CLAMP] = group["trust_clamp"] or 0.0  # 0: no clamp
        return row

    @staticmethod
    def _bias_masks(group):
        """Which bias corrections apply: (1−β1^t on d, 1−β2^t on v, novograd first-step init)."""
        pre = group["preconditioner"]
        if pre == "adam":
            return True, True, False
        correct = pre == "laprop" and group["bias_correction"]
        return correct and group["ema_momentum"], correct, pre == "novograd"

    def _settings_key(self, groups) -> tuple:
        """What the table and the NS schedules read from the groups, as plain values (a capturable
        lr by identity: its value is read on the device)."""
        return tuple(
            (_lr_key(g["lr"], self.capturable), _frozen_coefficients(g["ns_coefficients"]), _TABLE_VALUES(g))
            for g in map(groups.__getitem__, self.group_indices)
        )

    def _refresh_settings(self, groups) -> None:
        """Float columns, flags, NS schedules and NS output addresses, from the groups' settings."""
        for r in self.rounds:
            r.set_ns_schedules(groups)
        ints = self.table.ints
        for e in self.ns_entries:  # where the NS result is depends on the parity of ns_steps
            ints[e.row, ICOL.DELTA] = e.batch.output_view(e.spec).data_ptr()
        for r in self.rounds:
            r.set_step_lists(groups)
            r.forget_program()  # the NS item tables may be new tensors
        bucket_groups = [groups[b.group_index] for b in self.buckets]
        base = torch.tensor([self._bucket_floats(g) for g in bucket_groups], dtype=torch.float64)
        floats = base[self.bucket_of_entry]
        floats[:, FCOL.LR_K] *= self.shape_factor
        masks = torch.tensor([self._bias_masks(g) for g in bucket_groups], dtype=torch.bool)[self.bucket_of_entry]
        flags = torch.where(self.has_offset, FLAG_OFFSET, 0)
        trust = torch.tensor([bool(g["trust_ratio"]) for g in bucket_groups], dtype=torch.bool)[self.bucket_of_entry]
        flags = flags | torch.where(trust, FLAG_TRUST, 0) | torch.where(trust & self.is_l2, FLAG_TRUST_RAW, 0)
        flags = flags | torch.where(self.fused, FLAG_FUSED, 0)
        self.table.floats[:] = floats
        self.table.ints[:, ICOL.FLAGS] = flags
        self.static_flags = flags
        self.bias_masks = masks if bool(masks.any()) else None
        self.beta1, self.beta2 = floats[:, FCOL.BETA1].clone(), floats[:, FCOL.BETA2].clone()
        if self.capturable:
            dev = self.device
            self.lr_groups = [g for g in map(groups.__getitem__, self.group_indices)]
            self.dev_cols = dict(
                lr_index=self.lr_index.to(dev), entry_step=self.entry_step.to(dev), shape_factor=self.shape_factor.to(dev),
                decay_wd=torch.tensor([0.0 if g["preconditioner"] == "novograd" else g["weight_decay"] for g in bucket_groups],
                                      dtype=torch.float64)[self.bucket_of_entry].to(dev),
                masks=None if self.bias_masks is None else masks.to(dev),
                beta1=self.beta1.to(dev), beta2=self.beta2.to(dev), flags=flags.to(dev),
            )  # fmt: skip
        self.table.changed()

    def _fill_bias_columns(self) -> None:
        """1−β^t where bias correction applies and the novograd first-step flag, from the host's step count."""
        if self.bias_masks is None:
            return
        masks, t = self.bias_masks, self.step_count_host[self.entry_step]
        floats = self.table.floats
        floats[:, FCOL.BIAS1] = torch.where(masks[:, 0], 1 - self.beta1**t, 1.0)
        floats[:, FCOL.BIAS2] = torch.where(masks[:, 1], 1 - self.beta2**t, 1.0)
        self.table.ints[:, ICOL.FLAGS] = self.static_flags | torch.where(masks[:, 2] & (t == 1), FLAG_FIRST_STEP, 0)
        self.table.changed()

    def _fill_device_columns(self, device_table) -> None:
        """capturable: lr·k, lr·λ and the bias corrections written into the device table by torch
        ops from the device lr tensors and step counters (the same float64 arithmetic as the host's)."""
        c = self.dev_cols
        floats = device_table.view(torch.float64)[:, NI:]
        lr = torch.stack([g["lr"] for g in self.lr_groups]).to(torch.float64)[c["lr_index"]]
        floats[:, FCOL.LR_K] = lr * c["shape_factor"]
        floats[:, FCOL.DECAY] = lr * c["decay_wd"]
        n = 7  # stack, cast, gather, two products, two column writes
        if c["masks"] is not None:
            masks, t = c["masks"], self.step_count.to(torch.float64)[c["entry_step"]]
            floats[:, FCOL.BIAS1] = torch.where(masks[:, 0], 1 - c["beta1"] ** t, 1.0)
            floats[:, FCOL.BIAS2] = torch.where(masks[:, 1], 1 - c["beta2"] ** t, 1.0)
            device_table[:, ICOL.FLAGS] = c["flags"] | torch.where(masks[:, 2] & (t == 1), FLAG_FIRST_STEP, 0)
            n += 16
        mk.record("capturable_columns", n)

    def _refresh_addresses(self, grads) -> list:
        """Grad and param addresses (compared with the last step's; the table is rewritten only
        where one moved); returns the grads the kernels read (kept alive)."""
        if not all(map(torch.Tensor.is_contiguous, grads)):
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        ptrs = list(map(torch.Tensor.data_ptr, grads))
        if ptrs != self.grad_ptrs:
            self.grad_ptrs = ptrs
            self.table.ints[:, ICOL.GRAD] = torch.tensor(ptrs, dtype=torch.int64)
            self.table.changed()
        ptrs = list(map(torch.Tensor.data_ptr, self.params))
        if ptrs != self.param_ptrs:
            self.param_ptrs = ptrs
            self._fill_state_addresses()
        return grads

    def _fill_state_addresses(self) -> None:
        """Addresses of params (or their contiguous stand-ins) and state, and the dtype codes."""
        ints = self.table.ints
        ints[:, ICOL.GRAD_DTYPE] = torch.tensor([DTYPE_CODES[p.dtype] for p in self.params], dtype=torch.int64)  # autograd: grad dtype = param dtype
        ints[:, ICOL.PARAM] = torch.tensor(
            [(e.param_copy if e.param_copy is not None else p).data_ptr() for e, p in zip(self.entries, self.params)], dtype=torch.int64
        )
        ints[:, ICOL.PARAM_DTYPE] = torch.tensor([DTYPE_CODES[p.dtype] for p in self.params], dtype=torch.int64)
        ints[:, ICOL.EXP_AVG] = torch.tensor([s["exp_avg"].data_ptr() for s in self.states], dtype=torch.int64)
        ints[:, ICOL.EXP_AVG_SQ] = torch.tensor([s["exp_avg_sq"].data_ptr() if "exp_avg_sq" in s else 0 for s in self.states], dtype=torch.int64)
        ints[:, ICOL.OFFSET] = torch.tensor([s["offset"].data_ptr() if "offset" in s else 0 for s in self.states], dtype=torch.int64)
        if any(e.numel and not s["exp_avg"].is_contiguous() for e, s in zip(self.entries, self.states)):
            raise RuntimeError("mango: triton backend needs contiguous optimizer state tensors")
        self.table.changed()

    # -- the step ---------------------------------------------------------------------------
    def step(self, groups, grads) -> None:
        self.step_count.add_(1.0)
        if self.step_count.device.type != "cpu":
            mk.record("step_counters")
        if self.step_count_host is not None:
            self.step_count_host += 1.0
        key = self._settings_key(groups)
        if key != self.settings_key:
            self.settings_key = key
            self._refresh_settings(groups)
        if not self.capturable:
            self._fill_bias_columns()
        live_grads = self._refresh_addresses(grads)
        self._copy_params_in()
        aligned = self.table.addresses_aligned()
        tables = self.table.upload()
        if self.capturable:
            self._fill_device_columns(tables[0])
        for r in self.rounds:
            r.run(tables, groups, aligned)
        self._copy_params_out()
        del live_grads

    def _copy_params_in(self) -> None:
        for e in self.copied:
            e.param_copy.copy_(e.slot.param.detach())
            mk.record("param_copy")

    def _copy_params_out(self) -> None:
        for e in self.copied:
            e.slot.param.detach().copy_(e.param_copy)
            mk.record("param_copy")

    def nonfinite_in_last_step(self) -> list:
        """Names of tensors whose gradient had a NaN/Inf in the last moments pass (host sync)."""
        bad = torch.zeros(len(self.entries), dtype=torch.int64)
        for r in self.rounds:
            r.nonfinite_tiles(bad)
        return [e.slot.name for e, b in zip(self.entries, bad.tolist()) if b]


class TritonBackend:
    name = "triton"

    def __init__(self, ns_config: "mk.NSConfig" = None, block: int = None, memory_budget: float = None, ns_target: str = None):
        """`memory_budget`: bytes of work buffers a step may use (None: the memory budget's 2× the largest
        bucket; float("inf"): one round, the fewest launches). `ns_target` (e.g. "sm_90"): choose
        the NS engines as on that GPU architecture (a launch dry run on a CPU counting its step)."""
        self.ns_config = ns_config or mk.NSConfig()
        self.block = block or mk.DEFAULT_BLOCK
        self.memory_budget = memory_budget
        self.ns_target = ns_target

    def _program(self, opt, plan) -> list:
        """The plan's launch groups, built on first use; rebuilt if a setting that shapes the
        tables (trust_ratio, which adds ‖W‖ segments; the NS schedule, which groups the Gram form's
        batches) changes without a plan rebuild."""
        key = (self.memory_budget, getattr(opt, "capturable", False),
               tuple((bool(g["trust_ratio"]), g["ns_steps"], _frozen_coefficients(g["ns_coefficients"])) for g in opt.param_groups))  # the Gram form batches by schedule
        cached = plan.cache.get("triton")
        if cached is not None and cached[0] == key:
            return cached[1]
        by_key: dict = {}
        for bucket in plan.buckets:
            by_key.setdefault((bucket.device, bucket.dtype), []).append(bucket)
        launch_groups = []
        for (device, dtype), buckets in by_key.items():
            lg = _LaunchGroup(buckets, opt.param_groups, device, dtype, self.ns_config, self.block, self.memory_budget,
                              capturable=getattr(opt, "capturable", False))  # fmt: skip
            first = {id(b): n for n, b in zip(itertools.accumulate([0] + [len(b.slots) for b in plan.buckets]), plan.buckets)}
            lg.grad_order = [first[id(e.bucket)] + e.slot_index for e in lg.entries]  # where each entry's grad is in the step's flat list
            lg.grad_picker = operator.itemgetter(*lg.grad_order) if lg.grad_order else (lambda flat: ())
            launch_groups.append(lg)
        plan.cache["triton"] = (key, launch_groups)
        return launch_groups

    def step(self, opt, plan, grads_by_bucket) -> None:
        flat = list(itertools.chain.from_iterable(grads_by_bucket))
        for lg in self._program(opt, plan):
            grads = list(lg.grad_picker(flat)) if len(lg.entries) > 1 else [flat[i] for i in lg.grad_order]
            if lg.device.type == "cuda":
                with torch.cuda.device(lg.device):
                    lg.step(opt.param_groups, grads)
            else:
                lg.step(opt.param_groups, grads)

    def nonfinite_flags(self, bucket, grads) -> torch.Tensor:
        """Per-slot NaN/Inf flags for the optimizer's nonfinite policy: one kernel launch."""
        gs = [g if g.is_contiguous() else g.contiguous() for g in grads]
        layout = bucket.cache.get("triton_nonfinite")
        if layout is None:
            layout = bucket.cache["triton_nonfinite"] = mk.nonfinite_layout(gs, self.block)
        return mk.nonfinite_flags(gs, layout)

    def last_step_nonfinite(self, plan) -> list:
        """Names of params whose gradient was non-finite in the last step (from the moments pass)."""
        cached = plan.cache.get("triton")
        return [n for lg in (cached[1] if cached else []) for n in lg.nonfinite_in_last_step()]
