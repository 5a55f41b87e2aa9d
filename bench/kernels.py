"""Per-kernel / per-stage microbenchmarks.

- `ns_buckets_bench`: every NS shape bucket of a parameter set, orthogonalized by mango's batched
  NS ("ours": the Triton kernel on CUDA when mango_kernels has one, else the torch backend's
  `batched_newton_schulz`) against the bare `torch.bmm`/`baddbmm` NS in bf16 (and in the dtype
  mango's torch backend uses on this device), with the achieved TFLOP/s.
- `bare_ns_step`: the bare batched matmuls of one step's NS alone, nothing else (no pre-scaling,
  no stacking, no transpose, no dtype cast), on the same stacked shapes: timed in the same rounds
  as the optimizers, the denominator of the performance contract's CPU target "torch step <= 1.3x the bare NS
  matmul time".
- `TritonNS`: mango_kernels' batched NS as the Triton backend runs it (tables built once).
- `stage_breakdown`: mango torch-backend steps split into moments / NS / other norms / apply+rest,
  with GB/s of the elementwise stages against the measured copy bandwidth.
- `kernel_breakdown`: device time per CUDA kernel name over one step (the Triton kernels' GB/s).
- `top_ops`: the torch.profiler table of the ops that dominate a step.
"""

from __future__ import annotations

import statistics
import time

import torch

from mango import config
from mango import newton_schulz as ns

from .measure import quiet_profiler, sync
from .params import ParamSet
from .roofline import ns_buckets, stage_bytes

__all__ = ["TritonNS", "bare_ns", "bare_ns_step", "ns_buckets_bench", "stage_breakdown", "kernel_breakdown", "top_ops", "time_call"]

COEFFS = config.normalize_ns_coefficients(config.DEFAULTS["ns_coefficients"], config.DEFAULTS["ns_steps"])


def time_call(fn, device, min_reps: int = 3, max_reps: int = 100, budget_s: float = 0.5, setup=None) -> float:
    """Median seconds of `fn()` after one warm-up call (CUDA events on GPU); `setup()` runs
    before every call, outside the timed span."""
    device = torch.device(device)
    if setup:
        setup()
    fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        if setup:
            setup()
            sync(device)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return statistics.median(times)


def bare_ns(X: torch.Tensor, coefficients=COEFFS) -> torch.Tensor:
    """Only the batched matmuls of Newton–Schulz on a (B, r, c) stack with r <= c."""
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def _randn(shape, device, seed: int) -> torch.Tensor:
    """Gaussian fp32 data, drawn on the GPU where there is one (a Llama-sized bucket drawn on the host
    would cost seconds per call), else on the CPU."""
    where = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=where)


def _stack(bucket, device, dtype, oriented: bool, seed: int = 0):
    r, c = bucket.oriented if oriented else bucket.block
    X = _randn((bucket.batch, r, c), device, seed)
    X = X / torch.linalg.matrix_norm(X, keepdim=True)  # Frobenius norm 1 (so spectral <= 1), as NS expects
    return X.to(device=device, dtype=dtype)


def _torch_ns_dtype(device, method: str = "textbook", bucket=None) -> torch.dtype:
    """The torch backend's NS dtype for `method` (at the bucket's shape and batch where given: on a
    CPU it is measured per size class)."""
    from mango.ns_engine import auto_dtype

    if bucket is None:
        return auto_dtype({}, method, torch.device(device))
    r, c = bucket.block
    return auto_dtype({}, method, torch.device(device), rows=r, cols=c, count=bucket.batch)


