"""The elementwise Triton kernels of mango_kernels, each against the float64 reference (the kernel
design and the correctness contract, docs/design.md); the Newton–Schulz kernels are tested with
every other NS engine in tests/test_newton_schulz.py.

Runs under TRITON_INTERPRET=1 on CPU (conftest), or compiled with MANGO_TEST_DEVICE=cuda.
Every tensor a kernel writes is poisoned with NaN first, so an element it forgets fails.
Element blocks are small (16–32) so multi-tile tensors stay tiny under the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch

import mango_kernels as mk
from mango import reference
from mango_kernels.tables import (
    DTYPE_CODES,
    FCOL,
    FLAG_FIRST_STEP,
    FLAG_OFFSET,
    FLAG_TRUST,
    ICOL,
    NORM_NONE,
    NORM_SEGMENT_L2,
    NORM_SIGN,
    PRECONDITIONER_CODES,
    ElementwiseLayout,
    TensorLayout,
    TensorTable,
)

# odd sizes, 1×n, n×1, tall, wide, a vector, a 0-d tensor; 16-element tiles make most of them multi-tile
SHAPES = [(7,), (1, 9), (9, 1), (13, 5), (3, 21), ()]
BLOCK = 16


def rel(actual, expected) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def randn(shape, dtype, device, gen, positive=False):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x.abs() + 0.1 if positive else x).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------
# moments
# ----------------------------------------------------------------------------------------


def _settings(i, pre, nesterov, t):
    """Different hyperparameters per tensor: the table really is per tensor."""
    return dict(
        lr=1.0, beta1=0.9 - 0.02 * i, beta2=0.95 - 0.01 * i, eps=1e-8 * (i + 1), preconditioner=pre,
        second_moment="ema" if i % 2 == 0 else "sum", nesterov=nesterov, ema_momentum=i % 3 == 1,
        bias_correction=pre == "laprop" and i % 2 == 1, maximize=i == 2,
        weight_decay=0.01 * i if pre == "novograd" else 0.0,  # decoupled decay would hide d in W − W'
        beta_offset=None, trust_ratio=False, shape_scale=None, norm="none", role="matrix", step=t,
    )  # fmt: skip


def _float_row(s):
    """The tensor-table floats for one tensor, as mango.backends.triton_backend builds them."""
    pre, b1, b2 = s["preconditioner"], s["beta1"], s["beta2"]
    c = (1 - b1) if (pre == "adam" or s["ema_momentum"]) else 1.0
    t = s["step"]
    corr1 = pre == "adam" or (s["bias_correction"] and s["ema_momentum"])
    corr2 = pre == "adam" or s["bias_correction"]
    f = [0.0] * len(vars(FCOL))
    f[FCOL.BETA1], f[FCOL.BETA2], f[FCOL.EPS] = b1, b2, s["eps"]
    f[FCOL.V_COEF] = (1 - b2) if s["second_moment"] == "ema" else 1.0
    f[FCOL.M_COEF] = c
    f[FCOL.NESTEROV_M], f[FCOL.NESTEROV_X] = (b1, c) if s["nesterov"] else (1.0, 0.0)
    f[FCOL.BIAS1] = 1 - b1**t if corr1 else 1.0
    f[FCOL.BIAS2] = 1 - b2**t if corr2 else 1.0
    f[FCOL.GRAD_SIGN] = -1.0 if s["maximize"] else 1.0
    f[FCOL.WEIGHT_DECAY_U] = s["weight_decay"] if pre == "novograd" else 0.0
    f[FCOL.LR_K] = s["lr"]
    return f


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pre", [None, "laprop", "adam", "novograd"], ids=str)
def test_moments_matches_reference(pre, grad_dtype, device):
    """v, m and d of the moments kernel = reference.update's (d read off a norm="none", lr=1
    step), for tensors with different shapes, dtypes and hyperparameters in ONE launch."""
    gen = torch.Generator().manual_seed(11)
    t = 3.0
    n = len(SHAPES)
    params = [randn(s, torch.float32, device, gen) for s in SHAPES]
    grads = [randn(s, grad_dtype, device, gen) for s in SHAPES]
    settings = [_settings(i, pre, nesterov=i != 3, t=t) for i in range(n)]
    states = []
    for p, s in zip(params, settings):
        st = reference.init_state(p, s)
        st["step"].fill_(t - 1)
        st["exp_avg"].copy_(randn(p.shape, torch.float32, device, gen))
        if pre in ("laprop", "adam"):
            st["exp_avg_sq"].copy_(randn(p.shape, torch.float32, device, gen, positive=True))
        elif pre == "novograd":
            st["exp_avg_sq"].fill_(0.7)
        states.append(st)

    # oracle: float64 copies through reference.update; d = W - W' when lr=1, norm none, no offset
    expected = []
    for p, g, st, s in zip(params, grads, states, settings):
        st64 = {k: v.double().cpu() for k, v in st.items()}
        st64["step"] = st["step"].clone().cpu()
        w64 = p.double().cpu()
        w_new = w64.clone()
        reference.update(w_new, g.double().cpu(), st64, s)
        expected.append((w64 - w_new, st64))

    layout = ElementwiseLayout(
        [TensorLayout(p.numel(), segment_len=p.numel(), novograd=pre == "novograd") for p in params], BLOCK, device
    )
    assert layout.n_tiles > n  # several tensors span more than one tile
    ws = layout.workspaces(torch.float32)
    direction = [torch.full(p.shape, float("nan"), device=device) for p in params]  # poisoned
    ws["partials"].fill_(float("nan"))
    ws["sums"].fill_(float("nan"))
    ws["tile_flags"].fill_(7)
    table = TensorTable(n, device)
    table.set_int(ICOL.NUMEL, [p.numel() for p in params])
    table.set_int(ICOL.PARAM, [p.data_ptr() for p in params])
    table.set_int(ICOL.GRAD, [g.data_ptr() for g in grads])
    table.set_int(ICOL.EXP_AVG, [st["exp_avg"].data_ptr() for st in states])
    table.set_int(ICOL.EXP_AVG_SQ, [st["exp_avg_sq"].data_ptr() if "exp_avg_sq" in st else 0 for st in states])
    table.set_int(ICOL.DIRECTION, [d.data_ptr() for d in direction])
    table.set_int(ICOL.GRAD_DTYPE, [DTYPE_CODES[grad_dtype]] * n)
    table.set_int(ICOL.PARAM_DTYPE, [DTYPE_CODES[torch.float32]] * n)
    table.set_int(ICOL.DIRECTION_DTYPE, [DTYPE_CODES[torch.float32]] * n)
    table.set_int(ICOL.PRECONDITIONER, [PRECONDITIONER_CODES[pre]] * n)
    table.set_int(ICOL.G_SEGMENT, layout.g_segment.tolist())
    table.set_int(ICOL.FLAGS, [FLAG_FIRST_STEP if t == 1 else 0] * n)
    for col in range(len(vars(FCOL))):
        table.set_float(col, [_float_row(s)[col] for s in settings])
    tables = table.upload()
    with mk.count_launches() as log:
        if pre == "novograd":
            mk.launch_novograd_prepass(tables, layout, ws, torch.float32)
        mk.launch_moments(tables, layout, ws, torch.float32, table.addresses_aligned())
        mk.launch_segment_sums(layout.post_segments, ws["partials"], ws["sums"], 0, torch.float32)
    assert log.by_name()["moments"] == 1

    for i, (d, st, (d_ref, st_ref)) in enumerate(zip(direction, states, expected)):
        assert rel(d, d_ref) <= 1e-6, (i, SHAPES[i])
        assert rel(st["exp_avg"], st_ref["exp_avg"]) <= 1e-6
        if "exp_avg_sq" in st:
            assert rel(st["exp_avg_sq"], st_ref["exp_avg_sq"]) <= 1e-6
        # per-tensor Σd² from the tile partials, reduced by segment_sums
        assert float(ws["sums"][i]) == pytest.approx(float(d.double().square().sum()), rel=1e-5)
    assert int(ws["tile_flags"][: layout.n_tiles].max()) == 0


def test_moments_writes_bf16_direction_and_flags_nonfinite(device):
    """d for NS-bound tensors goes out in bf16 (rounded to nearest, like torch); Σd² is of the
    stored values; a NaN/Inf gradient raises exactly its tiles' flags."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(5, 8), (33,)]
    grads = [randn(s, torch.float32, device, gen) for s in shapes]
    grads[1][20] = float("inf")
    ms = [torch.zeros(s, device=device) for s in shapes]
    out = [torch.full(s, float("nan"), dtype=torch.bfloat16, device=device) for s in shapes]
    layout = ElementwiseLayout([TensorLayout(40, segment_len=8), TensorLayout(33, segment_len=33)], BLOCK, device)
    ws = layout.workspaces(torch.float32)
    table = TensorTable(2, device)
    table.set_int(ICOL.GRAD, [g.data_ptr() for g in grads])
    table.set_int(ICOL.EXP_AVG, [m.data_ptr() for m in ms])
    table.set_int(ICOL.DIRECTION, [o.data_ptr() for o in out])
    table.set_int(ICOL.DIRECTION_DTYPE, [DTYPE_CODES[torch.bfloat16]] * 2)
    for col, v in [(FCOL.BETA1, 0.5), (FCOL.M_COEF, 1.0), (FCOL.NESTEROV_M, 1.0), (FCOL.BIAS1, 1.0), (FCOL.BIAS2, 1.0), (FCOL.GRAD_SIGN, 1.0)]:
        table.set_float(col, [v, v])
    tables = table.upload()
    mk.launch_moments(tables, layout, ws, torch.float32)
    mk.launch_segment_sums(layout.post_segments, ws["partials"], ws["sums"], 0, torch.float32)
    assert torch.equal(out[0].view(torch.int16), grads[0].to(torch.bfloat16).view(torch.int16))  # RTNE, bit-exact
    rows = out[0].float().square().sum(dim=1)  # segment_len=8: one segment per row
    torch.testing.assert_close(ws["sums"][:5], rows, rtol=1e-6, atol=0)
    flags = ws["tile_flags"][: layout.n_tiles].cpu()
    tile_tensor, tile_start = layout.tiles_host[:, 0], layout.tiles_host[:, 1]
    bad_tile = (tile_tensor == 1) & (tile_start == 16)  # element 20 of tensor 1 lives in its 2nd tile
    assert flags[bad_tile].tolist() == [1] and int(flags[~bad_tile].sum()) == 0


