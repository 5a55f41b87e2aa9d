"""What every Newton–Schulz kernel shares: the item table, operand rounding, the polynomial and
the inverse pre-scale, each with its float64 twin for the `_ref` functions beside the launchers.

An *item* is one matrix to orthogonalize, a strided view into a flat buffer (the NS *stack*): a
row of the item table gives its offset, shape (rows ≤ cols: a tall matrix is used transposed by
swapping strides), leading stride and which of its strides is 1, where its pre-scale comes from,
its number of steps and, for the tiled kernels, its second-buffer offset and m×m workspace. Per
item a row of the coefficient table holds ε and one (a, b, c) per step.

Strides come from the table, so the compiler cannot know which one is 1: each kernel reads its
item and calls the item/tile body in one of two specializations, row-major (stride_c == 1) or
transposed (stride_r == 1), with the unit stride a literal and the other one, `ld`, from the
table. With ALIGNED (host-checked: shapes, ld and offsets of every item of the launch are
multiples of 8) those get multiple_of hints; together this turns the tile loads into 16-byte
vector / cp.async copies instead of 2-byte gathers.

dtypes: bf16 (the textbook default), fp16 (the Gram form's: its 10 mantissa bits hold the Gram
iterates), or fp32 (IEEE dot). Under the Triton interpreter low-precision operands are widened to
fp32 before tl.dot (its bf16 dot is broken; bf16/fp16 values are exact in fp32).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton.language as tl

from ._launch import INTERPRET, device_function
from ._rounding import round_to
from .elementwise import TL_DTYPES

# ld: the non-unit stride; transposed: 1 when stride_r = 1 (stride_c = ld); scale_mode: 0 pre-scale
# from the data (Frobenius), 1 from sums[segment] (a squared norm the host filled in); restarts: bit
# k set where the Gram form rewrites X and R before step k
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

NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dtype_constants(dtype: torch.dtype) -> dict:
    """The constexprs every NS kernel takes for operands of `dtype`."""
    return dict(DTYPE=TL_DTYPES[dtype], INTERPRET=INTERPRET, PRECISION="ieee" if dtype == torch.float32 else "tf32")


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


# ----------------------------------------------------------------------------------------
# float64 twins, for the `_ref` functions (plain torch on the same tables and buffers)
# ----------------------------------------------------------------------------------------


def item_matrix(buffer: torch.Tensor, row, offset: int) -> torch.Tensor:
    """The (rows, cols) strided view of an item (table row `row`) whose first element is buffer[offset]."""
    r, c, ld = int(row[IC.ROWS]), int(row[IC.COLS]), int(row[IC.LD])
    strides = (1, ld) if int(row[IC.TRANSPOSED]) else (ld, 1)
    return buffer.as_strided((r, c), strides, buffer.storage_offset() + offset)


def workspace_matrix(buffer: torch.Tensor, row) -> torch.Tensor:
    """An item's rows×rows workspace matrix in `buffer`."""
    r = int(row[IC.ROWS])
    start = int(row[IC.WORKSPACE])
    return buffer[start : start + r * r].view(r, r)


def inverse_scale_ref(row, coef_row, sums, sumsq) -> torch.Tensor:
    """`_inverse_scale`: 1 / max(‖X‖, ε), ‖X‖² from `sumsq` or (scale mode 1) from the sums."""
    if int(row[IC.SCALE_MODE]):
        sumsq = sums[int(row[IC.SEGMENT])].to(torch.float64)
    return 1.0 / torch.clamp_min(torch.as_tensor(sumsq, dtype=torch.float64).sqrt(), float(coef_row[0]))


def step_coefficients(coef_row, k: int) -> tuple:
    """(a, b, c) of step k from an item's coefficient row."""
    return tuple(float(v) for v in coef_row[1 + 3 * k : 4 + 3 * k])


def poly_ref(A: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """`_poly`: M = a·I + b·A + c·A·A."""
    return b * A + c * (A @ A) + a * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