class TritonNS:
    """mango_kernels' batched NS over some NS buckets, as the Triton backend runs it in a step:
    one NSBatch (tables built once), the direction already in its stack, ‖X‖² precomputed.
    `setup()` restores the input (outside the timed span), `run()` is the kernels alone."""

    label = "mango_kernels NSBatch (bf16)"

    def __init__(self, buckets, device, dtype=torch.bfloat16, seed: int = 0, config=None, method: str = "textbook"):
        import mango_kernels as mk
        from mango.backends.ns_gram_host import iterate_large

        specs = []
        for b in buckets:
            per = b.batch // b.tensors
            for _ in range(b.tensors):
                specs.append(mk.NSSpec.row_major(b.block[0], b.block[1], per))
        self.batch = mk.NSBatch(specs, dtype, device, config, method=method, large_gram=iterate_large)
        n = sum(s.numel for s in specs)
        x = _randn((n,), device, seed).to(device=device, dtype=dtype)
        self.batch.stack[:n].copy_(x)
        n_specs = len(specs)
        self.batch.set_schedule([len(COEFFS)] * n_specs, [list(COEFFS)] * n_specs, [1e-7] * n_specs, None,
                                [ns.gram_restarts(len(COEFFS))] * n_specs)  # fmt: skip
        self.saved = self.batch.stack.clone()
        self.specs = specs
        self._count = mk.count_launches

    def setup(self):
        self.batch.stack.copy_(self.saved)

    def run(self):
        self.batch.run()

    def inputs(self) -> list:
        """(blocks, rows, cols) of every spec's input, as saved."""
        return [self.saved[o : o + s.numel].view(s.n_blocks, *s.blocks[0][1:3]) for o, s in zip(self.batch.spec_offset, self.specs)]

    def outputs(self) -> list:
        return [self.batch.output_view(i).view(s.n_blocks, *s.blocks[0][1:3]) for i, s in enumerate(self.specs)]

    def launches(self) -> int:
        self.setup()
        with self._count() as log:
            self.run()
        return log.count


def bare_ns_step(pset: ParamSet, device, dtype=None):
    """(dtype name, fn) where fn runs `bare_ns` on every NS bucket's stack of `pset`: the matmuls
    of one step's NS and nothing else, to be timed next to the optimizers' steps."""
    dtype = dtype or _torch_ns_dtype(device)
    stacks = [_stack(b, device, dtype, oriented=True) for b in ns_buckets(pset)]

    def step():
        for X in stacks:
            bare_ns(X)

    return str(dtype).replace("torch.", ""), step


def _ours_ns(device, bucket):
    """(label, setup, fn) timing mango's NS of one bucket on this device."""
    from mango.backends.torch_backend import batched_newton_schulz

    if torch.device(device).type == "cuda":
        try:
            t = TritonNS([bucket], device)
            return t.label, t.setup, t.run
        except Exception as e:  # mango_kernels missing or its API moved: say so, use the torch NS
            why = f"; Triton NS unavailable: {type(e).__name__}: {str(e)[:80]}"
    else:
        why = ""
    method = auto_method(bucket, device)
    dt = _torch_ns_dtype(device, method, bucket)
    Xb = _stack(bucket, device, torch.float32, oriented=False)
    label = f"mango torch NS (ns_method=auto{why})"
    return label, None, lambda: batched_newton_schulz(Xb.to(dt), COEFFS, "frobenius", 1e-7, method=method)


def auto_method(bucket, device, settings=None) -> str:
    """What ns_method="auto" picks for this bucket's blocks on `device` (mango.ns_engine)."""
    from mango.ns_engine import auto_method

    r, c = bucket.block
    return auto_method(settings or {}, r, c, torch.device(device), count=bucket.batch)


