"""capturable=True: lr and step counters on the device, the step the same bit for bit.

On the CPU the capturable step must equal the default one exactly (same float64 arithmetic for lr·k,
lr·λ and the bias corrections, done by torch ops instead of on the host), with an LR scheduler
changing lr every step and checkpoints moving between the two modes. On CUDA the step is captured
in a CUDA graph and replayed; replays must equal eager steps.
"""

import copy

import pytest
import torch

import mango
import mango_kernels as mk


def _params(device, seed=0, large=False):
    """Small matrices of every kind; `large` adds matrices over 128 rows, which a GPU's "auto" puts
    on the cuBLAS engine (the on-chip kernels take the small ones)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (40, 24), (7, 13), (13,), (3, 8, 5), (0, 4)] + ([(160, 192), (192, 160), (136, 96)] if large else [])
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.device) for p in params]


SETTINGS = {
    "mango": dict(weight_decay=0.01),
    "adam_bias": dict(preconditioner="adam", weight_decay=0.1, ns_dtype=torch.float32),
    "laprop_bias": dict(bias_correction=True, ema_momentum=True, ns_steps=3),
    "novograd": dict(preconditioner="novograd", weight_decay=0.01),
    # the cuBLAS engine (torch GEMMs on the NS stack; the largest bucket in place): both forms
    "cublas": dict(ns_engine="cublas", weight_decay=0.01),
    "cublas_gram": dict(ns_engine="cublas", ns_method="gram", ns_dtype=torch.float32, beta_offset=0.5),
}


def _run(params, opt, sched, steps, first=0):
    for t in range(first, first + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()
        sched.step()


def _make(params, backend, capturable, settings):
    opt = mango.Mango(params, lr=0.02, backend=backend, capturable=capturable, **settings)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.3 * t))
    return opt, sched


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_capturable_equals_default_with_scheduler_and_checkpoints(backend, name):
    settings = SETTINGS[name]
    if backend == "torch" and settings.get("ns_dtype") is None:
        settings = dict(settings, ns_dtype=torch.float32)
    a, b = _params("cpu"), _params("cpu")
    opt_a, sched_a = _make(a, backend, False, settings)
    opt_b, sched_b = _make(b, backend, True, settings)
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor) and opt_b.param_groups[0]["lr"].dtype == torch.float64
    _run(a, opt_a, sched_a, 4)
    _run(b, opt_b, sched_b, 4)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][k]), k
    # one checkpoint layout: lr a float in both; each loads into the other mode
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert [type(g["lr"]) for g in sd_b["param_groups"]] == [float] * len(sd_b["param_groups"])
    assert sd_a["param_groups"][0]["lr"] == sd_b["param_groups"][0]["lr"]
    lr_tensor = opt_b.param_groups[0]["lr"]
    opt_a.load_state_dict(copy.deepcopy(sd_b))
    opt_b.load_state_dict(copy.deepcopy(sd_a))
    assert opt_b.param_groups[0]["lr"] is lr_tensor  # the tensor a captured graph reads, refilled
    assert isinstance(opt_a.param_groups[0]["lr"], float)
    sched_a.load_state_dict(sched_b.state_dict())
    _run(a, opt_a, sched_a, 3, first=4)
    _run(b, opt_b, sched_b, 3, first=4)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"]) == 7.0


def test_capturable_triton_matches_reference():
    """The capturable step against the float64 reference (elementwise tolerance) over 6 steps."""
    a = _params("cpu", seed=3)
    r = [torch.nn.Parameter(p.detach().double().clone()) for p in a]
    opt, sched = _make(a, "triton", True, dict(preconditioner="adam", ns_dtype=torch.float32, weight_decay=0.1))
    ref, ref_sched = _make(r, "reference", False, dict(preconditioner="adam", ns_dtype=torch.float32, weight_decay=0.1))
    for t in range(6):
        for p, q, g in zip(a, r, _grads(a, t)):
            p.grad, q.grad = g, g.double()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for p, q in zip(a, r):
        if p.numel():
            assert (p.double() - q).norm() <= 2e-5 * q.norm(), p.shape


def test_capturable_rejects_bad_values():
    with pytest.raises(ValueError, match="capturable"):
        mango.Mango(_params("cpu"), capturable="yes")
    with pytest.raises(ValueError, match="lr"):
        mango.Mango(_params("cpu"), lr=torch.ones(2))


@pytest.mark.parametrize("capturable", [False, True])
def test_lr_change_rewrites_host_table_only_without_capturable(capturable):
    """A scheduler's new lr refreshes the host table in the default step; the capturable step
    writes lr·k and lr·λ on the device instead (what a graph replay runs), the host table untouched."""
    a = _params("cpu")
    opt, sched = _make(a, "triton", capturable, dict(preconditioner="adam", ns_dtype=torch.float32))
    _run(a, opt, sched, 2)
    (lg,) = opt._plan.cache["triton"][1]
    refreshes = []
    refresh = lg._refresh_settings
    lg._refresh_settings = lambda groups: (refreshes.append(1), refresh(groups))
    with mk.count_launches(dry_run=True) as log:
        _run(a, opt, sched, 2, first=2)
    assert len(refreshes) == (0 if capturable else 2)
    assert ("capturable_columns" in log.by_name()) == capturable


@pytest.mark.parametrize("name", ["mango", "adam_bias", "cublas_gram"])
def test_cuda_graph_replay_equals_eager(device, name):
    """Capture one step in a CUDA graph (after warm-up, grads kept with set_to_none=False), replay it
    with new gradients copied into the same grad tensors and a scheduler changing lr: the replays
    equal eager capturable steps bit for bit. Matrices over 128 rows put the cuBLAS engine's GEMMs
    (its largest bucket in place) in the graph beside the Triton kernels."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (runs in the GPU run)")
    settings = SETTINGS[name]
    eager, graphed = _params(device, large=True), _params(device, large=True)
    opt_e, sched_e = _make(eager, "triton", True, settings)
    opt_g, sched_g = _make(graphed, "triton", True, settings)
    for p in graphed:
        p.grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for t in range(2):  # warm-up: plan, tables, Triton compiles
            for p, g in zip(graphed, _grads(graphed, t)):
                p.grad.copy_(g)
            opt_g.step()
            sched_g.step()
    torch.cuda.current_stream().wait_stream(s)
    _run(eager, opt_e, sched_e, 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    # capture ran nothing: state is as after warm-up; every replay is one step
    for t in range(2, 6):
        for p, g in zip(graphed, _grads(graphed, t)):
            p.grad.copy_(g)
        graph.replay()
        sched_g.step()
    _run(eager, opt_e, sched_e, 4, first=2)
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed):
        assert torch.equal(p, q)
    assert float(opt_e.state[eager[0]]["step"]) == float(opt_g.state[graphed[0]]["step"]) == 6.0
