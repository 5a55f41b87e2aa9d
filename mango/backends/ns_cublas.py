"""The cuBLAS engine of the triton backend: one NS bucket's Newton–Schulz as a fixed list of torch
batched GEMMs and elementwise ops on the NS stack the moments kernel writes, for the large buckets
where the per-architecture table (mango.ns_engine) says cuBLAS beats the tiled Triton kernels.

The blocks are iterated where they lie, in the orientation they are contiguous in (a tall one as
X ← a·X + X·B with B from XᵀX, as the torch backend does). X lives in one of two *places*: its NS stack
(place 0) and a second X-sized buffer (place 1). Every product that writes X writes it to the
other place (a *move*); the m×m temporaries live in the place X is not in, except the one the
moving product reads — the textbook form's B, the Gram form's Q — which has room of its own. The
pre-scale (X / max(‖X‖, ε), a norm, a clamp and a divide) is done in place or as the first move,
whichever leaves X in the stack after the last move, where the apply kernel reads it: so the
second buffer is free again after the bucket, and every cuBLAS bucket of a round shares one
(`scratch_numel`). A bucket then needs its stack, plus in the round's scratch X and one m×m
temporary per block (more only where the Gram form's three others do not fit in X: blocks less
than 3× as wide as tall), its blocks' norms, and an m×m identity shared by the buckets of its
size and dtype (`bind`).

**In place** (`in_place=True`, for a bucket that alone fills the memory budget): the two places
are the halves of one 2X region, place 1 starting s = ⌈U/2⌉ units after place 0 (a unit is one
matrix of the batch, or one row of a single tall matrix; U units in all). A move then writes X
shifted by s units in two products: first the units whose destination is free, then the others,
whose destination holds only what the first product already read. B or Q sits in the last U − s
units, which no move writes; the other temporaries in the s units X does not cover.
So the bucket needs exactly 2X, at one more launch per move, where its blocks are wide enough for
the temporaries (`CublasNSBatch.sizes` says None where not).

The textbook form is the torch backend's: A = X·Xᵀ, B = b·A + c·A², X ← a·X + B·X, with a·X added
in the GEMM's fp32 accumulator (in bf16, rounding a·I + B first doubles the error); its two
baddbmm are out of place, and such a baddbmm first copies its input into `out`: five launches a
step. The Gram form forms P = a·I + b·R + c·R² in two launches and no copy (P = R + (a/b)·I
against a kept identity, then P ← b·P + c·R·R in place; as accurate as rounding a·I + Z in fp16),
updates Q ← Q·P and R ← P·R·P, and moves X ← Q·X at its restarts and at the end.

The program is built once per schedule; every step runs it. Every kernel its ops launch is recorded
(`mango_kernels.host_ops`): a GEMM as "cublas_gemm", an elementwise op, reduction or copy as
"cublas_op" (an out-of-place baddbmm is both). With Muon's 5 steps a bucket takes 28 launches in
the textbook form and 26 in the Gram form, +10 or +2 in place. In a launch dry run the same program runs on one-element stand-ins of the same dtype, so the
step's launch count and the Python of issuing each op are those of a real step.

**A rank's share** (DDP's NS split, mango.ddp: `share = (first, stop)`, the consecutive members this
rank runs; (0, 0): none): the program is the whole bucket's with every view cut to those members'
blocks (their X at both places, their temporaries, their norms; the in-place moves' two products
cut to the members' units), in the same buffers and layout. So a rank does the FLOPs of its members
only, in the memory the whole bucket takes (in place: the same 2X, no scratch). A block's ops read
only its own X and temporaries, and write elsewhere only what the whole program no longer reads
(the second product of an in-place move writes over units the first one read): each member it
runs gets the whole run's result, bit for bit, where `output_view` says. The other members' memory may
be overwritten meanwhile (a temporary in the stack while X is in the scratch, a shifted product);
the all-gather then writes their results to their `output_view`s. `output_view` does not depend
on the share, so the NS result addresses the triton backend writes into its tensor table (from
`output_view`, whenever the settings change) hold whether the share is set before or after; setting
it rebuilds the program. A member no rank runs in the bucket (a row-split tall matrix: share (0, 0))
keeps its d at `input_view` for the split to read; its result goes to `output_view`.
"""

