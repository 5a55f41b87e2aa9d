"""The tiled Newton–Schulz kernels: items too large to hold on-chip, all shapes in one ragged grid.

Each launch covers every large item of a batch: a tile table lists (item, ti, tj) for every
tile of every item, so the launch count follows the NS steps, not the shapes. X ping-pongs
between the stack and a second buffer (each item's second offset is in its table row), and each
item has an m×m workspace in WA (fp32) and in WB (the NS dtype).

    ns_xxt     A = X·Xᵀ (unscaled, fp32) into WA: lower-triangle tiles, mirrored
    ns_poly    M = a·I + b·A + c·A² into WB (at step 0 of the pre-scaled X: A × s², s = 1/max(‖X‖, ε))
    ns_update  X' = M·X into the other buffer (with scale_first at k = 0 also × s)

The textbook form is the three per step; the Gram form uses `ns_xxt` for R and `ns_update` for
Q·X, with its m×m iteration between them on the host (mango.backends.ns_gram_host). Which tile
sizes fit which GPU: `mango_kernels.resources`.

Each launcher has a float64 `_ref` of the same signature beside it, for the tests.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import device_function, launch
from ._rounding import round_to
from .ns_common import (
    _OFF1,
    _STEPS,
    _WS,
    IC,
    ICOLS,
    _inverse_scale,
    _item,
    _operand,
    _poly,
    _trace,
    dtype_constants,
    inverse_scale_ref,
    item_matrix,
    poly_ref,
    step_coefficients,
    workspace_matrix,
)
from .resources import TILED_STAGES, TILED_WARPS


@device_function
def _offset_column(item, COLUMN: tl.constexpr, ALIGNED: tl.constexpr):
    """An element offset from the item's row of the item table (a multiple of 8 where ALIGNED)."""
    off = tl.load(item + COLUMN)
    if ALIGNED:
        off = tl.multiple_of(off, 8)
    return off


@device_function
def _tile(TILES, ITEMS, ICOLS: tl.constexpr):
    """This program's tile: its item's index and row of the item table, and the tile's block row
    and column (a tiled kernel's grid is one program per (item, ti, tj) of TILES)."""
    q = tl.program_id(0).to(tl.int64)
    i = tl.load(TILES + 3 * q)
    return i, ITEMS + i * ICOLS, tl.load(TILES + 3 * q + 1), tl.load(TILES + 3 * q + 2)


@device_function
def _ping(X0, X1, item, k, off0, ALIGNED: tl.constexpr):
    """The item's X after k rewrites: the stack for even k, the second buffer for odd k."""
    if k % 2 == 0:
        base = X0 + off0
    else:
        base = X1 + _offset_column(item, _OFF1, ALIGNED)
    return base


@device_function
def _pong(X0, X1, item, k, off0, ALIGNED: tl.constexpr):
    """Where rewrite k writes: the other buffer."""
    if k % 2 == 0:
        base = X1 + _offset_column(item, _OFF1, ALIGNED)
    else:
        base = X0 + off0
    return base


