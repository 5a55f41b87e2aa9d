"""backend="triton" against the float64 reference (the backends, the kernel design, the correctness
and the reliability contracts of docs/design.md), launches per step, nonfinite.

Kernels run under TRITON_INTERPRET=1 on CPU (conftest) or compiled with MANGO_TEST_DEVICE=cuda;
parameters live on the `device` fixture. Shapes are tiny: the interpreter runs each program in
Python, so the suite stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import mango
import mango_kernels as mk
from helpers import ALL_NORMS, all_params, choose_ns_as_on, make_groups, rel_err, small_ns_launch, state_snapshot

PRECONDITIONERS = [None, "laprop", "adam", "novograd"]
ELEMENTWISE_NORMS = ("l2", "l2_split", "l2_col", "sign", "none")


def groups_on(device, norms=ALL_NORMS, dtype=torch.float32, seed=0, **settings):
    """helpers.make_groups in float32 by default, on `device`."""
    return make_groups(norms, dtype=dtype, seed=seed, device=device, **settings)


def reference_copy(groups):
    """float64 CPU copies of the groups for the oracle."""
    out = []
    for g in groups:
        params = [torch.nn.Parameter(p.detach().double().cpu().clone()) for p in g["params"]]
        out.append(dict({k: v for k, v in g.items() if k != "params"}, params=params))
    return out


def trajectory(opt, steps, seed=1234, grad_dtype=None):
    """Deterministic random gradients (the same values for every copy of a parameter set)."""
    params = all_params(opt)
    for t in range(steps):
        gen = torch.Generator().manual_seed(seed + 7919 * t)
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g.to(dtype=grad_dtype or p.dtype, device=p.device)
        opt.step()
    return params


def pair(groups, steps, triton_kw=None, **kw):
    """(triton params, reference params, initial values) after `steps` steps; `triton_kw` go to
    the triton optimizer only (e.g. ns_dtype: the reference stays float64 throughout)."""
    before = [p.detach().double().cpu().clone() for g in groups for p in g["params"]]
    ref = trajectory(mango.Mango(reference_copy(groups), backend="reference", **kw), steps)
    out = trajectory(mango.Mango(groups, backend="triton", **kw, **(triton_kw or {})), steps)
    return out, ref, before


def displacement_err(out, ref, before) -> float:
    """Relative error of the total update W_T − W_0 (what the optimizer did, not the params)."""
    return rel_err([o.detach().double().cpu() - b for o, b in zip(out, before)], [r.detach() - b for r, b in zip(ref, before)])


# ----------------------------------------------------------------------------------------
# trajectories vs the float64 reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pre, nesterov",
    [(None, True), ("laprop", True), ("laprop", False), ("adam", True), ("adam", False), ("novograd", True)],
    ids=["none", "laprop", "laprop-plain", "adam", "adam-plain", "novograd"],
)
def test_elementwise_trajectory_within_spec(pre, nesterov, device):
    """Every elementwise norm, fp32 params, 10 steps: within the correctness contract's 1e-6 of float64."""
    groups = groups_on(device, ELEMENTWISE_NORMS, preconditioner=pre, nesterov=nesterov, beta_offset=0.9, weight_decay=0.01, lr=0.02)
    out, ref, before = pair(groups, 10)
    assert rel_err(out, ref) <= 1e-6
    assert displacement_err(out, ref, before) <= 1e-5  # the update itself, not just W


@pytest.mark.parametrize("pre", [None, "laprop"], ids=["muon-like", "laprop"])  # others: elementwise tests
def test_newton_schulz_trajectory_fp32(pre, device):
    """ns and ns_split with fp32 NS operands (IEEE dot): 10 steps within 1e-4 of float64, the
    torch backend's fp32 bound; this checks the whole NS pipeline (stack, head blocks, pre-scale)."""
    groups = groups_on(device, ["ns", "ns_split"], preconditioner=pre, beta_offset=0.9, weight_decay=0.01, lr=0.02)
    out, ref, before = pair(groups, 10, triton_kw=dict(ns_dtype=torch.float32))
    assert rel_err(out, ref) <= 1e-6
    assert displacement_err(out, ref, before) <= 1e-4


