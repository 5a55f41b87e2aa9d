"""state_dict round trips (bit-exact, across backends) and bad input: the reliability contract."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

import mango
from helpers import ALL_NORMS, all_params, clone_groups, make_groups, mango_opt, rel_err, run_trajectory, state_snapshot


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_resume_is_bit_exact(backend, dtype):
    groups = make_groups(ALL_NORMS, dtype=dtype)
    resumed_groups = clone_groups(groups)
    straight = mango_opt(groups, backend)
    run_trajectory(straight, steps=4, seed=1)
    run_trajectory(straight, steps=4, seed=2)

    first = mango_opt(resumed_groups, backend)
    run_trajectory(first, steps=4, seed=1)
    saved = _save_load({"opt": first.state_dict(), "params": [p.detach().clone() for p in all_params(first)]})
    fresh_groups = clone_groups(resumed_groups)
    for p, v in zip([p for g in fresh_groups for p in g["params"]], saved["params"]):
        p.data.copy_(v)
    second = mango_opt(fresh_groups, backend)
    second.load_state_dict(saved["opt"])
    for p in all_params(second):
        assert second.state[p]["exp_avg"].dtype == torch.float32  # not cast to the param's bf16
    run_trajectory(second, steps=4, seed=2)
    for a, b in zip(all_params(straight), all_params(second)):
        assert torch.equal(a, b)
    s1, s2 = state_snapshot(straight), state_snapshot(second)
    for i in s1:
        for k in s1[i]:
            assert torch.equal(s1[i][k], s2[i][k]), (i, k)


def test_checkpoint_moves_between_backends():
    groups = make_groups(ALL_NORMS)
    a = mango_opt(groups, "torch")
    run_trajectory(a, steps=3, seed=1)
    sd = _save_load(a.state_dict())
    b_groups = clone_groups(groups)
    b = mango_opt(b_groups, "reference")
    b.load_state_dict(sd)
    run_trajectory(a, steps=3, seed=2)
    run_trajectory(b, steps=3, seed=2)
    assert rel_err(all_params(a), all_params(b)) <= 1e-12


# ----------------------------------------------------------------------------------------
# bad input: a clear error naming the parameter, nothing modified
# ----------------------------------------------------------------------------------------
BAD_SETTINGS = [
    ("lr", -0.1),
    ("lr", math.nan),
    ("beta1", 1.0),
    ("beta1", -0.1),
    ("beta2", 1.5),
    ("beta_offset", 1.0),
    ("eps", -1e-8),
    ("weight_decay", -0.1),
    ("norm", "spectral"),
    ("preconditioner", "adagrad"),
    ("ns_prescale", "nuclear"),
    ("ns_steps", -1),
    ("ns_coefficients", (1.0, 2.0)),
    ("ns_coefficients", "jordan"),  # not a named schedule
    ("ns_method", "svd"),
    ("orientation", "columns"),
    ("experts", "yes"),
    ("shape_scale", "sqrt"),
    ("nesterov", "yes"),
    ("second_moment", "max"),
    ("head_dim", 0),
]


@pytest.mark.parametrize("name,value", BAD_SETTINGS, ids=[f"{n}={v}" for n, v in BAD_SETTINGS])
def test_bad_hyperparameters_name_the_setting(name, value):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=name):
        mango.Mango([p], **{name: value})


def test_ns_schedule_length_must_match_ns_steps():
    """A per-step list or a fixed-length named schedule of another length than an explicit ns_steps."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="ns_coefficients"):
        mango.Mango([p], ns_steps=5, ns_coefficients=[(1.0, 2.0, 3.0)] * 2)
    with pytest.raises(ValueError, match="ns_steps"):
        mango.Mango([p], ns_steps=5, ns_coefficients="polar_express_4")
    with pytest.raises(ValueError, match="ns_method"):
        mango.Mango([p], ns_method="gram", ns_dtype=torch.bfloat16)


def test_bad_group_added_later_leaves_optimizer_unchanged():
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3))
    opt = mango.Mango([p])
    with pytest.raises(ValueError, match="beta1"):
        opt.add_param_group({"params": [q], "beta1": 2.0})
    assert len(opt.param_groups) == 1


def test_bad_backend_and_policy():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="backend"):
        mango.Mango([p], backend="cuda")
    with pytest.raises(ValueError, match="nonfinite"):
        mango.Mango([p], nonfinite="zero")


def test_norm_not_available_for_role():
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match="norm"):
        mango.Mango([{"params": [p], "role": "vector_weight", "norm": "ns"}])


def test_head_count_that_does_not_divide_rows():
    w = torch.nn.Parameter(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"attn\.qkv.*head_dim=3 does not divide its 10 rows"):
        mango.Mango([{"params": [w], "param_names": ["attn.qkv"], "role": "qkv_weight", "head_dim": 3}])


def test_split_norm_without_head_dim():
    w = torch.nn.Parameter(torch.randn(12, 4))
    with pytest.raises(ValueError, match="head_dim"):
        mango.Mango([{"params": [w], "role": "qkv_weight"}])


def test_complex_and_integer_params():
    with pytest.raises(ValueError, match=r"complex"):
        mango.Mango([{"params": [torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))], "param_names": ["z"]}])
    with pytest.raises(ValueError, match=r"floating-point"):
        mango.Mango([torch.zeros(3, dtype=torch.int64)])


