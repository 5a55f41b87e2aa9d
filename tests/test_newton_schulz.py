"""Newton–Schulz, every engine in one place, against the float64 evaluation of `mango.newton_schulz`
(the correctness contract, docs/design.md: NS in fp32 within 1e-4, in 16 bits within 2e-2 over a batch).

Engines (mango.ns_engine): the Triton on-chip kernels and the tiled kernels (each in the textbook and
the Gram form), the triton backend's cuBLAS engine (torch batched GEMMs on its NS stack), the torch
backend's batched NS, and the float64 reference's two forms. Operand dtypes: fp32, and the 16-bit
dtype of each form (bf16 textbook, fp16 Gram). Each Triton launch is also checked against the
float64 `_ref` beside its launcher, on the same tables.

Kernels run under TRITON_INTERPRET=1 on CPU (conftest), or compiled with MANGO_TEST_DEVICE=cuda;
their scratch buffers are poisoned with NaN first, so an element a kernel forgets fails.
"""

from __future__ import annotations

import pytest
import torch

import mango
import mango_kernels as mk
from mango import newton_schulz as ns
from mango.backends.ns_cublas import CublasNSBatch
from mango.backends.ns_gram_host import iterate_large
from mango.backends.torch_backend import batched_newton_schulz
from mango.plan import NormBucket
from mango_kernels import ns_small, ns_tiled

MUON = mango.config.MUON_COEFFICIENTS
QUINTIC = [MUON] * 5
PE5 = list(mango.config.normalize_ns_coefficients("polar_express", 5))
# square, wide, tall with odd sizes, 1×n, n×1, and odd multi-tile matrices (16-row tiles below)
SHAPES = [(3, 16, 16), (3, 8, 20), (3, 21, 6), (3, 1, 9), (3, 9, 1), (2, 37, 29)]
SIXTEEN_BIT = {"textbook": torch.bfloat16, "gram": torch.float16}

ON_CHIP = mk.NSConfig(small_max_rows=128, gram_small_max_rows=64, small_block_c=16)
TILED = mk.NSConfig(small_max_rows=0, gram_small_max_rows=0, block_m=16, block_n=16, block_k=16)  # every item tiled


def rel(actual, expected) -> float:
    """‖a − e‖ / ‖e‖ of a tensor, or of a list of tensors taken together."""
    if isinstance(actual, (list, tuple)):
        return rel(torch.cat([a.detach().double().cpu().reshape(-1) for a in actual]), torch.cat([e.reshape(-1) for e in expected]))
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def expected(X: torch.Tensor, coefficients=QUINTIC, prescale: str = "frobenius") -> torch.Tensor:
    """The float64 textbook evaluation: what every engine is held to."""
    return ns.newton_schulz(X.detach().double().cpu(), coefficients, prescale)