from __future__ import annotations

import torch

import mango_kernels as mk
from mango_kernels._launch import dry_run_active

from .. import newton_schulz as _ns
from ..layout import norm_blocks

__all__ = ["CublasNSBatch", "moves"]

_ALIGN = 128  # elements: every temporary and the second place start at a multiple (aligned GEMM operands)
# m×m temporaries per block; the first is the one a move reads (it gets room no move writes)
_TEMPORARIES = {"textbook": ("B", "A"), "gram": ("Qs", "R", "P", "Qf")}
_GEMMS = (torch.bmm, torch.Tensor.baddbmm_)


def _launches(fn) -> tuple:
    """The kernels one op of a program launches: a GEMM; an out-of-place baddbmm copies its input
    into `out` first; every other op (norm, clamp, divide, add, copy) is one kernel."""
    if fn is torch.baddbmm:
        return ("cublas_op", "cublas_gemm")
    return ("cublas_gemm",) if fn in _GEMMS else ("cublas_op",)


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def moves(method: str, steps: int) -> int:
    """Products that write X: one per textbook step; the Gram form's restarts and its final Q·X."""
    if method == "textbook":
        return steps
    return (1 + len(_ns.gram_restarts(steps))) if steps else 0


def _first_fit(zones: list, sizes: list) -> list | None:
    """(zone, offset) for each size, first fit into zones of these capacities, each piece aligned;
    None where one does not fit."""
    used = [0] * len(zones)
    out = []
    for n in sizes:
        for z, cap in enumerate(zones):
            o = _up(used[z])
            if o + n <= cap:
                out.append((z, o))
                used[z] = o + n
                break
        else:
            return None
    return out


class _Geometry:
    """The bucket's blocks as iterated: K matrices of R×C in the orientation they are contiguous in
    (tall: R > C), or, where they are strided in both (column head blocks), in the wide one (the
    pre-scale copies them into the second place and the result is copied back)."""

    def __init__(self, nb, count: int, dtype: torch.dtype):
        self.nb, self.count = nb, count
        self.numel = _numel(nb.shape)
        self.total = count * self.numel
        base = torch.empty(self.total, dtype=dtype, device="meta")
        src = self.src(base)
        R, C = src.shape[-2:]
        self.K = self.total // max(R * C, 1)
        self.contiguous = src.is_contiguous()
        self.lead = tuple(src.shape[:-2])
        self.R, self.C = R, C
        self.tall = R > C
        self.m = min(R, C)
        # in place, a unit is a matrix of the batch, or a row of a single tall matrix
        self.rows_are_units = self.K == 1 and self.tall
        self.units, self.unit = (R, C) if self.rows_are_units else (self.K, R * C)

    def src(self, stack: torch.Tensor) -> torch.Tensor:
        """The blocks in `stack` as iterated: (..., R, C), contiguous where the layout allows."""
        nb = self.nb
        blocks = norm_blocks(stack[: self.total].view(self.count, *nb.shape), nb.shape, nb.norm, nb.head_dim, **nb.layout)
        transposed = blocks.stride(-2) == 1 and blocks.stride(-1) != 1 and blocks.shape[-1] > 1
        src = blocks.mT if transposed else blocks
        if not src.is_contiguous() and src.shape[-2] > src.shape[-1]:
            src = src.mT
        return src