@pytest.mark.parametrize("schedule", ["muon", "polar_express"])
def test_gram_form_trajectory_fp32(schedule, device):
    """ns_method="gram" on the kernels (on-chip and tiled items, restarts): 10 steps of ns and
    ns_split within the fp32 NS bound of the float64 reference (which runs the Gram form too)."""
    groups = groups_on(device, ["ns", "ns_split"], beta_offset=0.9, lr=0.02, ns_method="gram", ns_coefficients=schedule)
    ref = mango.Mango(reference_copy(groups), backend="reference")
    opt = mango.Mango(groups, backend="triton", ns_dtype=torch.float32)
    opt._backend_for(all_params(opt)[0].device).ns_config = mk.NSConfig(gram_small_max_rows=4, block_m=16, block_n=16, block_k=16)
    before = [p.detach().double().cpu().clone() for p in all_params(ref)]
    out, expected = trajectory(opt, 10), trajectory(ref, 10)
    assert displacement_err(out, expected, before) <= 1e-4


def test_gram_form_fp16_update_within_spec(device):
    """The Gram form's default 16-bit operands (fp16): one step's update within the correctness contract's 2e-2."""
    groups = groups_on(device, ["ns", "ns_split"], beta_offset=None, ns_method="gram")
    out, ref, before = pair(groups, 1)
    assert displacement_err(out, ref, before) <= 2e-2


def test_newton_schulz_bf16_update_within_spec(device):
    """The default bf16 NS: one step's update within the correctness contract's 2e-2 (as the torch backend's test)."""
    groups = groups_on(device, ["ns", "ns_split"], beta_offset=None)
    out, ref, before = pair(groups, 1)
    assert displacement_err(out, ref, before) <= 2e-2


@pytest.mark.parametrize(
    "extra",
    [
        dict(second_moment="sum", trust_ratio=True, maximize=True),
        dict(ema_momentum=True, bias_correction=True, shape_scale="match_rms_adamw"),
        dict(ns_prescale="spectral", ns_steps=3, ns_coefficients=[(3.4445, -4.7750, 2.0315), (2.0, -1.5, 0.5), (2.0, -1.5, 0.5)]),
        dict(ns_steps=0, shape_scale=None, weight_decay=0.0, beta_offset=0.5),
    ],
    ids=["sum-trust-maximize", "ema-biascorr-rms", "spectral-perstep", "ns0-noscale"],
)
def test_options_match_reference_float64(extra, device):
    """float64 params: the kernels compute in float64 (NS by torch): 5 steps agree to 1e-12."""
    groups = groups_on(device, ALL_NORMS, dtype=torch.float64, **extra)
    out, ref, _ = pair(groups, 5)
    assert rel_err(out, ref) <= 1e-12


def test_options_on_the_kernel_newton_schulz(device):
    """Spectral pre-scale, per-step coefficients and ns_steps changes between steps on the
    Triton NS (fp32 operands), including the tiled path for larger matrices."""
    settings = dict(ns_prescale="spectral", ns_steps=3, ns_coefficients=[(3.4445, -4.7750, 2.0315), (2.0, -1.5, 0.5), (2.0, -1.5, 0.5)])
    groups = groups_on(device, ["ns", "ns_split"], **settings)
    ref = mango.Mango(reference_copy(groups), backend="reference")
    opt = mango.Mango(groups, backend="triton", ns_dtype=torch.float32)
    opt._backend_for(all_params(opt)[0].device).ns_config = mk.NSConfig(small_max_rows=4, block_m=16, block_n=16, block_k=16)
    out = trajectory(opt, 2)
    expected = trajectory(ref, 2)
    for o in (opt, ref):
        for g in o.param_groups:
            g["ns_steps"], g["ns_coefficients"], g["ns_prescale"] = 0, (3.4445, -4.7750, 2.0315), "frobenius"
    out = trajectory(opt, 1, seed=99)
    expected = trajectory(ref, 1, seed=99)
    assert rel_err(out, expected) <= 1e-6


