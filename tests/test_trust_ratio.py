"""The trust ratio where LAMB defines it specially: ‖W‖ = 0 (a zero-initialised tensor), ‖r‖ = 0,
and the optional clamp φ = min(‖W‖, trust_clamp), on every backend (triton under TRITON_INTERPRET=1).

The definition: φ > 0 scales the normalized step, s = lr·k·φ·Δ; at φ = 0 the ratio is 1, on the
raw direction d for norm "l2" (LAMB's ratio 1 on the Adam step r) and on Δ for every other norm.
"""

import pytest
import torch

import mango
from helpers import rel_err
from mango.reference import newton_schulz

BACKENDS = ["reference", "torch", "triton"]
LR = 0.1


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def _direction_step(norm, d):
    """Δ for one tensor, written out (NS: the float64 polynomial with Muon's coefficients)."""
    if norm in ("l2", "none"):
        return d / d.norm() if norm == "l2" else d
    if norm == "sign":
        return torch.sign(d)
    if norm == "l2_col":
        return d / d.norm(dim=1, keepdim=True)
    return newton_schulz(d, [mango.config.MUON_COEFFICIENTS] * 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["l2", "sign", "none", "l2_col", "ns"])
def test_trust_ratio_from_zero_weights(backend, norm, device):
    """Two steps of plain momentum with β1 = 0 (so d = g) from W = 0, clamp 0.3 < ‖W₁‖; in the
    same bucket a random tensor (φ > 0 from the start) and a zero tensor with zero gradients."""
    shapes = [(6, 5), (6, 5), (6, 5)]
    start = [torch.zeros(6, 5, dtype=torch.float64), torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64), torch.zeros(6, 5, dtype=torch.float64)]
    params = [torch.nn.Parameter(w.clone().to(device)) for w in start]
    role = "matrix" if norm in ("ns", "l2", "sign", "none") else "embedding"
    opt = mango.Mango(
        [{"params": params, "role": role, "norm": norm}], lr=LR, beta1=0.0, preconditioner=None, nesterov=False,
        beta_offset=None, shape_scale=None, trust_ratio=True, trust_clamp=0.3, backend=backend,
    )  # fmt: skip
    expected = [w.clone() for w in start]
    for grads in _grads(shapes, 2):
        grads[2].zero_()
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        for i, g in enumerate(grads):
            if i == 2:
                continue  # r = 0: no step, whatever φ
            phi = min(float(expected[i].norm()), 0.3)
            if phi > 0:
                expected[i] = expected[i] - LR * phi * _direction_step(norm, g)
            else:
                expected[i] = expected[i] - LR * (g if norm == "l2" else _direction_step(norm, g))
    assert float(start[1].norm()) > 0.3 and float(expected[0].norm()) > 0.0
    for i, (p, e) in enumerate(zip(params, expected)):
        if i == 2:
            assert torch.equal(p.detach().cpu(), start[2])
        else:
            assert rel_err([p], [e]) <= 1e-12, i


def _lamb_by_hand(ws, grads_per_step, lr, b1, b2, eps, clamp):
    """LAMB as torch-optimizer writes it (ratio φ(‖W‖)/‖r‖, 1 if either is 0), with Adam's bias
    correction in r as mango's adam preconditioner has it, and φ = min(‖W‖, clamp)."""
    ws = [w.clone() for w in ws]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            phi, r_norm = min(float(ws[i].norm()), clamp), float(r.norm())
            ratio = 1.0 if phi == 0 or r_norm == 0 else phi / r_norm
            ws[i] = ws[i] - lr * ratio * r
    return ws


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_preset_with_clamp_matches_hand_written_lamb(backend, device):
    shapes = [(6, 5), (7,), (3, 3), (4,)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.zeros(6, 5, dtype=torch.float64), 3 * torch.randn(7, generator=gen, dtype=torch.float64),
             0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]  # fmt: skip
    grads = _grads(shapes, 10)
    for step in grads:
        step[3].zero_()  # ‖r‖ = 0 throughout
    lr, b1, b2, eps, clamp = 1e-2, 0.9, 0.999, 1e-6, 1.0
    params = [torch.nn.Parameter(w.clone().to(device)) for w in start]
    opt = mango.presets.lamb(params, lr=lr, betas=(b1, b2), eps=eps, trust_clamp=clamp, backend=backend)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(device)
        opt.step()
    theirs = _lamb_by_hand(start, grads, lr, b1, b2, eps, clamp)
    assert float(start[1].norm()) > clamp > float(start[2].norm())  # the clamp binds on one tensor only
    assert rel_err(params, theirs) <= 1e-12
    assert torch.equal(params[3].detach().cpu(), start[3])
