"""torch.compile of `opt.step()` and of a whole training step: runs on every backend and equals eager.

The torch backend's math is traced and compiled (inductor); the triton and reference backends' step
is one custom operator in the graph (mango.compiled_step); the step's bookkeeping runs eagerly
behind a graph break. An LR scheduler changes lr between steps; the compiled step must not be
recompiled for every new lr. Small MLPs keep compile time down (a few seconds per graph on one core).
The triton backend's tests take the `device` fixture: with MANGO_TEST_DEVICE=cuda they run the
compiled kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import mango
import mango_kernels as mk
from mango import compiled_step

PRESETS = ("mango", "muon", "lamb")
STEPS = 4
TOL = 1e-5  # fp32 NS, compiled vs eager, over the whole trajectory


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6),
    ).to(device)  # fmt: skip


def _optimizer(preset, model, backend="torch", lr_tensor=False):
    opt = getattr(mango.presets, preset)(model, backend=backend, ns_dtype=torch.float32, weight_decay=0.01)
    if lr_tensor:  # as the PyTorch compiled-optimizer tutorial does: lr changes without a recompile
        for g in opt.param_groups:
            g["lr"] = torch.tensor(g["lr"])
    return opt


def _inputs(t, device="cpu"):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(5, 12, generator=gen).to(device), torch.randn(5, 6, generator=gen).to(device)


def _run(preset, mode, steps=STEPS, backend="torch", lr_tensor=False, resume_at=None, compile_backend="inductor", device="cpu"):
    """Parameters after `steps` steps, with a LambdaLR changing lr every step. mode: "eager",
    "step" (torch.compile(opt.step)) or "train" (forward, backward, step, zero_grad compiled).
    resume_at: save the state dicts after that many steps and continue in fresh objects.
    Returns (parameters per step, unique graphs compiled after each step)."""
    torch._dynamo.reset()
    counters.clear()
    model = _model(device)
    opt = _optimizer(preset, model, backend, lr_tensor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))

    def build_step(model, opt):
        def train_step(x, y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        def eager_backward_compiled_step(x, y):
            torch.nn.functional.mse_loss(model(x), y).backward()
            compiled_step()
            opt.zero_grad()

        if mode == "train":
            return torch.compile(train_step, backend=compile_backend)
        if mode == "step":
            compiled_step = torch.compile(opt.step, backend=compile_backend)
            return eager_backward_compiled_step
        return train_step

    step = build_step(model, opt)
    trajectory, graphs = [], []
    for t in range(steps):
        if t == resume_at:
            saved = (model.state_dict(), opt.state_dict(), sched.state_dict())
            model = _model(device)
            opt = _optimizer(preset, model, backend, lr_tensor)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            sched.load_state_dict(saved[2])
            step = build_step(model, opt)
        step(*_inputs(t, device))
        sched.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
        graphs.append(counters["stats"]["unique_graphs"])
    return trajectory, graphs


def _max_diff(a, b) -> float:
    return max(max((x - y).abs().max().item() for x, y in zip(pa, pb)) for pa, pb in zip(a, b))


def _moved(trajectory) -> float:
    first = [p for p in _model().parameters()]
    return max((x.cpu() - y).abs().max().item() for x, y in zip(trajectory[-1], first))


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_step_equals_eager_through_a_state_dict_round_trip(preset):
    """torch.compile(opt.step) for 2 steps, state dicts saved and loaded into fresh objects, 2 more."""
    eager, _ = _run(preset, "eager")
    compiled, graphs = _run(preset, "step", resume_at=2)
    assert _moved(eager) > 1e-4  # the trajectory is not trivial
    assert _max_diff(eager, compiled) <= TOL
    assert graphs[0] >= 1  # something was compiled
    # a new lr is no recompile; new optimizer objects (the resume) are one
    assert graphs[1] == graphs[0] and graphs[3] == graphs[2], graphs


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_train_step_equals_eager(preset):
    """forward, backward, opt.step() and zero_grad() in one compiled function."""
    eager, _ = _run(preset, "eager")
    compiled, graphs = _run(preset, "train")
    assert _max_diff(eager, compiled) <= TOL
    assert graphs[-1] == graphs[0], graphs


def test_tensor_lr_is_the_same_lr():
    eager, _ = _run("mango", "eager", lr_tensor=True)
    reference, _ = _run("mango", "eager")
    compiled, graphs = _run("mango", "step", lr_tensor=True)
    assert _max_diff(eager, reference) <= TOL
    assert _max_diff(eager, compiled) <= TOL
    assert graphs[-1] == graphs[0], graphs


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_opaque_backends_compiled_step_is_the_eager_step(backend, device):
    """The triton backend (here under the Triton interpreter) and the reference backend run their
    step as one custom operator inside the compiled graph: torch.compile(opt.step) gives the eager
    result bit for bit (the same kernels on the same tensors), through an lr schedule and a state
    dict round trip, with no recompile per new lr. Inductor re-inplaces the operator: it is handed
    the optimizer's own params and state, no copies."""
    device = device if backend == "triton" else "cpu"  # MANGO_TEST_DEVICE=cuda: the compiled kernels on a GPU
    eager, _ = _run("mango", "eager", steps=3, backend=backend, device=device)
    copies = compiled_step.stand_in_copies
    compiled, graphs = _run("mango", "step", steps=3, backend=backend, resume_at=1, device=device)
    assert _moved(compiled) > 1e-3
    assert _max_diff(eager, compiled) == 0.0
    assert graphs[2] == graphs[1], graphs  # the fresh objects' first step compiles, their next lr does not
    assert compiled_step.stand_in_copies == copies