def test_mixed_dtypes_in_one_group(device):
    """bf16, fp16, fp32 and fp64 params in one group: two launch groups (fp32 / fp64 compute),
    W written in its own dtype, fp32/fp64 state."""
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    shapes = [(6, 4), (9,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt).to(device)) for dt in dtypes for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().double().cpu()) for p in params]
    opt = mango.Mango([{"params": params, "norm": "l2"}], backend="triton")
    ref = mango.Mango([{"params": ref_params, "norm": "l2"}], backend="reference")
    for _ in range(3):
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g.to(p.dtype).to(device)
            q.grad = g.to(p.dtype).double()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert opt.state[p]["exp_avg"].dtype == (torch.float64 if p.dtype == torch.float64 else torch.float32)
        tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-6, torch.float64: 1e-12}[p.dtype]
        assert rel_err([p], [q]) <= tol, p.dtype


def test_noncontiguous_empty_and_late_params(device):
    """Non-contiguous params (copied in and out), empty tensors (no tiles, step still counted),
    a param that gets its first gradient at step 3 (the plan and tables are rebuilt)."""
    base = torch.randn(6, 8, dtype=torch.float32, device=device)
    nc = torch.nn.Parameter(base.t())
    assert not nc.is_contiguous()
    empty = torch.nn.Parameter(torch.zeros(0, 5, device=device))
    empty_vec = torch.nn.Parameter(torch.zeros(0, device=device))
    late = torch.nn.Parameter(torch.randn(5, device=device))
    ps = [nc, empty, empty_vec, late]
    qs = [torch.nn.Parameter(p.detach().double().cpu().clone()) for p in ps]
    layout = lambda P: [{"params": [P[0], P[1]]}, {"params": [P[2], P[3]], "role": "vector_bias"}]  # noqa: E731
    opt = mango.Mango(layout(ps), backend="triton", ns_dtype=torch.float32)  # nc uses norm "ns"
    ref = mango.Mango(layout(qs), backend="reference")
    gen = torch.Generator().manual_seed(9)
    for t in range(5):
        for i, (p, q) in enumerate(zip(ps, qs)):
            if i == 3 and t < 2:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            g32 = g.float().to(device)
            p.grad = g32.t().contiguous().t() if i == 0 else g32  # a non-contiguous grad too
            q.grad = g.clone()
        opt.step()
        ref.step()
    assert not nc.is_contiguous()
    assert rel_err([nc, late], [qs[0], qs[3]]) <= 1e-6
    assert float(opt.state[empty]["step"]) == 5.0 and float(opt.state[late]["step"]) == 3.0


def test_state_dict_moves_between_backends(device):
    """Shared state layout: triton → state_dict → torch backend (and back) continues like never stopping."""
    groups = groups_on(device, ["ns", "l2", "none"], dtype=torch.float64)
    straight = mango.Mango(copy.deepcopy(groups), backend="reference")
    trajectory(straight, 4)
    first = mango.Mango(groups, backend="triton")
    trajectory(first, 2)
    second = mango.Mango(copy.deepcopy(groups), backend="torch")
    for p, q in zip(all_params(second), all_params(first)):
        p.data.copy_(q.detach())
    second.load_state_dict(first.state_dict())
    trajectory(second, 2, seed=1234 + 7919 * 2)
    assert rel_err(all_params(second), all_params(straight)) <= 1e-12


# ----------------------------------------------------------------------------------------
# a GPT-2-style model
# ----------------------------------------------------------------------------------------


def tiny_gpt(n_layer=1, n_embd=16, n_head=2, vocab=32, tie=False, seed=0):
    from bench.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=8, n_layer=n_layer, n_head=n_head, n_embd=n_embd, tie_weights=tie))


