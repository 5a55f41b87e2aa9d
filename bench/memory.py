"""Optimizer-owned memory, counted exactly: state, persistent work buffers, peak transient bytes.

Every allocation and free made through PyTorch's allocators (the CPU allocator and CUDA's caching
allocator alike) is recorded by `torch.profiler` with ``profile_memory=True``, in order, with its
size. Integrating those events over a window gives the bytes the window left allocated (net) and
the highest level reached inside it (peak), on CPU as well as on CUDA:

    resident   window = building the optimizer + its first step (state is created lazily there):
               net bytes still allocated at its end = state + persistent work buffers
    state      the optimizer's state tensors, counted by storage (a flat buffer once, not per view)
    persistent resident - state: what the optimizer keeps between steps beyond its state
               (mango torch: its workspace, the plan's index tensors; triton: tables and stacks)
    transient  window = one later (steady-state) step: the peak of the running sum of its
               allocations and frees, i.e. the most memory the step held at once above the
               memory at rest; its net should be 0 (nothing grows step to step)

So the most memory the optimizer holds during a step, beyond parameters and gradients, is
state + persistent + peak transient; "extra beyond state" is persistent + peak transient, which
the memory budget (docs/design.md) bounds by 2x the largest NS bucket in its NS dtype. On CUDA
`max_memory_allocated` minus the memory before the optimizer existed measures the same peak
independently (bench.measure.Memory).

Limits: memory not allocated through PyTorch's allocators (Python objects, Triton's compiled
kernels, allocator caching/fragmentation) is not counted; a free of a block that was allocated
before the window started is not reported by the profiler (so a window that frees older memory
would show its allocations only — `net_bytes` of a steady-state step shows whether that happens).
`tests/test_bench.py` checks the method on a sequence of known allocations.
"""

from __future__ import annotations

import torch

__all__ = ["AllocationTrace", "storage_bytes", "account", "ns_bucket_budget"]


def _walk(nodes):
    stack = list(nodes)[::-1]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(list(n.children)[::-1])


def _same_device(dev, want: torch.device) -> bool:
    try:
        dev = torch.device(dev)
    except (TypeError, RuntimeError):
        return False
    if dev.type != want.type:
        return False
    return want.index is None or dev.index in (None, want.index) or want.type == "cpu"