def test_int64_offsets_past_2_31(device):
    """Tile starts beyond 2³¹ elements address correctly (int64 arithmetic everywhere): the
    table points 2³¹+16 elements before small real tensors, and the tile starts there."""
    n, big = 24, 2**31 + 16
    g = torch.arange(n, dtype=torch.float32, device=device) + 1
    m = torch.zeros(n, device=device)
    d = torch.full((n,), float("nan"), device=device)
    layout = ElementwiseLayout([TensorLayout(n)], 32, device)
    layout.tiles = torch.tensor([[0, big, big + n, -1]], dtype=torch.int64, device=device)
    layout.n_tiles = 1
    ws = layout.workspaces(torch.float32)
    table = TensorTable(1, device)
    shift = lambda t: t.data_ptr() - big * t.element_size()  # noqa: E731
    table.set_int(ICOL.GRAD, [shift(g)])
    table.set_int(ICOL.EXP_AVG, [shift(m)])
    table.set_int(ICOL.DIRECTION, [shift(d)])
    for col, v in [(FCOL.BETA1, 0.5), (FCOL.M_COEF, 1.0), (FCOL.NESTEROV_M, 1.0), (FCOL.BIAS1, 1.0), (FCOL.BIAS2, 1.0), (FCOL.GRAD_SIGN, 1.0)]:
        table.set_float(col, [v])
    mk.launch_moments(table.upload(), layout, ws, torch.float32)
    torch.testing.assert_close(d, g)
    torch.testing.assert_close(m, g)


