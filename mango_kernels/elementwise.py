"""The elementwise kernels of a step: moments, segment sums, apply (and two helpers).

Each kernel is multi-tensor: one launch covers every tensor of the step, one program per tile
of the tile table (see `mango_kernels.tables`). What each one fuses:

* `moments`: reads g (any float dtype), m, v; writes v, m and the direction d (bf16 straight
  into the Newton–Schulz input stack for NS-bound tensors, compute dtype otherwise); writes the
  tile's Σd² (of d as stored) and, for trust-ratio tensors, ΣW² as per-tile partials, and a
  per-tile non-finite-gradient flag. Preconditioner (none / laprop / adam / novograd), dtypes,
  Nesterov and bias correction are per-tensor run-time values, so any mix of param groups is
  still ONE launch (one per compute dtype: fp32, or fp64 for float64 params).
* `segment_sums`: one program per segment (tensor, head block or row) adds its tiles' partials
  in a fixed order: deterministic, no atomics, so resumed runs are bit-exact.
* `apply`: Δ from d (sign, divide by the segment's l2 norm, or the NS output), scale by lr·k
  (shape factor, trust ratio min(‖W‖, clamp)), offset momentum O ← β_o·O + (1−β_o)·s, decoupled weight
  decay, and the write of W in its own dtype. One launch.
* `novograd_prepass` (only when a novograd tensor is present): Σg² partials and a snapshot of
  the scalar v, so the moments pass can use ‖g‖² without a race on v.
* `nonfinite_flags`: the pre-step check `nonfinite="skip"/"raise"` needs before anything is
  written (per-tensor int32 flags via atomic max: order-independent, hence deterministic).

The arithmetic mirrors `mango.backends.torch_backend` operation by operation (same divisions,
same order of terms), which keeps fp32 results within the correctness contract's 1e-6 of the float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_function, launch
from .tables import (
    DTYPE_CODES,
    FCOL,
    FLAG_FIRST_STEP,
    FLAG_OFFSET,
    FLAG_TRUST,
    FLAG_FUSED,
    FLAG_TRUST_RAW,
    ICOL,
    NI,
    NORM_SEGMENT_L2,
    NORM_SIGN,
    PRECONDITIONER_CODES,
    ROW,
    ElementwiseLayout,
    TensorLayout,
)
from ._launch import INTERPRET
from ._rounding import round_to

# Table columns as compile-time constants for the kernels.
_NUMEL = tl.constexpr(ICOL.NUMEL)
_PARAM = tl.constexpr(ICOL.PARAM)
_GRAD = tl.constexpr(ICOL.GRAD)
_EXP_AVG = tl.constexpr(ICOL.EXP_AVG)
_EXP_AVG_SQ = tl.constexpr(ICOL.EXP_AVG_SQ)
_OFFSET = tl.constexpr(ICOL.OFFSET)
_DIRECTION = tl.constexpr(ICOL.DIRECTION)
_DELTA = tl.constexpr(ICOL.DELTA)
_GRAD_DTYPE = tl.constexpr(ICOL.GRAD_DTYPE)
_PARAM_DTYPE = tl.constexpr(ICOL.PARAM_DTYPE)
_DIRECTION_DTYPE = tl.constexpr(ICOL.DIRECTION_DTYPE)
_DELTA_DTYPE = tl.constexpr(ICOL.DELTA_DTYPE)
_PRECONDITIONER = tl.constexpr(ICOL.PRECONDITIONER)
_NORM_KIND = tl.constexpr(ICOL.NORM_KIND)
_FLAGS = tl.constexpr(ICOL.FLAGS)
_W_SEGMENT = tl.constexpr(ICOL.W_SEGMENT)
_G_SEGMENT = tl.constexpr(ICOL.G_SEGMENT)

_BETA1 = tl.constexpr(FCOL.BETA1)
_BETA2 = tl.constexpr(FCOL.BETA2)
_EPS = tl.constexpr(FCOL.EPS)
_V_COEF = tl.constexpr(FCOL.V_COEF)
_M_COEF = tl.constexpr(FCOL.M_COEF)
_NESTEROV_M = tl.constexpr(FCOL.NESTEROV_M)
_NESTEROV_X = tl.constexpr(FCOL.NESTEROV_X)
_BIAS1 = tl.constexpr(FCOL.BIAS1)
_BIAS2 = tl.constexpr(FCOL.BIAS2)
_GRAD_SIGN = tl.constexpr(FCOL.GRAD_SIGN)
_WEIGHT_DECAY_U = tl.constexpr(FCOL.WEIGHT_DECAY_U)
_LR_K = tl.constexpr(FCOL.LR_K)
_BETA_OFFSET = tl.constexpr(FCOL.BETA_OFFSET)
_ONE_MINUS_BETA_OFFSET = tl.constexpr(FCOL.ONE_MINUS_BETA_OFFSET)
_DECAY = tl.constexpr(FCOL.DECAY)
_TRUST_CLAMP = tl.constexpr(FCOL.TRUST_CLAMP)

_LAPROP = tl.constexpr(PRECONDITIONER_CODES["laprop"])
_ADAM = tl.constexpr(PRECONDITIONER_CODES["adam"])
_NOVOGRAD = tl.constexpr(PRECONDITIONER_CODES["novograd"])
_SIGN = tl.constexpr(NORM_SIGN)
_SEGMENT_L2 = tl.constexpr(NORM_SEGMENT_L2)
_HAS_OFFSET = tl.constexpr(FLAG_OFFSET)
_TRUST = tl.constexpr(FLAG_TRUST)
_TRUST_RAW = tl.constexpr(FLAG_TRUST_RAW)
_FUSED = tl.constexpr(FLAG_FUSED)
_FIRST_STEP = tl.constexpr(FLAG_FIRST_STEP)

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Elements per program. Under the interpreter programs run one after another in numpy, so a
# small block keeps multi-tile code paths reachable with tiny test tensors.
DEFAULT_BLOCK = 128 if INTERPRET else 2048
_NUM_WARPS = 8
REDUCE_BLOCK = 128 if INTERPRET else 1024


# ----------------------------------------------------------------------------------------
# typed access through raw addresses
# ----------------------------------------------------------------------------------------


@device_function
def _ptr(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A typed pointer from a raw address. ALIGNED promises 16-byte alignment (checked on the
    host every step); the hint must sit on the pointer itself for loads to be vectorized."""
    ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def _load_as(address, offs, mask, code, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr):
    """Load `address[offs]` where the tensor's dtype is given by a run-time code; return COMPUTE."""
    if code == 0:
        x = tl.load(_ptr(address, tl.float32, ALIGNED) + offs, mask=mask, other=0.0).to(COMPUTE)
    elif code == 1:
        x = tl.load(_ptr(address, tl.bfloat16, ALIGNED) + offs, mask=mask, other=0.0).to(COMPUTE)
    elif code == 2:
        x = tl.load(_ptr(address, tl.float16, ALIGNED) + offs, mask=mask, other=0.0).to(COMPUTE)
    else:
        x = tl.load(_ptr(address, tl.float64, ALIGNED) + offs, mask=mask, other=0.0).to(COMPUTE)
    return x