class AllocationTrace:
    """Allocations and frees on one device while the context is open, from torch.profiler's memory
    events (``profile_memory=True``), in time order.

        with AllocationTrace("cpu") as tr:
            ...
        tr.peak_bytes, tr.net_bytes, tr.allocated_bytes, tr.events
    """

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.sizes: list = []  # signed bytes per event, in order (+ allocation, - free)
        self.error = None  # set when the profiler's events could not be read
        self._prof = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        from .measure import quiet_profiler

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._quiet = quiet_profiler()
        self._quiet.__enter__()
        self._prof = profile(activities=acts, profile_memory=True, record_shapes=False, with_stack=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        from torch._C._profiler import _EventType

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        try:
            self._prof.__exit__(*exc)
        finally:
            self._quiet.__exit__(*exc)
        try:  # a private API of torch.profiler: if it moves, say so instead of failing the benchmark
            tree = self._prof.profiler.kineto_results.experimental_event_tree()
            allocs = [e for e in _walk(tree) if e.tag == _EventType.Allocation]
            allocs = [e for e in allocs if _same_device(e.extra_fields.device, self.device)]
            allocs.sort(key=lambda e: e.start_time_ns)  # sort is stable: same-time events keep their order
            self.sizes = [int(e.extra_fields.alloc_size) for e in allocs]
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
        self._prof = None
        return False

    @property
    def events(self) -> int:
        return len(self.sizes)

    @property
    def net_bytes(self) -> int:
        """Bytes allocated in the window and not freed in it."""
        return sum(self.sizes)

    @property
    def peak_bytes(self) -> int:
        """Highest level of (allocated - freed) inside the window, relative to its start (>= 0)."""
        level = peak = 0
        for s in self.sizes:
            level += s
            peak = max(peak, level)
        return peak

    @property
    def allocated_bytes(self) -> int:
        """Sum of all allocations in the window (the allocation traffic)."""
        return sum(s for s in self.sizes if s > 0)

    def summary(self) -> dict:
        return {"net_bytes": self.net_bytes, "peak_bytes": self.peak_bytes, "allocated_bytes": self.allocated_bytes,
                "events": self.events}  # fmt: skip


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count it once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = (t.device, st.data_ptr(), st.nbytes())
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def ns_bucket_budget(pset, device, settings: dict | None = None) -> dict:
    """The memory budget for memory beyond the state: 2x the largest NS bucket (same-shape blocks
    batched together) in the dtype its Newton–Schulz runs in under `settings` on `device`."""
    from mango import config
    from mango import newton_schulz as ns
    from mango.ns_engine import auto_dtype, auto_method

    from .roofline import ns_buckets

    s = dict(config.DEFAULTS, **(settings or {}))
    device = torch.device(device)
    best = None
    for b in ns_buckets(pset):
        r, c = b.block
        method = auto_method(s, r, c, device, count=b.batch)
        dt = auto_dtype(s, method, device, rows=r, cols=c, count=b.batch)
        nbytes = b.batch * r * c * (torch.finfo(dt).bits // 8)
        if best is None or nbytes > best["bucket_bytes"]:
            best = {"bucket": b.label, "bucket_bytes": nbytes, "dtype": str(dt).replace("torch.", ""), "method": method}
    if best is None:
        return {"budget_bytes": 0, "bucket": None}
    return {"budget_bytes": 2 * best["bucket_bytes"], **best}


def account(resident: AllocationTrace, step: AllocationTrace, state_tensors, param_bytes: int, device,
            workspace_bytes: int | None = None, budget: dict | None = None, cuda_peak_extra: int | None = None) -> dict:  # fmt: skip
    """The memory record of one optimizer from its two traces (see the module docstring).
    `param_bytes`: the fp32 bytes of the parameter set (the unit of the x_params multiples)."""
    state = storage_bytes(state_tensors)
    persistent = resident.net_bytes - state
    transient = step.peak_bytes
    extra = persistent + transient
    x = (lambda b: None if b is None or not param_bytes else b / param_bytes)  # noqa: E731
    rec = {
        "state_bytes": state,
        "resident_bytes": resident.net_bytes,
        "persistent_bytes": persistent,
        "peak_transient_bytes": transient,
        "extra_beyond_state_bytes": extra,
        "peak_total_bytes": state + extra,
        "step_net_bytes": step.net_bytes,
        "step_allocated_bytes": step.allocated_bytes,
        "step_alloc_events": step.events,
        "param_bytes_fp32": param_bytes,
        "x_params": {k: x(v) for k, v in (("state", state), ("persistent", persistent), ("peak_transient", transient),
                                           ("extra_beyond_state", extra), ("peak_total", state + extra))},  # fmt: skip
        "method": "torch.profiler profile_memory allocation events: resident = net over build + first step; "
                  "peak transient = peak of the running sum over one steady-state step",
    }
    if workspace_bytes is not None:
        rec["workspace_bytes"] = workspace_bytes
        rec["persistent_other_bytes"] = persistent - workspace_bytes
    if budget is not None:
        rec["budget"] = dict(budget)
        b = budget.get("budget_bytes")
        rec["extra_vs_budget"] = extra / b if b else None
        rec["within_budget"] = bool(b) and extra <= b
    if cuda_peak_extra is not None:
        rec["cuda_max_allocated_extra_bytes"] = cuda_peak_extra
        rec["x_params"]["cuda_max_allocated_extra"] = x(cuda_peak_extra)
    if persistent < 0:
        rec["note"] = "resident < state: some state was allocated before the traced window"
    errors = [t.error for t in (resident, step) if t.error]
    if errors:
        rec["error"] = "; ".join(errors)
    return rec
