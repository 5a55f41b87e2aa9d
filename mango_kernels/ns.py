"""Batched Newton–Schulz: bf16 operands, fp32 accumulation, every NS matrix of a step at once.

The moments kernel writes each NS-bound tensor's direction d, in its natural row-major order,
into one flat *stack* buffer of the NS dtype (`NSBatch.stack`). An *item* is one matrix to
orthogonalize: a whole tensor (norm "ns") or one head block of head_dim rows of a fused-QKV
weight (norm "ns_split", MHA or GQA alike); it is described by an offset into the stack and
strides, so head blocks are a zero-copy strided batch and a tall matrix is used transposed
(rows ≤ cols) by swapping its strides, never by copying.

Items of every shape are batched together ("ragged" batches: per-item shapes in a table), so
the launch count depends on the number of NS steps, not on depth or on how many shapes exist:

* **small items** (rows ≤ `small_max_rows`, default 128: attention head blocks, small layers):
  ONE launch runs the Frobenius pre-scale and every NS step, one program per item, the Gram
  matrix A = X·Xᵀ and B on-chip (registers), X updated in place chunk by chunk (the update of
  a column chunk only needs that chunk once B is known).
* **large items**: three launches per NS step, each a ragged tile grid over all large items:
  `gram` A = X·Xᵀ on the lower-triangle tiles only, mirrored on store (A is symmetric);
  `poly` B = b·A + c·A·A, also lower triangle + mirror (A·A is symmetric); `update`
  X' = a·X + B·X into a second buffer (ping-pong: a tile of X' needs a full column panel of X).
  The Frobenius pre-scale is folded in: step 0 uses s²·A and writes s·(a·X + B·X), s = 1/‖X‖.

Both paths compute X ← a·X + B·X as X ← M·X with M = a·I + B, rounded to bf16 once (see
`_poly`: it halves the bf16 error of the step, whose a·X and B·X nearly cancel).

Pre-scale norms come from the sums of squares the moments kernel accumulated (per tensor for
"ns", per head block for "ns_split"), reduced per segment by `segment_sums`; a spectral
pre-scale (an option, not the hot path) is filled into the same slots by torch.

dtypes: bf16 (default), fp16, or fp32 operands (fp32 uses IEEE dot, not TF32). Under the
Triton interpreter low-precision operands are widened to fp32 before tl.dot (the interpreter's
bf16 dot is broken; bf16 values are exact in fp32, so this is the tensor-core math).
Per-step coefficient lists and different step counts per item are supported (items with fewer
steps skip the later launches' programs).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, device_function, launch
from ._rounding import round_to
from .elementwise import TL_DTYPES

# ld: the non-unit stride; transposed: 1 when the item is the transpose of its row-major block (stride_r = 1)
ITEM_COLUMNS = ("offset", "offset1", "rows", "cols", "ld", "transposed", "segment", "steps", "workspace")
ICOLS = len(ITEM_COLUMNS)
IC = SimpleNamespace(**{n.upper(): i for i, n in enumerate(ITEM_COLUMNS)})

_OFF0 = tl.constexpr(IC.OFFSET)
_OFF1 = tl.constexpr(IC.OFFSET1)
_R = tl.constexpr(IC.ROWS)
_C = tl.constexpr(IC.COLS)
_LD = tl.constexpr(IC.LD)
_TRANSPOSED = tl.constexpr(IC.TRANSPOSED)
_SEG = tl.constexpr(IC.SEGMENT)
_STEPS = tl.constexpr(IC.STEPS)
_WS = tl.constexpr(IC.WORKSPACE)

SMALL_MAX_ROWS = 128
ALIGN = 16  # elements: offsets in the stack are multiples of this (aligned vector access)
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class NSConfig:
    """Tile sizes; the defaults are for a GPU, smaller ones keep interpreter tests fast."""

    small_max_rows: int = SMALL_MAX_ROWS
    small_block_c: int = 32 if INTERPRET else 64
    block_m: int = 16 if INTERPRET else 128
    block_n: int = 16 if INTERPRET else 128
    block_k: int = 16 if INTERPRET else 64


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
#
# Strides come from the item table, so the compiler cannot know which one is 1: each kernel
# reads its item and calls the item/tile body in one of two specializations, row-major
# (stride_c == 1) or transposed (stride_r == 1), with the unit stride a literal and the other
# one, `ld`, from the table. With ALIGNED (host-checked: shapes, ld and offsets of every item
# of the launch are multiples of 8) those get multiple_of hints; together this turns the tile
# loads into 16-byte vector / cp.async copies instead of 2-byte gathers (checked in the PTX).


@device_function
def _operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A tl.dot operand: rounded to the NS dtype; widened back to fp32 under the interpreter."""
    if x.dtype != DTYPE:
        x = round_to(x, DTYPE, INTERPRET)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@device_function
