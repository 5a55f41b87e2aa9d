"""Param groups as torch.optim treats them: foreign keys kept, torch's `betas` spelling, strict
checks of mango's own settings and of loaded checkpoints (the roles and the reliability contract)."""

import io
import math
import warnings

import pytest
import torch

import mango
from helpers import all_params, make_groups, run_trajectory, state_snapshot


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _opt(*shapes, **kw):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    return mango.Mango(params, backend="torch", **kw)


# ----------------------------------------------------------------------------------------
# keys mango does not own
# ----------------------------------------------------------------------------------------
def test_foreign_keys_survive_constructor_add_group_and_checkpoints():
    w, b, c = (torch.nn.Parameter(torch.randn(s)) for s in ((4, 4), (4,), (3, 3)))
    opt = mango.Mango([{"params": [w], "lr_scale": 0.5, "tag": "body"}, {"params": [b]}], backend="torch")
    opt.add_param_group({"params": [c], "lr_scale": 2.0})
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # adds initial_lr, max_lr, min_lr, ...
    sd = _round_trip(opt.state_dict())
    assert sd["param_groups"][0]["lr_scale"] == 0.5 and sd["param_groups"][0]["tag"] == "body"
    assert sd["param_groups"][2]["lr_scale"] == 2.0
    assert all({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"} <= set(g) for g in sd["param_groups"])
    fresh = mango.Mango([{"params": [w]}, {"params": [b]}, {"params": [c]}], backend="torch")
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr_scale"] == 0.5 and fresh.param_groups[2]["max_lr"] == 0.1
    assert mango.config.foreign_keys(fresh.param_groups[0]) == sorted(
        ["lr_scale", "tag", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"]
    )


def test_scheduler_then_load_state_dict_keeps_initial_lr():
    opt = mango.Mango(torch.nn.Linear(4, 4).parameters())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["initial_lr"] == 0.01


@pytest.fixture
def fresh_key_warnings(monkeypatch):
    monkeypatch.setattr(mango.config, "_warned_keys", set())


@pytest.mark.parametrize("key, setting", [("weight_decai", "weight_decay"), ("nestrov", "nesterov"), ("ns_step", "ns_steps"), ("beta_1", "beta1")])
def test_misspelt_setting_is_kept_and_warned_once_naming_the_setting(fresh_key_warnings, key, setting):
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match=rf"key '{key}' is not a mango setting.*did you mean '{setting}'\?"):
        opt = mango.Mango([{"params": [w], key: 0.1}], backend="torch")
    assert opt.param_groups[0][key] == 0.1 and opt.param_groups[0][setting] == mango.config.DEFAULTS[setting]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [b], key: 0.2})  # the same key again: silent
        mango.Mango([{"params": [torch.nn.Parameter(torch.randn(2))], key: 0.1}], backend="torch")


def test_known_foreign_keys_and_keys_like_nothing_are_kept_silently(fresh_key_warnings):
    w = torch.nn.Parameter(torch.randn(4, 4))
    keys = {"initial_lr": 0.01, "max_lr": 0.1, "min_lr": 0.0, "lr_scale": 0.5, "momentum": 0.9, "tag": "body", "xyz": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = mango.Mango([{"params": [w], "role": "matrix", **keys}], backend="torch")
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        opt.load_state_dict(opt.state_dict())
    assert all(opt.param_groups[0][k] == v for k, v in keys.items() if k not in ("initial_lr", "max_lr", "min_lr", "momentum"))


# ----------------------------------------------------------------------------------------
# torch's betas=(β1, β2)
# ----------------------------------------------------------------------------------------
def test_betas_spelling_sets_beta1_beta2_everywhere():
    opt = _opt((4, 4), betas=(0.8, 0.9))
    g = opt.param_groups[0]
    assert (g["beta1"], g["beta2"], tuple(g["betas"])) == (0.8, 0.9, (0.8, 0.9))
    assert opt.defaults["betas"] == (0.8, 0.9)
    p = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [p], "betas": (0.5, 0.6)})
    assert (opt.param_groups[1]["beta1"], opt.param_groups[1]["beta2"]) == (0.5, 0.6)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "beta1": 0.7})
    assert tuple(opt.param_groups[2]["betas"]) == (0.7, 0.9)


@pytest.mark.parametrize(
    "kwargs,group",
    [
        (dict(betas=(0.8, 0.9), beta1=0.7), None),
        ({}, {"betas": (0.8, 0.9), "beta2": 0.5}),
        ({}, {"betas": (0.8,)}),
        ({}, {"betas": (0.8, 1.0)}),
        ({}, {"betas": 0.9}),
    ],
    ids=["ctor-disagree", "group-disagree", "not-a-pair", "beta2-out-of-range", "scalar"],
)
def test_bad_betas_are_rejected_naming_the_setting(kwargs, group):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="beta"):
        mango.Mango([dict(group, params=[p])] if group else [p], **kwargs)


def _step(opt, seed=0):
    for p in all_params(opt):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
    opt.step()


