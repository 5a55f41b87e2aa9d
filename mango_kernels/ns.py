"""Batched Newton–Schulz: low-precision operands, fp32 accumulation, every NS matrix of a step at once.

The moments kernel writes each NS-bound tensor's direction d, in its natural storage order, into
one flat *stack* buffer of the NS dtype (`NSBatch.stack`). An *item* is one matrix to orthogonalize:
a whole operator (norm "ns"), one expert of a stacked MoE weight, or one head block of a fused-QKV
weight (norm "ns_split"). An `NSSpec` lists a tensor's items as (offset, rows, cols, row stride,
col stride) in its stretch of the stack, so operators stored transposed (HF Conv1D: head blocks are
*column* blocks), experts and heads are zero-copy strided matrices; a tall item is used transposed
(rows ≤ cols) by swapping strides, never by copying. NS is invariant under transposition, so an item
may be given in either orientation; only the host's shape factor cares which is the operator's.

Items of every shape are batched together ("ragged" batches: per-item shapes in a table), so the
launch count depends on the number of NS steps, not on depth or on how many shapes exist.

Textbook form (X ← a·X + B·X with A = X·Xᵀ, B = b·A + c·A²):
* **small items** (rows ≤ `small_max_rows`, default 128: attention head blocks, small layers):
  ONE launch runs the pre-scale and every NS step, one program per item, A and B on-chip.
* **large items**: three launches per step over a ragged tile grid: `gram` A = X·Xᵀ (lower
  triangle, mirrored), `poly` M = a·I + b·A + c·A·A (lower triangle, mirrored), `update`
  X' = M·X into a second buffer (ping-pong).

Gram form (`method="gram"`, see mango.newton_schulz: iterate on R = X·Xᵀ and Q, touch X only for R
and the final Q·X, restart every 3 steps from step 2):
* **small items** (rows ≤ `gram_small_max_rows`, default 64): ONE launch; R, Q and P = a·I + Z
  on-chip; X is read for R, rewritten in place at restarts and at the end.
* **large items**: `gram` for R, the m×m iteration as batched matmuls on the host's device (torch,
  in the NS dtype, one call per product for all items of the same size), `update` for Q·X.

Pre-scaling: X / max(‖X‖_F, ε) is computed from the data itself (‖X‖² = trace(X·Xᵀ) on the tiled
paths, a first pass on the small ones), so tensors need no reduction segments in the moments pass;
a spectral pre-scale (an option) is filled into `sums` by the host (`prescale_from_sums`).

dtypes: bf16 (the textbook default), fp16 (the Gram form's: its 10 mantissa bits hold the Gram
iterates), or fp32 (IEEE dot). Under the Triton interpreter low-precision operands are widened to
fp32 before tl.dot (its bf16 dot is broken; bf16/fp16 values are exact in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, device_function, launch, record
from ._rounding import round_to
from .elementwise import TL_DTYPES

# ld: the non-unit stride; transposed: 1 when stride_r = 1 (stride_c = ld); scale_mode: 0 pre-scale
# from the data (Frobenius), 1 from sums[segment] (a squared norm the host filled in)
ITEM_COLUMNS = ("offset", "offset1", "rows", "cols", "ld", "transposed", "segment", "steps", "workspace", "scale_mode", "restarts")
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
_SCALE_MODE = tl.constexpr(IC.SCALE_MODE)
_RESTARTS = tl.constexpr(IC.RESTARTS)

SMALL_MAX_ROWS = 128
GRAM_SMALL_MAX_ROWS = 64  # R, Q and P (fp32, rows²) stay in registers up to this size
ALIGN = 16  # elements: offsets in the stack are multiples of this (aligned vector access)
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
METHODS = ("textbook", "gram")


def gram_restarts(steps: int) -> tuple:
    """Steps before which the Gram form recomputes X = Q·X and R (mango.newton_schulz.gram_restarts)."""
    return tuple(range(2, steps, 3))


@dataclass
class NSConfig:
    """Tile sizes; the defaults are for a GPU, smaller ones keep interpreter tests fast."""

    small_max_rows: int = SMALL_MAX_ROWS
    gram_small_max_rows: int = GRAM_SMALL_MAX_ROWS
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
# loads into 16-byte vector / cp.async copies instead of 2-byte gathers.


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
def _inverse_scale(item, COEF, SUMS, sumsq):
    """1 / max(‖X‖, eps): from `sumsq` (the data's Σx²) or, in scale mode 1, from sums[segment]."""
    eps = tl.load(COEF)
    if tl.load(item + _SCALE_MODE) != 0:
        sumsq = tl.load(SUMS + tl.load(item + _SEG)).to(tl.float32)
    return 1.0 / tl.maximum(tl.sqrt(sumsq), eps)


@device_function
def _trace(A, R, BK: tl.constexpr):
    """Σ_i A[i, i] of an R×R fp32 workspace matrix (‖X‖² when A = X·Xᵀ)."""
    kk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros([BK], dtype=tl.float32)
    for i0 in range(0, R, BK):
        ii = i0 + kk
        acc += tl.load(A + ii * R + ii, mask=ii < R, other=0.0)
    return tl.sum(acc, axis=0)


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
def _sum_squares(row_ptr, row_mask, cols, C, sc, BLOCK_C: tl.constexpr):
    """Σx² of an item (as stored), in fp32."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ptrs = row_ptr + (c0 + cols).to(tl.int64)[None, :] * sc
        mask = row_mask & ((c0 + cols) < C)[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=0)
    return tl.sum(acc, axis=0)


@device_function
def _item_rows(x, R, sr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row indices, row pointers, the row mask and column offsets of an on-chip item."""
    r = tl.arange(0, BLOCK_R)
    return r, x + r.to(tl.int64)[:, None] * sr, (r < R)[:, None], tl.arange(0, BLOCK_C)


@device_function
def _ns_small_item(
    x, R, C, sr, sc, item, coef, SUMS, steps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pre-scale and every textbook NS step of one item in place; A and M stay in registers."""
    r, row_ptr, row_mask, cols = _item_rows(x, R, sr, BLOCK_R, BLOCK_C)
    inv = _inverse_scale(item, coef, SUMS, _sum_squares(row_ptr, row_mask, cols, C, sc, BLOCK_C))
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


@device_function
def _rewrite(row_ptr, row_mask, cols, C, sc, Q, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
             DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr):  # fmt: skip
    """X ← Q·X in place, chunk by chunk; returns X·Xᵀ of the new X when GRAM."""
    q_op = _operand(Q, DTYPE, INTERPRET)
    R = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ptrs = row_ptr + (c0 + cols).to(tl.int64)[None, :] * sc
        mask = row_mask & ((c0 + cols) < C)[None, :]
        v = _operand(tl.load(ptrs, mask=mask, other=0.0), DTYPE, INTERPRET)
        y = round_to(tl.dot(q_op, v, input_precision=PRECISION), DTYPE, INTERPRET)
        tl.store(ptrs, y, mask=mask)
        if GRAM:
            y_op = _operand(y, DTYPE, INTERPRET)
            R = tl.dot(y_op, tl.trans(y_op), R, input_precision=PRECISION)
    tl.debug_barrier()
    return R


@device_function
def _ns_small_gram_item(
    x, R_, C, sr, sc, item, coef, SUMS, steps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Every Gram-form NS step of one item: R = X·Xᵀ, Q and P on-chip; X rewritten at restarts and the end."""
    r, row_ptr, row_mask, cols = _item_rows(x, R_, sr, BLOCK_R, BLOCK_C)
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    R = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):  # R = X·Xᵀ of X as stored; ‖X‖² = trace(R)
        ptrs = row_ptr + (c0 + cols).to(tl.int64)[None, :] * sc
        mask = row_mask & ((c0 + cols) < C)[None, :]
        v = _operand(tl.load(ptrs, mask=mask, other=0.0), DTYPE, INTERPRET)
        R = tl.dot(v, tl.trans(v), R, input_precision=PRECISION)
    inv = _inverse_scale(item, coef, SUMS, tl.sum(tl.sum(R * eye, axis=1), axis=0))
    R = R * (inv * inv)
    Q = eye * inv  # X itself is not rescaled: the pre-scale rides on Q until X is rewritten
    restarts = tl.load(item + _RESTARTS)
    for k in range(0, steps):
        if ((restarts >> k) & 1) != 0:  # X ← Q·X, R = X·Xᵀ, Q = I
            R = _rewrite(row_ptr, row_mask, cols, C, sc, Q, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION, True)
            Q = eye
        a = tl.load(coef + 1 + 3 * k)
        b = tl.load(coef + 2 + 3 * k)
        c = tl.load(coef + 3 + 3 * k)
        r_op = _operand(R, DTYPE, INTERPRET)
        P = _operand(_poly(r_op, tl.dot(r_op, r_op, input_precision=PRECISION), a, b, c, r, r), DTYPE, INTERPRET)
        Q = tl.dot(_operand(Q, DTYPE, INTERPRET), P, input_precision=PRECISION)
        if k + 1 < steps and ((restarts >> (k + 1)) & 1) == 0:  # R ← P·R·P
            PR = _operand(tl.dot(P, r_op, input_precision=PRECISION), DTYPE, INTERPRET)
            R = tl.dot(PR, P, input_precision=PRECISION)
    _rewrite(row_ptr, row_mask, cols, C, sc, Q, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION, False)


@triton.jit
def _ns_small_kernel(
    ITEMS, COEF, SUMS, X,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, GRAM: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    item = ITEMS + i * ICOLS
    coef = COEF + i * FCOLS
    off, R, C, ld, transposed = _item(item, ALIGNED)
    steps = tl.load(item + _STEPS)
    if GRAM:
        if transposed == 0:
            _ns_small_gram_item(X + off, R, C, ld, 1, item, coef, SUMS, steps, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION)
        else:
            _ns_small_gram_item(X + off, R, C, 1, ld, item, coef, SUMS, steps, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION)
    else:
        if transposed == 0:
            _ns_small_item(X + off, R, C, ld, 1, item, coef, SUMS, steps, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION)
        else:
            _ns_small_item(X + off, R, C, 1, ld, item, coef, SUMS, steps, BLOCK_R, BLOCK_C, DTYPE, INTERPRET, PRECISION)


@device_function
def _second_offset(item, ALIGNED: tl.constexpr):
    off1 = tl.load(item + _OFF1)
    if ALIGNED:
        off1 = tl.multiple_of(off1, 8)
    return off1


@device_function
def _ping(X0, X1, item, k, off0, ALIGNED: tl.constexpr):
    """The item's X after k rewrites: the stack for even k, the second buffer for odd k."""
    if k % 2 == 0:
        base = X0 + off0
    else:
        base = X1 + _second_offset(item, ALIGNED)
    return base


@device_function
def _pong(X0, X1, item, k, off0, ALIGNED: tl.constexpr):
    """Where rewrite k writes: the other buffer."""
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
    ITEMS, TILES, X0, X1, WA, k,
    ICOLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """A = X·Xᵀ of the item's X after k rewrites (unscaled), lower triangle tiles, mirrored."""
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
        ws = WA + tl.load(item + _WS)
        tl.store(ws + ri[:, None] * R + rj[None, :], acc, mask=(ri < R)[:, None] & (rj < R)[None, :])
        if ti != tj:  # mirror into the upper triangle
            tl.store(ws + rj[:, None] * R + ri[None, :], tl.trans(acc), mask=(rj < R)[:, None] & (ri < R)[None, :])


@triton.jit(do_not_specialize=["k"])
def _ns_poly_kernel(
    ITEMS, COEF, SUMS, TILES, WA, WB, k,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """M = a·I + b·A + c·A² of step k (at step 0 of the pre-scaled X: s²·A, s = 1/max(‖X‖, ε)),
    into WB in the NS dtype (the update uses it rounded to that anyway: half the bytes of fp32)."""
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
        s2 = 1.0
        if k == 0:
            inv = _inverse_scale(item, coef, SUMS, _trace(A, R, BK))
            s2 = inv * inv
        ri = (ti * BM + tl.arange(0, BM)).to(tl.int64)
        rj = (tj * BM + tl.arange(0, BM)).to(tl.int64)
        kk = tl.arange(0, BK).to(tl.int64)
        acc = tl.zeros([BM, BM], dtype=tl.float32)
        for m0 in range(0, R, BK):
            mm = m0 + kk
            a_im = tl.load(A + ri[:, None] * R + mm[None, :], mask=(ri < R)[:, None] & (mm < R)[None, :], other=0.0) * s2
            a_mj = tl.load(A + mm[:, None] * R + rj[None, :], mask=(mm < R)[:, None] & (rj < R)[None, :], other=0.0) * s2
            acc = tl.dot(_operand(a_im, DTYPE, INTERPRET), _operand(a_mj, DTYPE, INTERPRET), acc, input_precision=PRECISION)
        mask = (ri < R)[:, None] & (rj < R)[None, :]
        a_ij = _operand(tl.load(A + ri[:, None] * R + rj[None, :], mask=mask, other=0.0) * s2, DTYPE, INTERPRET)
        poly = round_to(_poly(a_ij, acc, a, b, c, ri, rj), DTYPE, INTERPRET)  # a dot operand of the update: stored rounded
        B = WB + ws_off
        tl.store(B + ri[:, None] * R + rj[None, :], poly, mask=mask)
        if ti != tj:
            tl.store(B + rj[:, None] * R + ri[None, :], tl.trans(poly), mask=(rj < R)[:, None] & (ri < R)[None, :])


@device_function
def _update_tile(
    x, y, B, ri, cj, R, C, sr, sc, scale,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Y[ri, cj] = scale · (M·X)[ri, cj] with M from the workspace (in the NS dtype)."""
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


@triton.jit(do_not_specialize=["k", "scale_first"])
def _ns_update_kernel(
    ITEMS, COEF, SUMS, TILES, X0, X1, WA, WB, k, scale_first,
    ICOLS: tl.constexpr, FCOLS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Rewrite k: X ← M·X (M in WB) into the other buffer; with scale_first at k = 0 also × s
    (the pre-scale, from trace(A) of WA, the unscaled Gram matrix of X)."""
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
        if (k == 0) & (scale_first != 0):
            scale = _inverse_scale(item, COEF + i * FCOLS, SUMS, _trace(WA + ws_off, R, BK))
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
    """One NS-bound tensor: `numel` elements of the stack holding its d, and its items as
    (offset, rows, cols, row stride, col stride) within them (any orientation)."""

    numel: int
    blocks: list
    segment: int = 0  # sums index of item 0 (scale mode 1); item j uses segment + j
    steps: int = 5
    coefficients: tuple = ((3.4445, -4.7750, 2.0315),) * 5
    eps: float = 1e-7
    prescale_from_sums: bool = False

    @classmethod
    def row_major(cls, rows: int, cols: int, n_blocks: int = 1, **kw) -> "NSSpec":
        """n_blocks consecutive row-major (rows, cols) matrices."""
        blocks = [(j * rows * cols, rows, cols, cols, 1) for j in range(n_blocks)]
        return cls(rows * cols * n_blocks, blocks, **kw)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


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


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN) * ALIGN


def _is_large(rows: int, cols: int, method: str, config: NSConfig) -> bool:
    """Whether an item takes the tiled path (rows of its wide orientation above the on-chip limit)."""
    limit = config.gram_small_max_rows if method == "gram" else config.small_max_rows
    return min(rows, cols) > limit


def ns_buffers(specs: list, dtype: torch.dtype, method: str = "textbook", config: NSConfig = None) -> dict:
    """(numel, dtype) of each work buffer of an NSBatch for these specs: the stack, the second buffer
    of the large items, and their m×m workspaces — A (the Gram matrix, fp32) and the polynomial or Q
    (a dot operand: the NS dtype). Lets a caller size memory before building batches (the triton
    backend's rounds)."""
    config = config or NSConfig()
    stack = second = ws = 0
    for s in specs:
        stack += _aligned(s.numel)
        large = [min(r, c) for _, r, c, _, _ in s.blocks if _is_large(r, c, method, config)]
        if large:
            second += _aligned(s.numel)
            ws += sum(m * m for m in large)
    return {"stack": (stack, dtype), "buffer1": (second, dtype), "workspace_a": (ws, torch.float32), "workspace_b": (ws, dtype)}


def ns_buffer_bytes(specs: list, dtype: torch.dtype, method: str = "textbook", config: NSConfig = None) -> int:
    return sum(n * (torch.finfo(dt).bits // 8) for n, dt in ns_buffers(specs, dtype, method, config).values())


@dataclass
class _Item:
    spec: int
    block: int
    offset: int  # in the stack
    rows: int  # ≤ cols (oriented)
    cols: int
    stride_r: int
    stride_c: int
    large: bool = False
    offset1: int = 0
    workspace: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ld_transposed(self) -> tuple:
        if self.stride_c == 1:
            return self.stride_r, 0
        if self.stride_r == 1:
            return self.stride_c, 1
        raise ValueError(f"mango_kernels: NS item needs a unit stride, got strides ({self.stride_r}, {self.stride_c})")


class NSBatch:
    """Every NS item of one NS dtype and form: the stack buffer the moments kernel writes, item
    tables, tile tables and workspaces. Built once per plan; `set_schedule` follows per-step changes
    of ns_steps / coefficients / ns_eps without rebuilding."""

    def __init__(self, specs: list, dtype: torch.dtype, device, config: NSConfig = None, method: str = "textbook", bind: bool = True):
        if dtype not in NS_DTYPES:
            raise ValueError(f"mango_kernels: Newton–Schulz kernels take {NS_DTYPES}, got {dtype}")
        if method not in METHODS:
            raise ValueError(f"mango_kernels: NS method must be one of {METHODS}, got {method!r}")
        self.specs = list(specs)
        self.dtype = dtype
        self.method = method
        self.device = torch.device(device)
        self.config = config or NSConfig()
        self.spec_offset = []
        off = 0
        for s in self.specs:
            self.spec_offset.append(off)
            off += _aligned(s.numel)  # keep every tensor's d 16-element aligned
        self.sums = torch.zeros(max(1, sum(s.n_blocks for s in self.specs)), dtype=torch.float32, device=self.device)
        self._build_items()
        self._schedule_key = None
        self.buffer_sizes = ns_buffers(self.specs, dtype, method, self.config)
        if bind:
            self.bind()

    def bind(self, alloc=None) -> None:
        """Give the batch its work buffers: fresh ones, or views from `alloc(numel, dtype)` (a
        caller's arena, shared by batches that never run at the same time)."""
        alloc = alloc or (lambda n, dt: torch.empty(n, dtype=dt, device=self.device))
        for name, (n, dt) in self.buffer_sizes.items():
            setattr(self, name, alloc(max(n, 1), dt))

    @property
    def nbytes(self) -> int:
        """Bytes of the work buffers `bind` hands out."""
        return sum(max(n, 1) * (torch.finfo(dt).bits // 8) for n, dt in self.buffer_sizes.values())

    # -- structure -------------------------------------------------------------------------
    def _build_items(self) -> None:
        cfg = self.config
        items = []
        seg = 0
        for si, s in enumerate(self.specs):
            s.segment = seg
            seg += s.n_blocks
            for j, (boff, r, c, sr, sc) in enumerate(s.blocks):
                if r > c:  # use the transpose: rows ≤ cols
                    r, c, sr, sc = c, r, sc, sr
                items.append(_Item(si, j, self.spec_offset[si] + boff, r, c, sr, sc, large=_is_large(r, c, self.method, cfg)))
        self.items = items
        self.small = [k for k, it in enumerate(items) if not it.large]
        self.large = [k for k, it in enumerate(items) if it.large]
        self.spec_is_large = [False] * len(self.specs)
        for k in self.large:
            self.spec_is_large[items[k].spec] = True
        # large items: the second buffer mirrors each large spec's stretch of the stack (strides carry
        # over); R×R workspaces (A in fp32, M or Q in the NS dtype), consecutive for items of the same size (batched host matmuls).
        # `ns_buffers` counts the same sizes.
        self.large_second_offset, n1 = {}, 0
        for si, s in enumerate(self.specs):
            if self.spec_is_large[si]:
                self.large_second_offset[si] = n1
                n1 += _aligned(s.numel)
        nws = 0
        for k in sorted(self.large, key=lambda k: (items[k].rows, k)):
            it = items[k]
            it.offset1 = self.large_second_offset[it.spec] + (it.offset - self.spec_offset[it.spec])
            it.workspace = nws
            nws += it.rows * it.rows
        self.large_by_rows: dict = {}
        for k in sorted(self.large, key=lambda k: (items[k].rows, k)):
            self.large_by_rows.setdefault(items[k].rows, []).append(k)

        def table(indices):
            t = torch.zeros((len(indices), ICOLS), dtype=torch.int64)
            for n, k in enumerate(indices):
                it = items[k]
                ld, transposed = it.ld_transposed
                t[n, IC.OFFSET], t[n, IC.OFFSET1] = it.offset, it.offset1
                t[n, IC.ROWS], t[n, IC.COLS], t[n, IC.LD], t[n, IC.TRANSPOSED] = it.rows, it.cols, ld, transposed
                t[n, IC.WORKSPACE] = it.workspace
            return t

        self.small_items_host = table(self.small)
        self.large_items_host = table(self.large)
        # vectorizable launches: every offset, shape and leading stride a multiple of 8 elements
        aligned = lambda t: bool((t[:, [IC.OFFSET, IC.OFFSET1, IC.ROWS, IC.COLS, IC.LD, IC.WORKSPACE]] % 8 == 0).all())  # noqa: E731
        self.small_aligned = aligned(self.small_items_host)
        self.large_aligned = aligned(self.large_items_host)
        self.small_block_r = max(16, triton.next_power_of_2(max((items[k].rows for k in self.small), default=1)))

        dev = self.device
        R = self.large_items_host[:, IC.ROWS]
        C = self.large_items_host[:, IC.COLS]
        bm, bn = cfg.block_m, cfg.block_n
        self.tri_tiles = _tiles((R + bm - 1) // bm, (R + bm - 1) // bm, lower_only=True).to(dev)
        self.full_tiles = _tiles((R + bm - 1) // bm, (C + bn - 1) // bn, lower_only=False).to(dev)

    # -- per-step schedule -------------------------------------------------------------------
    def set_schedule(self, steps: list, coefficients: list, eps: list, prescale_from_sums: list = None) -> None:
        """Per spec: NS steps, (a, b, c) per step, ε, and whether its pre-scale comes from `sums`
        (the host filled it: spectral). Uploads on change. The Gram form's large items must share one
        schedule (the host runs their m×m iteration as one batch)."""
        prescale_from_sums = prescale_from_sums or [False] * len(self.specs)
        key = (tuple(steps), tuple(map(tuple, coefficients)), tuple(eps), tuple(prescale_from_sums))
        if key == self._schedule_key:
            return
        self._schedule_key = key
        for s, n, co, e, ps in zip(self.specs, steps, coefficients, eps, prescale_from_sums):
            s.steps, s.coefficients, s.eps, s.prescale_from_sums = n, tuple(co), e, bool(ps)
        if self.method == "gram" and self.large:
            schedules = {(self.specs[self.items[k].spec].steps, self.specs[self.items[k].spec].coefficients) for k in self.large}
            if len(schedules) > 1:
                raise ValueError("mango_kernels: the Gram form's large items of one batch need one NS schedule")
        self.max_steps = max([s.steps for s in self.specs], default=0)
        self.fcols = 1 + 3 * max(self.max_steps, 1)

        def finish(host, indices):
            host = host.clone()
            coef = torch.zeros((len(indices), self.fcols), dtype=torch.float32)
            for n, k in enumerate(indices):
                it = self.items[k]
                s = self.specs[it.spec]
                host[n, IC.SEGMENT] = s.segment + it.block
                host[n, IC.STEPS] = s.steps
                host[n, IC.SCALE_MODE] = int(s.prescale_from_sums)
                host[n, IC.RESTARTS] = sum(1 << r for r in gram_restarts(s.steps)) if self.method == "gram" else 0
                coef[n, 0] = s.eps
                if s.steps:
                    coef[n, 1 : 1 + 3 * s.steps] = torch.tensor(s.coefficients, dtype=torch.float64).reshape(-1).float()
            return host.to(self.device), coef.to(self.device)

        self.small_items, self.small_coef = finish(self.small_items_host, self.small)
        self.large_items, self.large_coef = finish(self.large_items_host, self.large)
        self.large_max_steps = max([self.specs[self.items[k].spec].steps for k in self.large], default=0)

    # -- what the elementwise kernels and the host need -----------------------------------------
    def input_view(self, spec_index: int) -> torch.Tensor:
        """The spec's stretch of the stack (what the moments kernel writes), flat."""
        off = self.spec_offset[spec_index]
        return self.stack[off : off + self.specs[spec_index].numel]

    def _rewrites(self, spec_index: int) -> int:
        """How many times the large path rewrites a spec's X into the other buffer."""
        s = self.specs[spec_index]
        if self.method == "gram":
            return (1 + len(gram_restarts(s.steps))) if s.steps else 0
        return s.steps

    def output_view(self, spec_index: int) -> torch.Tensor:
        """Where the spec's NS result is after `run` (flat, same layout as `input_view`)."""
        s = self.specs[spec_index]
        if self.spec_is_large[spec_index] and self._rewrites(spec_index) % 2 == 1:
            off = self.large_second_offset[spec_index]
            return self.buffer1[off : off + s.numel]
        return self.input_view(spec_index)

    def block_views(self, spec_index: int, out: bool = False) -> list:
        """Strided (rows, cols) views of a spec's items in the stack (or where the result is)."""
        flat = self.output_view(spec_index) if out else self.input_view(spec_index)
        return [flat.as_strided((r, c), (sr, sc), flat.storage_offset() + boff) for boff, r, c, sr, sc in self.specs[spec_index].blocks]

    # -- launch ---------------------------------------------------------------------------
    def run(self) -> None:
        """Newton–Schulz on every item (pre-scaled from its data, or from `sums` where asked)."""
        cfg = self.config
        sums = self.sums
        common = dict(DTYPE=TL_DTYPES[self.dtype], INTERPRET=INTERPRET, PRECISION="ieee" if self.dtype == torch.float32 else "tf32")
        gram = self.method == "gram"
        if self.small:
            br = self.small_block_r
            launch(
                "ns_small_gram" if gram else "ns_small", _ns_small_kernel, (len(self.small),),
                self.small_items, self.small_coef, sums, self.stack,
                ICOLS=ICOLS, FCOLS=self.fcols, BLOCK_R=br, BLOCK_C=cfg.small_block_c if br <= 64 else max(16, cfg.small_block_c // 2),
                ALIGNED=self.small_aligned, GRAM=gram, num_warps=(8 if gram else 4) if br <= 64 else 8, **common,
            )  # fmt: skip
        if not self.large:
            return
        if gram:
            self._run_large_gram(sums, common)
            return
        items, coef = self.large_items, self.large_coef
        x0, x1 = self.stack, self.buffer1
        for k in range(self.large_max_steps):
            self._launch_gram(k, common)
            launch(
                "ns_poly", _ns_poly_kernel, (self.tri_tiles.shape[0],),
                items, coef, sums, self.tri_tiles, self.workspace_a, self.workspace_b, k,
                ICOLS=ICOLS, FCOLS=self.fcols, BM=cfg.block_m, BK=cfg.block_k, ALIGNED=self.large_aligned, num_warps=8, num_stages=3, **common,
            )  # fmt: skip
            self._launch_update(k, 1, common)

    def _launch_gram(self, k: int, common: dict) -> None:
        cfg = self.config
        launch(
            "ns_gram", _ns_gram_kernel, (self.tri_tiles.shape[0],),
            self.large_items, self.tri_tiles, self.stack, self.buffer1, self.workspace_a, k,
            ICOLS=ICOLS, BM=cfg.block_m, BK=cfg.block_k, ALIGNED=self.large_aligned, num_warps=8, num_stages=3, **common,
        )  # fmt: skip

    def _launch_update(self, k: int, scale_first: int, common: dict) -> None:
        cfg = self.config
        launch(
            "ns_update", _ns_update_kernel, (self.full_tiles.shape[0],),
            self.large_items, self.large_coef, self.sums, self.full_tiles, self.stack, self.buffer1,
            self.workspace_a, self.workspace_b, k, scale_first,
            ICOLS=ICOLS, FCOLS=self.fcols, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, ALIGNED=self.large_aligned,
            num_warps=8, num_stages=3, **common,
        )  # fmt: skip

    def _run_large_gram(self, sums, common) -> None:
        """The Gram form of the large items: R by the `gram` kernel, the m×m iteration as batched
        matmuls (one per product for all items of a size, in the NS dtype), Q·X by `update`.
        Per item size m: R (the current Gram matrix), Q, and the pre-scale s not yet applied to X."""
        s = self.specs[self.items[self.large[0]].spec]
        steps, coefficients = s.steps, s.coefficients
        if steps == 0:
            return  # pre-scale alone: the caller's job (as on the textbook path)
        restarts = gram_restarts(steps)
        rewrite = 0
        self._launch_gram(rewrite, common)
        Rs, Qs, scales = {}, {}, {}
        for m, ks in self.large_by_rows.items():  # R of the pre-scaled X: s²·X·Xᵀ
            A = self._ws_view(self.workspace_a, m, ks)
            scales[m] = self._inverse_scales(ks, A, sums)
            Rs[m] = (A * scales[m][:, None, None] ** 2).to(self.dtype)
            record("ns_gram_prepare", 5)
        for k, (a, b, c) in enumerate(coefficients):
            if k in restarts:  # X ← Q·X (× s the first time), R = X·Xᵀ, Q = I
                self._store_q(Qs, scales)
                self._launch_update(rewrite, 0, common)
                rewrite += 1
                self._launch_gram(rewrite, common)
                Rs = {m: self._ws_view(self.workspace_a, m, ks).to(self.dtype) for m, ks in self.large_by_rows.items()}
                Qs, scales = {}, {}
                record("ns_gram_prepare", len(Rs))
            for m in self.large_by_rows:
                R, q = Rs[m], Qs.get(m)
                P = torch.baddbmm(R, R, R, beta=b, alpha=c)  # Z = b·R + c·R²
                P.diagonal(dim1=-2, dim2=-1).add_(a)
                Qs[m] = P if q is None else torch.bmm(q, P)
                update = k + 1 < steps and k + 1 not in restarts
                if update:
                    Rs[m] = torch.bmm(torch.bmm(P, R), P)
                record("ns_gram_iterate", 2 + (q is not None) + 2 * update)
        self._store_q(Qs, scales)
        self._launch_update(rewrite, 0, common)

    def _ws_view(self, ws: torch.Tensor, m: int, ks: list) -> torch.Tensor:
        start = self.items[ks[0]].workspace
        return ws[start : start + len(ks) * m * m].view(len(ks), m, m)

    def _inverse_scales(self, ks, A, prescale_sums) -> torch.Tensor:
        """1 / max(‖X‖, ε) per item: ‖X‖² = trace(A) of the unscaled Gram matrix, or the host's sums."""
        eps = torch.tensor([self.specs[self.items[k].spec].eps for k in ks], dtype=torch.float32, device=A.device)
        from_sums = torch.tensor([self.specs[self.items[k].spec].prescale_from_sums for k in ks], device=A.device)
        seg = torch.tensor([self.specs[self.items[k].spec].segment + self.items[k].block for k in ks], device=A.device)
        sq = torch.where(from_sums, prescale_sums[seg], A.diagonal(dim1=-2, dim2=-1).sum(-1))
        return 1.0 / torch.maximum(sq.sqrt(), eps)

    def _store_q(self, Qs: dict, scales: dict) -> None:
        """Q of every large item into workspace B (the NS dtype), × the pre-scale s (in fp32, then
        rounded once) where X does not carry it yet."""
        for m, ks in self.large_by_rows.items():
            W = self._ws_view(self.workspace_b, m, ks)
            q = Qs.get(m)
            q = torch.eye(m, device=W.device).expand_as(W) if q is None else q.float()
            W.copy_(q * scales[m][:, None, None] if m in scales else q)
            record("ns_gram_store", 2 if m in scales else 1)


def newton_schulz(
    X: torch.Tensor,
    coefficients,
    eps: float = 1e-7,
    *,
    head_dim: int = None,
    dtype: torch.dtype = torch.bfloat16,
    prescale: str = "frobenius",
    config: NSConfig = None,
    method: str = "textbook",
) -> torch.Tensor:
    """Standalone batched NS of a (B, rows, cols) or (rows, cols) tensor (kernel tests, bench).

    `coefficients`: one (a, b, c) per step. `head_dim` splits rows into head blocks (the
    ns_split layout). Returns the result in `dtype`, same shape as X. A spectral pre-scale is
    computed here with torch and handed to the kernels through `sums`.
    """
    squeeze = X.dim() == 2
    X3 = X.unsqueeze(0) if squeeze else X
    B, rows, cols = X3.shape
    hd = head_dim or rows
    if rows % hd:
        raise ValueError(f"head_dim={hd} does not divide rows={rows}")
    coefficients = [tuple(map(float, c)) for c in coefficients]
    specs = [NSSpec.row_major(hd, cols, rows // hd) for _ in range(B)]
    batch = NSBatch(specs, dtype, X.device, config, method=method)
    for b in range(B):
        batch.input_view(b).copy_(X3[b].reshape(-1))
    spectral = prescale == "spectral"
    if spectral:
        blocks = torch.cat([torch.stack(batch.block_views(b)) for b in range(B)]).double()
        batch.sums.copy_(torch.linalg.matrix_norm(blocks, ord=2).square().float())
    steps = len(coefficients)
    batch.set_schedule([steps] * B, [coefficients] * B, [eps] * B, [spectral] * B)
    batch.run()
    if steps == 0:
        prescale_only(batch, range(B))
    out = torch.stack([batch.output_view(b) for b in range(B)]).reshape(B, rows, cols)
    return out[0] if squeeze else out


def prescale_only(batch: NSBatch, spec_indices) -> None:
    """ns_steps = 0 on the large path: X / max(‖X‖, ε) per item, by torch (not the hot path)."""
    for si in spec_indices:
        if not batch.spec_is_large[si]:
            continue
        s = batch.specs[si]
        for j, v in enumerate(batch.block_views(si)):
            norm = batch.sums[s.segment + j].sqrt() if s.prescale_from_sums else torch.linalg.vector_norm(v.float())
            v.copy_((v.float() / norm.clamp_min(s.eps)).to(v.dtype))
        record("ns_zero_steps")