def _item(item, ALIGNED: tl.constexpr):
    """(offset, rows, cols, leading stride, transposed) of an item; ALIGNED: all but the flag
    are multiples of 8 (hinted here, on the loads: hints on a helper's arguments are lost)."""
    off = tl.load(item + _OFF0)
    R = tl.load(item + _R)
    C = tl.load(item + _C)
    ld = tl.load(item + _LD)
    if ALIGNED:
        off = tl.multiple_of(off, 8)
        R = tl.multiple_of(R, 8)
        C = tl.multiple_of(C, 8)
        ld = tl.multiple_of(ld, 8)
    return off, R, C, ld, tl.load(item + _TRANSPOSED)


@device_function
def _inverse_scale(item, COEF, SUMS):
    """1 / max(‖X‖, eps) from the item's sum of squares (ε is column 0 of its coefficient row)."""
    eps = tl.load(COEF)
    return 1.0 / tl.maximum(tl.sqrt(tl.load(SUMS + tl.load(item + _SEG)).to(tl.float32)), eps)


@device_function
def _poly(a_op, a_sq, a, b, c, ri, rj):
    """M = a·I + b·A + c·A·A (rows ri, cols rj of it) from the rounded A and fp32 A·A.

    Two choices keep bf16 as accurate as torch's bf16 path or better: the SAME rounded A in
    both terms (b and c have opposite signs and cancel near σ ≈ 1; an fp32 A next to a bf16
    A·A doubles the error), and a·I folded in before M is rounded, so X ← a·X + B·X becomes
    X ← M·X with M's diagonal (≈ a + B_ii ≈ 0.7) rounded instead of B's (≈ −2.7): half the
    rounding error of the final NS step.
    """
    eye = ri[:, None] == rj[None, :]
    return b * a_op.to(tl.float32) + c * a_sq + tl.where(eye, a, 0.0)