def ns_buckets_bench(pset: ParamSet, device, rates: dict, budget_s: float = 0.3, forms: bool | None = None,
                     triton_forms: bool | None = None) -> dict:  # fmt: skip
    """Per NS bucket: ours (what ns_method="auto" picks) vs bare bmm NS in bf16 (and in the torch
    backend's dtype); with `forms` (default: on CPU) also the torch backend's NS in fp32 in each
    form, textbook and Gram; with `triton_forms` (default: on CUDA) the Triton NS kernels in each
    form — bf16 textbook and fp16 Gram, as the triton backend runs them."""
    forms = torch.device(device).type == "cpu" if forms is None else forms
    triton_forms = torch.device(device).type == "cuda" if triton_forms is None else triton_forms
    device = torch.device(device)
    same = _torch_ns_dtype(device)
    rows, label = [], None
    for b in ns_buckets(pset):
        flops = b.batch * ns.textbook_flops(*b.block, len(COEFFS))
        label, setup, ours = _ours_ns(device, b)
        t_ours = time_call(ours, device, budget_s=budget_s, setup=setup)
        row = {"bucket": b.label, "block": list(b.block), "batch": b.batch, "ns_flops": flops, "ours_s": t_ours}
        row["ours_method"] = auto_method(b, device)
        row["ours_tflops"] = flops / t_ours / 1e12  # textbook-equivalent rate (ns_flops / time)
        if forms:  # the torch backend's batched NS in each form, fp32 (the regime of CPUs without bf16)
            from mango.backends.torch_backend import batched_newton_schulz

            X32 = _stack(b, device, torch.float32, oriented=False)
            r, c = b.block
            row["gram_flops"] = b.batch * ns.gram_flops(r, c, len(COEFFS))
            for method in ("textbook", "gram"):
                row[f"fp32_{method}_s"] = time_call(
                    lambda m=method: batched_newton_schulz(X32, COEFFS, "frobenius", 1e-7, method=m), device, budget_s=budget_s)
            row["fp32_gram_vs_textbook"] = row["fp32_gram_s"] / row["fp32_textbook_s"]
        if triton_forms:
            try:
                for method, dt in (("textbook", torch.bfloat16), ("gram", torch.float16)):
                    t = TritonNS([b], device, dtype=dt, method=method)
                    row[f"triton_{method}_s"] = time_call(t.run, device, budget_s=budget_s, setup=t.setup)
                row["triton_gram_vs_textbook"] = row["triton_gram_s"] / row["triton_textbook_s"]
            except Exception as e:  # mango_kernels missing or its API moved: say so
                row["triton_forms_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        dts = [("bfloat16", torch.bfloat16)] + ([(str(same).replace("torch.", ""), same)] if same != torch.bfloat16 else [])
        for name, dt in dts:
            X = _stack(b, device, dt, oriented=True)
            try:
                t = time_call(lambda: bare_ns(X), device, budget_s=budget_s)
            except RuntimeError as e:
                row[f"bare_{name}_error"] = str(e).splitlines()[0]
                continue
            row[f"bare_{name}_s"] = t
            row[f"bare_{name}_tflops"] = flops / t / 1e12
            row[f"ours_vs_bare_{name}"] = t_ours / t
        peak = rates.get("peak_matmul_flops")
        if peak:
            row["ours_frac_of_peak"] = flops / t_ours / peak
        rows.append(row)
    out = {"ours": label, "same_dtype": str(same).replace("torch.", ""), "buckets": rows}
    if device.type == "cuda" and rows:  # the whole step's NS: every bucket in one ragged batch
        try:
            t = TritonNS(ns_buckets(pset), device)
            whole = time_call(t.run, device, budget_s=budget_s, setup=t.setup)
            flops = sum(r["ns_flops"] for r in rows)
            bare = [r.get("bare_bfloat16_s") for r in rows]
            out["all_buckets"] = {"ours_s": whole, "ns_flops": flops, "ours_tflops": flops / whole / 1e12,
                                  "launches": t.launches(),
                                  "bare_bfloat16_sum_s": sum(bare) if all(v is not None for v in bare) else None}  # fmt: skip
        except Exception as e:
            out["all_buckets_error"] = f"{type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------------------
# stage breakdown of the torch backend
# ----------------------------------------------------------------------------------------

# stage -> TorchBackend methods whose time it is: the moments pass `_direction`, the NS
# `orthogonalize`, the l2-type norms' `_add_segment_sums` / `_scale_segments` and the whole-tensor
# norms `tensor_norms` (NovoGrad, trust ratio); everything else in a step is "apply_and_rest"
STAGES = (("moments", ("_direction",)), ("ns", ("orthogonalize",)),
          ("other_norms", ("_add_segment_sums", "_scale_segments", "tensor_norms")))  # fmt: skip


def stage_breakdown(runner, prepare, device, numel: int, copy_bw: float, steps: int = 3) -> dict:
    """Time the stages of mango's torch backend inside real steps (CPU: exact; CUDA: synchronizes
    around each stage, which removes overlap). `apply_and_rest` = step - the timed stages.

    Every method of `STAGES` must exist on the backend: a renamed one is an error here, never a
    stage silently reported as 0 ms. `calls` says how often each stage ran (0 where a set has
    no such unit, e.g. no l2 norms)."""
    opt = runner.optimizer
    backends = [b for b in getattr(opt, "_backends", {}).values() if isinstance(b, _torch_backend_class())]
    if not backends:
        return {"error": "no torch backend instance on this optimizer"}
    be = backends[0]
    missing = [m for _, methods in STAGES for m in methods if not callable(getattr(be, m, None))]
    if missing:
        return {"error": f"TorchBackend has no method(s) {', '.join(missing)}: update bench.kernels.STAGES"}
    acc = {name: 0.0 for name, _ in STAGES}
    calls = {name: 0 for name, _ in STAGES}
    depth = [0]
    wrapped = []
    for name, methods in STAGES:
        for meth in methods:
            orig = getattr(be, meth)

            def timed(*a, _orig=orig, _name=name, **k):
                if depth[0]:  # nested inside another timed stage: counted there
                    return _orig(*a, **k)
                depth[0] += 1
                sync(device)
                t0 = time.perf_counter()
                try:
                    out = _orig(*a, **k)
                    sync(device)
                finally:
                    depth[0] -= 1
                acc[_name] += time.perf_counter() - t0
                calls[_name] += 1
                return out

            setattr(be, meth, timed)
            wrapped.append(meth)
    totals = []
    try:
        for _ in range(steps):
            prepare()
            sync(device)
            t0 = time.perf_counter()
            runner.step()
            sync(device)
            totals.append(time.perf_counter() - t0)
    finally:
        for meth in wrapped:
            delattr(be, meth)  # back to the class method
    n = len(totals)
    out = {name: acc[name] / n for name, _ in STAGES}
    out["calls"] = {name: calls[name] // n for name, _ in STAGES}
    out["step"] = sum(totals) / n
    out["apply_and_rest"] = out["step"] - sum(out[name] for name, _ in STAGES)
    out["moments_gbs"] = stage_bytes(numel, "moments") / out["moments"] / 1e9 if out.get("moments") else None
    out["apply_gbs"] = stage_bytes(numel, "apply") / out["apply_and_rest"] / 1e9 if out["apply_and_rest"] > 0 else None
    out["copy_gbs"] = copy_bw / 1e9
    out["method"] = f"wall time of TorchBackend methods {', '.join(wrapped)} inside {n} real steps; apply_and_rest = step - those"
    return out


def _torch_backend_class():
    from mango.backends.torch_backend import TorchBackend

    return TorchBackend


def kernel_breakdown(step, device, numel: int, copy_bw: float) -> dict | None:
    """CUDA: device time per kernel name over one step; GB/s for moments/apply kernels by name."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    per: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            k = per.setdefault(e.name, {"calls": 0, "s": 0.0})
            k["calls"] += 1
            k["s"] += e.time_range.elapsed_us() / 1e6
    rows = []
    for name, k in sorted(per.items(), key=lambda kv: -kv[1]["s"]):
        row = {"kernel": name[:120], "calls": k["calls"], "s": k["s"]}
        low = name.lower()
        stage = "moments" if "moment" in low else "apply" if "apply" in low else None
        if stage:
            row["gbs"] = stage_bytes(numel, stage) / k["s"] / 1e9
            row["frac_of_copy"] = row["gbs"] * 1e9 / copy_bw
        rows.append(row)
    return {"kernels": rows, "copy_gbs": copy_bw / 1e9}


def top_ops(step, device, n: int = 12) -> list:
    """The ops with the most self time in one step (torch.profiler), for "which stage dominates"."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with quiet_profiler(), profile(activities=acts) as prof:
        step()
        sync(device)
    rows = []
    for a in prof.key_averages():
        dev = getattr(a, "self_device_time_total", 0.0) or 0.0
        rows.append({"op": a.key, "calls": a.count, "self_cpu_ms": a.self_cpu_time_total / 1e3, "self_device_ms": dev / 1e3})
    key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    return rows[:n]