@device_function
def _xxt_tile(
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
def _ns_xxt_kernel(
    ITEMS, TILES, X0, X1, WA, k,
    ICOLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """A = X·Xᵀ of the item's X after k rewrites (unscaled), lower triangle tiles, mirrored."""
    i, item, ti, tj = _tile(TILES, ITEMS, ICOLS)
    if k < tl.load(item + _STEPS):
        off, R, C, ld, transposed = _item(item, ALIGNED)
        x = _ping(X0, X1, item, k, off, ALIGNED)
        ri = (ti * BM + tl.arange(0, BM)).to(tl.int64)
        rj = (tj * BM + tl.arange(0, BM)).to(tl.int64)
        if transposed == 0:
            acc = _xxt_tile(x, ri, rj, R, C, ld, 1, BM, BK, DTYPE, INTERPRET, PRECISION)
        else:
            acc = _xxt_tile(x, ri, rj, R, C, 1, ld, BM, BK, DTYPE, INTERPRET, PRECISION)
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
    i, item, ti, tj = _tile(TILES, ITEMS, ICOLS)
    if k < tl.load(item + _STEPS):
        coef = COEF + i * FCOLS
        a = tl.load(coef + 1 + 3 * k)
        b = tl.load(coef + 2 + 3 * k)
        c = tl.load(coef + 3 + 3 * k)
        off, R, C, ld, transposed = _item(item, ALIGNED)
        ws_off = _offset_column(item, _WS, ALIGNED)
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
    i, item, ti, tj = _tile(TILES, ITEMS, ICOLS)
    if k < tl.load(item + _STEPS):
        off, R, C, ld, transposed = _item(item, ALIGNED)
        ws_off = _offset_column(item, _WS, ALIGNED)
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
# launchers and their float64 references
# ----------------------------------------------------------------------------------------


def ns_xxt(items, tiles, x0, x1, wa, k: int, *, dtype, block_m: int, block_k: int, aligned: bool) -> None:
    """A = X·Xᵀ (unscaled, fp32) of each item's X after k rewrites into its workspace in `wa`;
    `tiles`: (item, ti, tj) of the lower triangle of each item's grid of block_m × block_m tiles."""
    launch(
        "ns_xxt", _ns_xxt_kernel, (tiles.shape[0],),
        items, tiles, x0, x1, wa, k,
        ICOLS=ICOLS, BM=block_m, BK=block_k, ALIGNED=aligned, num_warps=TILED_WARPS, num_stages=TILED_STAGES, **dtype_constants(dtype),
    )  # fmt: skip


def ns_poly(items, coef, sums, tiles, wa, wb, k: int, *, dtype, block_m: int, block_k: int, aligned: bool) -> None:
    """M = a·I + b·A + c·A² of step k (A from `wa`, pre-scaled at k = 0) into `wb` in `dtype`."""
    launch(
        "ns_poly", _ns_poly_kernel, (tiles.shape[0],),
        items, coef, sums, tiles, wa, wb, k,
        ICOLS=ICOLS, FCOLS=coef.shape[1], BM=block_m, BK=block_k, ALIGNED=aligned,
        num_warps=TILED_WARPS, num_stages=TILED_STAGES, **dtype_constants(dtype),
    )  # fmt: skip


def ns_update(items, coef, sums, tiles, x0, x1, wa, wb, k: int, scale_first: int, *, dtype, block_m: int, block_n: int,
              block_k: int, aligned: bool) -> None:  # fmt: skip
    """Rewrite k: X ← M·X (M from `wb`) into the other buffer, × the pre-scale (from trace of `wa`)
    at k = 0 with `scale_first`; `tiles`: (item, ti, tj) of each item's grid of block_m × block_n tiles."""
    launch(
        "ns_update", _ns_update_kernel, (tiles.shape[0],),
        items, coef, sums, tiles, x0, x1, wa, wb, k, scale_first,
        ICOLS=ICOLS, FCOLS=coef.shape[1], BM=block_m, BN=block_n, BK=block_k, ALIGNED=aligned,
        num_warps=TILED_WARPS, num_stages=TILED_STAGES, **dtype_constants(dtype),
    )  # fmt: skip


def _live_items(items, tiles, k: int):
    """Table rows (with their index) of the items the tiles cover that have a step k."""
    rows = items.tolist()
    for i in sorted(set(tiles[:, 0].tolist())):
        if k < rows[i][IC.STEPS]:
            yield i, rows[i]


def _x(x0, x1, row, k: int, write: bool = False):
    """The item's X after k rewrites (or, `write`, where rewrite k goes): stack for even, second buffer for odd."""
    in_second = (k % 2 == 1) != write
    return item_matrix(x1, row, row[IC.OFFSET1]) if in_second else item_matrix(x0, row, row[IC.OFFSET])


def ns_xxt_ref(items, tiles, x0, x1, wa, k: int, *, dtype, block_m: int, block_k: int, aligned: bool) -> None:
    """`ns_xxt` in float64 torch on the same tables (float64 buffers: exact)."""
    for _, row in _live_items(items, tiles, k):
        X = _x(x0, x1, row, k)
        workspace_matrix(wa, row).copy_(X @ X.mT)


def ns_poly_ref(items, coef, sums, tiles, wa, wb, k: int, *, dtype, block_m: int, block_k: int, aligned: bool) -> None:
    """`ns_poly` in float64 torch on the same tables."""
    coefs = coef.double().tolist()
    for i, row in _live_items(items, tiles, k):
        A = workspace_matrix(wa, row)
        if k == 0:
            A = A * inverse_scale_ref(row, coefs[i], sums, A.diagonal().sum()) ** 2
        workspace_matrix(wb, row).copy_(poly_ref(A, *step_coefficients(coefs[i], k)))


def ns_update_ref(items, coef, sums, tiles, x0, x1, wa, wb, k: int, scale_first: int, *, dtype, block_m: int, block_n: int,
                  block_k: int, aligned: bool) -> None:  # fmt: skip
    """`ns_update` in float64 torch on the same tables."""
    coefs = coef.double().tolist()
    for i, row in _live_items(items, tiles, k):
        scale = 1.0
        if k == 0 and scale_first:
            scale = inverse_scale_ref(row, coefs[i], sums, workspace_matrix(wa, row).diagonal().sum())
        _x(x0, x1, row, k, write=True).copy_(scale * (workspace_matrix(wb, row) @ _x(x0, x1, row, k)))
