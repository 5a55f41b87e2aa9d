"""The batched torch backend against the float64 reference (the correctness contract), over every combination."""

import itertools

import pytest
import torch

import mango

from helpers import ALL_NORMS, clone_groups, make_groups, mango_opt, rel_err, run_trajectory

PRECONDITIONERS = [None, "laprop", "adam", "novograd"]
ELEMENTWISE_NORMS = ("l2", "l2_split", "l2_col", "sign", "none")


def _settings(pre, nesterov, offset):
    s = dict(preconditioner=pre, nesterov=nesterov, beta_offset=0.9 if offset else None, weight_decay=0.01, lr=0.02)
    return s


@pytest.mark.parametrize("offset", [True, False], ids=["offset", "no-offset"])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("pre", PRECONDITIONERS, ids=str)
def test_float64_trajectory_matches_reference(pre, norm, nesterov, offset):
    """Same math in float64: 12 steps agree to rounding (far inside the correctness contract's 1e-6)."""
    groups = make_groups([norm], **_settings(pre, nesterov, offset))
    ref = run_trajectory(mango_opt(clone_groups(groups), "reference"), steps=12)
    out = run_trajectory(mango_opt(groups, "torch"), steps=12)
    assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("norm", ELEMENTWISE_NORMS)
@pytest.mark.parametrize("pre", PRECONDITIONERS, ids=str)
def test_float32_elementwise_within_spec(pre, norm, nesterov):
    """fp32 torch backend vs float64 reference: elementwise stages within 1e-6 (the correctness contract)."""
    groups = make_groups([norm], dtype=torch.float32, **_settings(pre, nesterov, True))
    ref = run_trajectory(mango_opt(clone_groups(groups, torch.float64), "reference"), steps=10)
    out = run_trajectory(mango_opt(groups, "torch"), steps=10)
    assert rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("norm", ["ns", "ns_split"])
@pytest.mark.parametrize("pre", PRECONDITIONERS, ids=str)
def test_float32_newton_schulz_trajectory(pre, norm):
    """fp32 NS amplifies rounding by the polynomial's slope (~a^steps); 1e-4 holds with margin
    and is 200× tighter than the bf16 bound of the correctness contract."""
    groups = make_groups([norm], dtype=torch.float32, ns_dtype=torch.float32, **_settings(pre, True, True))
    ref = run_trajectory(mango_opt(clone_groups(groups, torch.float64), "reference"), steps=10)
    out = run_trajectory(mango_opt(groups, "torch"), steps=10)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("norm", ["ns", "ns_split"])
def test_bf16_newton_schulz_within_spec(norm):
    """ns_dtype=bfloat16 (the GPU default) vs float64: one step within the correctness contract's 2e-2,
    on the update."""
    groups = make_groups([norm], dtype=torch.float32, beta_offset=None)
    before = [p.detach().clone() for g in groups for p in g["params"]]
    ref = run_trajectory(mango_opt(clone_groups(groups, torch.float64), "reference"), steps=1)
    out = run_trajectory(mango_opt(groups, "torch", ns_dtype=torch.bfloat16), steps=1)
    upd_out = [a.detach() - b for a, b in zip(out, before)]
    upd_ref = [a.detach() - b.double() for a, b in zip(ref, before)]
    assert rel_err(upd_out, upd_ref) <= 2e-2


@pytest.mark.parametrize(
    "extra",
    [
        dict(second_moment="sum"),
        dict(ns_prescale="spectral"),
        dict(ns_steps=6, ns_coefficients=[(3.4445, -4.7750, 2.0315)] * 3 + [(2.0, -1.5, 0.5)] * 3),
        dict(shape_scale=None),
        dict(shape_scale="match_rms_adamw"),
        dict(trust_ratio=True),
        dict(ema_momentum=True),
        dict(ema_momentum=True, bias_correction=True),
        dict(maximize=True),
        dict(weight_decay=0.0, beta_offset=0.5),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())[:40],
)
def test_options_match_reference(extra):
    groups = make_groups(ALL_NORMS, **extra)
    ref = run_trajectory(mango_opt(clone_groups(groups), "reference"), steps=10)
    out = run_trajectory(mango_opt(groups, "torch"), steps=10)
    assert rel_err(out, ref) <= 1e-12