@device_function
def _ns_small_item(
    x, R, C, sr, sc, coef, steps, inv,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pre-scale and every NS step of one item in place; A and M stay in registers."""
    r = tl.arange(0, BLOCK_R)
    row_ptr = x + r.to(tl.int64)[:, None] * sr
    row_mask = (r < R)[:, None]
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):  # X ← X / max(‖X‖, ε)
        ptrs = row_ptr + (c0 + cols).to(tl.int64)[None, :] * sc
        mask = row_mask & ((c0 + cols) < C)[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, round_to(v * inv, DTYPE, INTERPRET), mask=mask)
    tl.debug_barrier()  # in-place passes: make every thread's writes visible before re-reading
    for k in range(0, steps):
        a = tl.load(coef + 1 + 3 * k)
        b = tl.load(coef + 2 + 3 * k)
        c = tl.load(coef + 3 + 3 * k)
        gram = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            ptrs = row_ptr + (c0 + cols).to(tl.int64)[None, :] * sc
            mask = row_mask & ((c0 + cols) < C)[None, :]
            v = _operand(tl.load(ptrs, mask=mask, other=0.0), DTYPE, INTERPRET)
            gram = tl.dot(v, tl.trans(v), gram, input_precision=PRECISION)
        g_op = _operand(gram, DTYPE, INTERPRET)
        poly = _poly(g_op, tl.dot(g_op, g_op, input_precision=PRECISION), a, b, c, r, r)
        poly = _operand(poly, DTYPE, INTERPRET)
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):  # X ← (a·I + B)·X, chunk by chunk, in place
            ptrs = row_ptr + (c0 + cols).to(tl.int64)[None, :] * sc
            mask = row_mask & ((c0 + cols) < C)[None, :]
            v = _operand(tl.load(ptrs, mask=mask, other=0.0), DTYPE, INTERPRET)
            tl.store(ptrs, round_to(tl.dot(poly, v, input_precision=PRECISION), DTYPE, INTERPRET), mask=mask)
        tl.debug_barrier()


@triton.jit
def _ns_small_kernel(
    ITEMS, COEF, SUMS, X,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    item = ITEMS + i * ICOLS
    coef = COEF + i * FCOLS
    off, R, C, ld, transposed = _item(item, ALIGNED)
    steps = tl.load(item + _STEPS)
    inv = _inverse_scale(item, coef, SUMS)
    if transposed == 0:
        _ns_small_item(X + off, R, C, ld, 1, coef, steps, inv, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION)
    else:
        _ns_small_item(X + off, R, C, 1, ld, coef, steps, inv, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION)


@device_function
def _second_offset(item, ALIGNED: tl.constexpr):
    off1 = tl.load(item + _OFF1)
    if ALIGNED:
        off1 = tl.multiple_of(off1, 8)
    return off1


@device_function
def _ping(X0, X1, item, k, off0, ALIGNED: tl.constexpr):
    """The item's X at step k: the stack for even k, the second buffer for odd k."""
    if k % 2 == 0:
        base = X0 + off0
    else:
        base = X1 + _second_offset(item, ALIGNED)
    return base


@device_function
def _pong(X0, X1, item, k, off0, ALIGNED: tl.constexpr):
    """Where step k writes: the other buffer."""
    if k % 2 == 0:
        base = X1 + _second_offset(item, ALIGNED)
    else:
        base = X0 + off0
    return base


@device_function
def _gram_tile(
    x, ri, rj, R, C, sr, sc,
    BM: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows ri × rows rj of X·Xᵀ, fp32."""
    kk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros([BM, BM], dtype=tl.float32)
    for c0 in range(0, C, BK):
        cm = ((c0 + kk) < C)[None, :]
        xi = tl.load(x + ri[:, None] * sr + (c0 + kk)[None, :] * sc, mask=(ri < R)[:, None] & cm, other=0.0)
        xj = tl.load(x + rj[:, None] * sr + (c0 + kk)[None, :] * sc, mask=(rj < R)[:, None] & cm, other=0.0)
        acc = tl.dot(_operand(xi, DTYPE, INTERPRET), tl.trans(_operand(xj, DTYPE, INTERPRET)), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["k"])
def _ns_gram_kernel(
    ITEMS, COEF, SUMS, TILES, X0, X1, WA, k,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0).to(tl.int64)
    i = tl.load(TILES + 3 * q)
    ti = tl.load(TILES + 3 * q + 1)
    tj = tl.load(TILES + 3 * q + 2)
    item = ITEMS + i * ICOLS
    if k < tl.load(item + _STEPS):
        off, R, C, ld, transposed = _item(item, ALIGNED)
        x = _ping(X0, X1, item, k, off, ALIGNED)
        ri = (ti * BM + tl.arange(0, BM)).to(tl.int64)
        rj = (tj * BM + tl.arange(0, BM)).to(tl.int64)
        if transposed == 0:
            acc = _gram_tile(x, ri, rj, R, C, ld, 1, BM, BK, DTYPE, INTERPRET, PRECISION)
        else:
            acc = _gram_tile(x, ri, rj, R, C, 1, ld, BM, BK, DTYPE, INTERPRET, PRECISION)
        if k == 0:  # Frobenius pre-scale folded in: A = s²·X·Xᵀ
            inv = _inverse_scale(item, COEF + i * FCOLS, SUMS)
            acc = acc * (inv * inv)
        ws = WA + tl.load(item + _WS)
        tl.store(ws + ri[:, None] * R + rj[None, :], acc, mask=(ri < R)[:, None] & (rj < R)[None, :])
        if ti != tj:  # mirror into the upper triangle
            tl.store(ws + rj[:, None] * R + ri[None, :], tl.trans(acc), mask=(rj < R)[:, None] & (ri < R)[None, :])


@triton.jit(do_not_specialize=["k"])
def _ns_poly_kernel(
    ITEMS, COEF, TILES, WA, WB, k,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0).to(tl.int64)
    i = tl.load(TILES + 3 * q)
    ti = tl.load(TILES + 3 * q + 1)
    tj = tl.load(TILES + 3 * q + 2)
    item = ITEMS + i * ICOLS
    if k < tl.load(item + _STEPS):
        coef = COEF + i * FCOLS
        a = tl.load(coef + 1 + 3 * k)
        b = tl.load(coef + 2 + 3 * k)
        c = tl.load(coef + 3 + 3 * k)
        off, R, C, ld, transposed = _item(item, ALIGNED)
        ws_off = tl.load(item + _WS)
        if ALIGNED:
            ws_off = tl.multiple_of(ws_off, 8)
        A = WA + ws_off
        ri = (ti * BM + tl.arange(0, BM)).to(tl.int64)
        rj = (tj * BM + tl.arange(0, BM)).to(tl.int64)
        kk = tl.arange(0, BK).to(tl.int64)
        acc = tl.zeros([BM, BM], dtype=tl.float32)
        for m0 in range(0, R, BK):
            mm = m0 + kk
            a_im = tl.load(A + ri[:, None] * R + mm[None, :], mask=(ri < R)[:, None] & (mm < R)[None, :], other=0.0)
            a_mj = tl.load(A + mm[:, None] * R + rj[None, :], mask=(mm < R)[:, None] & (rj < R)[None, :], other=0.0)
            acc = tl.dot(_operand(a_im, DTYPE, INTERPRET), _operand(a_mj, DTYPE, INTERPRET), acc, input_precision=PRECISION)
        mask = (ri < R)[:, None] & (rj < R)[None, :]
        a_ij = _operand(tl.load(A + ri[:, None] * R + rj[None, :], mask=mask, other=0.0), DTYPE, INTERPRET)
        poly = _poly(a_ij, acc, a, b, c, ri, rj)
        B = WB + ws_off
        tl.store(B + ri[:, None] * R + rj[None, :], poly, mask=mask)
        if ti != tj:
            tl.store(B + rj[:, None] * R + ri[None, :], tl.trans(poly), mask=(rj < R)[:, None] & (ri < R)[None, :])


@device_function
def _update_tile(
    x, y, B, ri, cj, R, C, sr, sc, scale,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Y[ri, cj] = scale · (M·X)[ri, cj] with M = a·I + B from the workspace."""
    kk = tl.arange(0, BK).to(tl.int64)
    col_mask = (cj < C)[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for m0 in range(0, R, BK):
        mm = m0 + kk
        b_im = tl.load(B + ri[:, None] * R + mm[None, :], mask=(ri < R)[:, None] & (mm < R)[None, :], other=0.0)
        x_mj = tl.load(x + mm[:, None] * sr + cj[None, :] * sc, mask=(mm < R)[:, None] & col_mask, other=0.0)
        acc = tl.dot(_operand(b_im, DTYPE, INTERPRET), _operand(x_mj, DTYPE, INTERPRET), acc, input_precision=PRECISION)
    out = round_to(acc * scale, DTYPE, INTERPRET)
    tl.store(y + ri[:, None] * sr + cj[None, :] * sc, out, mask=(ri < R)[:, None] & col_mask)


@triton.jit(do_not_specialize=["k"])
def _ns_update_kernel(
    ITEMS, COEF, SUMS, TILES, X0, X1, WB, k,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0).to(tl.int64)
    i = tl.load(TILES + 3 * q)
    ti = tl.load(TILES + 3 * q + 1)
    tj = tl.load(TILES + 3 * q + 2)
    item = ITEMS + i * ICOLS
    if k < tl.load(item + _STEPS):
        off, R, C, ld, transposed = _item(item, ALIGNED)
        ws_off = tl.load(item + _WS)
        if ALIGNED:
            ws_off = tl.multiple_of(ws_off, 8)
        x = _ping(X0, X1, item, k, off, ALIGNED)
        y = _pong(X0, X1, item, k, off, ALIGNED)
        scale = 1.0
        if k == 0:  # s·(M·X) with M built from s²·A
            scale = _inverse_scale(item, COEF + i * FCOLS, SUMS)
        ri = (ti * BM + tl.arange(0, BM)).to(tl.int64)
        cj = (tj * BN + tl.arange(0, BN)).to(tl.int64)
        if transposed == 0:
            _update_tile(x, y, WB + ws_off, ri, cj, R, C, ld, 1, scale, BM, BN, BK, DTYPE, INTERPRET, PRECISION)
        else:
            _update_tile(x, y, WB + ws_off, ri, cj, R, C, 1, ld, scale, BM, BN, BK, DTYPE, INTERPRET, PRECISION)


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------


@dataclass
class NSSpec:
    """One NS-bound tensor: n_blocks matrices of (rows, cols), row-major, consecutive in the stack."""

    rows: int
    cols: int
    n_blocks: int = 1
    segment: int = 0  # sums index of block 0; block j uses segment + j
    steps: int = 5
    coefficients: tuple = ((3.4445, -4.7750, 2.0315),) * 5
    eps: float = 1e-7

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.n_blocks


def _tiles(n_row_tiles: torch.Tensor, n_col_tiles: torch.Tensor, lower_only: bool) -> torch.Tensor:
    """[(item, ti, tj)] for every item: the lower triangle of an n×n grid, or the full n×m grid."""
    rows = []
    for i, (nr, nc) in enumerate(zip(n_row_tiles.tolist(), n_col_tiles.tolist())):
        ti, tj = torch.meshgrid(torch.arange(nr), torch.arange(nc), indexing="ij")
        ti, tj = ti.reshape(-1), tj.reshape(-1)
        if lower_only:
            keep = tj <= ti
            ti, tj = ti[keep], tj[keep]
        rows.append(torch.stack([torch.full_like(ti, i), ti, tj], 1))
    return torch.cat(rows).contiguous() if rows else torch.zeros((0, 3), dtype=torch.int64)


class NSBatch:
    """Every NS item of one NS dtype: the stack buffer the moments kernel writes, item tables,
    tile tables and workspaces. Built once per plan; `set_schedule` follows per-step changes
    of ns_steps / coefficients / ns_eps without rebuilding."""

    def __init__(self, specs: list[NSSpec], dtype: torch.dtype, device, config: NSConfig = None):
        if dtype not in NS_DTYPES:
            raise ValueError(f"mango_kernels: Newton–Schulz kernels take {NS_DTYPES}, got {dtype}")
        self.specs = list(specs)
        self.dtype = dtype
        self.device = torch.device(device)
        self.config = config or NSConfig()
        self.spec_offset = []
        off = 0
        for s in self.specs:
            self.spec_offset.append(off)
            off += -(-s.numel // ALIGN) * ALIGN  # keep every tensor's d 16-element aligned
        self.stack = torch.empty(max(off, 1), dtype=dtype, device=self.device)
        self._build_items()
        self._schedule_key = None

    # -- structure -------------------------------------------------------------------------
    def _build_items(self) -> None:
        cfg = self.config
        rows = []  # (spec index, block index, offset, R, C, ld, transposed)
        for si, s in enumerate(self.specs):
            for j in range(s.n_blocks):
                off = self.spec_offset[si] + j * s.rows * s.cols
                if s.rows <= s.cols:  # row-major block, used as is: stride_r = ld = cols, stride_c = 1
                    rows.append((si, j, off, s.rows, s.cols, s.cols, 0))
                else:  # tall: use Xᵀ by swapping strides, no copy: stride_r = 1, stride_c = ld = cols
                    rows.append((si, j, off, s.cols, s.rows, s.cols, 1))
        self.item_spec = [r[0] for r in rows]
        self.item_block = [r[1] for r in rows]
        small = [k for k, r in enumerate(rows) if r[3] <= cfg.small_max_rows]
        large = [k for k, r in enumerate(rows) if r[3] > cfg.small_max_rows]
        self.small, self.large = small, large
        self.spec_is_large = [False] * len(self.specs)
        for k in large:
            self.spec_is_large[rows[k][0]] = True

        def table(indices, second_offsets, workspace):
            t = torch.zeros((len(indices), ICOLS), dtype=torch.int64)
            for n, k in enumerate(indices):
                si, j, off, R, C, ld, transposed = rows[k]
                t[n] = torch.tensor([off, second_offsets[n], R, C, ld, transposed, 0, 0, workspace[n]])
            return t

        # large items: compact offsets in the second buffer and R×R fp32 workspaces
        off1, ws = [], []
        n1 = nws = 0
        for k in large:
            R, C = rows[k][3], rows[k][4]
            # the second buffer mirrors the stack's layout for the spec, so strides carry over
            off1.append(n1 + (rows[k][2] - self.spec_offset[rows[k][0]]))
            ws.append(nws)
            nws += R * R
            if rows[k][1] == self.specs[rows[k][0]].n_blocks - 1:
                n1 += -(-self.specs[rows[k][0]].numel // ALIGN) * ALIGN
        self.small_items_host = table(small, [0] * len(small), [0] * len(small))
        self.large_items_host = table(large, off1, ws)
        # vectorizable launches: every offset, shape and leading stride a multiple of 8 elements
        aligned = lambda t: bool((t[:, [IC.OFFSET, IC.OFFSET1, IC.ROWS, IC.COLS, IC.LD, IC.WORKSPACE]] % 8 == 0).all())  # noqa: E731
        self.small_aligned = aligned(self.small_items_host)
        self.large_aligned = aligned(self.large_items_host)
        self.small_block_r = max(16, triton.next_power_of_2(max((rows[k][3] for k in small), default=1)))
        self.large_second_offset = {}  # spec index -> offset of the spec in the second buffer
        for n, k in enumerate(large):
            if rows[k][1] == 0:
                self.large_second_offset[rows[k][0]] = off1[n]

        dev = self.device
        self.buffer1 = torch.empty(max(n1, 1), dtype=self.dtype, device=dev)
        self.workspace_a = torch.empty(max(nws, 1), dtype=torch.float32, device=dev)
        self.workspace_b = torch.empty(max(nws, 1), dtype=torch.float32, device=dev)
        R = self.large_items_host[:, IC.ROWS]
        C = self.large_items_host[:, IC.COLS]
        bm, bn = cfg.block_m, cfg.block_n
        self.tri_tiles = _tiles((R + bm - 1) // bm, (R + bm - 1) // bm, lower_only=True).to(dev)
        self.full_tiles = _tiles((R + bm - 1) // bm, (C + bn - 1) // bn, lower_only=False).to(dev)

    # -- per-step schedule -------------------------------------------------------------------
    def set_schedule(self, segments: list[int], steps: list[int], coefficients: list, eps: list[float]) -> None:
        """Per spec: segment id of block 0, NS steps, (a, b, c) per step, ε. Uploads on change."""
        key = (tuple(segments), tuple(steps), tuple(map(tuple, coefficients)), tuple(eps))
        if key == self._schedule_key:
            return
        self._schedule_key = key
        for s, seg, n, co, e in zip(self.specs, segments, steps, coefficients, eps):
            s.segment, s.steps, s.coefficients, s.eps = seg, n, tuple(co), e
        self.max_steps = max([s.steps for s in self.specs], default=0)
        self.fcols = 1 + 3 * max(self.max_steps, 1)

        def finish(host, indices):
            host = host.clone()
            coef = torch.zeros((len(indices), self.fcols), dtype=torch.float32)
            for n, k in enumerate(indices):
                s = self.specs[self.item_spec[k]]
                host[n, IC.SEGMENT] = s.segment + self.item_block[k]
                host[n, IC.STEPS] = s.steps
                coef[n, 0] = s.eps
                if s.steps:
                    coef[n, 1 : 1 + 3 * s.steps] = torch.tensor(s.coefficients, dtype=torch.float64).reshape(-1).float()
            return host.to(self.device), coef.to(self.device)

        self.small_items, self.small_coef = finish(self.small_items_host, self.small)
        self.large_items, self.large_coef = finish(self.large_items_host, self.large)
        self.large_max_steps = max([self.specs[self.item_spec[k]].steps for k in self.large], default=0)

    # -- addresses the elementwise kernels need ----------------------------------------------------
    def input_view(self, spec_index: int) -> torch.Tensor:
        """(n_blocks, rows, cols) view of the spec's d in the stack (what the moments kernel writes)."""
        s = self.specs[spec_index]
        off = self.spec_offset[spec_index]
        return self.stack[off : off + s.numel].view(s.n_blocks, s.rows, s.cols)

    def output_view(self, spec_index: int) -> torch.Tensor:
        """(n_blocks, rows, cols) view where the spec's NS result is after `run` (depends on steps)."""
        s = self.specs[spec_index]
        if self.spec_is_large[spec_index] and s.steps % 2 == 1:
            off = self.large_second_offset[spec_index]
            return self.buffer1[off : off + s.numel].view(s.n_blocks, s.rows, s.cols)
        return self.input_view(spec_index)

    # -- launch ---------------------------------------------------------------------------
    def run(self, sums: torch.Tensor) -> None:
        """Newton–Schulz on every item; `sums[item segment]` holds ‖X‖² for the pre-scale."""
        cfg = self.config
        common = dict(DTYPE=TL_DTYPES[self.dtype], INTERPRET=INTERPRET, PRECISION="ieee" if self.dtype == torch.float32 else "tf32")
        if self.small:
            br = self.small_block_r
            launch(
                "ns_small", _ns_small_kernel, (len(self.small),),
                self.small_items, self.small_coef, sums, self.stack,
                ICOLS=ICOLS, FCOLS=self.fcols, BLOCK_R=br, BLOCK_C=cfg.small_block_c if br <= 64 else max(16, cfg.small_block_c // 2),
                ALIGNED=self.small_aligned, num_warps=4 if br <= 64 else 8, **common,
            )  # fmt: skip
        items, coef = self.large_items, self.large_coef
        x0, x1 = self.stack, self.buffer1
        for k in range(self.large_max_steps):
            launch(
                "ns_gram", _ns_gram_kernel, (self.tri_tiles.shape[0],),
                items, coef, sums, self.tri_tiles, x0, x1, self.workspace_a, k,
                ICOLS=ICOLS, FCOLS=self.fcols, BM=cfg.block_m, BK=cfg.block_k, ALIGNED=self.large_aligned, num_warps=8, num_stages=3, **common,
            )  # fmt: skip
            launch(
                "ns_poly", _ns_poly_kernel, (self.tri_tiles.shape[0],),
                items, coef, self.tri_tiles, self.workspace_a, self.workspace_b, k,
                ICOLS=ICOLS, FCOLS=self.fcols, BM=cfg.block_m, BK=cfg.block_k, ALIGNED=self.large_aligned, num_warps=8, num_stages=3, **common,
            )  # fmt: skip
            launch(
                "ns_update", _ns_update_kernel, (self.full_tiles.shape[0],),
                items, coef, sums, self.full_tiles, x0, x1, self.workspace_b, k,
                ICOLS=ICOLS, FCOLS=self.fcols, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, ALIGNED=self.large_aligned,
                num_warps=8, num_stages=3, **common,
            )  # fmt: skip


def newton_schulz(
    X: torch.Tensor,
    coefficients,
    eps: float = 1e-7,
    *,
    head_dim: int = None,
    dtype: torch.dtype = torch.bfloat16,
    prescale: str = "frobenius",
    config: NSConfig = None,
) -> torch.Tensor:
    """Standalone batched NS of a (B, rows, cols) or (rows, cols) tensor (kernel tests, bench).

    `coefficients`: one (a, b, c) per step. `head_dim` splits rows into head blocks (the
    ns_split layout). Returns the result in `dtype`, same shape as X. The sums of squares
    (or squared spectral norms) are computed here with torch; the optimizer gets them from
    the moments kernel instead.
    """
    squeeze = X.dim() == 2
    X3 = X.unsqueeze(0) if squeeze else X
    B, rows, cols = X3.shape
    hd = head_dim or rows
    if rows % hd:
        raise ValueError(f"head_dim={hd} does not divide rows={rows}")
    coefficients = [tuple(map(float, c)) for c in coefficients]
    specs = [NSSpec(hd, cols, rows // hd, segment=b * (rows // hd)) for b in range(B)]
    batch = NSBatch(specs, dtype, X.device, config)
    for b in range(B):
        batch.input_view(b).copy_(X3[b].reshape(-1, hd, cols))
    blocks = torch.cat([batch.input_view(b) for b in range(B)]).float()
    if prescale == "frobenius":
        sums = blocks.square().sum(dim=(-2, -1))
    else:
        sums = torch.linalg.matrix_norm(blocks.double(), ord=2).square().float()
    steps = len(coefficients)
    batch.set_schedule([s.segment for s in specs], [steps] * B, [coefficients] * B, [eps] * B)
    batch.run(sums.contiguous())
    out = torch.stack([batch.output_view(b) for b in range(B)]).reshape(B, rows, cols)
    return out[0] if squeeze else out