def test_betas_sync_rule_whichever_changed_wins():
    opt = _opt((4, 4))
    g = opt.param_groups[0]
    g["betas"] = (0.85, 0.95)  # what OneCycleLR / CyclicLR write
    _step(opt)
    assert g["beta1"] == 0.85 and tuple(g["betas"]) == (0.85, 0.95)
    g["beta1"] = 0.9  # a user's edit in mango's spelling
    assert opt.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)  # state_dict syncs too
    g["beta2"] = 0.99
    _step(opt)
    assert tuple(g["betas"]) == (0.9, 0.99)


def test_betas_both_changed_differently_is_an_error_and_changes_nothing():
    opt = _opt((4, 4))
    _step(opt)
    before = [p.detach().clone() for p in all_params(opt)], state_snapshot(opt)
    g = opt.param_groups[0]
    g["betas"], g["beta1"] = (0.8, 0.95), 0.7
    for p in all_params(opt):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*betas.*beta1"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(all_params(opt), before[0]))
    assert float(opt.state[all_params(opt)[0]]["step"]) == float(before[1][0]["step"])


def test_betas_from_a_scheduler_are_validated():
    opt = _opt((4, 4))
    opt.param_groups[0]["betas"] = (1.5, 0.95)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*beta1"):
        _step(opt)


def test_cyclic_schedulers_drive_beta1():
    """OneCycleLR and CyclicLR with cycle_momentum=True (their default) change the β1 mango uses:
    the run equals one whose beta1 and lr are set by hand to the scheduler's values."""
    for make in (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3),
    ):
        groups = make_groups(("ns", "l2", "sign"), dtype=torch.float32)
        by_hand = mango.Mango([dict(g, params=[p.detach().clone().requires_grad_() for p in g["params"]]) for g in groups], backend="torch")
        opt = mango.Mango(groups, backend="torch")
        sched = make(opt)
        seen = set()
        for t in range(8):
            for h, g in zip(by_hand.param_groups, opt.param_groups):
                h["lr"], h["beta1"] = g["lr"], g["betas"][0]
            seen.add(opt.param_groups[0]["betas"][0])
            for ps in (all_params(opt), all_params(by_hand)):
                for p, gr in zip(ps, [torch.randn(p.shape, generator=torch.Generator().manual_seed(t)) for p in ps]):
                    p.grad = gr
            opt.step()
            by_hand.step()
            sched.step()
        assert len(seen) > 3  # β1 really cycled
        assert all(torch.equal(a, b) for a, b in zip(all_params(opt), all_params(by_hand)))


# ----------------------------------------------------------------------------------------
# strict checks of mango's own settings
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "ns_eps", "trust_clamp", "beta1", "beta2", "beta_offset"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_hyperparameters_are_rejected(name, value):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=rf"invalid {name}=.*"):
        mango.Mango([p], **{name: value})


@pytest.mark.parametrize("value", [0.0, -1.0, "10"])
def test_trust_clamp_must_be_positive(value):
    with pytest.raises(ValueError, match="trust_clamp"):
        mango.Mango([torch.nn.Parameter(torch.randn(3))], trust_ratio=True, trust_clamp=value)


# ----------------------------------------------------------------------------------------
# loading checkpoints
# ----------------------------------------------------------------------------------------
def _trained(shapes, steps=2, **kw):
    opt = _opt(*shapes, **kw)
    for t in range(steps):
        _step(opt, seed=t)
    return opt


def test_mismatched_state_shape_names_parameter_and_both_shapes():
    saved = _round_trip(_trained([(4, 4)]).state_dict())
    w = torch.nn.Parameter(torch.randn(5, 5))
    opt = mango.Mango([{"params": [w], "param_names": ["blocks.0.mlp.weight"]}], backend="torch", lr=0.02)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.weight.*exp_avg has shape \[4, 4\].*expected \[5, 5\]"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.02 and not opt.state  # nothing replaced


def test_novograd_state_needs_its_scalar_v():
    saved = _round_trip(_trained([(4, 4)], preconditioner="novograd", norm="none").state_dict())
    saved["state"][0]["exp_avg_sq"] = torch.zeros(4, 4)
    opt = _opt((4, 4), preconditioner="novograd", norm="none")
    with pytest.raises(ValueError, match=r"exp_avg_sq has shape \[4, 4\], expected \[\] \(NovoGrad"):
        opt.load_state_dict(saved)


def test_loaded_group_with_bad_settings_is_rejected_before_anything_changes():
    saved = _round_trip(_trained([(4, 4)]).state_dict())
    saved["param_groups"][0]["lr"] = math.inf
    opt = _opt((4, 4))
    with pytest.raises(ValueError, match=r"loaded param_groups\[0\].*lr=inf"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.01 and not opt.state


def test_checkpoint_from_before_betas_and_trust_clamp_loads():
    opt = _trained([(4, 4), (3,)])
    sd = _round_trip(opt.state_dict())
    for g in sd["param_groups"]:
        del g["betas"], g["trust_clamp"]
    fresh = _opt((4, 4), (3,))
    for p, q in zip(all_params(fresh), all_params(opt)):
        p.data.copy_(q.detach())
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["trust_clamp"] is None and tuple(fresh.param_groups[0]["betas"]) == (0.95, 0.95)
    run_trajectory(opt, steps=2)
    run_trajectory(fresh, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(all_params(opt), all_params(fresh)))