@device_function
def _store_as(address, offs, mask, x, code, COMPUTE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr):
    """Store x rounded to the tensor's dtype (run-time code); return the stored value in COMPUTE.
    (Each branch has its own names: compiled Triton wants one type per name across branches.)"""
    if code == 0:
        q32 = x.to(tl.float32)
        tl.store(_ptr(address, tl.float32, ALIGNED) + offs, q32, mask=mask)
        r = q32.to(COMPUTE)
    elif code == 1:
        qbf = round_to(x, tl.bfloat16, INTERPRET)
        tl.store(_ptr(address, tl.bfloat16, ALIGNED) + offs, qbf, mask=mask)
        r = qbf.to(COMPUTE)
    elif code == 2:
        q16 = x.to(tl.float16)
        tl.store(_ptr(address, tl.float16, ALIGNED) + offs, q16, mask=mask)
        r = q16.to(COMPUTE)
    else:
        q64 = x.to(tl.float64)
        tl.store(_ptr(address, tl.float64, ALIGNED) + offs, q64, mask=mask)
        r = q64.to(COMPUTE)
    return r


@device_function
def _offsets_and_mask(start, end, BLOCK: tl.constexpr):
    """int64 element offsets of a tile and its mask."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return offs, offs < end


@device_function
def _tile(TILES, p, ALIGNED: tl.constexpr):
    """(tensor, start, end, segment) of tile p. ALIGNED: start and end are multiples of 16, so
    the mask is constant over 16-element groups and loads can be vectorized. (Hints must sit
    on the ops that produce the values, here the loads: on a helper's argument they are lost.)"""
    t = tl.load(TILES + p * 4)
    start = tl.load(TILES + p * 4 + 1)
    end = tl.load(TILES + p * 4 + 2)
    seg = tl.load(TILES + p * 4 + 3)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    return t, start, end, seg


@device_function
def _f(frow, col, COMPUTE: tl.constexpr):
    return tl.load(frow + col).to(COMPUTE)


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_tiles"])
def _novograd_prepass_kernel(
    I, TILES, NOVOGRAD_TILES, PARTIALS, V_SNAPSHOT, n_tiles,
    ROW: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    p = tl.load(NOVOGRAD_TILES + tl.program_id(0).to(tl.int64))
    t, start, end, seg = _tile(TILES, p, ALIGNED)
    irow = I + t * ROW
    offs, mask = _offsets_and_mask(start, end, BLOCK)
    g = _load_as(tl.load(irow + _GRAD), offs, mask, tl.load(irow + _GRAD_DTYPE), COMPUTE, ALIGNED)
    tl.store(PARTIALS + 2 * n_tiles + p, tl.sum(g * g, axis=0))
    if start == 0:  # one program per tensor snapshots v before the moments pass rewrites it
        v = tl.load(tl.load(irow + _EXP_AVG_SQ).to(tl.pointer_type(COMPUTE)))
        tl.store(V_SNAPSHOT + t, v)


@triton.jit(do_not_specialize=["n_tiles"])
def _moments_kernel(
    I, F, TILES, PARTIALS, SUMS, TILE_FLAGS, V_SNAPSHOT, n_tiles,
    ROW: tl.constexpr, NI: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0).to(tl.int64)
    t, start, end, seg = _tile(TILES, p, ALIGNED)
    irow = I + t * ROW
    frow = F + t * ROW + NI
    offs, mask = _offsets_and_mask(start, end, BLOCK)
    pre = tl.load(irow + _PRECONDITIONER)
    flags = tl.load(irow + _FLAGS)
    trust = (flags & _TRUST) != 0

    g = _load_as(tl.load(irow + _GRAD), offs, mask, tl.load(irow + _GRAD_DTYPE), COMPUTE, ALIGNED)
    bad = tl.max((mask & ~(tl.abs(g) < float("inf"))).to(tl.int32), axis=0)
    tl.store(TILE_FLAGS + p, bad.to(tl.int8))
    g = g * _f(frow, _GRAD_SIGN, COMPUTE)

    b1 = _f(frow, _BETA1, COMPUTE)
    b2 = _f(frow, _BETA2, COMPUTE)
    eps = _f(frow, _EPS, COMPUTE)
    v_coef = _f(frow, _V_COEF, COMPUTE)
    wd_u = _f(frow, _WEIGHT_DECAY_U, COMPUTE)
    if trust | ((pre == _NOVOGRAD) & (wd_u != 0)):
        w = _load_as(tl.load(irow + _PARAM), offs, mask, tl.load(irow + _PARAM_DTYPE), COMPUTE, ALIGNED)
    else:
        w = tl.zeros([BLOCK], dtype=COMPUTE)

    # precondition: x is what enters the momentum, den what d is divided by at the end (adam)
    den = tl.full([BLOCK], 1.0, COMPUTE)
    if (pre == _LAPROP) | (pre == _ADAM):
        v_ptr = _ptr(tl.load(irow + _EXP_AVG_SQ), COMPUTE, ALIGNED)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        v = b2 * v + v_coef * g * g
        tl.store(v_ptr + offs, v, mask=mask)
        root = tl.sqrt(v / _f(frow, _BIAS2, COMPUTE)) + eps
        if pre == _LAPROP:
            x = g / root
        else:
            x = g
            den = root
    elif pre == _NOVOGRAD:
        g_sq = tl.load(SUMS + tl.load(irow + _G_SEGMENT))
        v_old = tl.load(V_SNAPSHOT + t)
        v_new = tl.where((flags & _FIRST_STEP) != 0, g_sq, b2 * v_old + v_coef * g_sq)
        if start == 0:
            tl.store(tl.load(irow + _EXP_AVG_SQ).to(tl.pointer_type(COMPUTE)), v_new)
        x = g / (tl.sqrt(v_new) + eps) + wd_u * w
    else:
        x = g

    # momentum and the (Nesterov) direction
    m_ptr = _ptr(tl.load(irow + _EXP_AVG), COMPUTE, ALIGNED)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    m = b1 * m + _f(frow, _M_COEF, COMPUTE) * x
    tl.store(m_ptr + offs, m, mask=mask)
    d = _f(frow, _NESTEROV_M, COMPUTE) * m + _f(frow, _NESTEROV_X, COMPUTE) * x
    d = d / _f(frow, _BIAS1, COMPUTE) / den

    if (flags & _FUSED) != 0:  # none / sign without trust ratio: the step is applied right here
        if tl.load(irow + _NORM_KIND) == _SIGN:
            d = _sign(d)
        _apply_step(irow, frow, offs, mask, _f(frow, _LR_K, COMPUTE) * d, flags, COMPUTE, INTERPRET, ALIGNED)
        tl.store(PARTIALS + p, 0.0)
    else:
        # d as stored (bf16 for the NS stack) feeds the norms, so sum the stored values
        dq = _store_as(tl.load(irow + _DIRECTION), offs, mask, d, tl.load(irow + _DIRECTION_DTYPE), COMPUTE, INTERPRET, ALIGNED)
        tl.store(PARTIALS + p, tl.sum(tl.where(mask, dq * dq, 0.0), axis=0))
        if trust:
            tl.store(PARTIALS + n_tiles + p, tl.sum(w * w, axis=0))


@triton.jit(do_not_specialize=["out_base"])
def _segment_sum_kernel(SEGMENTS, PARTIALS, SUMS, out_base, RBLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    first = tl.load(SEGMENTS + 2 * s)
    count = tl.load(SEGMENTS + 2 * s + 1)
    acc = tl.zeros([RBLOCK], dtype=COMPUTE)
    for k in range(0, count, RBLOCK):
        idx = k + tl.arange(0, RBLOCK).to(tl.int64)
        acc += tl.load(PARTIALS + first + idx, mask=idx < count, other=0.0)
    tl.store(SUMS + out_base + s, tl.sum(acc, axis=0))


@device_function
def _sign(x):
    """torch.sign: ±1, 0 stays 0, NaN stays NaN."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)).to(x.dtype)


@device_function
def _apply_step(irow, frow, offs, mask, s, flags, COMPUTE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr):
    """Offset momentum O ← β_o·O + (1−β_o)·s, then W ← W − (s + O) − lr·λ·W in W's own dtype."""
    w_addr = tl.load(irow + _PARAM)
    w_code = tl.load(irow + _PARAM_DTYPE)
    w = _load_as(w_addr, offs, mask, w_code, COMPUTE, ALIGNED)
    if (flags & _HAS_OFFSET) != 0:
        o_ptr = _ptr(tl.load(irow + _OFFSET), COMPUTE, ALIGNED)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0)
        o = _f(frow, _BETA_OFFSET, COMPUTE) * o + _f(frow, _ONE_MINUS_BETA_OFFSET, COMPUTE) * s
        tl.store(o_ptr + offs, o, mask=mask)
        s = s + o
    w_new = w - s - _f(frow, _DECAY, COMPUTE) * w
    _store_as(w_addr, offs, mask, w_new, w_code, COMPUTE, INTERPRET, ALIGNED)


@triton.jit
def _apply_kernel(
    I, F, TILES, SUMS,
    ROW: tl.constexpr, NI: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0).to(tl.int64)
    t, start, end, seg = _tile(TILES, p, ALIGNED)
    irow = I + t * ROW
    frow = F + t * ROW + NI
    flags = tl.load(irow + _FLAGS)
    if (flags & _FUSED) == 0:  # fused tensors were applied in the moments pass
        offs, mask = _offsets_and_mask(start, end, BLOCK)
        kind = tl.load(irow + _NORM_KIND)
        raw = _load_as(tl.load(irow + _DELTA), offs, mask, tl.load(irow + _DELTA_DTYPE), COMPUTE, ALIGNED)
        delta = raw
        if kind == _SIGN:
            delta = _sign(delta)
        elif kind == _SEGMENT_L2:  # unit l2 norm per segment (tensor, head block or row); 0 stays 0
            norm = tl.sqrt(tl.load(SUMS + seg))
            delta = tl.where(norm > 0, delta / norm, 0.0).to(COMPUTE)
        k = _f(frow, _LR_K, COMPUTE)
        if (flags & _TRUST) != 0:  # φ = min(‖W‖, trust_clamp); φ = 0: ratio 1 (on the raw d with _TRUST_RAW)
            w_norm = tl.sqrt(tl.load(SUMS + tl.load(irow + _W_SEGMENT)))
            clamp = _f(frow, _TRUST_CLAMP, COMPUTE)
            w_norm = tl.where((clamp > 0) & (w_norm > clamp), clamp, w_norm)
            k = k * tl.where(w_norm > 0, w_norm, 1.0).to(COMPUTE)
            if (flags & _TRUST_RAW) != 0:
                delta = tl.where(w_norm > 0, delta, raw)
        _apply_step(irow, frow, offs, mask, k * delta, flags, COMPUTE, INTERPRET, ALIGNED)


@triton.jit
def _nonfinite_kernel(PTRS, TILES, FLAGS, BLOCK: tl.constexpr, CHECK: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    t, start, end, seg = _tile(TILES, p, ALIGNED)
    offs, mask = _offsets_and_mask(start, end, BLOCK)
    g = _load_as(tl.load(PTRS + 2 * t), offs, mask, tl.load(PTRS + 2 * t + 1), CHECK, ALIGNED)
    bad = tl.max((mask & ~(tl.abs(g) < float("inf"))).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_max(FLAGS + t, bad)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------


def launch_novograd_prepass(tables, layout: ElementwiseLayout, ws: dict, compute_dtype, aligned: bool = False) -> None:
    """Σg² partials of novograd tensors, v snapshots, then their per-tensor sums."""
    ints, _ = tables
    n = layout.novograd_tiles.numel()
    launch(
        "novograd_prepass", _novograd_prepass_kernel, (n,),
        ints, layout.tiles, layout.novograd_tiles, ws["partials"], ws["v_snapshot"], layout.n_tiles,
        ROW=ROW, BLOCK=layout.block, COMPUTE=TL_DTYPES[compute_dtype], ALIGNED=aligned and layout.tiles_aligned,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    launch_segment_sums(layout.pre_segments, ws["partials"], ws["sums"], layout.n_sums - layout.n_pre_segments, compute_dtype)


def launch_moments(tables, layout: ElementwiseLayout, ws: dict, compute_dtype, aligned: bool = False) -> None:
    """v, m, d, Σd²/ΣW² partials and non-finite flags for every tile (`aligned`: every address
    in the table is 16-byte aligned, see TensorTable.addresses_aligned)."""
    ints, floats = tables
    launch(
        "moments", _moments_kernel, (layout.n_tiles,),
        ints, floats, layout.tiles, ws["partials"], ws["sums"], ws["tile_flags"], ws["v_snapshot"], layout.n_tiles,
        ROW=ROW, NI=NI, BLOCK=layout.block, COMPUTE=TL_DTYPES[compute_dtype], INTERPRET=INTERPRET,
        ALIGNED=aligned and layout.tiles_aligned, num_warps=_NUM_WARPS,
    )  # fmt: skip


def launch_segment_sums(segments: torch.Tensor, partials: torch.Tensor, sums: torch.Tensor, out_base: int, compute_dtype) -> None:
    """sums[out_base + s] = Σ partials[first_s : first_s + count_s] for every segment s."""
    launch(
        "segment_sums", _segment_sum_kernel, (segments.shape[0],),
        segments, partials, sums, out_base, RBLOCK=REDUCE_BLOCK, COMPUTE=TL_DTYPES[compute_dtype], num_warps=4,
    )  # fmt: skip


def launch_apply(tables, layout: ElementwiseLayout, ws: dict, compute_dtype, aligned: bool = False) -> None:
    """Δ, scale, offset momentum, weight decay and the write of W for every tile."""
    ints, floats = tables
    launch(
        "apply", _apply_kernel, (layout.n_tiles,),
        ints, floats, layout.tiles, ws["sums"],
        ROW=ROW, NI=NI, BLOCK=layout.block, COMPUTE=TL_DTYPES[compute_dtype], INTERPRET=INTERPRET,
        ALIGNED=aligned and layout.tiles_aligned, num_warps=_NUM_WARPS,
    )  # fmt: skip


def nonfinite_layout(tensors, block: int = DEFAULT_BLOCK) -> ElementwiseLayout:
    """Tiles for `nonfinite_flags` over tensors of these sizes (cache it: it depends on sizes only)."""
    return ElementwiseLayout([TensorLayout(t.numel()) for t in tensors], block, tensors[0].device)


def nonfinite_flags(tensors, layout: ElementwiseLayout = None) -> torch.Tensor:
    """Bool tensor [len(tensors)] on the tensors' device: True where a tensor holds a NaN or Inf.

    One launch plus the flag buffer's zero-fill and the pointer table's copy. Tensors must be
    contiguous (the caller passes `.contiguous()` grads).
    """
    from ._launch import record

    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    device = tensors[0].device
    layout = layout or nonfinite_layout(tensors)
    table = torch.tensor([[t.data_ptr(), DTYPE_CODES[t.dtype]] for t in tensors], dtype=torch.int64)
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
        record("table_copy")
    flags = torch.zeros(len(tensors), dtype=torch.int32, device=device)
    record("zero_flags")
    check = tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32
    aligned = layout.tiles_aligned and all(t.data_ptr() % 16 == 0 for t in tensors)
    launch(
        "nonfinite", _nonfinite_kernel, (layout.n_tiles,),
        table, layout.tiles, flags, BLOCK=layout.block, CHECK=check, ALIGNED=aligned, num_warps=_NUM_WARPS,
    )  # fmt: skip
    record("flags_to_bool")
    return flags > 0