class CublasNSBatch:
    """One NS bucket's `count` tensors (all of shape `nb.shape`) run by cuBLAS; `in_place`: within
    2X of its own (the module docstring), else sharing the round's scratch (`bind_scratch`)."""

    engine = "cublas"
    small = ()  # no on-chip items: every block goes through the GEMMs

    def __init__(self, nb, count: int, dtype: torch.dtype, device, method: str = "textbook", in_place: bool = False):
        self.nb, self.count, self.dtype, self.method = nb, count, dtype, method
        self.device = torch.device(device)
        self.geometry = g = _Geometry(nb, count, dtype)
        self.numel = g.numel
        self.large = list(range(count))
        self.in_place = in_place
        if in_place:
            layout = _in_place_layout(g, method)
            if layout is None:
                raise ValueError(f"mango: the NS bucket of shape {nb.shape} cannot run in place in 2x its size")
            self.shift, self.offsets = layout
            self.buffer_sizes = {"stack": (2 * g.total, dtype)}
            self.scratch_numel = 0
        else:
            self.shift = 0
            room, self.offsets = _pingpong_layout(g, method)
            self.buffer_sizes = {"stack": (g.total, dtype)}
            self.scratch_numel = _up(g.total) + room
        self.stack = self.scratch = None
        self.coefficients, self.eps, self.prescale = (), 1e-7, "frobenius"
        self._share = None
        self.ops = self.stand_in_ops = self.names = ()

    @staticmethod
    def sizes(nb, count: int, dtype: torch.dtype, method: str) -> tuple:
        """Bytes of (its stack, the scratch it needs) sharing the round's scratch, and of its 2X
        region in place (None where its blocks cannot run in place)."""
        g = _Geometry(nb, count, dtype)
        word = torch.finfo(dtype).bits // 8
        room, _ = _pingpong_layout(g, method)
        in_place = None if _in_place_layout(g, method) is None else 2 * g.total * word
        return g.total * word, (_up(g.total) + room) * word, in_place

    # -- buffers and schedule -------------------------------------------------------------------
    def bind(self, alloc=None, identities: dict = None) -> None:
        """The stack from `alloc(numel, dtype)` (default: its own); `identities` {(m, dtype): I},
        shared by the batches of a step so that buckets of one size keep one identity."""
        alloc = alloc or (lambda n, dt: torch.empty(n, dtype=dt, device=self.device))
        n, dt = self.buffer_sizes["stack"]
        self.stack = alloc(max(n, 1), dt)
        self.norm = torch.empty((*self.geometry.lead, 1, 1), dtype=self.dtype, device=self.device)
        identities = {} if identities is None else identities
        key = (self.geometry.m, self.dtype)
        if key not in identities:
            identities[key] = torch.eye(self.geometry.m, dtype=self.dtype, device=self.device)
        self.identity = identities[key]
        self._build()

    def bind_scratch(self, scratch: torch.Tensor) -> None:
        """The round's shared scratch: a byte buffer, aligned, of at least `scratch_numel` elements."""
        self.scratch = scratch.view(torch.uint8)[: self.scratch_numel * (torch.finfo(self.dtype).bits // 8)].view(self.dtype)
        self._build()

    @property
    def share(self):
        """(first, stop): the consecutive members this rank runs under DDP's NS split (the module
        docstring); None: all of them."""
        return self._share

    @share.setter
    def share(self, value) -> None:
        if value is not None:
            first, stop = value
            if not 0 <= first <= stop <= self.count:
                raise ValueError(f"mango: share must be (first, stop) with 0 <= first <= stop <= {self.count}, got {value!r}")
            value = (first, stop)
        if value != self._share:
            self._share = value
            self._build()

    def share_blocks(self) -> tuple:
        """(first, stop) of the blocks the program runs: the share's members' (all, in place by rows)."""
        first, stop = self._share or (0, self.count)
        per = self.geometry.K // self.count
        return first * per, stop * per

    def set_schedule(self, steps, coefficients, eps, prescale_from_sums=None, restarts=None) -> None:
        """The bucket's schedule (one param group: every member has the same); rebuilds the program.
        The Gram form's restarts are `newton_schulz.gram_restarts`'s, as the program takes them."""
        coefficients = tuple(tuple(map(float, c)) for c in coefficients[0])
        prescale = "spectral" if prescale_from_sums and prescale_from_sums[0] else "frobenius"
        if (coefficients, float(eps[0]), prescale) != (self.coefficients, self.eps, self.prescale):
            self.coefficients, self.eps, self.prescale = coefficients, float(eps[0]), prescale
            self._build()

    def input_view(self, i: int) -> torch.Tensor:
        return self.stack[i * self.numel : (i + 1) * self.numel]

    def output_view(self, i: int) -> torch.Tensor:
        """Where member i's result is after `run`: the stack, or in place after an odd number of
        moves, the second place."""
        base = self.shift * self.geometry.unit if self.in_place and moves(self.method, len(self.coefficients)) % 2 else 0
        return self.stack[base + i * self.numel : base + (i + 1) * self.numel]

    # -- the step ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The bucket's NS: every op of its program (on stand-ins in a launch dry run), counted."""
        mk.host_ops(self.names, self._execute)

    def _execute(self) -> None:
        for fn, args, kwargs in self.stand_in_ops if dry_run_active() else self.ops:
            fn(*args, **kwargs)

    def _build(self) -> None:
        if self.stack is None or (not self.in_place and self.scratch is None):
            return
        self.ops = _Program(self, _Views(self)).ops
        self.stand_in_ops = _Program(self, _StandIns(self)).ops
        self.names = tuple(name for fn, _, _ in self.ops for name in _launches(fn))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------------------
# where the temporaries go
# ----------------------------------------------------------------------------------------


def _pingpong_layout(g: _Geometry, method: str):
    """Sharing a scratch [second place | room]: the moving product's temporary in the room, each
    other one in the place X is not in where it fits, else in the room. Returns (room elements,
    {name: (zone, offset)}), zone 0 the place X is not in, zone 1 the room."""
    mm = g.K * g.m * g.m
    safe, *free = _TEMPORARIES[method]
    offsets, room, used = {safe: (1, 0)}, _up(mm), 0
    for name in free:
        if _up(used) + mm <= g.total:
            offsets[name], used = (0, _up(used)), _up(used) + mm
        else:
            offsets[name], room = (1, room), room + _up(mm)
    return room, offsets


def _in_place_layout(g: _Geometry, method: str):
    """In place: (shift s in units, {name: (zone, offset)}), zone 0 the s units X does not cover,
    zone 1 the last U − s units (the moving product's temporary first); None where the temporaries
    do not fit or the blocks cannot be shifted (strided, one wide matrix)."""
    if not g.contiguous or (g.K == 1 and not g.tall) or g.units < 2:
        return None
    U, unit = g.units, g.unit
    s = -(-U // 2)
    while (s * unit) % _ALIGN and s < U - 1:  # an aligned second place, where one fits
        s += 1
    mm = g.K * g.m * g.m
    safe, *free = _TEMPORARIES[method]
    if _up(mm) > (U - s) * unit:
        return None
    placed = _first_fit([s * unit, (U - s) * unit - _up(mm)], [mm] * len(free))
    if placed is None:
        return None
    offsets = {safe: (1, 0)}
    for name, (z, o) in zip(free, placed):
        offsets[name] = (z, o + (_up(mm) if z == 1 else 0))
    return s, offsets


# ----------------------------------------------------------------------------------------
# the program
# ----------------------------------------------------------------------------------------


class _Views:
    """The tensors a program runs on: the blocks in the stack, the two places of X and the
    temporaries at each place, all views of the bound buffers, cut to the share's blocks."""

    def __init__(self, batch: CublasNSBatch):
        g = self.g = batch.geometry
        shape, total, mm = (g.K, g.R, g.C), g.total, g.K * g.m * g.m
        self.src = g.src(batch.stack)  # the pre-scale reads it; a strided result is copied back into it
        self.norm = batch.norm
        self.identity = batch.identity
        self.device = batch.device
        if batch.in_place:
            region, s, unit, U = batch.stack, batch.shift, g.unit, g.units
            self.places = [region[:total].view(shape), region[s * unit : s * unit + total].view(shape)]
            zone0 = [region[U * unit : (U + s) * unit], region[: s * unit]]  # by the place X is in
            zone1 = region[(U + s) * unit : 2 * U * unit]
        else:
            first, second = batch.stack[:total], batch.scratch[:total]
            self.places = [first.view(shape), second.view(shape)]
            zone0 = [second, first]
            zone1 = batch.scratch[_up(total) :]
        self.temps = [{name: (zone0[pos] if z == 0 else zone1)[o : o + mm].view(g.K, g.m, g.m)
                       for name, (z, o) in batch.offsets.items()} for pos in (0, 1)]  # fmt: skip
        if batch.share is not None:  # the share's members: their blocks of every view, same memory
            first, stop = batch.share
            k0, k1 = batch.share_blocks()
            self.src, self.norm = self.src[first:stop], self.norm[first:stop]
            self.places = [x[k0:k1] for x in self.places]
            self.temps = [{name: t[k0:k1] for name, t in temps.items()} for temps in self.temps]

    def x(self, pos: int) -> torch.Tensor:
        return self.places[pos]

    def x_units(self, pos: int, lo: int, hi: int) -> torch.Tensor:
        return self.places[pos][:, lo:hi] if self.g.rows_are_units else self.places[pos][lo:hi]

    def eps(self, value: float) -> torch.Tensor:
        """ε as a 0-d tensor of the NS dtype on the device (a Python number costs each op a wrap)."""
        return torch.tensor(value, dtype=self.norm.dtype, device=self.device)

    def temp(self, name: str, pos: int) -> torch.Tensor:
        return self.temps[pos][name]

    def units_of(self, M: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return M if self.g.rows_are_units else M[lo:hi]


class _StandIns:
    """One-element tensors of the NS dtype in place of every view (a launch dry run): the program's
    Python and its ops run, the NS does not."""

    def __init__(self, batch: CublasNSBatch):
        one = lambda: torch.zeros((1, 1, 1), dtype=batch.dtype)  # noqa: E731
        self.src, self.norm = one(), one()
        self.identity = torch.ones((1, 1), dtype=batch.dtype)
        self.dtype = batch.dtype
        self.places = [one(), one()]
        self.temps = [{name: one() for name in batch.offsets} for _ in (0, 1)]

    def x(self, pos: int) -> torch.Tensor:
        return self.places[pos]

    def x_units(self, pos: int, lo: int, hi: int) -> torch.Tensor:
        return self.places[pos]

    def eps(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=self.dtype)

    def temp(self, name: str, pos: int) -> torch.Tensor:
        return self.temps[pos][name]

    def units_of(self, M: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return M


def _spectral_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """The spectral pre-scale's norms (an option, not the hot path; counted as one op)."""
    out.copy_(_ns.spectral_norm(src)[..., None, None])


class _Program:
    """The op list of one bucket's NS on `v` (the module docstring): (fn, args, kwargs) triples."""

    def __init__(self, batch: CublasNSBatch, v):
        self.b, self.v, self.g = batch, v, batch.geometry
        self.ops = []
        k0, k1 = batch.share_blocks()
        if k0 == k1:  # a share of no members: nothing to run
            return
        # the units the program runs, in the whole bucket's numbering (in place by rows: all of them)
        self.units = (0, self.g.units) if self.g.rows_are_units else (k0, k1)
        steps = len(batch.coefficients)
        n_moves = moves(batch.method, steps)
        pos = self._prescale(n_moves)
        if steps:
            pos = self._textbook(pos) if batch.method == "textbook" else self._gram(pos)
        if not self.g.contiguous:  # the result back into the strided blocks, from the second place
            if pos == 0:
                self.op(torch.Tensor.copy_, v.x(1), v.x(0))
            self.op(torch.Tensor.copy_, v.src, v.x(1).view(v.src.shape))
        elif not batch.in_place:
            assert pos == 0, "the result must end in the stack"

    def op(self, fn, *args, **kwargs) -> None:
        self.ops.append((fn, args, kwargs))

    # X at place `pos` and its Gram matrix / products, in the orientation it is stored in
    def _gram_of(self, X, out) -> None:
        if self.g.tall:
            self.op(torch.bmm, X.mT, X, out=out)
        else:
            self.op(torch.bmm, X, X.mT, out=out)

    def _times(self, M, X, out, beta=None) -> None:
        """M applied to X on its small side: M·X, or X·M when tall (M is a polynomial in the Gram
        matrix, symmetric) [+ beta·X]."""
        a, b = (X, M) if self.g.tall else (M, X)
        if beta is None:
            self.op(torch.bmm, a, b, out=out)
        else:
            self.op(torch.baddbmm, X, a, b, beta=beta, out=out)

    def _move(self, pos: int, M_name: str, beta=None) -> int:
        """X at the other place = M·X [+ beta·X]: one product, or two in place (module docstring)."""
        v, dst = self.v, 1 - pos
        M = v.temp(M_name, pos)
        if not self.b.in_place:
            self._times(M, v.x(pos), v.x(dst), beta)
            return dst
        U, s = self.g.units, self.b.shift
        u0, u1 = self.units
        halves = [(U - s, U), (0, U - s)] if pos == 0 else [(0, s), (s, U)]
        for lo, hi in halves:
            lo, hi = max(lo, u0) - u0, min(hi, u1) - u0  # the share's units of this half, in its views
            if lo < hi:
                self._times(v.units_of(M, lo, hi), v.x_units(pos, lo, hi), v.x_units(dst, lo, hi), beta)
        return dst

    def _prescale(self, n_moves: int) -> int:
        """X / max(‖X‖, ε): in place, or into the second place where an odd number of moves follows
        (sharing a scratch: X must end in the stack) or the blocks are strided (always)."""
        v, b = self.v, self.b
        if b.prescale == "spectral":
            self.op(_spectral_into, v.src, v.norm)
        else:
            self.op(torch.linalg.vector_norm, v.src, dim=(-2, -1), keepdim=True, out=v.norm)
        self.op(torch.Tensor.clamp_min_, v.norm, v.eps(b.eps))
        if not self.g.contiguous or (not b.in_place and n_moves % 2):
            self.op(torch.div, v.src, v.norm, out=v.x(1).view(v.src.shape))
            return 1
        self.op(torch.Tensor.div_, v.src, v.norm)
        return 0

    def _poly(self, A, P, coefficient) -> None:
        """P = a·I + b·A + c·A² in two launches: P = A + (a/b)·I, then P ← b·P + c·A·A in place
        (an out-of-place baddbmm first copies its input into `out`: a third launch)."""
        a, b, c = coefficient
        if b != 0:
            self.op(torch.add, A, self.v.identity, alpha=a / b, out=P)
            self.op(torch.Tensor.baddbmm_, P, A, A, beta=b, alpha=c)
        else:
            self.op(torch.mul, self.v.identity.expand_as(P), a, out=P)
            self.op(torch.Tensor.baddbmm_, P, A, A, alpha=c)

    def _textbook(self, pos: int) -> int:
        """Each step: A = X·Xᵀ, B = b·A + c·A², X ← a·X + B·X (a move; a·X added in the fp32
        accumulator: in bf16 that halves the error of rounding a·I + B first, as the Gram form's P is).
        Both baddbmm are out of place, so each first copies its input (A, X) into `out`: two launches."""
        v = self.v
        for a, b, c in self.b.coefficients:
            A, B = v.temp("A", pos), v.temp("B", pos)
            self._gram_of(v.x(pos), A)
            self.op(torch.baddbmm, A, A, A, beta=b, alpha=c, out=B)
            pos = self._move(pos, "B", beta=a)
        return pos

    def _gram(self, pos: int) -> int:
        """mango.newton_schulz.gram: R and Q on m×m blocks, X touched at restarts and at the end.
        Each step forms P = a·I + b·R + c·R², then Q ← Q·P and (where the next step needs it)
        R ← P·R·P; Q starts as P after each move of X."""
        v, coefficients = self.v, self.b.coefficients
        steps = len(coefficients)
        restarts = _ns.gram_restarts(steps)
        ends = [k for k in range(1, steps) if k in restarts] + [steps]  # the step before which each move happens
        self._gram_of(v.x(pos), v.temp("R", pos))
        q = None  # the buffer Q is in ("Qs" or "Qf"); None: Q = I, not formed yet
        for k, coefficient in enumerate(coefficients):
            if k in restarts and q is not None:
                pos = self._move(pos, q)  # X ← Q·X, R = X·Xᵀ, Q = I
                self._gram_of(v.x(pos), v.temp("R", pos))
                q = None
            R = v.temp("R", pos)
            if q is None:  # Q = P, in the buffer that Q is in when X next moves
                left = next(e for e in ends if e > k) - k - 1  # Q updates before that move
                q = "Qs" if left % 2 == 0 else "Qf"
                P = v.temp(q, pos)
                self._poly(R, P, coefficient)
            else:
                P, Q, Qn = v.temp("P", pos), v.temp(q, pos), v.temp(_other(q), pos)
                self._poly(R, P, coefficient)
                self.op(torch.bmm, Q, P, out=Qn)  # Q ← Q·P
                q = _other(q)
            if k + 1 < steps and k + 1 not in restarts:  # R ← P·R·P, through the free Q buffer
                T = v.temp(_other(q), pos)
                self.op(torch.bmm, P, R, out=T)
                self.op(torch.bmm, T, P, out=R)
        return self._move(pos, q)  # X ← Q·X


def _other(q: str) -> str:
    return "Qf" if q == "Qs" else "Qs"