def gpt_optimizers(device, ns_dtype="auto", **model_kw):
    model = tiny_gpt(**model_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied weights: labelled once, with a warning
        groups = mango.param_groups(model, qkv_heads=model.qkv_heads)
    tri = [dict(g, params=[torch.nn.Parameter(p.detach().clone().to(device)) for p in g["params"]]) for g in groups]
    ref = [dict(g, params=[torch.nn.Parameter(p.detach().double().clone()) for p in g["params"]]) for g in groups]
    return mango.Mango(tri, backend="triton", ns_dtype=ns_dtype), mango.Mango(ref, backend="reference")


@pytest.mark.parametrize("ns_dtype, tol", [("auto", 2e-2), (torch.float32, 1e-4)], ids=["bf16-NS", "fp32-NS"])
def test_gpt2_trajectory_matches_reference(ns_dtype, tol, device):
    """mango.Mango(backend="triton") vs backend="reference" in float64 on a GPT-2-style model
    (embeddings, LN gains/biases, fused QKV with head-wise NS, MLP, head): 10 steps. Elementwise-
    only tensors stay within 1e-6; the NS-bound ones within the NS tolerance."""
    tri, ref = gpt_optimizers(device, ns_dtype=ns_dtype)
    before = [p.detach().double().cpu().clone() for p in all_params(tri)]
    out = trajectory(tri, 10)
    expected = trajectory(ref, 10)
    ns_bound = {id(p) for g in tri.param_groups if g["role"] in ("matrix", "qkv_weight", "head") for p in g["params"]}
    split = lambda xs, keep: [x for x, p in zip(xs, all_params(tri)) if (id(p) in ns_bound) == keep]  # noqa: E731
    assert displacement_err(split(out, True), split(expected, True), split(before, True)) <= tol
    assert displacement_err(split(out, False), split(expected, False), split(before, False)) <= 1e-5
    if ns_dtype == torch.float32:
        assert rel_err(out, expected) <= 1e-5


# ----------------------------------------------------------------------------------------
# launches per step
# ----------------------------------------------------------------------------------------

# GPT-2 124M's structure at small width: heads (head_dim rows) take the on-chip NS path,
# the model's matrices the tiled one, as 64-row heads and 768-row matrices do at full size.
GPT2_LIKE = mk.NSConfig(small_max_rows=16, block_m=16, block_n=16, block_k=16)


def gpt_step_optimizer(n_layer, device, n_embd=32, tie=True, ns_config=GPT2_LIKE, memory_budget=None, seed=0):
    """A GPT-2-structured model's triton optimizer with gradients set, its plan built by one dry step."""
    model = tiny_gpt(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab=64, tie=tie, seed=seed)
    model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = mango.Mango(mango.param_groups(model, qkv_heads=model.qkv_heads), backend="triton")
    backend = opt._backend_for(torch.device(device))
    backend.ns_config, backend.memory_budget = ns_config, memory_budget
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return opt


def launch_group(opt):
    (lg,) = opt._plan.cache["triton"][1]
    return lg


def launches_per_step(n_layer, device, dry_run=True, **kw):
    opt = gpt_step_optimizer(n_layer, device, **kw)
    with mk.count_launches(dry_run=True):
        opt.step()  # builds the plan and tables
    with mk.count_launches(dry_run=dry_run) as log:
        opt.step()
    return log, launch_group(opt)


def expected_launches(lg, device, ns_steps=5, table_copies=0) -> dict:
    """Per round: moments, segment sums (if it has l2 segments), one on-chip NS launch per batch
    with head blocks (named by the form its buckets got), 3 per NS step for its tiled matrices,
    apply; plus `table_copies` uploads of the tensor table where it lives on the device (none in
    a step whose addresses and settings are the last step's: the table is uploaded only when
    rewritten, see test_the_table_is_uploaded_only_when_rewritten)."""
    out: dict = {}
    for r in lg.rounds:
        names = ["moments", "apply"] + ["segment_sums"] * bool(r.layout.n_post_segments)
        for batch, _ in r.ns_batches:
            assert not (batch.large and batch.method == "gram"), "the tiled Gram form's launches are not modelled here"
            names += [small_ns_launch(batch)] * bool(batch.small) + ["ns_xxt", "ns_poly", "ns_update"] * ns_steps * bool(batch.large)
        for n in names:
            out[n] = out.get(n, 0) + 1
    if table_copies:
        out["table_copy"] = table_copies
    return out


def test_launches_per_step_gpt2_structure_independent_of_depth(device):
    """GPT-2 structure (tied embedding/head, fused QKV): one round — everything in its buffers at
    once — is 19 launches (≤ 64) at any depth: moments, segment sums, one on-chip NS launch, 3 per
    NS step for the tiled matrices, apply. Within the memory budget the same step runs in
    rounds, and the count follows the rounds: the same for 6 and 12 layers and another width.
    Counted in dry-run mode (the launch structure is host-side); the test below checks dry-run
    counts equal real ones."""
    check_gpt2_launch_structure(device)


def table_on_a_device(monkeypatch):
    """Give every tensor table a device copy of its own, as on CUDA (on CPU the kernels read the
    host table itself), so a CPU run takes the upload path a GPU step takes."""
    init = mk.tables.TensorTable.__init__

    def separate(self, n, device):
        init(self, n, device)
        self.device_table = self.host.clone()

    monkeypatch.setattr(mk.tables.TensorTable, "__init__", separate)


def test_the_table_is_uploaded_only_when_rewritten(monkeypatch):
    """One table copy in the step that builds the plan, none while addresses and settings stay,
    one when the gradients are new tensors (set_to_none=True) and one when lr changes."""
    table_on_a_device(monkeypatch)

    def copies(opt):
        with mk.count_launches(dry_run=True) as log:
            opt.step()
        return log.by_name().get("table_copy", 0)

    opt = gpt_step_optimizer(1, "cpu")
    assert [copies(opt) for _ in range(3)] == [1, 0, 0]
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    assert copies(opt) == 1 and copies(opt) == 0
    for g in opt.param_groups:
        g["lr"] *= 0.5
    assert copies(opt) == 1 and copies(opt) == 0


def test_gpt2_launch_structure_with_the_cuda_choice_in_a_dry_run(monkeypatch):
    """The same structure with every NS form chosen as on a CUDA device (where "auto" weighs fp16
    tensor cores, so the head blocks may get the Gram form) and the tensor table uploaded as on a
    GPU: the choice is host-side, so a CPU dry run launches what the CUDA step launches, and CI
    sees it without a GPU."""
    choose_ns_as_on(monkeypatch, "cuda")
    table_on_a_device(monkeypatch)
    from mango import ns_engine

    with mk.count_launches(dry_run=True):  # CPU tensors take the triton backend in a dry run, interpreter or not
        opt = gpt_step_optimizer(1, "cpu")
        opt.step()
        lg = launch_group(opt)
        for e in lg.entries:
            if e.ns_kernel:
                group = opt.param_groups[e.bucket.group_index]
                count = e.nb.blocks_per_tensor * len(e.nb.slots)
                want = ns_engine.choose(group, *e.nb.block_shape, lg.dtype, "cpu", "triton", count, arch="sm_90")
                assert (e.ns_choice.engine, e.ns_method, e.ns_dtype) == (want.engine, want.method, want.dtype)
        check_gpt2_launch_structure("cpu")


def check_gpt2_launch_structure(device):
    one = {n: launches_per_step(n, device, memory_budget=float("inf")) for n in (6, 12)}
    for log, lg in one.values():
        (r,) = lg.rounds
        assert sum(bool(b.small) for b, _ in r.ns_batches) == 1 and sum(bool(b.large) for b, _ in r.ns_batches) == 1
        assert log.by_name() == expected_launches(lg, device) and log.count == 19 <= 64
    assert one[6][0].by_name() == one[12][0].by_name()
    (twelve, lg12), (six, lg6) = launches_per_step(12, device), launches_per_step(6, device)
    wider, lgw = launches_per_step(6, device, n_embd=48)
    assert len(lg12.rounds) == len(lg6.rounds) == len(lgw.rounds) > 1
    assert twelve.by_name() == six.by_name() == wider.by_name() == expected_launches(lg12, device)


def test_dry_run_counts_what_a_real_step_launches(device):
    config = mk.NSConfig(small_max_rows=16, block_m=32, block_n=64, block_k=32)  # few tiles: fast to interpret
    real, lg = launches_per_step(1, device, dry_run=False, tie=False, ns_config=config)
    dry, _ = launches_per_step(1, device, dry_run=True, tie=False, ns_config=config)
    assert real.by_name() == dry.by_name() == expected_launches(lg, device)
    assert real.by_name()["ns_update"] == 5 * sum(any(b.large for b, _ in r.ns_batches) for r in lg.rounds)


# ----------------------------------------------------------------------------------------
# memory: rounds within the memory budget
# ----------------------------------------------------------------------------------------


def test_rounds_keep_work_buffers_within_the_budget(device):
    """The arena (every work buffer of a step: NS stacks, second buffers, m×m workspaces, the
    direction buffer) is at most the budget, 2× the largest bucket in its NS dtype — except a round
    holding one tensor whose own buffers exceed it. It is far below one round's need, and the
    budget is what the plan's buckets say."""
    opt = gpt_step_optimizer(12, device)
    with mk.count_launches(dry_run=True):
        opt.step()
    lg = launch_group(opt)
    largest = max(sum(e.numel for e in lg.entries if e.nb is nb) for nb in {id(e.nb): e.nb for e in lg.entries if e.ns_kernel}.values())
    assert lg.budget == 2 * largest * 2  # bf16 NS
    mem = lg.memory()
    assert mem["arena"] == max(mem["round_bytes"])
    for r, nbytes in zip(lg.rounds, mem["round_bytes"]):
        costly = [e for e in r.entries if e.ns_kernel or not e.fused]
        assert nbytes <= lg.budget or len([e for e in costly if e.numel]) == 1
    one = gpt_step_optimizer(12, device, memory_budget=float("inf"))
    with mk.count_launches(dry_run=True):
        one.step()
    assert mem["arena"] <= lg.budget < launch_group(one).memory()["arena"] / 2


@pytest.mark.parametrize("preset, ns_dtype", [("mango", "auto"), ("mango", torch.float32), ("muon", "auto"), ("lamb", "auto")],
                         ids=["bf16-NS", "fp32-NS", "muon", "lamb"])  # fmt: skip
def test_rounds_give_the_same_step_as_one_round(preset, ns_dtype, device):
    """Rounds change when each tensor's stages run, not what they compute: 2 steps in rounds and in
    one round give the same parameters and state, bit for bit — NS buckets split across rounds, and
    LAMB's l2 directions (with the trust ratio) packed into rounds by their work-buffer bytes.
    On a GPU this needs every kernel to compute an item the same whatever else shares its launch:
    the on-chip NS tile is as tall as the largest small item of its batch, and a block reduction or
    dot follows the tile's thread layout, so an 8-row item in a 16-row tile (alone in its round)
    and in a 32-row one (beside 32-row items) rounded differently in fp32 (bf16/fp16 outputs hid
    it). Each round's batch therefore runs in the tile height one round would use: checked here
    on the plan, and bit for bit on the results."""
    config = mk.NSConfig(small_max_rows=16, block_m=32, block_n=64, block_k=32)  # few tiles: fast to interpret
    runs = []
    # without NS the budget is 2× the largest l2 bucket (here most of the model): a smaller one forces rounds
    bounded = 16 * 1024 if preset == "lamb" else None
    for budget in (bounded, float("inf")):
        model = tiny_gpt(n_layer=2, n_embd=32, n_head=4, vocab=64, tie=True)
        model.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = mango.param_groups(model, qkv_heads=model.qkv_heads)
            opt = getattr(mango.presets, preset)(groups, backend="triton", **({"ns_dtype": ns_dtype} if preset == "mango" else {}))
        backend = opt._backend_for(torch.device(device))
        backend.ns_config, backend.memory_budget = config, budget
        params = trajectory(opt, 2)
        lg = launch_group(opt)
        heights = {(b.dtype, b.method, b.small_block_r) for r in lg.rounds for b, _ in r.ns_batches if b.small}
        runs.append((len(lg.rounds), heights, [p.detach().clone() for p in params], state_snapshot(opt)))
    (rounds, h_rounds, p_rounds, s_rounds), (single, h_one, p_one, s_one) = runs
    assert rounds > 1 and single == 1
    assert h_rounds == h_one
    for a, b in zip(p_rounds, p_one):
        assert torch.equal(a, b)
    assert s_rounds.keys() == s_one.keys()
    for i in s_rounds:
        for k, v in s_rounds[i].items():
            assert torch.equal(v, s_one[i][k]), (i, k)


# ----------------------------------------------------------------------------------------
# non-finite gradients
# ----------------------------------------------------------------------------------------


def test_nonfinite_skip_leaves_params_and_state_bit_identical(device):
    groups = groups_on(device, ["ns", "l2", "sign"], beta_offset=0.9)
    opt = mango.Mango(groups, backend="triton", nonfinite="skip")
    trajectory(opt, 2)
    params = all_params(opt)
    before = [p.detach().clone() for p in params]
    state = state_snapshot(opt)
    with mk.count_launches() as log:
        for p in params:
            p.grad = torch.randn_like(p)
        params[1].grad.view(-1)[0] = float("nan")
        opt.step()
    assert opt.skipped_steps == 1
    assert log.by_name().get("nonfinite", 0) == len(opt._plan.buckets)  # one check launch per bucket
    assert "moments" not in log.by_name()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    after = state_snapshot(opt)
    for i in state:
        for k in state[i]:
            assert torch.equal(state[i][k], after[i][k]), (i, k)
    for p in params:  # and the next finite step runs
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(params[0].detach(), before[0])


def test_nonfinite_raise_and_moments_flag(device):
    groups = groups_on(device, ["l2", "none"])
    opt = mango.Mango(groups, backend="triton", nonfinite="raise")
    params = all_params(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad.view(-1)[-1] = float("inf")
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    # "propagate": no pre-check, but the moments kernel's per-tile flags name the tensor afterwards
    opt.nonfinite = "propagate"
    opt.step()
    backend = opt._backend_for(params[0].device)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert backend.last_step_nonfinite(opt._plan) == [names[2]]


def test_round_packing_by_hand():
    """_pack_rounds on made-up costs: NS buckets whole where they fit, first fit by decreasing size,
    a bucket over the budget cut into runs, a tensor over it alone, non-NS directions as one unit,
    costless entries in the first round, plan order inside each round."""
    from types import SimpleNamespace as NS

    from mango.backends.triton_backend import _pack_rounds

    buckets = {name: object() for name in "abcw"}
    spec = [("a", 1, 60), ("a", 1, 60), ("b", 1, 50), ("c", 1, 30), ("c", 1, 30), ("c", 1, 30), ("c", 1, 30),
            ("w", 0, 5), ("w", 0, 5), ("w", 0, 0), ("b", 1, 200)]  # fmt: skip
    entries = [NS(row=i, nb=buckets[b], ns_kernel=bool(ns)) for i, (b, ns, _) in enumerate(spec)]
    cost = [c for _, _, c in spec]
    rounds = [[e.row for e in r] for r in _pack_rounds(entries, cost, budget=130)]
    # pieces: a 120 (fits), b 250 (cut: [2] 50 and [10] 200 alone), c 120 (fits), work 10
    # decreasing: b[10] 200 -> round 0; a 120 -> round 1; c 120 -> round 2; b[2] 50 -> round 3; work 10 -> round 1
    assert rounds == [[9, 10], [0, 1, 7, 8], [3, 4, 5, 6], [2]]
    assert _pack_rounds(entries, [0] * len(entries), budget=130) == [entries]  # nothing costs: one round
