"""The hardware floor of one optimizer step: NS FLOPs over the matmul rate + state bytes over bandwidth.

    floor = NS FLOPs (symmetric) / measured matmul rate  +  state bytes / measured copy bandwidth

Both rates are measured on the device the benchmark runs on (`measure_device`), so every step
time can be reported as a multiple of the floor of that same machine. The performance contract states the GPT-2
124M figures this reproduces: 1.77 TFLOP of NS (1.28 TFLOP using symmetry), ~4.2 GiB of state
traffic, ≈3 ms on an H100.

NS FLOPs per step for one block X (r x c, used transposed so r <= c), per Newton–Schulz step
(`mango.newton_schulz.textbook_step_flops`):

    A = X Xᵀ         2 r² c         symmetric: r (r+1) c     (one triangle)
    B = b A + c A A  2 r³                      r² (r+1)      (symmetric result)
    X = a X + B X    2 r² c                    2 r² c

State bytes: the least traffic a step can do: read the gradient, read and write the parameter
and every state tensor (m, v, offset for MANGO), once each. For fp32 MANGO that is 36 bytes per
parameter.

Per NS method (`ns_methods`): the textbook and the Gram form of the same polynomial (the kernel design),
counted by `mango.newton_schulz.textbook_flops` / `gram_flops` (2 FLOPs per multiply-add, no
symmetry, the Gram form with its restarts), and what ``ns_method="auto"`` picks per bucket on the
device (`mango.ns_engine`). Each method's floor uses the measured matmul rate of the
dtype that method runs in there (`mango.ns_engine.auto_dtype` at the bucket's shape and batch:
bf16 textbook and fp16 Gram on CUDA; on a CPU, measured per size class) plus the state traffic
over the copy bandwidth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from mango import config
from mango import newton_schulz as ns

from .params import ParamSet

__all__ = [
    "NSBucket",
    "ns_buckets",
    "ns_flops",
    "state_bytes",
    "stage_bytes",
    "measure_device",
    "floor",
    "ns_methods",
]

NS_STEPS = config.DEFAULT_NS_STEPS


@dataclass(frozen=True)
class NSBucket:
    """Same-shape NS blocks of one role: what the batched backends orthogonalize in one call."""

    role: str
    norm: str
    param_shape: tuple  # shape of each parameter in the bucket
    block: tuple  # (rows, cols) of each NS block
    batch: int  # number of blocks (tensors x head blocks)
    tensors: int

    @property
    def oriented(self) -> tuple:
        """(r, c) with r <= c: the shape the NS iterates on."""
        r, c = self.block
        return (r, c) if r <= c else (c, r)

    @property
    def label(self) -> str:
        r, c = self.block
        return f"{self.role} {r}x{c} x{self.batch}"


def ns_buckets(pset: ParamSet) -> list[NSBucket]:
    """NS buckets of the MANGO preset on `pset`, in the order the plan meets them (role group, then shape)."""
    out: dict = {}
    for t in pset.tensors:
        norm = config.ROLE_DEFAULT_NORM[t.role]
        if norm not in config.NS_NORMS:
            continue
        rows, cols = t.shape[0], math.prod(t.shape[1:])
        if norm == "ns_split":
            block, per = (t.head_dim, cols), rows // t.head_dim
        else:
            block, per = (rows, cols), 1
        key = (t.role, t.head_dim, norm, t.shape)
        b = out.get(key)
        out[key] = NSBucket(t.role, norm, t.shape, block, (b.batch if b else 0) + per, (b.tensors if b else 0) + 1)
    # the plan orders buckets by param group (first appearance of the role), then by first shape
    return list(out.values())


def ns_flops(pset: ParamSet, steps: int = NS_STEPS, symmetric: bool = False) -> int:
    """Textbook NS FLOPs of one step over every NS bucket of `pset`."""
    return sum(b.batch * ns.textbook_flops(*b.block, steps, symmetric=symmetric) for b in ns_buckets(pset))


def state_bytes(pset: ParamSet, param_bytes: int = 4, grad_bytes: int = 4, state_bytes_per: int = 4, state_tensors: int = 3) -> int:
    """Least traffic of one MANGO step: read g, read+write W and each of the `state_tensors` (m, v, O)."""
    per = grad_bytes + 2 * param_bytes + 2 * state_tensors * state_bytes_per
    return pset.numel * per


def stage_bytes(numel: int, stage: str, word: int = 4) -> int:
    """Least traffic of one elementwise stage over `numel` parameters (fp32 words).

    moments: read g, m, v; write m, v and the direction d        (6 words)
    apply:   read the normalized Δ, W, O; write O, W              (5 words)
    """
    words = {"moments": 6, "apply": 5}[stage]
    return numel * words * word


# ----------------------------------------------------------------------------------------
# device rates
# ----------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, reps: int, inner: int = 1) -> float:
    """Best wall time of `reps` repetitions of `inner` calls (seconds per call)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_matmul(device, dtype, n: int | None = None, reps: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) for n x n x n in `dtype` (best of `reps`)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 2
    t = _best_time(lambda: torch.mm(a, b, out=out), device, reps, inner)
    return 2 * n**3 / t


