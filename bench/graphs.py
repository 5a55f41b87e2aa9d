"""mango's triton step captured in a CUDA graph and replayed, for bench.step.

`capturable=True` (docs/guide.md, "CUDA graphs") keeps lr and the step counters on the device, so
`opt.step()` can be captured once and replayed: no Python and one launch per step. Here:

- `graph_runner`: the contender `triton_graph`: a mango triton optimizer with `capturable=True`,
  warmed up on a side stream, its step captured, then timed as `graph.replay()` (one launch);
- `replay_equals_eager`: the check that replaying the captured step gives the parameters that
  eager steps give, on two (three) fresh copies of a parameter set fed the same gradients.

`capture(step)` is injectable: `cuda_capture` on a GPU; a test passes a plain function on the CPU
to check everything around the capture.
"""

from __future__ import annotations

import torch

import mango

from .params import ParamSet, mango_groups

__all__ = ["WARMUP", "cuda_capture", "graph_runner", "replay_equals_eager"]

WARMUP = 3  # eager steps before the capture: the plan, the tables, the kernels' compilation


def cuda_capture(step, device=None):
    """The guide's recipe: `WARMUP` steps on a side stream, then `step` captured in a CUDA graph
    (recorded, not run). Returns the replay function (it keeps the graph alive)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _optimizer(pset: ParamSet, params, backend: str, capturable: bool):
    return mango.presets.mango(mango_groups(pset, params), backend=backend, capturable=capturable)


def graph_runner(pset: ParamSet, params, device, unavailable, runner, capture=None, backend: str = "triton"):
    """The `triton_graph` contender on `params` (their .grad tensors are the graph's inputs: the
    bench refreshes them in place). `runner(key, label, step, opt, info)` builds the Runner."""
    device = torch.device(device)
    if capture is None:
        if device.type != "cuda":
            raise unavailable("no CUDA")
        capture = lambda step: cuda_capture(step, device)  # noqa: E731
    opt = _optimizer(pset, params, backend, capturable=True)
    try:
        replay = capture(opt.step)
    except Exception as e:  # a step that cannot be captured says why, the run goes on
        raise unavailable(f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from e
    info = {"capturable": True, "warmup_steps": WARMUP, "launches_per_step": 1,
            "launches_source": "one CUDA graph replay"}  # fmt: skip
    return runner("triton_graph", "mango triton (CUDA graph replay)", replay, opt, info)


def _final_params(pset, device, backend, capturable, steps, capture, seed):
    """Parameters after WARMUP steps on the first gradients and `steps` more on fresh ones (eager,
    or replays of the step captured after the warm-up when `capture` is given), kept on the CPU."""
    params = pset.build(device, seed=0)
    grads = [p.grad for p in params]
    gen = torch.Generator(device=device).manual_seed(seed)

    def refresh():
        for g in grads:
            g.normal_(generator=gen)

    opt = _optimizer(pset, params, backend, capturable)
    refresh()
    if capture is None:
        for _ in range(WARMUP):
            opt.step()
        step = opt.step
    else:
        step = capture(opt.step)  # warms up itself, with the same gradients
    for _ in range(steps):
        refresh()
        step()
    out = [p.detach().to("cpu", copy=True) for p in params]
    del opt, step, params, grads
    return out


def replay_equals_eager(pset: ParamSet, device, steps: int = 3, capture=None, backend: str = "triton", seed: int = 1234) -> dict:
    """Replay of the captured step against eager steps on the same gradients: the default step
    (`capturable=False`) and the capturable one run eagerly. One copy of the set at a time on the
    device. Returns max |Δ| of the parameters against each, and whether they are bit-identical."""
    device = torch.device(device)
    if capture is None:
        capture = lambda step: cuda_capture(step, device)  # noqa: E731
    replayed = _final_params(pset, device, backend, True, steps, capture, seed)
    out = {"steps": steps, "warmup_steps": WARMUP, "backend": backend, "compared": "every parameter after the steps"}
    for name, capturable in (("eager", False), ("eager_capturable", True)):
        eager = _final_params(pset, device, backend, capturable, steps, None, seed)
        diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(replayed, eager) if a.numel()), default=0.0)
        out[name] = {"max_abs_diff": diff, "identical": all(torch.equal(a, b) for a, b in zip(replayed, eager))}
    out["identical"] = out["eager"]["identical"] and out["eager_capturable"]["identical"]
    return out
