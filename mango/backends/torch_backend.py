"""The batched pure-PyTorch backend (default on CPU, on GPUs without Triton, and under FSDP2).

Same math as `mango.reference`, organised so that neither the number of tensors nor their size
drives the cost:

* **Flat state.** For each elementwise bucket of the plan, m, v and O live in one flat buffer; the
  per-parameter state entries are views into it (so `state_dict`, the reference and the triton
  backend see the usual per-tensor layout). Tensors are ordered by norm bucket ("unit").
* **Bounded memory.** A step never holds a buffer of the whole parameter set. Each unit is swept
  in *chunks* (≤ `CHUNK_ELEMENTS` elements, `CPU_CHUNK_ELEMENTS` on a CPU, cut at tensor rows):
  gradients are gathered into a chunk buffer, the direction d is computed there, and the update is
  applied chunk by chunk.
  Newton–Schulz units write d straight into an NS-dtype buffer X of the unit; the iteration runs
  between X and one more buffer Y of the same size; the chunk buffers of the other passes live in
  whichever of the two is free. So the memory a step adds to the state is 2× the largest NS
  bucket in its NS dtype (the memory budget), or two chunks where no NS bucket is that large.
* **Reductions without a copy of d.** Norms that need a whole tensor or row before anything can
  be applied (l2, l2_col, l2_split) sum squares per segment in a first sweep and recompute d from
  the updated moments in a second one, unless the unit fits in one chunk (then d stays put).
* **Operators, not storage.** Matrix norms act on `mango.layout.norm_blocks` views: per expert,
  on the (out, in) orientation of Conv1D weights, per head block — strided views of the buffers,
  never copies.
* **Newton–Schulz in either form**, batched over the unit's blocks: the textbook iteration or the
  Gram form (`mango.newton_schulz`), picked per unit; lr·k rides on the last product.

The whole-tensor stages are methods (`tensor_norms`, `finish_sums`, `orthogonalize`) so the
sharded backend (mango.distributed) can replace them with collectives.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .. import newton_schulz as _ns
from ..config import ns_schedule
from ..layout import block_shape, norm_blocks
from ..ns_engine import choose_for_bucket
from .arena import align_up, itemsize, typed_view

__all__ = ["TorchBackend", "batched_newton_schulz", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 22  # elements per elementwise sweep (a 16 MB fp32 chunk buffer): few ops on a GPU
CPU_CHUNK_ELEMENTS = 1 << 18  # on a CPU: two 1 MB fp32 chunk buffers stay in a core's L2 across a chunk's ~15 ops
MIN_CHUNK = 1 << 16  # chunks are not cut smaller than this to fit a budget (op overhead)
TEMP_FLOOR_BYTES = 1 << 20  # NS batches are not sliced to keep their m×m temporaries under this
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "offset")
_REDUCE_NORMS = ("l2", "l2_col", "l2_split")



def _lr(group):
    """The group's lr: a number in an eager step (a capturable optimizer keeps it in a 0-d tensor,
    read here so the step is bit-identical to a float lr), the tensor itself under torch.compile
    (an operand, so a scheduler's new value needs no recompile)."""
    lr = group["lr"]
    return lr.item() if isinstance(lr, torch.Tensor) and not torch.compiler.is_compiling() else lr


# ----------------------------------------------------------------------------------------
# batched Newton–Schulz on preallocated buffers
# ----------------------------------------------------------------------------------------


def _frobenius(X: torch.Tensor) -> torch.Tensor:
    # in X's dtype: the reduction accumulates in fp32 internally either way, while dtype=float32
    # would first copy the whole (bf16) stack to fp32 — an X-sized fp32 temporary per NS call
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)