def measure_copy(device, nbytes: int | None = None, reps: int = 5) -> float:
    """Measured copy bandwidth (bytes read + written per second) of a large fp32 tensor copy."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (128 << 20))
    x = torch.empty(nbytes // 4, device=device)
    x.fill_(1.0)
    y = torch.empty_like(x)
    inner = 10 if device.type == "cuda" else 2
    t = _best_time(lambda: y.copy_(x), device, reps, inner)
    return 2 * nbytes / t


def measure_device(device, quick: bool = False) -> dict:
    """Matmul rates (fp32 and bf16) and copy bandwidth of `device`; `peak_matmul` is the best of them."""
    device = torch.device(device)
    n = None
    if quick:
        n = 256 if device.type == "cpu" else 2048
    reps = 2 if quick else 5
    rates = {}
    # fp16 only where a default NS runs in it (the Gram form on CUDA); it does not enter the peak
    dtypes = (("float32", torch.float32), ("bfloat16", torch.bfloat16)) + ((("float16", torch.float16),) if device.type == "cuda" else ())
    for name, dt in dtypes:
        try:
            rates[name] = measure_matmul(device, dt, n=n, reps=reps)
        except RuntimeError as e:  # a dtype the device cannot multiply
            rates[name] = None
            rates[name + "_error"] = str(e).splitlines()[0]
    bw = measure_copy(device, nbytes=(16 << 20) if quick else None, reps=reps)
    measured = {k: v for k, v in rates.items() if isinstance(v, float) and k != "float16"}
    best_dtype = max(measured, key=measured.get) if measured else None
    best = measured.get(best_dtype)
    return {
        "matmul_flops": rates,
        "peak_matmul_flops": best,
        "peak_matmul_dtype": best_dtype,
        "copy_bytes_per_s": bw,
        "matmul_size": n or (8192 if device.type == "cuda" else 1024),
    }


def floor(pset: ParamSet, rates: dict, steps: int = NS_STEPS) -> dict:
    """The floor of one MANGO step on `pset` for the measured `rates` (see module docstring)."""
    full, sym = ns_flops(pset, steps), ns_flops(pset, steps, symmetric=True)
    nbytes = state_bytes(pset)
    mm, bw = rates["peak_matmul_flops"], rates["copy_bytes_per_s"]
    t_ns, t_state = sym / mm, nbytes / bw
    return {
        "ns_flops": full,
        "ns_flops_symmetric": sym,
        "state_bytes": nbytes,
        "matmul_flops_used": mm,
        "matmul_dtype_used": rates["peak_matmul_dtype"],
        "copy_bytes_per_s_used": bw,
        "ns_s": t_ns,
        "ns_full_s": full / mm,
        "state_s": t_state,
        "floor_s": t_ns + t_state,
        "floor_full_s": full / mm + t_state,
    }


def ns_methods(pset: ParamSet, rates: dict, device, settings: dict | None = None) -> dict:
    """NS FLOPs of one step per method — textbook, Gram, and what ``ns_method="auto"`` picks per
    bucket on `device` — with each method's floor (see the module docstring). `settings`: mango
    group settings over the defaults (ns_dtype, ns_coefficients, ns_steps, ns_method)."""
    from mango.ns_engine import auto_dtype, auto_method

    device = torch.device(device)
    s = dict(config.DEFAULTS, **(settings or {}))
    steps = len(config.ns_schedule(s))
    mm = rates["matmul_flops"]
    t_state = state_bytes(pset) / rates["copy_bytes_per_s"]

    def dtype_of(method, b):  # on a CPU measured at the bucket's size class, as the optimizer decides
        r, c = b.block
        return str(auto_dtype(s, method, device, rows=r, cols=c, count=b.batch)).replace("torch.", "")

    def rate_of(dtype_name):
        return mm.get(dtype_name) if isinstance(mm.get(dtype_name), float) else None

    buckets, tot = [], {"textbook": 0, "gram": 0, "auto": 0}
    t_ns = {"textbook": 0.0, "gram": 0.0, "auto": 0.0}
    missing = set()
    for b in ns_buckets(pset):
        r, c = b.block
        flops = {"textbook": b.batch * ns.textbook_flops(r, c, steps), "gram": b.batch * ns.gram_flops(r, c, steps)}
        auto = auto_method(s, r, c, device, count=b.batch)
        dts = {m: dtype_of(m, b) for m in ("textbook", "gram")}
        row = {"bucket": b.label, "block": list(b.block), "batch": b.batch, "textbook_flops": flops["textbook"],
               "gram_flops": flops["gram"], "gram_restarts": list(ns.gram_restarts(steps)), "auto": auto,
               "textbook_dtype": dts["textbook"], "gram_dtype": dts["gram"],
               "gram_vs_textbook_flops": flops["gram"] / flops["textbook"] if flops["textbook"] else None}  # fmt: skip
        buckets.append(row)
        for m, f in (("textbook", flops["textbook"]), ("gram", flops["gram"]), ("auto", flops[auto])):
            tot[m] += f
            dt = dts[auto] if m == "auto" else dts[m]
            rate = rate_of(dt)
            if rate:
                t_ns[m] += f / rate
            else:
                missing.add(dt)
    out = {"steps": steps, "settings": {k: str(s[k]) for k in ("ns_dtype", "ns_method", "ns_coefficients", "ns_steps")},
           "buckets": buckets, "flops": tot, "state_s": t_state,
           "flop_convention": "mango.newton_schulz.textbook_flops / gram_flops: 2 FLOPs per multiply-add, no symmetry"}  # fmt: skip
    out["floors"] = {}
    for m in ("textbook", "gram", "auto"):
        dts = sorted({r[f"{m}_dtype"] if m != "auto" else r[r["auto"] + "_dtype"] for r in buckets})
        ok = not any(d in missing for d in dts)
        out["floors"][m] = {"ns_s": t_ns[m] if ok else None, "floor_s": t_ns[m] + t_state if ok else None, "dtypes": dts}
    out["gram_vs_textbook_flops"] = tot["gram"] / tot["textbook"] if tot["textbook"] else None
    if missing:
        out["rates_missing"] = sorted(missing)
    return out
