"""The triton step's host work kept across steps: launches made again from the last step's record
while nothing changed, refreshed when a setting or a pointer changes, results unchanged."""

import torch

import mango
import mango_kernels as mk
from tests.helpers import rel_err


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (24, 16), (5, 9), (9,), (0, 3)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().double().clone()) for p in ps]
    return ps, qs


def _grads(ps, qs, t, fresh=True):
    g = torch.Generator().manual_seed(100 + t)
    for p, q in zip(ps, qs):
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if fresh or p.grad is None:
            p.grad = x.float()
        else:
            p.grad.copy_(x)
        q.grad = x


def test_replayed_rounds_match_reference_through_setting_and_pointer_changes():
    """Steps with fresh and kept grads, an ns_eps change and an lr change mid-run: every step
    against the float64 reference, and the round programs dropped when the settings change."""
    ps, qs = _setup()
    opt = mango.Mango(ps, backend="triton", ns_dtype=torch.float32, weight_decay=0.01)
    ref = mango.Mango(qs, backend="reference", ns_dtype=torch.float32, weight_decay=0.01)
    launches = []
    for t in range(7):
        if t == 3:
            for o in (opt, ref):
                o.param_groups[0]["ns_eps"] = 1e3  # the pre-scale divisor: new NS tables, same plan
        if t == 5:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 0.003
        _grads(ps, qs, t, fresh=t % 2 == 0)
        with mk.count_launches() as log:
            opt.step()
        ref.step()
        launches.append(log.by_name())
        (lg,) = opt._plan.cache["triton"][1]
        assert all(r.program for r in lg.rounds)  # textbook fp32 NS: launches only
        assert rel_err(ps, qs) <= 1e-5, t
    assert launches[1] == launches[2] and launches[4] == launches[6]
    # a stale program after the ns_eps change would pre-scale with the old ε, and a stale table
    # would miss the lr change: the per-step reference check above catches both


class _Kernel:
    """A stand-in for a Triton kernel: `kernel[grid](*args)` appends to `calls`."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("kernel", grid, args))


def test_program_records_only_launch_only_blocks():
    with mk.recording() as program:
        mk.record("torch_op")
    assert not program.replayable
    with mk.count_launches(dry_run=True) as log:
        with mk.recording() as program:
            mk._launch.launch("k", _Kernel([]), (2,), 1, x=2)
        program.replay()
    assert program.replayable and len(program.launches) == 1
    assert log.by_name() == {"k": 2}


def test_program_replays_launches_and_host_ops_in_order():
    """host_ops calls (the cuBLAS engine's torch ops) are kept in a program beside the launches and
    made again in order, counted under their names; a dry run skips the kernels, not the calls."""
    calls = []
    kernel = _Kernel(calls)
    with mk.recording() as program:
        mk._launch.launch("a", kernel, (1,), 1)
        mk.host_ops(("gemm", "gemm", "op"), lambda: calls.append("host"))
        mk._launch.launch("b", kernel, (3,), 2)
    assert program.replayable and calls == [("kernel", (1,), (1,)), "host", ("kernel", (3,), (2,))]
    calls.clear()
    with mk.count_launches() as log:
        program.replay()
    assert calls == [("kernel", (1,), (1,)), "host", ("kernel", (3,), (2,))]
    assert log.events == ["a", "gemm", "gemm", "op", "b"]
    calls.clear()
    with mk.count_launches(dry_run=True) as log:
        program.replay()
    assert calls == ["host"] and log.count == 5


def test_settings_read_by_identity_still_follow_every_change():
    """A step recognises unchanged settings cheaply (a tuple of NS coefficients by identity, a
    group's plan-shaping values as last step's): a new tuple, a list edited in place, a new
    structural value and a replaced group each still reach the step, checked against the float64
    reference at every step."""
    ps, qs = _setup(1)
    opts = [mango.Mango(ps, backend="triton", ns_dtype=torch.float32), mango.Mango(qs, backend="reference", ns_dtype=torch.float64)]
    muon = ((3.4445, -4.7750, 2.0315),) * 5
    plans = []
    for t in range(8):
        for o in opts:
            g = o.param_groups[0]
            if t == 1:
                g["ns_coefficients"] = muon  # a tuple of tuples: recognised by identity from now on
            if t == 3:
                g["ns_coefficients"] = ((2.0, -1.5, 0.5),) * 5  # a new tuple: new NS schedules
            if t == 4:
                g["ns_coefficients"] = [[3.0, -3.2, 1.2] for _ in range(5)]
            if t == 5:
                g["ns_coefficients"][2][0] = 2.5  # edited in place
            if t == 6:
                g["ns_method"] = "gram"  # plan-shaping: a new plan
            if t == 7:
                o.param_groups[0] = dict(g, ns_method="textbook")  # a new group object
        _grads(ps, qs, t)
        for o in opts:
            o.step()
        plans.append(opts[0]._plan)
        assert rel_err(ps, qs) <= 1e-5, t
    assert plans[5] is plans[0] and plans[6] is not plans[5] and plans[7] is not plans[6]