def batched_newton_schulz(
    X: torch.Tensor, coefficients, prescale: str, eps: float, dtype=None, out_scale: float = 1.0,
    method: str = "textbook", buffers=None, max_temp_bytes: int = None, where: list = None,
) -> torch.Tensor:  # fmt: skip
    """Newton–Schulz on every (r, c) matrix of a (..., r, c) batch (any strides); returns
    out_scale × the result as a (..., r, c) tensor (possibly a transposed view).

    The pre-scale norm is taken on X as given; the iteration runs on contiguous operands in `dtype`
    (default X.dtype) in the orientation X has in memory (cast and scale in one pass that never
    transposes), with the Gram matrix of the smaller side: A = X·Xᵀ when X is wide there, Xᵀ·X and
    X ← a·X + X·B when it is tall (the same polynomial: the transposed iteration). `buffers`: two
    tensors of at least X's size in `dtype` to iterate in (ping-pong, nothing else of that size is
    allocated; X may live in the first); without them,
    fresh ones. `method`: "textbook" (A = X·Xᵀ, B = b·A + c·A², X ← a·X + B·X) or "gram"
    (mango.newton_schulz.gram). The m×m temporaries (A, B; or R, P, Q and two products) of a slice of
    the batch live in room of the two buffers that slice does not use — the part of the batch not
    yet reached, the stale half of the slices done, and anything past the batch — so with buffers
    the NS allocates nothing (the memory budget); where there is no such room (a batch of one matrix filling
    its buffers), fresh temporaries for slices under `max_temp_bytes` (at least one matrix).
    `where`: a list; the index in `buffers` of the one holding the result is appended to it.
    """
    dtype = dtype or X.dtype
    lead = X.shape[:-2]
    transposed = X.stride(-2) == 1 and X.stride(-1) != 1 and X.shape[-1] > 1  # X's rows are its memory's columns
    src = X.mT if transposed else X
    m, n = src.shape[-2:]
    tall = m > n
    k = min(m, n)  # side of the Gram matrix
    B = math.prod(lead)
    if prescale == "frobenius":
        scale = _frobenius(src)
    else:
        scale = _ns.spectral_norm(src)[..., None, None]
    scale = scale.clamp_min(eps)
    if src.dtype == dtype:  # divide in the operand dtype: an fp32 scale would promote the division to an
        scale = scale.to(dtype)  # X-sized fp32 temporary before the cast into `cur`
    if buffers is None:
        buffers = (torch.empty(B * m * n, dtype=dtype, device=X.device), torch.empty(B * m * n, dtype=dtype, device=X.device))
    cur, other = (buf.view(-1)[: B * m * n].view(B, m, n) for buf in (buffers[1], buffers[0]))
    torch.div(src, scale, out=cur.view(*lead, m, n))  # X may be in buffers[0]: it is read here, once
    if B == 0:
        if where is not None:
            where.append(1)
        return cur.view(*lead, m, n).mT if transposed else cur.view(*lead, m, n)
    iterate = _gram_iterate if method == "gram" else _textbook_iterate
    count = 5 if method == "gram" else 2  # k×k temporaries per matrix
    flat = (buffers[1].view(-1), buffers[0].view(-1))  # cur's and other's whole buffers
    step = _slice_in_place(B, m * n, count, k * k, *(f.numel() for f in flat))
    in_place = step is not None
    if not in_place:  # no room: fresh temporaries, sliced
        per_matrix = count * k * k * (torch.finfo(dtype).bits // 8)
        step = B if max_temp_bytes is None else max(1, max_temp_bytes // per_matrix)
    in_other = False  # where finished slices' results are (every slice takes the same number of ping-pongs)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        rooms = _rooms(flat, b0, b1, B, m * n, in_other) if in_place else None
        first = cur[b0:b1]
        Y = iterate(first, other[b0:b1], coefficients, out_scale, rooms, tall)
        in_other = Y is not first  # the iterations swap Python references: no pointer needed (traceable)
    Y = (other if in_other else cur).view(*lead, m, n)
    if where is not None:
        where.append(0 if in_other else 1)
    return Y.mT if transposed else Y


def _rooms(flat, b0: int, b1: int, B: int, item: int, in_other: bool) -> list:
    """The stretches of the two buffers (cur, other) that slice [b0, b1) of a B-matrix batch (item
    elements each) leaves alone: other's part past the slice (not reached yet), the stale buffer's
    part before it (the done slices' results are in the other one), cur past the batch."""
    cur, other = flat
    stale = cur if in_other else other
    return [other[b1 * item :], stale[: b0 * item], cur[B * item :]]


def _first_fit(room_sizes, count: int, size: int) -> list | None:
    """Where `count` pieces of `size` elements go in rooms of these sizes, first fit: [(room, offset)]."""
    free = list(room_sizes)
    out = []
    for _ in range(count):
        i = next((i for i, f in enumerate(free) if f >= size), None)
        if i is None:
            return None
        out.append((i, room_sizes[i] - free[i]))
        free[i] -= size
    return out


@functools.lru_cache(maxsize=256)
def _slice_in_place_search(B: int, item: int, count: int, mm: int, cur_len: int, other_len: int):
    """The largest slice size whose `count` m×m temporaries (mm elements per matrix) fit in the
    `_rooms` of every slice, or None where even single matrices do not fit. Cached: a plan asks
    the same questions every step, and the search is up to B·log B first-fit checks."""
    for k in range(B, 0, -1):
        if all(_first_fit([other_len - min(B, b0 + k) * item, b0 * item, cur_len - B * item], count, min(k, B - b0) * mm)
               for b0 in range(0, B, k)):  # fmt: skip
            return k
    return None


@torch.compiler.assume_constant_result  # compiled code calls it once, at trace time: ints in, an int out
def _slice_in_place(B: int, item: int, count: int, mm: int, cur_len: int, other_len: int):
    """`_slice_in_place_search`, cached."""
    return _slice_in_place_search(B, item, count, mm, cur_len, other_len)


def _temporaries(Y, count: int, rooms) -> list:
    """`count` (B, k, k) temporaries for a (B, m, n) stack, k = min(m, n): views into `rooms` (flat
    stretches of the NS buffers, first fit) when given, else fresh."""
    Bn, m = Y.shape[0], min(Y.shape[1], Y.shape[2])
    if rooms is None:
        return [Y.new_empty(Bn, m, m) for _ in range(count)]
    size = Bn * m * m
    return [rooms[i][o : o + size].view(Bn, m, m) for i, o in _first_fit([r.numel() for r in rooms], count, size)]


def _gram_of(Y, tall: bool, out) -> torch.Tensor:
    """The smaller Gram matrix of a (B, m, n) stack: Y·Yᵀ, or Yᵀ·Y when tall."""
    return torch.bmm(Y.mT, Y, out=out) if tall else torch.bmm(Y, Y.mT, out=out)


def _times(M, Y, tall: bool, out, add=None, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """alpha·(M applied to Y on its small side) [+ beta·add]: M·Y, or Y·M when tall (M is a
    polynomial in the Gram matrix, symmetric: Y·M = (M·Yᵀ)ᵀ)."""
    a, b = (Y, M) if tall else (M, Y)
    if add is None:
        return torch.bmm(a, b, out=out)
    return torch.baddbmm(add, a, b, beta=beta, alpha=alpha, out=out)


def _textbook_iterate(Y, other, coefficients, out_scale, rooms=None, tall=False):
    """The textbook steps on a contiguous (B, m, n) stack: A and B in two k×k buffers, X ping-ponging."""
    last = len(coefficients) - 1
    # out_scale rides on the last product, except where it is 0 (CPU bf16 baddbmm with alpha = beta = 0
    # returns garbage, not zeros), a tensor, or traced (lr changes between steps: a separate multiply)
    fold = _plain_number(out_scale) and out_scale != 0.0 and not torch.compiler.is_compiling()
    A, Bm = _temporaries(Y, 2, rooms) if coefficients else (None, None)
    for step, (a, b, c) in enumerate(coefficients):
        k = out_scale if step == last and fold else 1.0
        _gram_of(Y, tall, A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=Bm)
        _times(Bm, Y, tall, other, add=Y, beta=a * k, alpha=k)  # a·X added in the fp32 accumulator
        Y, other = other, Y
    if (not coefficients or not fold) and not _is_one(out_scale):
        Y.mul_(out_scale)
    return Y


def _plain_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_one(x) -> bool:
    """x is the number 1 (a tensor or traced lr never counts: multiplying by it is always right)."""
    return _plain_number(x) and not torch.compiler.is_compiling() and x == 1.0


def _gram_iterate(Y, other, coefficients, out_scale, rooms=None, tall=False):
    """mango.newton_schulz.gram on a contiguous (B, m, n) stack: X-sized work in the two X buffers only,
    the m×m iterates (R, P, Q and two products) in five buffers reused every step."""
    steps = len(coefficients)
    if steps == 0:
        if not _is_one(out_scale):
            Y.mul_(out_scale)
        return Y
    restarts = _ns.gram_restarts(steps)
    R, P, Q, T, U = _temporaries(Y, 5, rooms)
    _gram_of(Y, tall, R)
    fresh = True  # Q = I
    for k, (a, b, c) in enumerate(coefficients):
        if k in restarts and not fresh:
            _times(Q, Y, tall, other)
            Y, other = other, Y
            _gram_of(Y, tall, R)
            fresh = True
        torch.baddbmm(R, R, R, beta=b, alpha=c, out=P)  # Z = b·R + c·R²
        P.diagonal(dim1=-2, dim2=-1).add_(a)  # P = a·I + Z
        if fresh:
            Q.copy_(P)
        else:
            torch.bmm(Q, P, out=T)
            Q, T = T, Q
        fresh = False
        if k + 1 < steps and k + 1 not in restarts:
            torch.bmm(P, R, out=U)
            torch.bmm(U, P, out=R)
    if not _is_one(out_scale):
        Q.mul_(out_scale)
    _times(Q, Y, tall, other)
    return other


def _safe_inverse(n: torch.Tensor) -> torch.Tensor:
    """1/n where n > 0, else 0 (a zero direction gives a zero step)."""
    return torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with at least one dimension, so a piece can be a range of its rows (dim 0)."""
    return t if t.dim() else t.view(1)


# ----------------------------------------------------------------------------------------
# the layout of one elementwise bucket
# ----------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """Rows [r0, r1) of tensor `k` (layout position) = flat elements [x0, x1) of the layout."""

    k: int
    r0: int
    r1: int
    x0: int
    x1: int
    whole: bool = False  # the piece is the whole tensor
    seg: torch.Tensor = None  # reduce units: the segments (rows of `sums`) of this piece, in order


@dataclass
class _Unit:
    """One norm bucket: tensors [k0, k1) of the layout = flat elements [a, b)."""

    nb: object
    kind: str  # "elementwise" (none, sign), "reduce" (l2, l2_col, l2_split) or "ns"
    k0: int
    k1: int
    a: int
    b: int
    chunks: list = field(default_factory=list)  # lists of _Piece (the plan's chunk size)
    n_segments: int = 0  # reduce units: entries of the per-segment sums
    cache: dict = field(default_factory=dict)  # chunk lists by size limit

    @property
    def numel(self) -> int:
        return self.b - self.a


class _FlatLayout:
    """Flat state of one elementwise bucket, per-tensor views into it, and its units and chunks."""

    def __init__(self, bucket, chunk_limit):
        slots = bucket.slots
        in_buckets = [i for nb in bucket.norm_buckets for i in nb.slots]
        rest = sorted(set(range(len(slots))) - set(in_buckets))  # empty matrices: step count only
        self.order = in_buckets + rest
        numels = [slots[i].param.numel() for i in self.order]
        self.numel = sum(numels)
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.params = [slots[i].param for i in self.order]
        self.view_cache = {}  # (buffer address, dtype, chunk) -> piece views, see TorchBackend._piece_views
        self.raw_ptr = None  # the workspace those views are of
        dev, dt = bucket.device, bucket.dtype
        self.device, self.dtype = dev, dt
        pos = {slot_index: k for k, slot_index in enumerate(self.order)}
        self.units = []
        for nb in bucket.norm_buckets:
            ks = [pos[i] for i in nb.slots]
            kind = "ns" if nb.norm in ("ns", "ns_split") else "reduce" if nb.norm in _REDUCE_NORMS else "elementwise"
            unit = _Unit(nb, kind, ks[0], ks[-1] + 1, offsets[ks[0]], offsets[ks[-1] + 1])
            unit.chunks = self.chunks(unit, chunk_limit(unit))
            self.units.append(unit)
        self.state = {}
        states = [slots[i].state for i in self.order]
        for key in _STATE_KEYS:
            if key not in states[0]:
                continue
            if states[0][key].dim() == 0 and key == "exp_avg_sq":  # NovoGrad: one scalar per tensor
                buf = torch.stack([s[key] for s in states]).to(dt)
                for k, s in enumerate(states):
                    s[key] = buf[k]
            else:
                buf = torch.cat([s[key].reshape(-1) for s in states]).to(dt) if states else torch.empty(0, dtype=dt, device=dev)
                for s, view in zip(states, self.views(buf)):
                    s[key] = view
            self.state[key] = buf
        # step counters stay on the CPU (as in torch.optim): bias corrections are host scalars, no sync
        self.steps = torch.stack([s["step"] for s in states]).to(dtype=torch.float32, device="cpu")
        for k, s in enumerate(states):
            s["step"] = self.steps[k]

    def views(self, flat):
        """Views of a flat buffer shaped like each parameter, in layout order."""
        return [flat[a:b].view(p.shape) for p, a, b in zip(self.params, self.offsets, self.offsets[1:])]

    # -- chunks ------------------------------------------------------------------------------
    def _align(self, unit, k) -> int:
        """Rows of tensor k that must stay in one piece: a reduction segment (or, for the NS result,
        a head block of storage rows) never spans two pieces."""
        nb, p = unit.nb, self.params[k]
        if unit.kind == "ns":
            split_rows = nb.norm == "ns_split" and nb.orientation == "out_in" and not nb.experts
            return nb.head_dim if split_rows else 1
        if unit.kind != "reduce":
            return 1
        if nb.norm == "l2_col" and nb.orientation == "in_out" and not nb.experts:
            return max(1, p.shape[0])  # its operator rows are the storage columns: the whole tensor
        return 1

    def chunks(self, unit, limit: int) -> list:
        """The unit cut into chunks of at most `limit` elements (more only where one aligned group
        of rows is larger), at tensor rows; cached per limit."""
        cached = unit.cache.get(limit)
        if cached is not None:
            return cached
        out, chunk, used = [], [], 0
        for k in range(unit.k0, unit.k1):
            p, x = self.params[k], self.offsets[k]
            if p.numel() == 0:
                continue
            rows = p.shape[0] if p.dim() else 1
            row_len = p.numel() // rows
            step = self._align(unit, k)
            r = 0
            while r < rows:
                fit = ((limit - used) // row_len) // step * step
                if fit == 0 and used:  # not even one aligned group fits: close the chunk
                    out.append(chunk)
                    chunk, used = [], 0
                    continue
                r1 = min(rows, r + max(step, fit))
                chunk.append(_Piece(k, r, r1, x + r * row_len, x + r1 * row_len, whole=(r == 0 and r1 == rows)))
                used += (r1 - r) * row_len
                r = r1
                if used >= limit:
                    out.append(chunk)
                    chunk, used = [], 0
        if chunk:
            out.append(chunk)
        if unit.kind == "reduce":
            self._segments(unit, out)
        unit.cache[limit] = out
        return out

    def _segments(self, unit, chunks) -> None:
        """Give every piece of a reduce unit the ids of its reduction segments (rows of `sums`)."""
        nb, first, base = unit.nb, {}, 0
        for k in range(unit.k0, unit.k1):
            first[k] = base
            base += _segment_count(nb, self.params[k].shape)
        unit.n_segments = base
        for chunk in chunks:
            for pc in chunk:
                shape = self.params[pc.k].shape
                n, rows = _segment_count(nb, shape), (shape[0] if len(shape) else 1)
                if nb.norm == "l2" and not nb.experts:
                    ids = [first[pc.k]]  # one segment; pieces add partial sums
                elif nb.norm == "l2_split":  # the head blocks its rows touch (a shard may start mid-block)
                    hd, off = nb.head_dim, nb.row_offset
                    ids = range(first[pc.k] + (off + pc.r0) // hd, first[pc.k] + (off + pc.r1 - 1) // hd + 1)
                elif pc.r0 == 0 and pc.r1 == rows:
                    ids = range(first[pc.k], first[pc.k] + n)  # a whole tensor (in_out l2_col, or it fits)
                else:
                    per = n // rows  # segments per storage row: 1 (rows, experts) or operator rows per expert
                    ids = range(first[pc.k] + pc.r0 * per, first[pc.k] + pc.r1 * per)
                pc.seg = torch.tensor(list(ids), dtype=torch.long, device=self.device)


def _segment_count(nb, shape) -> int:
    """Reduction segments of one tensor: one per block (l2, l2_split), one per operator row (l2_col).
    A row shard of a split bias (nb.global_rows) counts the blocks of the whole tensor."""
    if nb.norm == "l2_split":
        return (nb.global_rows or shape[0]) // nb.head_dim
    n, r, c = _block_counts(nb, shape)
    return n * r if nb.norm == "l2_col" else n


def _block_counts(nb, shape):
    """(blocks, rows, cols) of `norm_blocks` for a tensor of this shape in unit `nb`."""
    return block_shape(tuple(shape), nb.norm, nb.head_dim, **nb.layout)


def _span(chunk) -> int:
    """Elements of a chunk (its pieces are consecutive in the flat layout)."""
    return chunk[-1].x1 - chunk[0].x0 if chunk else 0


def _longest(chunks) -> int:
    return max([0, *(_span(ch) for ch in chunks)])


def _piece_shape(p: torch.Tensor, pc: _Piece) -> tuple:
    return (pc.r1 - pc.r0, *p.shape[1:]) if p.dim() else (1,)


# ----------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------


class TorchBackend:
    name = "torch"
    # the optimizer runs `prepare` eagerly and `run` (the math) where torch.compile can trace it;
    # a subclass whose step makes collectives or host decisions per step sets this False
    traceable = True

    def __init__(self, chunk_elements: int = None):
        self.chunk_elements = chunk_elements  # None: CPU_CHUNK_ELEMENTS on a CPU, CHUNK_ELEMENTS elsewhere
        self._workspace: dict = {}  # device -> uint8 buffer, grown to the largest need of any plan
        self._budget = 0  # the memory budget's scratch bytes of the plan being stepped (bytes; 0: none)
        self._ns_in_second = False  # where the last `orthogonalize` left its result (see _ns_unit)

    def step(self, opt, plan, grads_by_bucket) -> None:
        self.run(opt, plan, grads_by_bucket, self.prepare(opt, plan))

    def prepare(self, opt, plan, compiling: bool = False) -> dict:
        """A step's setup, outside any graph: the flat layouts (built once per plan) and the workspace,
        sized for the whole plan up front (never regrown mid-step). Returns {device: workspace}; with
        `compiling`, a workspace is one buffer per dtype (see `_typed`)."""
        need, dtypes = {}, {}
        for bucket in plan.buckets:
            group = opt.param_groups[bucket.group_index]
            layout = bucket.cache.get("flat")
            if layout is None:
                budget = plan.cache.get("torch_budget")
                if budget is None:
                    budget = plan.cache["torch_budget"] = self.memory_budget(opt, plan)
                limit = lambda unit, g=group, b=bucket: self._chunk_limit(g, b, unit, budget)  # noqa: E731
                layout = bucket.cache["flat"] = _FlatLayout(bucket, limit)
            self._budget = plan.cache.get("torch_budget", 0)
            need[bucket.device] = max(need.get(bucket.device, 0), self.workspace_bytes(group, bucket, layout))
            dtypes.setdefault(bucket.device, set()).update({layout.dtype, *(self._ns_dtype(group, bucket, u) for u in layout.units if u.kind == "ns")})
        if compiling:
            raws = {device: self._typed_scratch(device, nbytes, dtypes[device]) for device, nbytes in need.items()}
        else:
            raws = {device: self._scratch(device, nbytes) for device, nbytes in need.items()}
        for bucket in plan.buckets:
            layout, raw = bucket.cache["flat"], raws[bucket.device]
            ptr = tuple(sorted((str(t.dtype), t.data_ptr()) for t in raw.values())) if isinstance(raw, dict) else raw.data_ptr()
            if layout.raw_ptr != ptr:  # a new workspace: views of the old one would keep it alive
                layout.view_cache.clear()
                layout.raw_ptr = ptr
            group = opt.param_groups[bucket.group_index]
            if compiling:
                # compiled code reads the group's settings from a copy whose lr is a tensor: a traced float
                # is a guard (a recompile per new value), or in some kernels a constant (an lr schedule
                # would run the value it was compiled with)
                lr = group["lr"]
                if not isinstance(lr, torch.Tensor):
                    lr = bucket.cache.get("lr")
                    if lr is None:
                        lr = bucket.cache["lr"] = torch.zeros((), dtype=torch.float64)
                    lr.fill_(group["lr"])
                settings = bucket.cache.setdefault("compiled_settings", {})
                settings.clear()
                settings.update(group, lr=lr)
            for unit in layout.units:
                if unit.kind == "ns":  # the apply sweep's chunks, wherever the NS leaves its result
                    x_bytes = unit.numel * (torch.finfo(self._ns_dtype(group, bucket, unit)).bits // 8)
                    for in_y in (False, True):
                        self._apply_chunks(layout, unit, raw, x_bytes, in_y)
        return raws

    def run(self, opt, plan, grads_by_bucket, raws) -> None:
        """The step's tensor math on prepared layouts and workspaces (traceable by torch.compile)."""
        compiling = torch.compiler.is_compiling()
        for bucket, grads in zip(plan.buckets, grads_by_bucket):
            layout = bucket.cache["flat"]
            # compiled: the settings `prepare` copied, lr a tensor (an operand of the graph, not a float;
            # the optimizer's own param_groups are guarded value by value when traced)
            group = bucket.cache["compiled_settings"] if compiling else opt.param_groups[bucket.group_index]
            self._bucket_step(group, bucket, layout, [grads[i] for i in layout.order], raws[bucket.device])

    def memory_budget(self, opt, plan) -> int:
        """The memory budget's scratch bytes: 2× the largest NS bucket of the plan in its NS dtype."""
        largest = 0
        for bucket in plan.buckets:
            group = opt.param_groups[bucket.group_index]
            for nb in bucket.norm_buckets:
                if nb.norm in ("ns", "ns_split"):
                    dt = choose_for_bucket(nb, bucket, group, "torch").dtype
                    numel = sum(bucket.slots[i].param.numel() for i in nb.slots)
                    largest = max(largest, numel * (torch.finfo(dt).bits // 8))
        return 2 * largest

    def _chunk_limit(self, group, bucket, unit, budget: int) -> int:
        """Elements per chunk of a unit: two fp32 chunk buffers must fit where they live — in an NS
        unit's second buffer (its size in the NS dtype), elsewhere in the plan's budget; where the plan
        has no NS bucket, the default chunk."""
        word = torch.finfo(bucket.dtype).bits // 8
        most = self.chunk_elements or (CPU_CHUNK_ELEMENTS if bucket.device.type == "cpu" else CHUNK_ELEMENTS)
        if unit.kind == "ns":
            room = unit.numel * (torch.finfo(self._ns_dtype(group, bucket, unit)).bits // 8)
        else:
            room = budget
        if not room:
            return most
        return min(most, max(MIN_CHUNK, room // (2 * word)))

    # -- workspace -------------------------------------------------------------------------------
    def workspace_bytes(self, group, bucket, L: _FlatLayout) -> int:
        """Bytes of scratch one step of this bucket needs (see the module docstring)."""
        need = 0
        word = torch.finfo(L.dtype).bits // 8
        for unit in L.units:
            chunk = _longest(unit.chunks)
            if unit.kind == "ns":
                item = torch.finfo(self._ns_dtype(group, bucket, unit)).bits // 8
                x = unit.numel * item
                need = max(need, x + max(x, 2 * chunk * word))
            else:
                need = max(need, 2 * chunk * word)
        return need + 64  # the 16-byte alignment of up to three regions

    def _workspace_key(self, device):
        """Which workspace a step uses: one per device (buckets run one after another)."""
        return device

    def _scratch(self, device, nbytes: int) -> torch.Tensor:
        key = self._workspace_key(device)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < nbytes:
            self._workspace[key] = None  # free the old one before allocating the new
            buf = self._workspace[key] = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=device)
        return buf

    def _typed_scratch(self, device, nbytes: int, dtypes) -> dict:
        """The workspace for compiled code: one buffer per dtype, each of `nbytes`, with the same byte
        offsets as the single buffer (aot_autograd cannot mutate views of one buffer in several
        dtypes). Costs up to one more workspace while compiled."""
        out = {}
        for dt in sorted(dtypes, key=str):
            key = ("typed", self._workspace_key(device), dt)
            word = torch.finfo(dt).bits // 8
            buf = self._workspace.get(key)
            if buf is None or buf.numel() * word < nbytes:
                self._workspace[key] = None
                buf = self._workspace[key] = torch.empty(-(-max(nbytes, 16) // word), dtype=dt, device=device)
            out[dt] = buf
        return out

    @staticmethod
    def _typed(raw, start_bytes: int, n: int, dtype) -> torch.Tensor:
        """n elements of `dtype` at a 16-byte aligned offset of the workspace (a uint8 buffer, or
        under compile one buffer per dtype)."""
        start = align_up(start_bytes, 16)
        if isinstance(raw, dict):
            word = itemsize(dtype)
            return raw[dtype][start // word : start // word + n]
        return typed_view(raw, start, n, dtype)

    @staticmethod
    def _nbytes(raw) -> int:
        """Bytes of a workspace (see `_typed`)."""
        if isinstance(raw, dict):
            return min(t.numel() * t.element_size() for t in raw.values())
        return raw.numel()

    # -- one bucket --------------------------------------------------------------------------------
    def _bucket_step(self, group, bucket, L: _FlatLayout, grads, raw) -> None:
        L.steps.add_(1.0)
        for unit in L.units:
            if unit.kind == "ns":
                self._ns_unit(group, bucket, L, unit, grads, raw)
            elif unit.kind == "reduce":
                self._reduce_unit(group, L, unit, grads, raw)
            else:
                self._elementwise_unit(group, L, unit, grads, raw)

    def _chunk_buffers(self, raw, L, n: int, start_bytes: int = 0):
        word = torch.finfo(L.dtype).bits // 8
        G = self._typed(raw, start_bytes, n, L.dtype)
        D = self._typed(raw, start_bytes + n * word + 16, n, L.dtype)
        return G, D

    # -- the three kinds of units ---------------------------------------------------------------------
    def _elementwise_unit(self, group, L, unit, grads, raw) -> None:
        """none / sign: one sweep — direction, Δ, scale, offset, apply."""
        n = _longest(unit.chunks)
        G, D = self._chunk_buffers(raw, L, n)
        pre = self._pre_pass(group, L, unit, grads)
        trust = self._trust(group, L, unit)
        for chunk in unit.chunks:
            d = self._direction(group, L, unit, chunk, grads, G, D, pre, update_state=True)
            if unit.nb.norm == "sign":
                d.sign_()
            self._apply(group, L, unit, chunk, d, lr_k=_lr(group), trust=trust, raw_d=None)

    def _reduce_unit(self, group, L, unit, grads, raw) -> None:
        """l2 / l2_col / l2_split: sums of squares per segment, then Δ = d / ‖segment‖."""
        nb = unit.nb
        n = _longest(unit.chunks)
        G, D = self._chunk_buffers(raw, L, n)
        pre = self._pre_pass(group, L, unit, grads)
        sums = torch.zeros(unit.n_segments, dtype=L.dtype, device=L.device)
        one_sweep = len(unit.chunks) == 1
        for chunk in unit.chunks:
            d = self._direction(group, L, unit, chunk, grads, G, D, pre, update_state=True)
            self._add_segment_sums(L, unit, chunk, d, sums)
        inv = _safe_inverse(self.finish_sums(unit, sums).sqrt())
        trust = self._trust(group, L, unit)
        for chunk in unit.chunks:
            d = D[: _span(chunk)] if one_sweep else self._direction(
                group, L, unit, chunk, grads, G, D, pre, update_state=False)  # fmt: skip
            raw_d = self._raw_copy(group, d, G) if trust is not None and nb.norm == "l2" else None
            self._scale_segments(L, unit, chunk, d, inv)
            self._apply(group, L, unit, chunk, d, lr_k=_lr(group), trust=trust, raw_d=raw_d)

    def _ns_unit(self, group, bucket, L, unit, grads, raw) -> None:
        """ns / ns_split: d into the unit's NS buffer X, NS between X and Y, then apply from the result."""
        nb = unit.nb
        ns_dtype = self._ns_dtype(group, bucket, unit)
        item = torch.finfo(ns_dtype).bits // 8
        K = unit.k1 - unit.k0
        x_bytes = unit.numel * item
        X = self._typed(raw, 0, unit.numel, ns_dtype)
        n = _longest(unit.chunks)
        G, D = self._chunk_buffers(raw, L, n, start_bytes=x_bytes + 16)  # in Y's room until NS starts
        pre = self._pre_pass(group, L, unit, grads)
        for chunk in unit.chunks:
            d = self._direction(group, L, unit, chunk, grads, G, D, pre, update_state=True)
            X[chunk[0].x0 - unit.a : chunk[-1].x1 - unit.a].copy_(d)
        trust = self._trust(group, L, unit)
        scale = _lr(group) * nb.shape_factor
        # the NS may use all of the workspace past X (its m×m temporaries go in room the ping-pong leaves)
        y_start = -(-(x_bytes + 16) // 16) * 16
        y_all = self._typed(raw, y_start, (self._nbytes(raw) - y_start) // item, ns_dtype)
        self._ns_in_second = False  # set by orthogonalize: whether its result is in y_all
        result = self.orthogonalize(group, bucket, unit, X.view(K, *nb.shape), scale=scale, buffers=(X, y_all))
        # the apply sweep's chunk buffer goes in X's room where the result is in the second buffer
        in_y = isinstance(result, torch.Tensor) and self._ns_in_second
        chunks, T = self._apply_chunks(L, unit, raw, x_bytes, in_y)
        for chunk in chunks:
            t = T[: _span(chunk)]
            self.copy_ns_result(L, unit, chunk, t, result)
            self._apply(group, L, unit, chunk, t, lr_k=None, trust=trust, raw_d=None)

    def _apply_chunks(self, L, unit, raw, x_bytes: int, in_y: bool):
        """An NS unit's apply sweep: its chunks and their buffer, in X's room (in_y) or past X. Both
        are cached (`prepare` builds them for either case, so compiled code finds them ready)."""
        word = torch.finfo(L.dtype).bits // 8
        y_start = -(-(x_bytes + 16) // 16) * 16
        start, room = (0, x_bytes) if in_y else (y_start, self._nbytes(raw) - y_start)
        chunks = L.chunks(unit, max(1, min(_longest(unit.chunks), room // word)))
        biggest = _longest(chunks)
        if biggest * word <= room:
            return chunks, self._typed(raw, start, biggest, L.dtype)
        # one aligned group of rows larger than the free room (a tiny 1×n unit): a buffer of its own
        T = unit.cache.get("own_buffer")
        if T is None or T.numel() < biggest:
            T = unit.cache["own_buffer"] = torch.empty(biggest, dtype=L.dtype, device=L.device)
        return chunks, T

    # -- stages ------------------------------------------------------------------------------------
    def _piece_views(self, L, chunk, buf):
        """Views of a chunk buffer shaped like the pieces (rows of tensors) of the chunk. Cached: the
        buffers sit at fixed places of the workspace, and building ~3 views per tensor every step
        was a third of a step's time on models with many small tensors."""
        if torch.compiler.is_compiling():  # traced once into the graph: nothing to cache (and no pointers)
            return [buf[pc.x0 - chunk[0].x0 : pc.x1 - chunk[0].x0].view(_piece_shape(L.params[pc.k], pc)) for pc in chunk]
        key = (buf.data_ptr(), buf.dtype, id(chunk))
        views = L.view_cache.get(key)
        if views is None:
            base = chunk[0].x0
            views = [buf[pc.x0 - base : pc.x1 - base].view(_piece_shape(L.params[pc.k], pc)) for pc in chunk]
            L.view_cache[key] = views
        return views

    @staticmethod
    def _rows_of(tensors, chunk):
        """The chunk's pieces of per-parameter tensors (grads, params): the tensors themselves where a
        piece is a whole tensor (params stay live through `.data =`), else a slice of rows."""
        return [_rows(tensors[pc.k]) if pc.whole else _rows(tensors[pc.k])[pc.r0 : pc.r1] for pc in chunk]

    def _pre_pass(self, group, L, unit, grads):
        """What a sweep needs before it starts: NovoGrad's per-tensor ‖g‖² → v (updated here, once)."""
        if group["preconditioner"] != "novograd":
            return None
        b2 = group["beta2"]
        ema_v = group["second_moment"] == "ema"
        ks = range(unit.k0, unit.k1)
        V = L.state["exp_avg_sq"][unit.k0 : unit.k1]  # one scalar per tensor
        sq = self.tensor_norms([grads[k] for k in ks]).to(V.dtype) ** 2
        first = (L.steps[unit.k0 : unit.k1] == 1).to(V.device)  # NovoGrad's v₁ = ‖g₁‖²
        V.copy_(torch.where(first, sq, b2 * V + ((1 - b2) * sq if ema_v else sq)))
        return list((V.sqrt() + group["eps"]).unbind(0))

    def _direction(self, group, L, unit, chunk, grads, G, D, pre, update_state: bool):
        """Preconditioner + momentum over one chunk: returns d (a view of D). With update_state the
        moments are updated first; without, d is recomputed from the already-updated moments
        (bit-identical to the first sweep: the same operations on the same values)."""
        n = _span(chunk)
        x0, x1 = chunk[0].x0, chunk[-1].x1
        G, D = G[:n], D[:n]
        g_views = self._piece_views(L, chunk, G)
        torch._foreach_copy_(g_views, self._rows_of(grads, chunk))
        if group["maximize"]:
            G.neg_()
        b1, b2, eps, p = group["beta1"], group["beta2"], group["eps"], group["preconditioner"]
        ema_v = group["second_moment"] == "ema"
        M = L.state["exp_avg"][x0:x1]
        if p == "adam":
            V = L.state["exp_avg_sq"][x0:x1]
            if update_state:
                V.mul_(b2).addcmul_(G, G, value=(1 - b2) if ema_v else 1.0)
                M.lerp_(G, 1 - b1)  # m ← β1·m + (1−β1)·g
            if group["nesterov"]:
                torch.lerp(G, M, b1, out=D)  # β1·m + (1−β1)·g
            else:
                D.copy_(M)
            self._bias_div(L, chunk, D, b1)
            G.copy_(V)
            self._bias_div(L, chunk, G, b2)
            return D.div_(G.sqrt_().add_(eps))
        if p is None:
            U = G
        elif p == "laprop":
            V = L.state["exp_avg_sq"][x0:x1]
            if update_state:
                V.mul_(b2).addcmul_(G, G, value=(1 - b2) if ema_v else 1.0)
            if group["bias_correction"]:
                D.copy_(V)
                self._bias_div(L, chunk, D, b2)
                D.sqrt_()
            else:
                torch.sqrt(V, out=D)  # = copy, then sqrt_: one pass
            torch.div(G, D.add_(eps), out=D)
            U = D
        elif p == "novograd":
            torch._foreach_div_(g_views, [pre[pc.k - unit.k0] for pc in chunk])
            if group["weight_decay"]:
                torch._foreach_add_(g_views, self._rows_of(L.params, chunk), alpha=group["weight_decay"])
            U = G
        else:
            raise ValueError(f"mango: invalid preconditioner={p!r}")
        c = (1 - b1) if group["ema_momentum"] else 1.0
        if update_state:
            if c == 1.0:
                torch.add(U, M, alpha=b1, out=M)  # m ← β1·m + u
            else:
                M.lerp_(U, c)  # m ← β1·m + (1−β1)·u
        if group["nesterov"]:
            if c == 1.0:
                torch.add(U, M, alpha=b1, out=D)
            else:
                torch.lerp(U, M, b1, out=D)
        else:
            D.copy_(M)
        if group["bias_correction"] and group["ema_momentum"]:
            self._bias_div(L, chunk, D, b1)
        return D

    @staticmethod
    def _bias_div(L, chunk, X, beta) -> None:
        """X /= 1 − βᵗ: one scalar when every tensor of the chunk has the same step count, else per piece."""
        if torch.compiler.is_compiling():  # no host reads: per piece, from the step counters as tensors
            base = chunk[0].x0
            t = L.steps[chunk[0].k : chunk[-1].k + 1].to(torch.float64)
            corrections = 1 - beta ** t
            for pc in chunk:
                X[pc.x0 - base : pc.x1 - base].div_(corrections[pc.k - chunk[0].k])
            return
        ks = [pc.k for pc in chunk]
        t = L.steps[ks[0] : ks[-1] + 1]
        if bool((t == t[0]).all()):
            X.div_(1 - beta ** float(t[0]))
            return
        base = chunk[0].x0
        for pc in chunk:
            X[pc.x0 - base : pc.x1 - base].div_(1 - beta ** float(L.steps[pc.k]))

    def _raw_copy(self, group, d, G):
        """LAMB's fallback needs the un-normalized d where ‖W‖ = 0: keep a copy (G is free now)."""
        out = G[: d.numel()]
        out.copy_(d)
        return out

    def _add_segment_sums(self, L, unit, chunk, d, sums) -> None:
        """sums[segment] += Σ d² over every segment of the chunk's pieces (deterministic order)."""
        nb = unit.nb
        views = self._piece_views(L, chunk, d)
        if nb.norm == "l2" and not nb.experts:
            parts = torch.stack(torch._foreach_norm(views)) ** 2 if views else None
        elif nb.norm == "l2_split":
            parts = torch.cat([self._split_rows(v, nb, pc).sum(-1) for v, pc in zip(views, chunk)])
        else:
            dims = -1 if nb.norm == "l2_col" else (-2, -1)
            parts = torch.cat([
                torch.linalg.vector_norm(norm_blocks(v, v.shape, nb.norm, nb.head_dim, **nb.layout), dim=dims).reshape(-1) ** 2
                for v in views
            ])  # fmt: skip
        if parts is not None:
            sums.index_add_(0, torch.cat([pc.seg for pc in chunk]), parts.to(sums.dtype))

    def _scale_segments(self, L, unit, chunk, d, inv) -> None:
        """d ← d / ‖segment‖ (0 where the segment is 0)."""
        nb = unit.nb
        views = self._piece_views(L, chunk, d)
        if nb.norm == "l2" and not nb.experts:
            torch._foreach_mul_(views, list(inv[torch.cat([pc.seg for pc in chunk])].unbind(0)))
            return
        for v, pc in zip(views, chunk):
            f = inv[pc.seg]
            if nb.norm == "l2_split":  # every row by its block's factor
                lead = (nb.row_offset + pc.r0) % nb.head_dim
                rows = v.reshape(pc.r1 - pc.r0, -1)
                rows.mul_(f.repeat_interleave(nb.head_dim)[lead : lead + rows.shape[0], None])
                continue
            blocks = norm_blocks(v, v.shape, nb.norm, nb.head_dim, **nb.layout)
            if nb.norm == "l2_col":
                blocks.mul_(f.view(*blocks.shape[:-1], 1))
            else:
                blocks.mul_(f.view(*blocks.shape[:-2], 1, 1))

    @staticmethod
    def _split_rows(v, nb, pc):
        """Σd² per row of a split-bias piece, padded and grouped into the head blocks it touches:
        (blocks, head_dim). Works where a row shard starts mid-block (FSDP2)."""
        hd = nb.head_dim
        q = v.reshape(pc.r1 - pc.r0, -1).square().sum(-1)
        lead = (nb.row_offset + pc.r0) % hd
        tail = (-(lead + q.numel())) % hd
        return torch.nn.functional.pad(q, (lead, tail)).view(-1, hd)

    def _trust(self, group, L, unit):
        """Per tensor of the unit, LAMB's φ = min(‖W‖, trust_clamp), or None without trust_ratio
        (`_apply` takes ratio 1 where φ = 0: on the raw step for l2, on Δ otherwise)."""
        if not group["trust_ratio"]:
            return None
        phi = self.tensor_norms(L.params[unit.k0 : unit.k1])
        clamp = group.get("trust_clamp")
        return phi if clamp is None else phi.clamp(max=clamp)

    def _apply(self, group, L, unit, chunk, s, lr_k, trust, raw_d) -> None:
        """s (a chunk buffer: Δ, or the NS result already × lr·k) → lr·k·Δ·trust, offset momentum,
        decoupled weight decay, W ← W − (s + O) − lr·λ·W."""
        nb = unit.nb
        x0, x1 = chunk[0].x0, chunk[-1].x1
        if lr_k is not None:
            s.mul_(lr_k * nb.shape_factor)
        if trust is not None:
            views = self._piece_views(L, chunk, s)
            ws = [trust[pc.k - unit.k0] for pc in chunk]
            factors = [torch.where(w > 0, w, torch.ones_like(w)) for w in ws]
            if raw_d is not None:  # l2 with ‖W‖ = 0: the raw step lr·d (LAMB's trust ratio of 1)
                raws = self._piece_views(L, chunk, raw_d)
                for v, r, w in zip(views, raws, ws):
                    torch.where(w > 0, v, r * (_lr(group) * nb.shape_factor), out=v)
            torch._foreach_mul_(views, factors)
        if "offset" in L.state:
            O = L.state["offset"][x0:x1]
            O.lerp_(s, 1 - group["beta_offset"])  # O ← β_off·O + (1−β_off)·s
            s.add_(O)
        params = self._rows_of(L.params, chunk)
        wd = 0.0 if group["preconditioner"] == "novograd" else group["weight_decay"]
        views = self._piece_views(L, chunk, s)
        lr = _lr(group)
        if wd and not _plain_number(lr):  # a tensor lr: lr·λ as an operand
            torch._foreach_add_(views, torch._foreach_mul(params, lr * wd))
        elif wd and lr * wd:
            torch._foreach_add_(views, params, alpha=lr * wd)
        torch._foreach_sub_(params, views)

    # -- NS --------------------------------------------------------------------------------------
    def _ns_dtype(self, group, bucket, unit):
        """The unit's NS operand dtype, as decided at plan time (mango.ns_engine)."""
        return choose_for_bucket(unit.nb, bucket, group, "torch").dtype

    # ------------------------------------------------------------------------------------
    # Stages that need whole tensors. A sharded (distributed) backend overrides these with
    # collectives; everything else in this class is elementwise and shard-local.
    # ------------------------------------------------------------------------------------
    def tensor_norms(self, tensors) -> torch.Tensor:
        """l2 norm of each tensor, as one 1-D tensor (in the state dtype for low-precision tensors)."""
        if not tensors:
            return torch.zeros(0)
        wide = torch.float32 if tensors[0].dtype in _LOW_PRECISION else None
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=wide))

    def finish_sums(self, unit, sums: torch.Tensor) -> torch.Tensor:
        """Per-segment sums of squares of d, complete (a sharded backend adds the other ranks')."""
        return sums

    def copy_ns_result(self, L, unit, chunk, t, result) -> None:
        """Copy the chunk's part of `orthogonalize`'s result (norm-block form) into the chunk buffer t
        (storage layout, state dtype)."""
        nb = unit.nb
        compiling = torch.compiler.is_compiling()
        key = None if compiling else ("ns", result.data_ptr(), t.data_ptr(), id(chunk))
        pairs = None if compiling else L.view_cache.get(key)
        if pairs is None:
            dst = [norm_blocks(v, v.shape, nb.norm, nb.head_dim, **nb.layout) for v in self._piece_views(L, chunk, t)]
            pairs = (dst, [_result_piece(result[pc.k - unit.k0], nb, pc) for pc in chunk])
            if not compiling:
                L.view_cache[key] = pairs
        torch._foreach_copy_(*pairs)

    def orthogonalize(self, group, bucket, unit, X: torch.Tensor, scale: float = 1.0, buffers=None) -> torch.Tensor:
        """ns / ns_split: scale × batched NS of the unit's blocks. X is the unit's (K, *shape) stack in
        storage layout (NS dtype); returns scale × the result in norm-block form (a view into
        `buffers` when given), which `copy_ns_result` reads."""
        nb = unit.nb
        blocks = norm_blocks(X, nb.shape, nb.norm, nb.head_dim, **nb.layout)
        if blocks.numel() == 0:  # an empty row shard (FSDP2): nothing here to orthogonalize
            return blocks
        method = choose_for_bucket(nb, bucket, group, "torch").method
        coeffs = ns_schedule(group)
        # the m×m temporaries (A, B or the Gram iterates) stay under 1/16 of the budget (1 MB at least:
        # slicing smaller batches only adds calls)
        limit = max(self._budget // 16, TEMP_FLOOR_BYTES) if self._budget else None
        where = []
        out = batched_newton_schulz(blocks, coeffs, group["ns_prescale"], group["ns_eps"], dtype=X.dtype, out_scale=scale,
                                    method=method, buffers=buffers, max_temp_bytes=limit, where=where)  # fmt: skip
        self._ns_in_second = where == [1]
        return out


def _result_piece(R: torch.Tensor, nb, pc: _Piece) -> torch.Tensor:
    """The part of one tensor's NS result (its norm blocks, (E, [heads, head_dim,] rows, cols)) that
    belongs to storage rows [pc.r0, pc.r1): experts, operator rows, head blocks or operator columns."""
    if nb.experts:
        return R[pc.r0 : pc.r1]
    if nb.orientation == "in_out":  # storage rows are operator columns
        return R[..., pc.r0 : pc.r1]
    if nb.norm == "ns_split":
        return R[:, pc.r0 // nb.head_dim : pc.r1 // nb.head_dim]
    return R[:, pc.r0 : pc.r1]

