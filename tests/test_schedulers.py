"""Every LR scheduler of torch.optim.lr_scheduler (and HF's cosine warm-up) with mango: k steps →
torch.save of optimizer + scheduler → torch.load(weights_only=True) into fresh objects →
continue is bit-identical to never stopping (the reliability contract)."""

import inspect
import io

import pytest
import torch
from torch.optim import lr_scheduler as L

import mango
from helpers import all_params, make_groups, state_snapshot

NORMS = ("ns", "l2_split", "l2", "sign")
STEPS, STOP = 12, 5


def _hf_cosine(opt):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=STEPS)


# Each scheduler with its defaults, plus the arguments it requires (and patience=1 so that
# ReduceLROnPlateau acts within the run).
SCHEDULERS = {
    "LambdaLR": lambda o: L.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda s: 0.9),
    "StepLR": lambda o: L.StepLR(o, step_size=3),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 7]),
    "ConstantLR": lambda o: L.ConstantLR(o),
    "LinearLR": lambda o: L.LinearLR(o),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.9),
    "SequentialLR": lambda o: L.SequentialLR(o, [L.LinearLR(o, total_iters=4), L.CosineAnnealingLR(o, T_max=8)], milestones=[4]),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=10),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=STEPS),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o, total_iters=3), L.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=1),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=0.05, step_size_up=4),  # cycle_momentum=True: β1
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=4),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),  # cycle_momentum=True: β1
    "hf_cosine_with_warmup": _hf_cosine,
}


def test_every_torch_scheduler_is_covered():
    names = {n for n, c in vars(L).items() if inspect.isclass(c) and c.__module__ == L.__name__ and not n.startswith("_")}
    names -= {"LRScheduler", "Optimizer"}
    schedulers = {n for n in names if issubclass(getattr(L, n), L.LRScheduler) or n == "ReduceLROnPlateau"}
    assert schedulers <= set(SCHEDULERS), sorted(schedulers - set(SCHEDULERS))


def _fresh(make):
    opt = mango.Mango(make_groups(NORMS, dtype=torch.float32), backend="torch")
    return opt, make(opt)


def _train(opt, sched, steps) -> list:
    """Steps with fixed gradients; returns the (lr, β1) each step used."""
    used = []
    for t in steps:
        used.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        params = all_params(opt)
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if isinstance(sched, L.ReduceLROnPlateau):
            sched.step(1.0 if t < 3 else 0.9)  # improves once, then plateaus: lr is reduced
        else:
            sched.step()
    return used


def _saved(opt, sched):
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach().clone() for p in all_params(opt)]}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_resume_with_scheduler_is_bit_exact(name):
    make = SCHEDULERS[name]
    straight, straight_sched = _fresh(make)
    used = _train(straight, straight_sched, range(STEPS))

    first, first_sched = _fresh(make)
    assert _train(first, first_sched, range(STOP)) == used[:STOP]
    saved = _saved(first, first_sched)
    resumed, resumed_sched = _fresh(make)  # fresh objects, as a new process would build them
    with torch.no_grad():
        for p, v in zip(all_params(resumed), saved["params"]):
            p.copy_(v)
    resumed.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert _train(resumed, resumed_sched, range(STOP, STEPS)) == used[STOP:]
    assert len({lr for lr, _ in used}) > 1  # the schedule did change lr
    if name in ("CyclicLR", "OneCycleLR"):
        assert len({b1 for _, b1 in used}) > 1  # and cycled β1
    for a, b in zip(straight.param_groups, resumed.param_groups):
        assert (a["lr"], a["beta1"], tuple(a["betas"])) == (b["lr"], b["beta1"], tuple(b["betas"]))
    for a, b in zip(all_params(straight), all_params(resumed)):
        assert torch.equal(a, b)
    s1, s2 = state_snapshot(straight), state_snapshot(resumed)
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_warm_up_from_lr_zero_leaves_parameters_unchanged(backend):
    """Warm-ups start at lr = 0 (HF's schedules, LinearLR's start_factor ≈ 0): a step then moves
    nothing, in bf16 NS too (CPU bf16 baddbmm with alpha = beta = 0 returns garbage, not zeros)."""
    shapes = [(64, 32), (32, 64), (48, 48), (64, 32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    before = [p.detach().clone() for p in params]
    opt = mango.Mango(params, lr=0.0, ns_dtype=torch.bfloat16, backend=backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values())