def test_mixed_dtypes_in_one_group():
    """bf16, fp16, fp32 and fp64 params in one group: each updated in its own dtype, fp32/fp64 state."""
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(dt)) for dt in dtypes]
    ref_params = [torch.nn.Parameter(p.detach().double()) for p in params]
    opt = mango_opt([{"params": params}], "torch", ns_dtype=torch.float32)
    ref = mango_opt([{"params": ref_params}], "reference")
    for t in range(3):
        g = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        for p, q in zip(params, ref_params):
            p.grad = g.to(p.dtype)
            q.grad = g.to(p.dtype).double()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert p.dtype in dtypes
        assert opt.state[p]["exp_avg"].dtype == (torch.float64 if p.dtype == torch.float64 else torch.float32)
        # the param is rounded to its dtype each step; compare within that dtype's resolution
        tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5, torch.float64: 1e-5}[p.dtype]
        assert rel_err([p], [q]) <= tol


def test_params_without_grad_untouched_and_late_joiners():
    groups = make_groups(["ns", "l2"])
    opt = mango_opt(groups, "torch")
    ref = mango_opt(clone_groups(groups), "reference")
    P, R = [p for g in opt.param_groups for p in g["params"]], [p for g in ref.param_groups for p in g["params"]]
    frozen = P[1].detach().clone()
    gen = torch.Generator().manual_seed(5)
    for t in range(6):
        for i, (p, q) in enumerate(zip(P, R)):
            if i == 1 and t < 3:  # no grad for the first three steps, then it joins
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if t < 3:
            assert torch.equal(P[1].detach(), frozen)
            assert P[1] not in opt.state or not opt.state[P[1]]
    assert float(opt.state[P[1]]["step"]) == 3.0 and float(opt.state[P[0]]["step"]) == 6.0
    assert rel_err(P, R) <= 1e-12


def test_lr_scheduler_and_closure():
    groups = make_groups(["ns", "none"])
    opt = mango_opt(groups, "torch")
    ref = mango_opt(clone_groups(groups), "reference")
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, ref)]
    for t in range(5):
        for o in (opt, ref):
            params = [p for g in o.param_groups for p in g["params"]]

            def closure(params=params, t=t):
                gen = torch.Generator().manual_seed(t)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                return torch.tensor(float(t))

            assert float(o.step(closure)) == float(t)
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 6)
    assert rel_err(*[[p for g in o.param_groups for p in g["params"]] for o in (opt, ref)]) <= 1e-12


def test_zero_grad_and_zero_gradients_give_finite_results():
    groups = make_groups(ALL_NORMS)
    opt = mango_opt(groups, "torch")
    params = [p for g in groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)  # zero gradients: no update at all
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_empty_and_noncontiguous_params():
    base = torch.randn(6, 8, dtype=torch.float64)
    nc = torch.nn.Parameter(base.t())  # non-contiguous (8, 6) view
    assert not nc.is_contiguous()
    empty = torch.nn.Parameter(torch.zeros(0, 5, dtype=torch.float64))
    empty_vec = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    ref_nc = torch.nn.Parameter(nc.detach().clone())
    opt = mango_opt([{"params": [nc, empty]}, {"params": [empty_vec], "role": "vector_bias"}], "torch")
    ref = mango_opt([{"params": [ref_nc]}], "reference")
    for t in range(4):
        g = torch.randn(8, 6, dtype=torch.float64)
        nc.grad, ref_nc.grad = g.clone(), g.clone()
        empty.grad = torch.zeros(0, 5, dtype=torch.float64)
        empty_vec.grad = torch.zeros(0, dtype=torch.float64)
        opt.step()
        ref.step()
    assert rel_err([nc], [ref_nc]) <= 1e-12
    assert empty.shape == (0, 5) and float(opt.state[empty]["step"]) == 4.0


