"""`python -m bench.step`: optimizer step time of mango against its peers and the hardware floor.

For every parameter set (real model shapes, see bench/params.py) and every optimizer (see
bench/optimizers.py) it measures, in one run on one device:

- step time: median of many steps after warm-up, gradients refreshed with random data before
  every step (outside the timed span), CUDA events on GPU (bench/measure.py);
- the multiple of the roofline floor of the set on this device (bench/roofline.py) and the ratio
  to mango's own step measured in the same run;
- launches per step: mango_kernels' counter for the Triton backend, the torch profiler's CUDA
  kernel count on GPU, its count of dispatched aten ops on CPU;
- optimizer-owned memory, counted exactly for every contender (bench/memory.py): state bytes,
  persistent work buffers, peak transient bytes of a step (torch.profiler allocation events, CPU
  and CUDA; on CUDA also max_memory_allocated), as multiples of the fp32 parameter bytes, and
  mango's extra beyond state against the memory budget's 2x the largest NS bucket in its NS dtype;
- NS FLOPs per method (textbook, Gram, what ns_method="auto" picks per bucket) and their floors;
- per NS bucket: mango's batched NS vs the bare torch.bmm NS; the torch backend's stages (GB/s);
  the engine, form and dtype each mango contender runs the bucket in, and why (mango.ns_engine);
- the bare batched textbook NS matmuls of the whole step, timed like a contender (bf16 on CUDA);
- with the `triton_graph` contender on CUDA: whether replaying the captured step equals eager steps;
- CPU targets of the performance contract where the set carries them (bench/targets.py; 24L d64: torch vs
  reference >= 3x; 12L d256: torch step <= 1.1x the bare NS matmuls), and on 12L d256 the bench's own NS-method
  yardstick (<= 0.7x by the Gram form and schedules, for every torch-backend variant); that set also runs every
  forced NS dtype/form beside "auto", and the peer packages, by default.

Every set gets its own share of --time-budget; the sets run so far are written after each one.
It writes step_<device>_<time>.json / .md / .png under --out (default bench/results/) and
prints the markdown report. `--quick` runs every code path at tiny sizes (CI; no timing claims).

    python -m bench.step                                  # CPU: gpt-cpu + the two CPU target sets
    python -m bench.step --sets gpt2-124m,gpt2-350m       # GPU: GPT-2 shapes
    python -m bench.step --sets gpt2-124m,hf-gpt2-124m,hf-gpt2-350m,llama-1b   # GPU: the GPU run's sets
    python -m bench.step --cpu-targets --skip compile     # only the performance contract's CPU targets
    python -m bench.step --quick --out /tmp/b             # CI smoke run
    python -m bench.step --sets gpt-12l-d256 --optimizers torch,torch_textbook,torch_fp32,torch_fp32_textbook,muon_adamw
                                                          # NS methods vs the bare textbook NS
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import sys
import time

import torch

from . import kernels as K
from . import optimizers as O
from . import report as R
from .memory import AllocationTrace, account, ns_bucket_budget
from .measure import Memory, configure_threads, count_launches, summarize, sync, time_interleaved, time_steps
from .params import SETS, TIED_ROLES, ParamSet, resolve_set
from .roofline import floor, measure_device, ns_flops, ns_methods, state_bytes
from .targets import CPU as TARGETS

from mango import ns_engine

DEFAULT_SETS = {
    "cpu": ("gpt-cpu", "gpt-24l-d64", "gpt-12l-d256"),
    "cuda": ("gpt2-124m", "gpt2-350m"),
}
CPU_TARGET_SETS = ("gpt-24l-d64", "gpt-12l-d256")
SCHEMA = 1


def _timing_plan(args, device) -> dict:
    if args.quick:
        return dict(warmup=1, min_steps=2, max_steps=2, budget_s=0.0)
    if device.type == "cuda":
        plan = dict(warmup=5, min_steps=20, max_steps=200, budget_s=2.0)
    else:
        plan = dict(warmup=2, min_steps=5, max_steps=50, budget_s=2.0)
    if args.budget is not None:
        plan["budget_s"] = args.budget
    if args.steps is not None:
        plan["min_steps"] = args.steps
    return plan


def _device_info(device, threads) -> dict:
    info = {"type": device.type, "threads": threads}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), memory_bytes=p.total_memory, sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)  # fmt: skip
    else:
        name = ns_engine.cpu_model()
        info.update(name=name, cores=os.cpu_count())
        try:
            info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return info


def _versions() -> dict:
    import mango

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "mango": getattr(mango, "__version__", None),
         "platform": platform.platform()}  # fmt: skip
    for mod in ("triton", "numpy", "matplotlib"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    return v


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Contender:
    """One optimizer on its own fresh copy of a parameter set, with its own gradient stream."""

    def __init__(self, key, pset: ParamSet, device, args):
        self.key, self.device = key, device
        self.rec = {"key": key, "label": O.LABELS[key], "status": "ok"}
        self.params = pset.build(device, seed=0)
        self.grads = [p.grad for p in self.params]
        # every optimizer sees the same gradient sequence
        self.gen = torch.Generator(device=device).manual_seed(1234)
        self.mem = Memory(device)
        self.mem.start()
        self.runner = None
        # memory at rest: every allocation of building the optimizer and of its first step (where
        # state and work buffers are created) that is still alive afterwards (bench/memory.py)
        self.resident = AllocationTrace(device)
        # a CUDA graph is captured outside the profiler's window (stream capture under an active
        # profiler is not something to count on): its memory is CUDA's max_memory_allocated alone
        self.captured = key in O.CAPTURED
        build = lambda: O.build(key, pset, self.params, device, compile_backend=args.compile_backend,  # noqa: E731
                                compile_timeout_s=args.compile_timeout, quick=args.quick)  # fmt: skip
        try:
            if self.captured:
                self.prepare()
                self.runner = build()
            with self.resident:
                self.prepare()
                self.runner = self.runner or build()
                self.prepare()
                self.runner.step()
        except O.Unavailable as e:
            reason = str(e)
            self.rec.update(status="failed" if reason.startswith("compile failed") else "n/a", reason=reason)
            self.close()
            return
        self.rec["label"] = self.runner.label
        self.rec["info"] = dict(self.runner.info)
        choices = getattr(self.runner.optimizer, "ns_choices", None)
        if choices is not None:  # mango: which engine, form and dtype each NS bucket runs in, and why
            self.rec["info"]["ns_choices"] = ns_choice_records(choices())

    @property
    def ok(self) -> bool:
        return self.runner is not None

    def prepare(self):
        for g in self.grads:
            g.normal_(generator=self.gen)

    def record_timing(self, t: dict, floor_s: float):
        rec = self.rec
        rec.update(summarize(t["times_s"]))
        rec["first_step_s"] = t["first_step_s"]
        rec["times_s"] = t["times_s"]
        rec["x_floor"] = rec["median_s"] / floor_s if rec["median_s"] and floor_s else None

    def measure_rest(self, pset: ParamSet, args, extras: bool, own_memory: bool):
        """Launch counts, state bytes, memory, stage breakdown and profiles (after timing)."""
        rec, runner, device, key = self.rec, self.runner, self.device, self.key
        self.prepare()
        if runner.launch_counter is not None:  # the kernels' own counter (triton)
            c0 = runner.launch_counter()
            runner.step()
            sync(device)
            rec["launches_counter"] = runner.launch_counter() - c0
            self.prepare()
        rec["profiler"] = count_launches(runner.step, device)
        if runner.info.get("launches_per_step") is not None:  # a CUDA graph replay: one launch
            rec["launches"], rec["launches_source"] = runner.info["launches_per_step"], runner.info["launches_source"]
        elif runner.launch_counter is not None:
            rec["launches"], rec["launches_source"] = rec["launches_counter"], "mango_kernels counter"
        elif device.type == "cuda":
            rec["launches"], rec["launches_source"] = rec["profiler"]["kernels"], "profiler CUDA kernels"
        else:
            rec["launches"], rec["launches_source"] = rec["profiler"]["ops"], "profiler aten ops (top-level)"
        rec["state_bytes"] = O.state_nbytes(runner.state())
        rec["peak_extra_bytes"] = self.mem.peak_extra() if own_memory else None
        prof = "torch.profiler allocation events (bench/memory.py): rec['memory']"
        if self.captured:  # built before the profiler's window: the CUDA peak is its memory record
            rec["memory"] = None
            rec["memory_source"] = ("cuda max_memory_allocated - allocated before the optimizer was built "
                                    "(the graph is captured outside the profiler's window)")  # fmt: skip
        elif device.type == "cuda":
            rec["memory"] = self.account_memory(pset, own_memory)
            rec["memory_source"] = prof + ("; peak_extra_bytes: cuda max_memory_allocated - allocated before the optimizer was built"
                                           if own_memory else "; cuda max_memory_allocated not measured (optimizers were interleaved)")  # fmt: skip
        else:
            rec["memory"] = self.account_memory(pset, own_memory)
            rec["memory_source"] = prof
        bw = args._rates["copy_bytes_per_s"]
        if key == "torch":
            self.prepare()
            rec["stages"] = K.stage_breakdown(runner, self.prepare, device, pset.numel, bw, steps=1 if args.quick else 3)
        if extras and key in ("torch", "reference", "triton"):
            self.prepare()
            rec["top_ops"] = K.top_ops(runner.step, device)
        if device.type == "cuda" and key in ("triton", "torch"):
            self.prepare()
            rec["kernels"] = K.kernel_breakdown(runner.step, device, pset.numel, bw)

    def account_memory(self, pset: ParamSet, own_memory: bool) -> dict:
        """State, persistent work buffers and peak transient bytes (bench/memory.py): the resident
        trace taken at build, and one more steady-state step traced here."""
        self.prepare()
        step = AllocationTrace(self.device)
        with step:
            self.runner.step()
        workspace, budget = None, None
        opt = self.runner.optimizer
        for be in getattr(opt, "_backends", {}).values():
            ws = getattr(be, "_workspace", None)
            if isinstance(ws, dict):
                workspace = (workspace or 0) + sum(b.numel() * b.element_size() for b in ws.values() if b is not None)
        if self.key in O.MANGO_KEYS:
            budget = ns_bucket_budget(pset, self.device, (self.runner.info or {}).get("ns_settings"))
        cuda = self.mem.peak_extra() if own_memory and self.device.type == "cuda" else None
        return account(self.resident, step, list(self.runner.state()), 4 * pset.numel, self.device,
                       workspace_bytes=workspace, budget=budget, cuda_peak_extra=cuda)  # fmt: skip

    def close(self):
        self.runner = None
        self.params = self.grads = None
        if self.key in ("compile", "torch_compiled"):
            import torch._dynamo as dynamo

            dynamo.reset()
        _cleanup(self.device)


def ns_choice_records(choices) -> list:
    """One record per NS bucket of `Mango.ns_choices()`: its blocks, engine, form, dtype and why."""
    out = []
    for names, (r, c), ch in choices:
        out.append({"block": [r, c], "tensors": len(names), "first": names[0] if names else None, "engine": ch.engine,
                    "method": ch.method, "dtype": str(ch.dtype).replace("torch.", ""), "why": ch.why,
                    "tiles": list(ch.tiles) if ch.tiles else None, "label": f"{r}x{c} x{len(names)}: {ch.label()}"})  # fmt: skip
    return out


def _print_rec(rec, wall=None):
    if rec["status"] == "ok":
        w = f", {wall:.1f} s wall" if wall is not None else ""
        print(f"  {rec['label']:<32} {rec['median_s'] * 1e3:10.3f} ms  ({rec['steps']} steps{w})", flush=True)
        for ch in (rec.get("info") or {}).get("ns_choices") or []:
            print(f"      NS {ch['label']}", flush=True)
    else:
        print(f"  {rec['label']:<32} {rec['status']}: {rec['reason']}", flush=True)


def _interleave(args, device, pset: ParamSet) -> bool:
    """Interleave the optimizers' timed steps (robust to load drift on shared CPUs) unless CUDA
    (peak memory needs one optimizer at a time) or the copies would not fit comfortably in RAM."""
    if args.interleave != "auto":
        return args.interleave == "on"
    if device.type == "cuda":
        return False
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    need = len(args.optimizers) * pset.numel * 4 * 6  # W, g, m, v, O + temporaries, fp32
    return need < 0.25 * ram


def _bare_dtype(rec: dict, device_same: str) -> str:
    """The dtype of the bare textbook NS a torch-backend contender is compared with: the one its own
    textbook NS runs in (its ns_dtype, or the device's auto dtype)."""
    dt = ((rec.get("info") or {}).get("ns_settings") or {}).get("ns_dtype")
    return str(dt).replace("torch.", "") if dt is not None and dt != "auto" else device_same


def _variant_ratios(by_key: dict, bare_ns: dict, same: str) -> dict:
    out = {}
    for key, rec in by_key.items():
        if rec.get("status") != "ok" or not (key.startswith("torch") or key == "muon_adamw"):
            continue
        dt = _bare_dtype(rec, same) if key.startswith("torch") else same
        bare = (bare_ns.get(dt) or {}).get("median_s")
        if bare:
            out[key] = {"label": rec["label"], "step_s": rec["median_s"], "bare_ns_dtype": dt, "bare_ns_s": bare,
                        "value": rec["median_s"] / bare}  # fmt: skip
    return out


def _targets(pset: ParamSet, by_key: dict, ns_bench: dict | None, bare_ns: dict, same: str) -> list:
    """The performance contract's CPU targets `pset` carries; `same`: the torch backend's NS dtype here."""
    out = []
    torch_rec = by_key.get("torch", {})
    t_torch = torch_rec.get("median_s")
    stages = torch_rec.get("stages") or {}
    for tname in pset.targets:
        spec = TARGETS[tname]
        rec = {"id": tname, "set": pset.name, **spec, "value": None, "met": None}
        if tname == "overhead":
            t_ref = by_key.get("reference", {}).get("median_s")
            if t_torch and t_ref:
                rec["value"] = t_ref / t_torch
                rec["torch_s"], rec["reference_s"] = t_torch, t_ref
            else:
                rec["why_missing"] = "needs both mango torch and mango reference timings"
        else:  # "ns" and "ns_gram": the same ratio against two bounds
            bare = (bare_ns.get(same) or {}).get("median_s")
            rec["bare_ns_source"] = "bare NS matmuls timed in the same rounds as the optimizers"
            if bare is None and ns_bench:  # fall back to the per-bucket benchmark, timed separately
                vals = [b.get(f"bare_{same}_s") for b in ns_bench["buckets"]]
                bare = sum(vals) if vals and all(v is not None for v in vals) else None
                rec["bare_ns_source"] = "sum of the per-bucket NS benchmark"
            if t_torch and bare:
                rec["value"] = t_torch / bare
                rec["torch_s"], rec["bare_ns_s"], rec["bare_ns_dtype"] = t_torch, bare, same
            else:
                rec["why_missing"] = "needs mango torch timing and the bare NS timing"
        if tname == "ns_gram":  # every torch-backend variant and Muon against the bare NS in its dtype
            rec["variants"] = _variant_ratios(by_key, bare_ns, same)
        t_bf = by_key.get("torch_bf16", {}).get("median_s")
        if t_bf and tname == "overhead" and by_key.get("reference", {}).get("median_s"):
            rec["value_bf16_ns"] = by_key["reference"]["median_s"] / t_bf
        if t_bf and tname == "ns" and (bare_ns.get("bfloat16") or {}).get("median_s"):
            rec["value_bf16_ns"] = t_bf / bare_ns["bfloat16"]["median_s"]
        if rec["value"] is not None:
            rec["met"] = rec["value"] >= spec["target"] if spec["better"] == "higher" else rec["value"] <= spec["target"]
            if stages.get("step"):
                parts = {k: stages.get(k) for k in ("moments", "ns", "other_norms", "apply_and_rest") if stages.get(k) is not None}
                rec["stage_fractions"] = {k: v / stages["step"] for k, v in parts.items()}
                rec["dominant_stage"] = max(parts, key=parts.get) if parts else None
        out.append(rec)
    return out


def _out_of_time(args) -> str | None:
    """Why nothing more should start (--time-budget spent, or this set's share of it), or None."""
    budget = getattr(args, "time_budget", None)
    if budget is None:
        return None
    now = time.perf_counter()
    if now - args._started >= budget:
        return f"--time-budget {budget:g} s spent before it started"
    deadline, share = getattr(args, "_set_deadline", None) or (None, None)
    if deadline is not None and now >= deadline:
        return f"this set's share ({share:.0f} s) of --time-budget {budget:g} s spent before it started"
    return None


def _set_weight(args, pset: ParamSet) -> float:
    """A set's claim on --time-budget: per contender that runs there, a fixed part (building,
    profiling, a few steps) and a part that grows with the set's size (each step's time)."""
    return len(_contenders(args, pset)[0]) * (1.0 + pset.numel / 1e9)


def _start_set(args, sets: list, index: int) -> None:
    """Give the set about to run its share of what is left of --time-budget (by `_set_weight`):
    every set gets its own budget, so a slow set cannot take the peers of the sets after it; time
    a set leaves unused goes to the sets after it."""
    if args.time_budget is None:
        return
    left = max(0.0, args.time_budget - (time.perf_counter() - args._started))
    weights = [max(_set_weight(args, ps), 1e-9) for ps in sets[index:]]
    share = left * weights[0] / sum(weights)
    args._set_deadline = (time.perf_counter() + share, share)


def _set_plan(plan: dict, fl: dict, device) -> dict:
    """Fewer timed steps where a step is long: on a large set (a step of ~3x its floor or more
    would fill the per-contender --budget in fewer than min_steps steps) the minimum drops to what
    fills it, at least 5, and warm-up to 3. The timed span still ends on --budget."""
    if device.type != "cuda" or not plan.get("budget_s") or not fl.get("floor_s"):
        return plan
    fits = int(plan["budget_s"] / (3 * fl["floor_s"]))
    if fits >= plan["min_steps"]:
        return plan
    return dict(plan, min_steps=max(5, fits), warmup=min(plan["warmup"], 3), reduced_for="a long step: see bench.step._set_plan")


def _contenders(args, pset: ParamSet) -> tuple:
    """(keys to run on `pset`, records of those that will not: left out, or not run here by default)."""
    keys, not_run = list(args.optimizers), []
    if not args.optimizers_given:
        keys += [k for k in pset.default_add if k not in keys and k not in args.skip_set]
    skipped = dict(_left_out_here(args, pset.name))
    if not args.optimizers_given:
        skipped.update({k: f"not run on this set by default; --optimizers ...,{k} runs it" for k in keys if k in pset.default_skip and k not in skipped})
    for key in [k for k in keys if k in skipped]:
        keys.remove(key)
        not_run.append({"key": key, "label": O.LABELS[key], "status": "skipped", "reason": skipped[key]})
    return keys, not_run


def _left_out_here(args, set_name: str) -> dict:
    """{key: reason} of --leave-out entries that apply to this set (all sets, or KEY@SET,...)."""
    out = {}
    for key, (sets, reason) in getattr(args, "left_out", {}).items():
        if sets is None or set_name in sets:
            out[key] = reason
    return out


def run_set(pset: ParamSet, device, args, rates, plan) -> dict:
    fl = floor(pset, rates)
    plan = _set_plan(plan, fl, device)
    res = {"set": pset.describe(), "floor": fl, "optimizers": [], "timing": plan}
    # NS FLOPs per method and their floors, for the auto NS dtype and for fp32 (CPUs without bf16)
    res["ns_methods"] = {"auto": ns_methods(pset, rates, device), "float32": ns_methods(pset, rates, device, {"ns_dtype": torch.float32})}
    print(f"\n[{pset.name}] {pset.title}: {pset.numel:,} params in {len(pset.tensors)} tensors; "
          f"NS {fl['ns_flops'] / 1e9:.2f} GFLOP ({fl['ns_flops_symmetric'] / 1e9:.2f} sym), "
          f"state {fl['state_bytes'] / 1e6:.1f} MB -> floor {fl['floor_s'] * 1e3:.3f} ms", flush=True)  # fmt: skip
    extras = bool(pset.targets) or args.quick or args.profile
    interleave = _interleave(args, device, pset)
    res["interleaved"] = interleave
    keys, not_run = _contenders(args, pset)
    for rec in not_run:
        res["optimizers"].append(rec)
        _print_rec(rec)
    # yardsticks timed like the optimizers: the bare NS matmuls of one step (the "ns" target; on CUDA
    # every set's bare cuBLAS bf16 NS), in the dtypes the contenders' NS runs in
    yard_dtypes = _yardstick_dtypes(pset, keys, device, args)
    res["bare_ns"] = {}
    timing_plan = {k: plan[k] for k in ("warmup", "min_steps", "max_steps", "budget_s")}
    noop = lambda: None  # noqa: E731
    if interleave:  # all optimizers alive at once, one timed step of each per round
        yard = _yardsticks(pset, device, yard_dtypes)
        cs = []
        for key in keys:
            cs.append(Contender(key, pset, device, args))
            if not cs[-1].ok:
                _print_rec(cs[-1].rec)
        live = [c for c in cs if c.ok]
        timings = time_interleaved([(c.runner.step, c.prepare) for c in live] + [(fn, noop) for _, fn in yard], device, **timing_plan)
        for (name, _), t in zip(yard, timings[len(live):]):
            res["bare_ns"][name] = {**summarize(t["times_s"]), "times_s": t["times_s"]}
        for c, t in zip(live, timings):
            c.record_timing(t, fl["floor_s"])
            c.measure_rest(pset, args, extras, own_memory=False)
            _print_rec(c.rec)
        for c in cs:
            c.close()
            res["optimizers"].append(c.rec)
    else:  # one optimizer at a time (own peak memory)
        for key in keys:
            if _out_of_time(args):
                res["optimizers"].append({"key": key, "label": O.LABELS[key], "status": "skipped", "reason": _out_of_time(args)})
                _print_rec(res["optimizers"][-1])
                continue
            t0 = time.perf_counter()
            c = Contender(key, pset, device, args)
            if c.ok:
                c.record_timing(time_steps(c.runner.step, c.prepare, device, **timing_plan), fl["floor_s"])
                c.measure_rest(pset, args, extras, own_memory=True)
                c.close()
            _print_rec(c.rec, time.perf_counter() - t0)
            res["optimizers"].append(c.rec)
        for dt in yard_dtypes:  # built after the optimizers: their stacks do not sit in anyone's memory
            name = str(dt).replace("torch.", "")
            if _out_of_time(args):
                res["bare_ns"][name] = {"median_s": None, "skipped": _out_of_time(args)}
                continue
            (name, fn), = _yardsticks(pset, device, [dt])
            t = time_steps(fn, noop, device, **timing_plan)
            res["bare_ns"][name] = {**summarize(t["times_s"]), "times_s": t["times_s"]}
            del fn
            _cleanup(device)
    if "triton_graph" in keys and device.type == "cuda" and args.graph_check:
        res["graph_check"] = _graph_check(pset, device, args)
    for name, b in res["bare_ns"].items():
        if b.get("median_s"):
            print(f"  {'bare NS matmuls (' + name + ')':<32} {b['median_s'] * 1e3:10.3f} ms  ({b['steps']} steps)", flush=True)
        else:
            print(f"  {'bare NS matmuls (' + name + ')':<32} skipped: {b.get('skipped')}", flush=True)
    order = {k: i for i, k in enumerate(O.ALL_CONTENDERS)}
    res["optimizers"].sort(key=lambda r: order.get(r["key"], len(order)))
    by_key = {r["key"]: r for r in res["optimizers"]}
    primary = next((k for k in ("triton", "torch") if by_key.get(k, {}).get("status") == "ok"), None)
    res["primary"] = primary
    if primary:
        tp = by_key[primary]["median_s"]
        for r in res["optimizers"]:
            if r.get("median_s"):
                r["vs_primary"] = r["median_s"] / tp
    res["ns_buckets"] = None
    if not args.no_kernels and not _out_of_time(args):
        try:
            res["ns_buckets"] = K.ns_buckets_bench(pset, device, rates, budget_s=0.0 if args.quick else 0.3)
        except Exception as e:  # report, do not lose the run
            res["ns_buckets_error"] = f"{type(e).__name__}: {e}"
    same = str(K._torch_ns_dtype(device)).replace("torch.", "")
    res["targets"] = _targets(pset, by_key, res["ns_buckets"], res["bare_ns"], same)
    for t in res["targets"]:
        if t["value"] is not None:
            print(f"  target {t['name']}: {t['value']:.2f} (target {'>=' if t['better'] == 'higher' else '<='} {t['target']}) "
                  f"{'MET' if t['met'] else 'MISSED'}", flush=True)  # fmt: skip
    return res


def _yardstick_dtypes(pset: ParamSet, keys: list, device, args) -> list:
    """The dtypes of the bare NS yardsticks of this set: on the CPU target sets, the torch backend's
    auto dtype and the forced ones among the contenders; elsewhere (--bare-ns, the default on CUDA)
    the bare cuBLAS NS in bf16, the textbook form's dtype there."""
    dts = []
    if {"ns", "ns_gram"} & set(pset.targets):
        dts = [K._torch_ns_dtype(device)] + ([torch.bfloat16] if "torch_bf16" in keys else [])
        dts += [torch.float32] if any(k.startswith("torch_fp32") for k in keys) else []
        dts += [torch.float16] if "torch_fp16_gram" in keys else []
    elif args.bare_ns:
        dts = [torch.bfloat16]
    return list(dict.fromkeys(dts))


def _yardsticks(pset: ParamSet, device, dtypes) -> list:
    return [K.bare_ns_step(pset, device, dt) for dt in dtypes]


def _graph_check(pset: ParamSet, device, args) -> dict:
    """Replay of the captured triton step against eager steps (bench/graphs.py), under the set's budget."""
    from . import graphs

    why = _out_of_time(args)
    if why:
        return {"status": "skipped", "reason": why}
    t0 = time.perf_counter()
    try:
        rec = {"status": "ok", **graphs.replay_equals_eager(pset, device, steps=3)}
    except Exception as e:  # reported, the run goes on
        rec = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    rec["seconds"] = time.perf_counter() - t0
    _cleanup(device)
    if rec["status"] == "ok":
        print(f"  capture + replay vs eager ({rec['steps']} steps): "
              f"{'bit-identical' if rec['identical'] else 'DIFFERENT'} (max |Δ| vs default eager {rec['eager']['max_abs_diff']:.2e}, "
              f"vs capturable eager {rec['eager_capturable']['max_abs_diff']:.2e})", flush=True)  # fmt: skip
    else:
        print(f"  capture + replay vs eager: {rec['status']}: {rec['reason']}", flush=True)
    return rec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sets", help=f"comma-separated parameter sets ({', '.join(SETS)}); default: CPU {','.join(DEFAULT_SETS['cpu'])}, "
                                  f"CUDA {','.join(DEFAULT_SETS['cuda'])}")  # fmt: skip
    p.add_argument("--cpu-targets", action="store_true",
                   help=f"only the CPU target sets of the performance contract ({', '.join(CPU_TARGET_SETS)})")
    p.add_argument("--optimizers", help=f"comma-separated, from {', '.join(O.ALL_CONTENDERS)} (default: {', '.join(O.CONTENDERS)}; "
                                        "torch_bf16 only where the torch backend's NS is not bf16 already)")
    p.add_argument("--skip", default="", help="comma-separated optimizers to leave out (e.g. compile)")
    p.add_argument("--leave-out", action="append", default=[], metavar="KEY[@SET,...]=REASON",
                   help="an optimizer not run (on every set, or on the sets named after @), reported in every output as "
                        "skipped for REASON (repeatable)")
    p.add_argument("--bare-ns", action=argparse.BooleanOptionalAction, default=None,
                   help="time the bare batched textbook NS matmuls of every set in bf16 beside the optimizers "
                        "(default: on CUDA; the CPU target sets always have theirs)")
    p.add_argument("--graph-check", action=argparse.BooleanOptionalAction, default=True,
                   help="with triton_graph on CUDA: check that replaying the captured step equals eager steps (default on)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), help="results folder")
    p.add_argument("--quick", action="store_true", help="every code path at tiny sizes, in seconds (CI); no timing claims")
    p.add_argument("--threads", default="auto", help="torch CPU threads: N or auto (default; fewer when other processes load the cores)")
    p.add_argument("--tied-role", default="head", choices=TIED_ROLES,
                   help="role of the tied wte/lm_head tensor (default head: NS, as the performance contract counts)")
    p.add_argument("--budget", type=float, help="seconds of timed steps per optimizer (default 2)")
    p.add_argument("--steps", type=int, help="minimum timed steps per optimizer")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --quick: aot_eager)")
    p.add_argument("--compile-timeout", type=float, default=240.0, help="seconds before compiling the reference counts as failed")
    p.add_argument("--cpu-budget", type=float, default=0.25, help="gpt-cpu: largest size whose estimated step is under this many seconds")
    p.add_argument("--interleave", default="auto", choices=("auto", "on", "off"),
                   help="time the optimizers in interleaved rounds (auto: on for CPU when the copies fit in RAM, "
                        "off on CUDA where peak memory is measured per optimizer)")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-bucket NS benchmark")
    p.add_argument("--profile", action="store_true", help="record the torch.profiler top ops of mango's step for every set")
    p.add_argument("--no-png", action="store_true", help="do not draw the bar chart")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run: optimizers (one at a time) not started by "
                                                     "then are reported as skipped, and the results are still written")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    skip = {s for s in args.skip.split(",") if s}
    args.skip_set = skip
    if args.bare_ns is None:
        args.bare_ns = device.type == "cuda"
    from mango.ns_engine import auto_dtype

    ns_dt = str(auto_dtype({}, "textbook", device)).replace("torch.", "")
    args.optimizers_given = args.optimizers is not None
    if args.optimizers is None:
        defaults = O.CONTENDERS + (O.PEERS if device.type == "cuda" else ())
        args.optimizers = ",".join(k for k in defaults if k != "torch_bf16" or ns_dt != "bfloat16")
    args.optimizers = [k for k in args.optimizers.split(",") if k and k not in skip]
    args.left_out = {}
    for item in args.leave_out:
        target, sep, reason = item.partition("=")
        if not sep or not reason.strip():
            raise SystemExit(f"--leave-out {item!r}: give KEY=REASON or KEY@SET,SET=REASON (the reason is what the report says)")
        key, at, where = target.partition("@")
        args.left_out[key] = ({w for w in where.split(",") if w} if at else None, reason.strip())
        if key not in args.optimizers:
            args.optimizers.append(key)
    for k in args.optimizers:
        if k not in O.ALL_CONTENDERS:
            raise SystemExit(f"unknown optimizer {k!r}; known: {', '.join(O.ALL_CONTENDERS)}")
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    threads = configure_threads(args.threads)
    started = args._started = time.perf_counter()
    print(f"bench.step on {device} ({threads['threads']} threads"
          f"{'; ' + threads['reason'] if threads.get('reason') else ''}); measuring the device ...", flush=True)  # fmt: skip
    rates = measure_device(device, quick=args.quick)
    args._rates = rates
    print(f"  matmul: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in rates["matmul_flops"].items() if isinstance(v, float))
          + f"; copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)  # fmt: skip

    if args.quick:
        names = ["tiny"] if not args.sets else args.sets.split(",")
    elif args.sets:
        names = [s for s in args.sets.split(",") if s]
    elif args.cpu_targets:
        names = list(CPU_TARGET_SETS)
    else:
        names = list(DEFAULT_SETS["cuda" if device.type == "cuda" else "cpu"])

    ns_rate = rates["matmul_flops"].get(ns_dt) or rates["peak_matmul_flops"]

    def estimate(ps):  # mango torch backend: full NS FLOPs at its NS dtype + ~3x the least state traffic
        return ns_flops(ps) / ns_rate + 3 * state_bytes(ps) / rates["copy_bytes_per_s"]

    sets = [resolve_set(n, tied_role=args.tied_role, estimate_s=estimate, budget_s=args.cpu_budget) for n in names]
    plan = _timing_plan(args, device)
    result = {
        "schema": SCHEMA,
        "kind": "bench.step",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "device": _device_info(device, threads),
        "versions": _versions(),
        "rates": rates,
        "timing": {**plan, "method": "CUDA events, device idle at step start" if device.type == "cuda" else "perf_counter",
                   "gradients": "refreshed with torch.randn before every step, outside the timed span",
                   "statistic": "median of timed steps after warm-up"},  # fmt: skip
        "settings": {"optimizers": args.optimizers, "skipped": sorted(skip), "tied_role": args.tied_role,
                     "left_out": {k + (f"@{','.join(sorted(w))}" if w else ""): r for k, (w, r) in args.left_out.items()},
                     "bare_ns": args.bare_ns, "time_budget_s": args.time_budget,
                     "compile_backend": args.compile_backend, "compile_timeout_s": args.compile_timeout,
                     "torch_backend_ns_dtype": ns_dt, "preset": "mango.presets.mango defaults (fp32 params and state)"},  # fmt: skip
        "sets": [],
    }
    for i, ps in enumerate(sets):
        _start_set(args, sets, i)
        result["sets"].append(run_set(ps, device, args, rates, plan))
        if i < len(sets) - 1:  # the sets so far, on disk: a run killed later still leaves them (JSON and markdown)
            result["targets"] = [t for s in result["sets"] for t in s["targets"]]
            R.write(dict(result, partial=f"{i + 1} of {len(sets)} sets"), args.out, png=False)
    result["targets"] = [t for s in result["sets"] for t in s["targets"]]
    result["wall_s"] = time.perf_counter() - started
    try:  # the load other processes put on the machine, at the end too (timings under load are noisy)
        result["device"]["threads"]["loadavg_end"] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass
    paths = R.write(result, args.out, png=not args.no_png)
    result["files"] = paths
    print()
    print(R.markdown(result))
    print("wrote " + ", ".join(paths.values()))
    return result


if __name__ == "__main__":
    main()
