"""Presets against the published algorithms, written out here independently of mango's code."""

import pytest
import torch

import mango
from helpers import rel_err

BACKENDS = ["torch", "reference"]


def _params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _copy(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_matches_torch_optim_muon(backend):
    """The correctness contract: on matrices the muon preset is torch.optim.Muon (same lr convention),
    to bf16 tolerance."""
    shapes = [(32, 16), (16, 48), (24, 24)]
    ours = _params(shapes)
    theirs = _copy(ours)
    start = [p.detach().clone() for p in ours]
    opt = mango.presets.muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16, backend=backend)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for grads in _grads(shapes, 10):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.float(), g.float()
        opt.step()
        ref.step()
    moved = [p.detach() - s for p, s in zip(ours, start)]
    moved_ref = [q.detach() - s for q, s in zip(theirs, start)]
    assert rel_err(moved, moved_ref) <= 2e-2
    assert rel_err(ours, theirs) <= 2e-2


def test_muon_preset_splits_roles_on_a_model():
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = mango.presets.muon(model, lr=0.02, adamw_lr=3e-4)
    by_role = {}
    for g in opt.param_groups:
        by_role.setdefault(g["role"], []).append(g)
    (mat,) = by_role["matrix"]
    assert mat["norm"] == "ns" and mat["preconditioner"] is None and mat["lr"] == 0.02 and mat["ema_momentum"]
    for role in ("embedding", "vector_weight", "vector_bias"):
        for g in by_role[role]:
            assert g["preconditioner"] == "adam" and g["norm"] == "none" and g["lr"] == 3e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_novograd_matches_the_paper(backend):
    """NovoGrad, Algorithm 1 (Ginsburg et al.): layer-wise v with v₁ = ‖g₁‖², decay inside m."""
    shapes = [(6, 5), (7,)]
    lr, b1, b2, eps, wd = 0.01, 0.95, 0.98, 1e-8, 1e-3
    ours = _params(shapes, dtype=torch.float64)
    theirs = [p.detach().clone() for p in ours]
    opt = mango.presets.novograd(ours, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, backend=backend)
    m = [torch.zeros_like(w) for w in theirs]
    v = [None] * len(theirs)
    for grads in _grads(shapes, 10):
        for i, (p, g) in enumerate(zip(ours, grads)):
            p.grad = g.clone()
            norm2 = float(g.pow(2).sum())
            v[i] = norm2 if v[i] is None else b2 * v[i] + (1 - b2) * norm2
            m[i] = b1 * m[i] + (g / (v[i] ** 0.5 + eps) + wd * theirs[i])
            theirs[i] = theirs[i] - lr * m[i]
        opt.step()
    assert rel_err(ours, theirs) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_matches_its_formula(backend):
    """LAMB (You et al.): Adam direction r = m̂/(√v̂+ε), step lr·‖w‖/‖r‖·r per tensor."""
    shapes = [(6, 5), (7,), (3, 3)]
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-6
    ours = _params(shapes, dtype=torch.float64)
    theirs = [p.detach().clone() for p in ours]
    opt = mango.presets.lamb(ours, lr=lr, betas=(b1, b2), eps=eps, backend=backend)
    m = [torch.zeros_like(w) for w in theirs]
    v = [torch.zeros_like(w) for w in theirs]
    for t, grads in enumerate(_grads(shapes, 10), start=1):
        for i, (p, g) in enumerate(zip(ours, grads)):
            p.grad = g.clone()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            theirs[i] = theirs[i] - lr * (theirs[i].norm() / r.norm()) * r
        opt.step()
    assert rel_err(ours, theirs) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_laprop_matches_its_formula(backend):
    """LaProp (Ziyin et al.): m ← β1·m + (1−β1)·g/(√(v/c_v)+ε), w ← w − lr·m/c_m."""
    shapes = [(6, 5), (7,)]
    lr, b1, b2, eps = 4e-4, 0.9, 0.999, 1e-15
    ours = _params(shapes, dtype=torch.float64)
    theirs = [p.detach().clone() for p in ours]
    opt = mango.presets.laprop(ours, lr=lr, betas=(b1, b2), eps=eps, backend=backend)
    m = [torch.zeros_like(w) for w in theirs]
    v = [torch.zeros_like(w) for w in theirs]
    for t, grads in enumerate(_grads(shapes, 10), start=1):
        for i, (p, g) in enumerate(zip(ours, grads)):
            p.grad = g.clone()
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m[i] = b1 * m[i] + (1 - b1) * g / ((v[i] / (1 - b2**t)).sqrt() + eps)
            theirs[i] = theirs[i] - lr * m[i] / (1 - b1**t)
        opt.step()
    assert rel_err(ours, theirs) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_mango_matches_the_report_written_out(backend):
    """The report's final update (section 4) for one matrix, with the NS polynomial as Muon's."""
    shape = (6, 10)
    lr, b1, b2, bo, eps = 0.01, 0.95, 0.95, 0.99, 1e-8
    (ours,) = _params([shape], dtype=torch.float64)
    W = ours.detach().clone()
    opt = mango.presets.mango([ours], lr=lr, backend=backend)
    m, v, O = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    a, b, c = 3.4445, -4.7750, 2.0315
    for (g,) in _grads([shape], 10):
        ours.grad = g.clone()
        v = b2 * v + (1 - b2) * g * g
        u = g / (v.sqrt() + eps)
        m = b1 * m + u
        X = b1 * m + u
        X = X / torch.linalg.matrix_norm(X)
        for _ in range(5):
            A = X @ X.T
            X = a * X + (b * A + c * (A @ A)) @ X
        s = lr * X  # rows < cols: shape factor √max(1, 6/10) = 1
        O = bo * O + (1 - bo) * s
        W = W - (s + O)
        opt.step()
    assert rel_err([ours], [W]) <= 1e-12


def test_mango_preset_on_gpt_like_model_uses_report_norms():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = torch.nn.Linear(16, 48)
            self.c_proj = torch.nn.Linear(16, 16)

    model = torch.nn.ModuleDict(dict(wte=torch.nn.Embedding(10, 16), attn=Attn(), ln=torch.nn.LayerNorm(16)))
    opt = mango.presets.mango(model, qkv_heads={"attn.c_attn": 4})
    norms = {}
    for g in opt.param_groups:
        for name in g["param_names"]:
            norms[name] = (g["role"], g["norm"] or mango.config.ROLE_DEFAULT_NORM[g["role"]], g["head_dim"])
    assert norms["attn.c_attn.weight"] == ("qkv_weight", "ns_split", 4)
    assert norms["attn.c_attn.bias"] == ("qkv_bias", "l2_split", 4)
    assert norms["attn.c_proj.weight"][:2] == ("matrix", "ns")
    assert norms["attn.c_proj.bias"][:2] == ("vector_bias", "l2")
    assert norms["wte.weight"][:2] == ("embedding", "none")
    assert norms["ln.weight"][:2] == ("vector_weight", "none")
    assert opt.defaults["lr"] == 0.01 and opt.defaults["beta_offset"] == 0.99 and opt.defaults["nesterov"]
