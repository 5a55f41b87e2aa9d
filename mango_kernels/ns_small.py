"""The on-chip Newton–Schulz kernels: every step of every small item in ONE launch.

One program per item (attention head blocks, small layers: rows ≤ `resources.ON_CHIP_MAX_ROWS`
of the form), all of the item's m×m matrices in registers; X is read and rewritten in place in
the stack chunk by chunk of BLOCK_C columns.

* textbook (launch `ns_small`): X / max(‖X‖, ε) from a first pass over the data (or the host's
  sums), then per step A = X·Xᵀ and M = a·I + b·A + c·A² on-chip and X ← M·X.
* Gram form (launch `ns_small_gram`, see mango.newton_schulz): R = X·Xᵀ (‖X‖² = trace R), then
  per step P = a·I + b·R + c·R², Q ← Q·P, R ← P·R·P on-chip; X is rewritten as Q·X only at the
  restarts the item table marks, and at the end.

`ns_small_ref` is the same launch in float64 torch, for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_function, launch
from ._rounding import round_to
from .ns_common import (
    _RESTARTS,
    _STEPS,
    IC,
    ICOLS,
    _inverse_scale,
    _item,
    _operand,
    _poly,
    dtype_constants,
    inverse_scale_ref,
    item_matrix,
    poly_ref,
    step_coefficients,
)


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


def ns_small(items, coef, sums, stack, *, dtype, block_r: int, block_c: int, aligned: bool, gram: bool) -> None:
    """Every NS step of every item of `items` (one program each, items of ≤ block_r rows) in
    place in `stack` (operands of `dtype`); `block_c`: columns per chunk (halved above 64 rows,
    where the item's m×m matrices take the registers); `gram`: the Gram form."""
    launch(
        "ns_small_gram" if gram else "ns_small", _ns_small_kernel, (items.shape[0],),
        items, coef, sums, stack,
        ICOLS=ICOLS, FCOLS=coef.shape[1], BLOCK_R=block_r, BLOCK_C=block_c if block_r <= 64 else max(16, block_c // 2),
        ALIGNED=aligned, GRAM=gram, num_warps=(8 if gram else 4) if block_r <= 64 else 8, **dtype_constants(dtype),
    )  # fmt: skip


def ns_small_ref(items, coef, sums, stack, *, dtype, block_r: int, block_c: int, aligned: bool, gram: bool) -> None:
    """`ns_small` in float64 torch on the same tables (give it a float64 `stack`): exact arithmetic
    where the kernel rounds its operands to `dtype`; the block sizes do not change the math."""
    for row, coef_row in zip(items.tolist(), coef.double().tolist()):
        X = item_matrix(stack, row, row[IC.OFFSET])
        steps = row[IC.STEPS]
        if not gram:
            Y = X * inverse_scale_ref(row, coef_row, sums, X.square().sum())
            for k in range(steps):
                Y = poly_ref(Y @ Y.mT, *step_coefficients(coef_row, k)) @ Y
            X.copy_(Y)
            continue
        R = X @ X.mT
        inv = inverse_scale_ref(row, coef_row, sums, R.diagonal().sum())
        eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
        R, Q = R * inv * inv, eye * inv
        for k in range(steps):
            if (row[IC.RESTARTS] >> k) & 1:  # X ← Q·X, R = X·Xᵀ, Q = I
                X.copy_(Q @ X)
                R, Q = X @ X.mT, eye
            P = poly_ref(R, *step_coefficients(coef_row, k))
            Q = Q @ P
            if k + 1 < steps and not (row[IC.RESTARTS] >> (k + 1)) & 1:
                R = P @ R @ P
        X.copy_(Q @ X)