def test_compiled_train_step_with_the_triton_step_in_the_graph(device):
    """forward, backward, the triton step (one operator) and zero_grad compiled, a tensor lr changed
    by the schedule (an input of the operator): inductor's forward and backward round differently from
    eager (~1e-8 here), so the trajectory is held to the fp32 bound; one set of graphs for every lr."""
    eager, _ = _run("mango", "eager", steps=3, backend="triton", lr_tensor=True, device=device)
    train, graphs = _run("mango", "train", steps=3, backend="triton", lr_tensor=True, device=device)
    assert _max_diff(eager, train) <= TOL
    assert graphs[-1] == graphs[0], graphs


def test_triton_step_is_one_operator_in_the_graph(device):
    """Traced, the triton step is one mango.backend_step node declaring every tensor it writes (each
    param, its m, v and offset, and the one counter every state["step"] is a view of); the only
    graph break is the call into the eager bookkeeping; the kernels it launches are the eager step's."""
    model, twin = _model(device), _model(device)
    opt, eager_opt = _optimizer("mango", model, "triton"), _optimizer("mango", twin, "triton")
    x, y = _inputs(0, device)
    for m in (model, twin):
        torch.nn.functional.mse_loss(m(x), y).backward()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    counters.clear()
    with mk.count_launches() as compiled_log:
        torch.compile(opt.step, backend=record)()
    with mk.count_launches() as eager_log:
        eager_opt.step()
    reasons = list(counters["graph_break"])
    assert reasons and all("_prepare_step" in r for r in reasons), reasons
    calls = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [torch.ops.mango.backend_step], calls
    n_params = len(list(model.parameters()))
    assert len(calls[0].args[1]) == 4 * n_params + 1
    assert compiled_log.by_name() == eager_log.by_name() and compiled_log.count > 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_operator_is_sound_where_the_compiler_does_not_reinplace():
    """aot_eager runs the functionalized operator as is: it is handed copies of the params and state;
    it steps the optimizer's own tensors and writes the results into the copies, which are copied
    back: the eager result. Inductor's code calls the operator on the graph inputs themselves."""
    from torch._inductor.utils import run_and_get_code

    eager, _ = _run("mango", "eager", steps=2, backend="reference")
    copies = compiled_step.stand_in_copies
    compiled, _ = _run("mango", "step", steps=2, backend="reference", compile_backend="aot_eager")
    assert _max_diff(eager, compiled) == 0.0
    assert compiled_step.stand_in_copies > copies

    model = _model()
    opt = _optimizer("mango", model, "reference")
    torch.nn.functional.mse_loss(model(_inputs(0)[0]), _inputs(0)[1]).backward()
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(torch.compile(opt.step))
    (code,) = [c for c in codes if "mango.backend_step" in c]
    assert "copy" not in code and "clone" not in code, code


def test_compiled_step_is_one_graph_of_the_math():
    """The torch backend's step is traced whole: graph breaks only where the bookkeeping runs."""
    model = _model()
    opt = _optimizer("mango", model)
    torch.nn.functional.mse_loss(model(_inputs(0)[0]), _inputs(0)[1]).backward()
    ops = []

    def count_ops(gm, example_inputs):
        ops.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))
        return gm

    torch._dynamo.reset()
    counters.clear()
    torch.compile(opt.step, backend=count_ops)()
    reasons = list(counters["graph_break"])
    assert reasons and all("_prepare_step" in r for r in reasons), reasons  # only the call into the eager bookkeeping
    assert max(ops) > 100  # moments, NS and apply of every bucket in the one graph after it


def test_bench_contender_compiles_the_torch_backend():
    """bench.step's torch_compiled contender: torch.compile(opt.step), compiled at build; the graph is
    traced (the eager backend keeps this fast) and its steps equal the eager torch backend's."""
    from bench import optimizers, params

    def fill_grads(ps_, t):
        gen = torch.Generator().manual_seed(t)
        for p in ps_:
            p.grad.copy_(torch.randn(p.shape, generator=gen))

    ps = params.resolve_set("tiny")
    compiled_params, eager_params = ps.build("cpu"), ps.build("cpu")
    fill_grads(compiled_params, 0)
    fill_grads(eager_params, 0)
    runner = optimizers.build("torch_compiled", ps, compiled_params, "cpu", compile_backend="eager")
    eager = optimizers.build("torch", ps, eager_params, "cpu")
    eager.step()  # the compiled runner's build took its first step
    assert runner.info["graphs"] >= 1 and runner.info["compile_s"] > 0
    fill_grads(compiled_params, 1)
    fill_grads(eager_params, 1)
    runner.step()
    eager.step()
    assert max((a - b).abs().max().item() for a, b in zip(compiled_params, eager_params)) <= 1e-3  # bf16 NS ("auto" here)
    assert max((a - b).abs().max().item() for a, b in zip(compiled_params, ps.build("cpu"))) > 1e-3  # they moved
    with pytest.raises(optimizers.Unavailable, match="^compile failed: "):
        optimizers.build("torch_compiled", ps, ps.build("cpu"), "cpu", compile_backend="no_such_backend")


def test_compile_cost_bench_on_a_dry_run(tmp_path):
    """bench.compile_cost: eager, the operator and the graph-break path launch the same kernels; the
    operator is one graph after the one graph break, the graph-break path compiles nothing."""
    from bench import compile_cost

    rows = compile_cost.main(["--sets", "tiny", "--compile-backend", "eager", "--in-process", "--steps", "2", "--out", str(tmp_path)])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    by = {r["mode"]: r for r in rows}
    assert set(by) == set(compile_cost.MODES)
    assert by["eager"]["launches"] == by["operator"]["launches"] == by["graph_break"]["launches"] > 0
    assert (by["operator"]["graphs"], by["operator"]["graph_breaks"]) == (1, 1)
    assert (by["graph_break"]["graphs"], by["eager"]["graph_breaks"]) == (0, 0)