# ----------------------------------------------------------------------------------------
# apply (and the whole elementwise pipeline at kernel level)
# ----------------------------------------------------------------------------------------

APPLY_CASES = {  # norm: (shapes, role, head_dim)
    "none": ([(7,), (4, 9)], "matrix", None),
    "sign": ([(9,), ()], "vector_weight", None),
    "l2": ([(1,), (40,)], "vector_bias", None),
    "l2_split": ([(12,), (6, 5)], "qkv_bias", 3),
    "l2_col": ([(5, 7), (7, 1), (1, 30)], "embedding", None),
}
_SEGMENT = {"l2": lambda shape, hd: math.prod(shape), "l2_split": lambda shape, hd: hd * math.prod(shape[1:]), "l2_col": lambda shape, hd: math.prod(shape[1:])}


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", list(APPLY_CASES))
def test_apply_matches_reference(norm, param_dtype, device):
    """moments (plain momentum, β1=0: d = g) → segment_sums → apply vs reference.update, with
    trust ratio, offset momentum, weight decay and W written back in its own dtype."""
    gen = torch.Generator().manual_seed(3)
    shapes, role, hd = APPLY_CASES[norm]
    n = len(shapes)
    params = [randn(s, param_dtype, device, gen) for s in shapes]
    grads = [randn(s, torch.float32, device, gen) for s in shapes]
    settings = [
        dict(reference_settings(norm, role, hd), trust_ratio=i == 0, weight_decay=0.1 * i, beta_offset=0.9 if i != 1 else None, lr=0.1 + 0.05 * i)
        for i in range(n)
    ]
    states = [reference.init_state(p, s) for p, s in zip(params, settings)]
    for st in states:
        if "offset" in st:
            st["offset"].copy_(randn(st["offset"].shape, torch.float32, device, gen))
    expected = []
    for p, g, st, s in zip(params, grads, states, settings):
        st64 = {k: v.double().cpu() for k, v in st.items()}
        st64["step"] = st["step"].clone().cpu()
        w = p.double().cpu().clone()
        reference.update(w, g.double().cpu(), st64, s)
        expected.append((w, st64))

    seg = [_SEGMENT[norm](tuple(p.shape), hd) if norm in _SEGMENT and p.numel() else 0 for p in params]
    layout = ElementwiseLayout([TensorLayout(p.numel(), segment_len=sl, trust_ratio=s["trust_ratio"]) for p, sl, s in zip(params, seg, settings)], BLOCK, device)
    ws = layout.workspaces(torch.float32)
    ws["sums"].fill_(float("nan"))
    work = [torch.full(p.shape, float("nan"), device=device) for p in params]
    kind = {"none": NORM_NONE, "sign": NORM_SIGN}.get(norm, NORM_SEGMENT_L2)
    table = TensorTable(n, device)
    table.set_int(ICOL.NUMEL, [p.numel() for p in params])
    table.set_int(ICOL.PARAM, [p.data_ptr() for p in params])
    table.set_int(ICOL.GRAD, [g.data_ptr() for g in grads])
    table.set_int(ICOL.EXP_AVG, [st["exp_avg"].data_ptr() for st in states])
    table.set_int(ICOL.OFFSET, [st["offset"].data_ptr() if "offset" in st else 0 for st in states])
    table.set_int(ICOL.DIRECTION, [w.data_ptr() for w in work])
    table.set_int(ICOL.DELTA, [w.data_ptr() for w in work])
    table.set_int(ICOL.PARAM_DTYPE, [DTYPE_CODES[param_dtype]] * n)
    table.set_int(ICOL.NORM_KIND, [kind] * n)
    table.set_int(ICOL.W_SEGMENT, layout.w_segment.tolist())
    table.set_int(ICOL.FLAGS, [(FLAG_OFFSET if "offset" in st else 0) | (FLAG_TRUST if s["trust_ratio"] else 0) for st, s in zip(states, settings)])
    for col, values in {
        FCOL.M_COEF: [1.0] * n, FCOL.NESTEROV_M: [1.0] * n, FCOL.BIAS1: [1.0] * n, FCOL.BIAS2: [1.0] * n,
        FCOL.GRAD_SIGN: [1.0] * n, FCOL.LR_K: [s["lr"] for s in settings],
        FCOL.BETA_OFFSET: [s["beta_offset"] or 0.0 for s in settings],
        FCOL.ONE_MINUS_BETA_OFFSET: [1 - (s["beta_offset"] or 0.0) for s in settings],
        FCOL.DECAY: [s["lr"] * s["weight_decay"] for s in settings],
    }.items():  # fmt: skip
        table.set_float(col, values)
    tables = table.upload()
    with mk.count_launches() as log:
        mk.launch_moments(tables, layout, ws, torch.float32)
        if layout.n_post_segments:
            mk.launch_segment_sums(layout.post_segments, ws["partials"], ws["sums"], 0, torch.float32)
        mk.launch_apply(tables, layout, ws, torch.float32)
    assert log.by_name()["apply"] == 1
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[param_dtype]  # one rounding of W
    for i, (p, st, (w_ref, st_ref)) in enumerate(zip(params, states, expected)):
        assert p.dtype == param_dtype
        if p.numel():
            assert rel(p, w_ref) <= tol, (i, shapes[i])
            if "offset" in st:
                assert rel(st["offset"], st_ref["offset"]) <= 1e-6


