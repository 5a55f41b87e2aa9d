"""Measurement primitives shared by the benchmarks: threads, step timing, launch counts, memory.

Timing rules (the same for every optimizer, so ratios within one run are fair):
- `prepare()` (fresh random gradients) runs before every step and is never inside the timed span;
- CPU: `time.perf_counter` around the step;
- CUDA: the device is synchronized after `prepare()` (the step starts on an idle GPU, so launch
  overhead is not hidden behind queued work), then CUDA events bracket the step;
- the figure is the median of the timed steps, after warm-up steps that are not counted.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time

import torch

__all__ = ["configure_threads", "sync", "time_steps", "time_interleaved", "count_launches", "Memory", "summarize", "quiet_profiler"]


def configure_threads(spec: str | int | None) -> dict:
    """Set torch's intra-op threads. "auto": torch's default, minus cores other processes keep busy.

    On a machine whose cores are shared, an OpenMP team larger than the idle cores waits a
    scheduler time slice at every barrier (milliseconds per op), which would dominate small-op
    timings; "auto" avoids that and records why.
    """
    default = torch.get_num_threads()
    info = {"torch_default": default}
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    info["loadavg_1min"] = load
    cores = os.cpu_count() or default
    if spec in (None, "auto"):
        n = default
        if load is not None:
            idle = max(1, int(math.floor(cores - load + 0.5)))
            if idle < default:
                n = idle
                info["reason"] = f"load average {load:.1f} on {cores} cores from other processes: using {idle}"
    else:
        n = int(spec)
    torch.set_num_threads(n)
    info["threads"] = n
    return info


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, prepare, device, warmup: int, min_steps: int, max_steps: int, budget_s: float) -> dict:
    """Run `warmup` steps, then timed steps until `min_steps` are done and `budget_s` is spent
    (or `max_steps`). Returns per-step seconds and the first (warm-up) step's time."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    first = None
    for i in range(warmup):
        prepare()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times, events = [], []
    start_wall = time.perf_counter()
    while len(times) + len(events) < max_steps:
        prepare()
        sync(device)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            events.append((a, b))
            b.synchronize()
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        n = len(times) + len(events)
        if n >= min_steps and time.perf_counter() - start_wall >= budget_s:
            break
    if cuda:
        sync(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    return {"first_step_s": first, "times_s": times}


def time_interleaved(steppers, device, warmup: int, min_steps: int, max_steps: int, budget_s: float) -> list:
    """`time_steps` for several (step, prepare) pairs at once: warm-up each, then rounds of one
    timed step of each, in order, until every one has `min_steps` and `budget_s` per stepper is
    spent (or `max_steps` rounds). A slow drift in machine load hits all of them alike."""
    device = torch.device(device)
    out = []
    for step, prepare in steppers:
        out.append(time_steps(step, prepare, device, warmup, 0, 0, 0.0))
    start = time.perf_counter()
    rounds = 0
    while rounds < max_steps:
        for (step, prepare), rec in zip(steppers, out):
            t = time_steps(step, prepare, device, 0, 1, 1, 0.0)
            rec["times_s"].extend(t["times_s"])
        rounds += 1
        if rounds >= min_steps and time.perf_counter() - start >= budget_s * len(steppers):
            break
    return out


def summarize(times: list) -> dict:
    if not times:
        return {"median_s": None, "min_s": None, "steps": 0}
    q = sorted(times)
    return {
        "median_s": statistics.median(q),
        "min_s": q[0],
        "p20_s": q[int(0.2 * (len(q) - 1))],
        "p80_s": q[int(0.8 * (len(q) - 1))],
        "steps": len(q),
    }


@contextlib.contextmanager
def quiet_profiler():
    """Silence the native profiler's start/stop lines on stderr (fd 2) while profiling."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_launches(step, device) -> dict:
    """Profile one call of `step`: CUDA kernels launched (on CUDA) and aten ops dispatched.

    `ops` counts top-level aten ops (not nested in another aten op: what Python or a compiled
    graph dispatches; a `_foreach_*` counts once), `leaf_ops` the ops that do work themselves
    (a `_foreach_*` that falls back to a per-tensor loop counts once per tensor). Kernels
    generated by torch.compile for the CPU do not appear as aten ops.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with quiet_profiler(), profile(activities=acts) as prof:
        with record_function("bench_step"):
            step()
        sync(device)
    ops = leaf = kernels = 0
    children: dict = {}
    events = [e for e in prof.events()]
    for e in events:
        if e.cpu_parent is not None:
            children[id(e.cpu_parent)] = children.get(id(e.cpu_parent), 0) + (1 if e.name.startswith("aten::") else 0)
    for e in events:
        if e.device_type == DeviceType.CUDA:
            kernels += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            ops += 1
        if children.get(id(e), 0) == 0 and e.name not in _VIEW_OPS:
            leaf += 1
    out = {"ops": ops, "leaf_ops": leaf}
    if device.type == "cuda":
        out["kernels"] = kernels
    return out


_VIEW_OPS = {
    "aten::as_strided", "aten::view", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::resolve_conj", "aten::resolve_neg", "aten::detach", "aten::alias", "aten::unbind",
    "aten::select", "aten::slice", "aten::reshape", "aten::_reshape_alias", "aten::expand",
    "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::lift_fresh",
}  # fmt: skip


class Memory:
    """Peak memory an optimizer adds on top of its parameters and gradients (CUDA only).

    `start()` after params and grads exist and before the optimizer is built; `peak_extra()`
    after its steps: max_memory_allocated - allocated at start (state + transient buffers).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.base = None

    def start(self):
        if self.device.type != "cuda":
            return
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak_extra(self):
        if self.device.type != "cuda" or self.base is None:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base