def test_sparse_gradient_is_rejected_with_the_name():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = mango.Mango([{"params": [emb.weight], "param_names": ["tok_emb.weight"], "role": "embedding"}])
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"tok_emb\.weight.*sparse"):
        opt.step()
    assert torch.equal(before, emb.weight.detach()) and not opt.state[emb.weight]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_skip_leaves_everything_bit_identical(backend, bad):
    groups = make_groups(ALL_NORMS, dtype=torch.float32)
    opt = mango_opt(groups, backend, nonfinite="skip")
    run_trajectory(opt, steps=2)
    params = all_params(opt)
    before_p = [p.detach().clone() for p in params]
    before_s = state_snapshot(opt)
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p)
    params[3].grad.view(-1)[0] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before_p):
        assert torch.equal(p.detach(), b)
    after_s = state_snapshot(opt)
    for i in before_s:
        for k in before_s[i]:
            assert torch.equal(before_s[i][k], after_s[i][k])
    run_trajectory(opt, steps=1)  # next finite step proceeds
    assert not all(torch.equal(p.detach(), b) for p, b in zip(params, before_p))


def test_nonfinite_raise_names_parameter_and_propagate_is_default():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = mango.Mango([{"params": [w], "param_names": ["blk.w"]}], nonfinite="raise")
    w.grad = torch.full((4, 4), math.nan)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"blk\.w"):
        opt.step()
    assert torch.equal(w.detach(), before)
    opt2 = mango.Mango([w])
    assert opt2.nonfinite == "propagate"
    opt2.step()
    assert torch.isnan(w).all()


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    # Triton binds a kernel to the interpreter when it is defined: import the kernels under it first,
    # or the later tests of this process would get compiled kernels and no driver to run them
    import mango.backends.triton_backend  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = mango.Mango([w], backend="triton")
    w.grad = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="triton"):
        opt.step()


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_of_optimizer(backend, how):
    """A copy taken mid-run (copy.deepcopy, or a pickle.dumps/loads round trip, as torch.optim
    optimizers allow) owns its parameters and state, and its next steps equal the original's bit for bit."""
    opt = mango_opt(make_groups(ALL_NORMS), backend)
    run_trajectory(opt, steps=2, seed=1)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert not any(a is b for a, b in zip(all_params(clone), all_params(opt)))
    assert all(torch.equal(a, b) for a, b in zip(all_params(clone), all_params(opt)))
    run_trajectory(clone, steps=3, seed=2)  # the copy first: had it shared a tensor, the original would move twice
    run_trajectory(opt, steps=3, seed=2)
    for a, b in zip(all_params(clone), all_params(opt)):
        assert torch.equal(a, b)
    s1, s2 = state_snapshot(clone), state_snapshot(opt)
    assert s1.keys() == s2.keys() and len(s1) == len(all_params(opt))
    for i in s1:
        for k in s1[i]:
            assert torch.equal(s1[i][k], s2[i][k]), (i, k)
    assert [g["norm"] for g in clone.param_groups] == [g["norm"] for g in opt.param_groups]


def test_nonfinite_skip_with_empty_tensors():
    """The reliability contract: empty tensors are fine in every mode, including the non-finite check."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    e = torch.nn.Parameter(torch.zeros(0, 3))
    opt = mango.Mango([w, e], nonfinite="skip", backend="torch")
    w.grad, e.grad = torch.randn(4, 4), torch.zeros(0, 3)
    opt.step()
    assert opt.skipped_steps == 0 and float(opt.state[w]["step"]) == 1.0
    w.grad = torch.full((4, 4), math.inf)
    before = w.detach().clone()
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(w.detach(), before)


EMPTY_SHAPES = [(5, 0), (0, 5), (0,), (0, 0), (3, 0, 2)]


def _step_with_empties(preset, backend, empties: bool):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    es = [torch.nn.Parameter(torch.zeros(s)) for s in EMPTY_SHAPES] if empties else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the triton backend's interpreter notice
        opt = getattr(mango.presets, preset)([w, *es], backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        w.grad = torch.randn(6, 4, generator=gen)
        for e in es:
            e.grad = torch.zeros_like(e)
        opt.step()
    return w, es, opt


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("preset", ["mango", "muon", "lamb", "laprop", "novograd"])
def test_empty_tensors_are_a_no_op_on_every_backend(preset, backend):
    """0-row, 0-col, 0-length and 3-d empty params beside a real one (NS norms included, where the
    reference once divided by a zero column count): steps run, the empties stay empty with empty
    state, and the real parameter moves exactly as without them."""
    w, es, opt = _step_with_empties(preset, backend, empties=True)
    alone, _, _ = _step_with_empties(preset, backend, empties=False)
    for e, shape in zip(es, EMPTY_SHAPES):
        assert e.shape == shape
        assert all(v.numel() == 0 for v in opt.state[e].values() if torch.is_tensor(v) and v.dim() > 0)
    assert torch.isfinite(w).all() and rel_err(w.detach(), alone.detach()) <= 1e-6


@pytest.mark.parametrize("pre", [None, "laprop", "adam", "novograd"], ids=str)
@pytest.mark.parametrize("offset", [0.99, None])
def test_state_keys_name_what_init_state_creates(pre, offset):
    """The plan only allocates state when `state_keys` says an entry is missing: the two must agree."""
    from mango.reference import init_state, state_keys

    settings = dict(mango.config.DEFAULTS, preconditioner=pre, beta_offset=offset)
    assert set(init_state(torch.zeros(3, 2), settings)) == state_keys(settings)