def reference_settings(norm, role, head_dim):
    return dict(
        preconditioner=None, beta1=0.0, beta2=0.0, eps=1e-8, second_moment="ema", nesterov=False, ema_momentum=False,
        bias_correction=False, norm=norm, role=role, head_dim=head_dim, shape_scale=None, maximize=False,
    )  # fmt: skip


def test_segment_sums_fixed_order(device):
    """Segment sums over ranges longer than the reduce block, written to an offset."""
    gen = torch.Generator().manual_seed(2)
    partials = randn((700,), torch.float32, device, gen)
    segments = torch.tensor([[0, 1], [1, 300], [301, 399], [5, 0]], dtype=torch.int64, device=device)
    sums = torch.full((6,), float("nan"), device=device)
    mk.launch_segment_sums(segments, partials, sums, 2, torch.float32)
    expected = [partials[0], partials[1:301].sum(), partials[301:700].sum(), torch.tensor(0.0)]
    torch.testing.assert_close(sums[2:].cpu(), torch.stack([e.cpu() for e in expected]), rtol=1e-5, atol=1e-5)
    assert torch.isnan(sums[:2]).all()  # nothing written outside out_base + segment


def test_nonfinite_flags_kernel(device):
    tensors = [
        torch.ones(37, device=device),
        torch.ones(5, 7, dtype=torch.bfloat16, device=device),
        torch.ones(100, dtype=torch.float16, device=device),
        torch.ones(3, dtype=torch.float64, device=device),
        torch.ones(0, device=device),
    ]
    tensors[1][4, 6] = float("nan")
    tensors[2][99] = float("-inf")
    layout = mk.nonfinite_layout(tensors, BLOCK)
    assert mk.nonfinite_flags(tensors, layout).tolist() == [False, True, True, False, False]
    tensors[3][0] = float("inf")
    assert mk.nonfinite_flags(tensors, layout).tolist() == [False, True, True, True, False]


def test_launch_counter_api():
    before = mk.launch_count()
    with mk.count_launches() as outer, mk.count_launches(dry_run=True) as inner:
        mk.record("x", 2)
    assert outer.count == inner.count == 2 and outer.by_name() == {"x": 2}
    assert mk.launch_count() == before + 2