def conditioned(shape, gen) -> torch.Tensor:
    """Matrices with singular values spread over [0.3, 1]: where the NS polynomial is well
    conditioned. (A Gaussian square matrix can have σ_min/‖X‖_F ~ 1e-4, where p⁵ has slope
    a⁵ ≈ 480: even exact arithmetic on the 16-bit-rounded input is ~1% off there.)"""
    B, r, c = shape
    k = min(r, c)
    U = torch.linalg.qr(torch.randn(B, r, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(B, c, k, generator=gen, dtype=torch.float64)).Q
    return (U * torch.linspace(1.0, 0.3, k, dtype=torch.float64)) @ V.mT


# ----------------------------------------------------------------------------------------
# the engines: each runs NS on a list of (B, r, c) batches and returns the results
# ----------------------------------------------------------------------------------------


def _triton(config, method):
    """The Triton kernels: every batch in ONE ragged NSBatch (what the triton backend builds)."""

    def run(Xs, coefficients, dtype, device, prescale="frobenius"):
        specs = [mk.NSSpec.row_major(r, c, B) for B, r, c in (X.shape for X in Xs)]
        batch = mk.NSBatch(specs, dtype, device, config, method=method, large_gram=iterate_large)
        for i, X in enumerate(Xs):
            batch.input_view(i).copy_(X.reshape(-1))
        spectral = prescale == "spectral"
        if spectral:  # the host fills the pre-scale, as the triton backend does
            batch.sums.copy_(torch.cat([ns.spectral_norm(torch.stack(batch.block_views(i)).float()) for i in range(len(Xs))]).square())
        n = len(Xs)
        batch.set_schedule([len(coefficients)] * n, [coefficients] * n, [1e-7] * n, [spectral] * n, [ns.gram_restarts(len(coefficients))] * n)
        for buf in (batch.buffer1, batch.workspace_a, batch.workspace_b):
            buf.fill_(float("nan"))
        batch.run()
        if not coefficients:
            mk.prescale_only(batch, range(n))
        return [batch.output_view(i).view(X.shape) for i, X in enumerate(Xs)]

    return run


def _cublas(method):
    """The triton backend's cuBLAS engine: a CublasNSBatch per batch (one NS bucket each)."""

    def run(Xs, coefficients, dtype, device, prescale="frobenius"):
        out = []
        for X in Xs:
            B, r, c = X.shape
            batch = CublasNSBatch(NormBucket("ns", [], (r, c), (r, c)), B, dtype, device, method)
            batch.bind()
            batch.bind_scratch(torch.full((batch.scratch_numel * torch.finfo(dtype).bits // 8,), 255, dtype=torch.uint8, device=device))  # NaN bytes
            for i in range(B):
                batch.input_view(i).copy_(X[i].reshape(-1))
            batch.set_schedule([len(coefficients)] * B, [coefficients] * B, [1e-7] * B, [prescale == "spectral"] * B)
            batch.run()
            out.append(torch.stack([batch.output_view(i).view(r, c) for i in range(B)]))
        return out

    return run


def _torch(method):
    def run(Xs, coefficients, dtype, device, prescale="frobenius"):
        return [batched_newton_schulz(X, coefficients, prescale, 1e-7, dtype=dtype, method=method) for X in Xs]

    return run


def _reference(method):
    def run(Xs, coefficients, dtype, device, prescale="frobenius"):
        return [mango.reference.newton_schulz(X.to(dtype), coefficients, prescale, method=method) for X in Xs]

    return run


ENGINES = {
    "triton_small-textbook": _triton(ON_CHIP, "textbook"),
    "triton_small-gram": _triton(ON_CHIP, "gram"),
    "triton_tiled-textbook": _triton(TILED, "textbook"),
    "triton_tiled-gram": _triton(TILED, "gram"),
    "cublas-textbook": _cublas("textbook"),
    "cublas-gram": _cublas("gram"),
    "torch-textbook": _torch("textbook"),
    "torch-gram": _torch("gram"),
    "reference-textbook": _reference("textbook"),
    "reference-gram": _reference("gram"),
}


def _dtypes(engine: str) -> list:
    """fp32 and the form's 16-bit dtype; the float64 reference in fp32 and in float64 (its readable
    forms round every op to the operand dtype: in 16 bits they are not an engine)."""
    method = engine.split("-")[1]
    return [torch.float32, torch.float64 if engine.startswith("reference") else SIXTEEN_BIT[method]]


CASES = [(e, dt) for e in ENGINES for dt in _dtypes(e)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(dtype, device, seed=0) -> list:
    """For 16 bits batches of well-conditioned matrices (see `conditioned`); for fp32/fp64, whose
    rounding is far inside their bound, two Gaussian matrices of each shape."""
    gen = torch.Generator().manual_seed(seed)
    if dtype in SIXTEEN_BIT.values():
        return [conditioned(s, gen).to(device=device, dtype=torch.float32) for s in SHAPES]
    return [torch.randn((min(B, 2), r, c), generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32) for B, r, c in SHAPES]


@pytest.mark.parametrize("engine, dtype", CASES, ids=[f"{e}-{str(dt)[6:]}" for e, dt in CASES])
def test_engine_matches_the_float64_textbook_polynomial(engine, dtype, device):
    """Every engine, form and operand dtype, on batches of every shape at once, within the
    correctness contract's bound of float64: fp32 NS 1e-4 for each batch (the float64 forms agree to
    rounding); 16-bit NS 2e-2 over the whole batch — per matrix 16-bit NS is ~1.3–2% off float64
    (torch's bf16 textbook path up to ~2.2% on a small tall matrix), so the bound is a statement about
    a batch, not about every tiny matrix. Results finite, in the operand dtype and the input's shape."""
    Xs = _inputs(dtype, device)
    outs = ENGINES[engine](Xs, QUINTIC, dtype, device)
    want = [expected(X) for X in Xs]
    for X, out, w in zip(Xs, outs, want):
        assert out.shape == X.shape and out.dtype == dtype and torch.isfinite(out).all(), X.shape
        if dtype not in SIXTEEN_BIT.values():
            assert rel(out, w) <= TOLERANCE[dtype], (tuple(X.shape), rel(out, w))
    assert rel(outs, want) <= TOLERANCE[dtype]


SCHEDULES = {"polar_express": PE5, "per-step": [MUON] * 2 + [(2.0, -1.5, 0.5)] * 2, "one-step": [MUON], "no-steps": []}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("engine", [e for e in ENGINES if not e.startswith("reference")])
def test_per_step_coefficients_and_step_counts(engine, schedule, device):
    """One (a, b, c) per step (Polar Express's, a mixed list), one step, and none (the pre-scale alone), in fp32."""
    X = torch.randn(2, 20, 18, generator=torch.Generator().manual_seed(6)).to(device)  # tall: items used transposed
    (out,) = ENGINES[engine]([X], SCHEDULES[schedule], torch.float32, device)
    assert rel(out, expected(X, SCHEDULES[schedule])) <= 1e-4


GRAM_ENGINES = [e for e in ENGINES if e.endswith("gram") and not e.startswith("reference")]


@pytest.mark.parametrize("engine", GRAM_ENGINES)
def test_gram_form_zero_rank_deficient_and_spectral(engine, device):
    """The Gram form, fp32: zero matrices stay zero; a rank-2 input is orthogonalized on its range
    (the null space, where rounding noise is amplified by every form, is left out of the
    comparison); the spectral pre-scale."""
    gen = torch.Generator().manual_seed(3)
    run = ENGINES[engine]
    zero = torch.zeros(2, 12, 20, device=device)
    assert torch.equal(run([zero], QUINTIC, torch.float32, device)[0], zero)
    low = torch.randn(2, 12, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 2, 20, generator=gen, dtype=torch.float64)
    out = run([low.to(device=device, dtype=torch.float32)], QUINTIC, torch.float32, device)[0].double().cpu()
    P = torch.linalg.pinv(low) @ low  # projector onto the row space (cols x cols)
    assert rel(out @ P, expected(low) @ P) <= 1e-4
    G = torch.randn(2, 12, 20, generator=gen).to(device)
    out = run([G], QUINTIC, torch.float32, device, prescale="spectral")[0]
    assert rel(out, expected(G, prescale="spectral")) <= 1e-4


def test_16_bit_kernels_at_least_as_accurate_as_torch_on_gaussian_inputs(device):
    """On Gaussian inputs (any conditioning) the on-chip bf16 kernel is no further from float64 than
    torch's bf16 NS (the same rounded A in both polynomial terms, a·I folded in before M is rounded:
    mango_kernels.ns_common._poly)."""
    gen = torch.Generator().manual_seed(8)
    Xs = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    for X, out in zip(Xs, ENGINES["triton_small-textbook"](Xs, QUINTIC, torch.bfloat16, device)):
        torch_bf16 = batched_newton_schulz(X.cpu().to(torch.bfloat16), QUINTIC, "frobenius", 1e-7)
        assert rel(out, expected(X)) <= 1.1 * rel(torch_bf16, expected(X)) + 1e-3, tuple(X.shape)


def test_gram_form_16_bit_at_model_shapes():
    """The torch engine's Gram form in fp16 at shapes of real models (1×n, head blocks, an MLP
    weight, a tall vocabulary head, reduced), Muon's and Polar Express's coefficients: Muon's within
    2e-2; Polar Express's first polynomials have slope ~20 at σ = 1 (a 1×n matrix is exactly that
    after pre-scaling) and R carries σ², so there its 16-bit path is held to what Muon
    implementations run: no worse than the textbook form in bf16 (1×300: 2.5% vs 6.3%)."""
    for shape in [(1, 1, 300), (1, 300, 1), (2, 64, 768), (1, 768, 3072), (1, 3000, 96)]:
        X = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
        for coefficients, name in ((QUINTIC, "muon"), (PE5, "polar_express")):
            want = expected(X, coefficients)
            out = batched_newton_schulz(X.float(), coefficients, "frobenius", 1e-7, dtype=torch.float16, method="gram")
            bound = 2e-2
            if name == "polar_express":
                textbook = batched_newton_schulz(X.float(), coefficients, "frobenius", 1e-7, dtype=torch.bfloat16)
                bound = max(2e-2, rel(textbook, want))
            assert torch.isfinite(out).all() and rel(out, want) <= bound, (shape, name, rel(out, want))


# ----------------------------------------------------------------------------------------
# the float64 reference itself
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (24, 8), (1, 9), (33, 7)])
def test_reference_newton_schulz_is_the_polynomial(shape):
    """The float64 reference equals an SVD-free evaluation of the same polynomial, exactly, and
    its singular values are p(σ/‖X‖_F) for the quintic p — inside the band it guarantees."""
    X = torch.randn(*shape, dtype=torch.float64)
    a, b, c = MUON
    Y = X.T if shape[0] > shape[1] else X
    Y = Y / torch.linalg.matrix_norm(Y, ord="fro")
    for _ in range(5):
        A = Y @ Y.T
        Y = a * Y + (b * A + c * (A @ A)) @ Y
    want = Y.T if shape[0] > shape[1] else Y
    out = mango.reference.newton_schulz(X, QUINTIC)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    s = torch.linalg.svdvals(X) / X.norm()
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    torch.testing.assert_close(torch.linalg.svdvals(out), s.sort(descending=True).values, rtol=1e-9, atol=1e-12)
    if min(shape) > 1:
        assert float(torch.linalg.svdvals(out).max()) < 1.25  # Muon's quintic keeps σ in ~(0.68, 1.2)


def test_gram_form_needs_its_restart_even_in_fp32():
    """Why the Gram form restarts in every dtype: on a gradient-like input (σ_i ∝ (i+1)^-1.5) the fp32
    Gram form without a restart misses the float64 textbook polynomial by more than the correctness
    contract's fp32 bound (1e-4); with the restart at step 2 it is well inside (and so is the textbook
    form)."""
    gen = torch.Generator().manual_seed(0)
    m, n = 256, 1024
    U = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64)).Q
    X = ns.prescale(U @ torch.diag((torch.arange(m, dtype=torch.float64) + 1) ** -1.5) @ V.T)
    want = ns.textbook(X, QUINTIC)
    assert ns.gram_restarts(5) == (2,)
    assert rel(ns.gram(X.float(), QUINTIC), want) <= 1e-4 and rel(ns.textbook(X.float(), QUINTIC), want) <= 1e-4
    assert rel(ns.gram(X.float(), QUINTIC, restarts=()), want) > 1e-4


def test_flops_count_the_products_each_form_performs():
    m, n = 64, 256
    big, small = 2 * m * m * n, 2 * m**3
    assert ns.textbook_flops(m, n, 5) == ns.textbook_flops(n, m, 5) == 5 * (2 * big + small)
    assert ns.textbook_flops(m, n, 1, symmetric=True) == m * (m + 1) * n + m * m * (m + 1) + big
    assert ns.gram_flops(m, n, 5) == 4 * big + 14 * small  # R, restart (Q·X, R), Q·X; 14 m×m products
    assert ns.flops("gram", m, n, 5) == ns.gram_flops(m, n, 5) and ns.flops("textbook", m, n, 5) == ns.textbook_flops(m, n, 5)


# ----------------------------------------------------------------------------------------
# each Triton launch against the float64 `_ref` beside its launcher
# ----------------------------------------------------------------------------------------


def _items_batch(device, method="textbook", config=TILED):
    """An fp32 NSBatch of row-major, tall and column-major (Conv1D-stored) items, filled with data."""
    gen = torch.Generator().manual_seed(2)
    specs = [mk.NSSpec.row_major(20, 36), mk.NSSpec.row_major(33, 17, 2), mk.NSSpec(24 * 18, [(0, 18, 24, 1, 18)])]
    batch = mk.NSBatch(specs, torch.float32, device, config, method=method, large_gram=iterate_large)
    for buf in (batch.stack, batch.buffer1):
        buf.copy_(torch.randn(buf.shape, generator=gen))
    n = len(specs)
    for i in range(n):  # the host's pre-scale (used by spec 1): twice the squared norm of each item
        batch.sums[specs[i].segment : specs[i].segment + specs[i].n_blocks] = 2 * torch.stack(batch.block_views(i)).square().sum((1, 2))
    batch.set_schedule([5] * n, [PE5] * n, [1e-7] * n, [False, True, False], [ns.gram_restarts(5)] * n)
    return batch


def _float64(batch) -> dict:
    """float64 CPU copies of the batch's buffers, for the references."""
    return {name: getattr(batch, name).detach().double().cpu() for name in ("stack", "buffer1", "workspace_a", "workspace_b", "sums")}


@pytest.mark.parametrize("method", ["textbook", "gram"])
def test_on_chip_launch_equals_its_reference(method, device):
    batch = _items_batch(device, method, ON_CHIP)
    f64 = _float64(batch)
    kw = dict(dtype=torch.float32, block_r=batch.small_block_r, block_c=16, aligned=batch.small_aligned, gram=method == "gram")
    ns_small.ns_small(batch.small_items, batch.small_coef, batch.sums, batch.stack, **kw)
    ns_small.ns_small_ref(batch.small_items.cpu(), batch.small_coef.cpu(), f64["sums"], f64["stack"], **kw)
    assert rel(batch.stack, f64["stack"]) <= 1e-4


def test_tiled_launches_equal_their_references(device):
    """ns_xxt, ns_poly and ns_update, each on the same inputs as its float64 reference (the two
    rewrites' parities, the pre-scale at step 0 from the data and from the sums)."""
    batch = _items_batch(device)
    items, coef, sums = batch.large_items, batch.large_coef, batch.sums
    tiles = dict(block_m=16, block_k=16, aligned=batch.large_aligned, dtype=torch.float32)
    for k in (0, 1):
        f64 = _float64(batch)
        ns_tiled.ns_xxt(items, batch.tri_tiles, batch.stack, batch.buffer1, batch.workspace_a, k, **tiles)
        ns_tiled.ns_xxt_ref(items.cpu(), batch.tri_tiles.cpu(), f64["stack"], f64["buffer1"], f64["workspace_a"], k, **tiles)
        assert rel(batch.workspace_a, f64["workspace_a"]) <= 1e-6, k
        f64 = _float64(batch)
        ns_tiled.ns_poly(items, coef, sums, batch.tri_tiles, batch.workspace_a, batch.workspace_b, k, **tiles)
        ns_tiled.ns_poly_ref(items.cpu(), coef.cpu(), f64["sums"], batch.tri_tiles.cpu(), f64["workspace_a"], f64["workspace_b"], k, **tiles)
        assert rel(batch.workspace_b, f64["workspace_b"]) <= 1e-6, k
        f64 = _float64(batch)
        ns_tiled.ns_update(items, coef, sums, batch.full_tiles, batch.stack, batch.buffer1, batch.workspace_a, batch.workspace_b,
                           k, 1 - k, block_n=16, **tiles)  # fmt: skip
        ns_tiled.ns_update_ref(items.cpu(), coef.cpu(), f64["sums"], batch.full_tiles.cpu(), f64["stack"], f64["buffer1"],
                               f64["workspace_a"], f64["workspace_b"], k, 1 - k, block_n=16, **tiles)  # fmt: skip
        assert rel(batch.buffer1 if k == 0 else batch.stack, f64["buffer1"] if k == 0 else f64["stack"]) <= 1e-6, k


# ----------------------------------------------------------------------------------------
# items: strided views of the stack; launches
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_q, n_kv", [(4, 4), (4, 1)], ids=["MHA", "GQA"])
def test_head_blocks(n_q, n_kv, device):
    """Fused QKV: rows split into head blocks of head_dim (n_q + 2·n_kv of them), a strided
    batch of the same buffer; equals NS of each block on its own."""
    hd, cols = 4, 12
    gen = torch.Generator().manual_seed(4)
    X = torch.randn((2, (n_q + 2 * n_kv) * hd, cols), generator=gen).to(device)
    out = mk.newton_schulz(X, QUINTIC, head_dim=hd, dtype=torch.float32, config=ON_CHIP)
    blocks = expected(X.reshape(-1, hd, cols))
    assert rel(out, blocks.reshape(X.shape)) <= 1e-5


@pytest.mark.parametrize("method, config", [("textbook", ON_CHIP), ("textbook", TILED), ("gram", ON_CHIP), ("gram", TILED)],
                         ids=["on-chip", "tiled", "gram-on-chip", "gram-tiled"])  # fmt: skip
def test_strided_items_conv1d_heads_and_experts(method, config, device):
    """Items are strided views of the stack: the column head blocks of a transposed (in, out)
    weight (HF Conv1D), and experts; each equals NS of that block on its own."""
    from mango.backends.triton_backend import ns_blocks

    gen = torch.Generator().manual_seed(5)
    cases = [
        (NormBucket("ns_split", [], (20, 24), (4, 20), head_dim=4, orientation="in_out"), (20, 24)),  # 6 heads of (4, 20)
        (NormBucket("ns", [], (3, 8, 20), (8, 20), experts=True), (3, 8, 20)),
        (NormBucket("ns", [], (3, 20, 8), (8, 20), experts=True, orientation="in_out"), (3, 20, 8)),
    ]
    for nb, shape in cases:
        d = torch.randn(shape, generator=gen).to(device)
        spec = mk.NSSpec(d.numel(), ns_blocks(nb, d.numel()))
        batch = mk.NSBatch([spec], torch.float32, device, config, method=method, large_gram=iterate_large)
        batch.input_view(0).copy_(d.reshape(-1))
        batch.set_schedule([5], [QUINTIC], [1e-7], None, [ns.gram_restarts(5)])
        batch.run()
        got = torch.stack(batch.block_views(0, out=True))
        blocks = torch.stack([d.reshape(-1).as_strided((r, c), (sr, sc), off) for off, r, c, sr, sc in spec.blocks])
        assert rel(got, expected(blocks)) <= 1e-4, (nb, method)


def test_launches_of_each_engine(device):
    """All on-chip items of every shape: one launch; the tiled textbook form: three per NS step; the
    tiled Gram form: X·Xᵀ and Q·X once each and again at its restart, its m×m iteration on the host."""
    X = torch.randn(3, 8, 20, device=device)
    with mk.count_launches() as log:
        mk.newton_schulz(X, QUINTIC, config=ON_CHIP)
    assert log.by_name() == {"ns_small": 1}
    with mk.count_launches(dry_run=True) as log:
        mk.newton_schulz(X, QUINTIC, config=TILED)
    assert log.by_name() == {"ns_xxt": 5, "ns_poly": 5, "ns_update": 5}
    gram = dict(method="gram", dtype=torch.float16, restarts=ns.gram_restarts(5), large_gram=iterate_large)
    with mk.count_launches() as log:
        mk.newton_schulz(X, QUINTIC, config=ON_CHIP, **gram)
    assert log.by_name() == {"ns_small_gram": 1}
    with mk.count_launches() as log:
        mk.newton_schulz(X, QUINTIC, config=TILED, **gram)
    names = log.by_name()
    assert names["ns_xxt"] == 2 and names["ns_update"] == 2 and "ns_poly" not in names


def test_the_gram_form_is_told_its_restarts_and_its_host_iteration():
    spec = mk.NSSpec.row_major(20, 30)
    with pytest.raises(ValueError, match="large_gram"):
        mk.NSBatch([spec], torch.float32, "cpu", TILED, method="gram")
    batch = mk.NSBatch([spec], torch.float32, "cpu", ON_CHIP, method="gram")
    with pytest.raises(ValueError, match="restarts"):
        batch.set_schedule([5], [QUINTIC], [1e-7])