def test_head_split_is_blockwise():
    """ns_split must equal NS applied to each head block separately (GQA: 8 + 2×2 blocks)."""
    from mango import reference
    from mango.config import normalize_ns_coefficients

    hd, cols = 4, 16
    d = torch.randn(12 * hd, cols, dtype=torch.float64)
    settings = dict(head_dim=hd, ns_prescale="frobenius", ns_eps=1e-7, ns_steps=5, ns_coefficients=(3.4445, -4.7750, 2.0315))
    split = reference.normalize(d, "ns_split", settings)
    coeffs = normalize_ns_coefficients(settings["ns_coefficients"], 5)
    blocks = torch.cat([reference.newton_schulz(b, coeffs) for b in d.split(hd, dim=0)])
    torch.testing.assert_close(split, blocks, rtol=1e-12, atol=1e-13)  # batched vs single matmul rounding
    from mango.backends.torch_backend import batched_newton_schulz

    batched = batched_newton_schulz(d.view(12, hd, cols), coeffs, "frobenius", 1e-7).reshape(12 * hd, cols)
    torch.testing.assert_close(batched, blocks, rtol=1e-12, atol=1e-12)


def test_plan_is_cached_and_rebuilt_on_structure_change():
    groups = make_groups(["ns", "l2"])
    opt = mango_opt(groups, "torch")
    run_trajectory(opt, steps=2)
    plan = opt._plan
    run_trajectory(opt, steps=1)
    assert opt._plan is plan
    opt.param_groups[0]["norm"] = "l2"
    run_trajectory(opt, steps=1)
    assert opt._plan is not plan


def test_combinations_cover_every_norm_and_preconditioner():
    combos = set(itertools.product(PRECONDITIONERS, ALL_NORMS))
    assert len(combos) == 28


@pytest.mark.parametrize("method", ["textbook", "gram"])
def test_batched_newton_schulz_in_slices_is_the_same(method):
    """Bounding the m×m temporaries (max_temp_bytes) iterates on slices of the batch: bit-identical."""
    from mango.backends.torch_backend import batched_newton_schulz

    X = torch.randn(7, 6, 20, generator=torch.Generator().manual_seed(0))
    coeffs = mango.config.ns_schedule(dict(ns_coefficients="muon", ns_steps=5))
    whole = batched_newton_schulz(X, coeffs, "frobenius", 1e-7, method=method).clone()
    sliced = batched_newton_schulz(X, coeffs, "frobenius", 1e-7, method=method, max_temp_bytes=1)  # one matrix at a time
    assert torch.equal(whole, sliced)


@pytest.mark.parametrize("norm", ["ns", "ns_split"])
def test_gram_form_trajectory_matches_reference(norm):
    """ns_method="gram": 10 steps of the torch backend (fp32 NS) within the correctness contract's fp32 NS bound of the
    float64 reference running the same form; float64 against float64 to rounding."""
    groups = make_groups([norm], dtype=torch.float32, ns_dtype=torch.float32, ns_method="gram", beta_offset=0.9, lr=0.02)
    ref = run_trajectory(mango_opt(clone_groups(groups, torch.float64), "reference"), steps=10)
    out = run_trajectory(mango_opt(groups, "torch"), steps=10)
    assert rel_err(out, ref) <= 1e-4
    groups = make_groups([norm], ns_method="gram", ns_coefficients="polar_express")
    ref = run_trajectory(mango_opt(clone_groups(groups), "reference"), steps=10)
    out = run_trajectory(mango_opt(groups, "torch"), steps=10)
    assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("method", ["textbook", "gram"])
@pytest.mark.parametrize("shape", [(3, 512, 128), (5, 96, 96), (2, 64, 256), (1, 40, 200)], ids=str)
def test_ns_temporaries_in_the_buffers_change_nothing(method, shape):
    """batched_newton_schulz with its two buffers puts the m×m temporaries in room the ping-pong
    leaves (slicing the batch to fit) — or, with no room, allocates them: the result is bit for bit the same
    as with fresh buffers, the input living in the first buffer as in the backend."""
    from mango.backends.torch_backend import batched_newton_schulz

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(*shape, generator=gen, dtype=torch.float32)
    coeffs = ((3.4445, -4.7750, 2.0315),) * 5
    expected = batched_newton_schulz(X.clone(), coeffs, "frobenius", 1e-7, method=method)
    first = torch.empty(X.numel())
    second = torch.empty(X.numel())
    first.copy_(X.reshape(-1))
    got = batched_newton_schulz(first.view(shape), coeffs, "frobenius", 1e-7, method=method, buffers=(first, second))
    assert torch.equal(got, expected)
