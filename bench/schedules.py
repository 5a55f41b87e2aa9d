"""`python -m bench.schedules`: how orthogonal each named NS schedule makes a matrix, per step, and its time.

For every schedule in `mango.config.NS_SCHEDULES` (Muon's triple, the MANGO authors' 6 steps, Polar
Express per-step coefficients at 4/5/any steps) it runs mango's batched Newton–Schulz
(`mango.backends.torch_backend.batched_newton_schulz`, Frobenius pre-scaling, exactly what the
torch backend runs) for k = 1, 2, ... steps and records the singular values of the output X_k
(float64 SVD): σ_min, σ_max (the σ range: 1 is orthogonal), the 10th percentile and the median.

    forms × dtypes   textbook in float64 (the exact polynomial), bf16 (CUDA and bf16 CPUs) and fp32;
                     Gram form (the kernel design, with its restarts) in float64, fp32 (CPUs) and fp16 (CUDA)
    inputs           "gaussian": i.i.d. N(0, 1) entries (a well-conditioned spectrum);
                     "gradient": U·diag(σ)·Vᵀ with σ_i ∝ (i+1)^-1.5 and random orthogonal U, V (a
                     low-rank-ish spectrum like a gradient's or a momentum's: a few large directions
                     and a long tail, condition number ~rows^1.5)
    shapes           a GPT-2 MLP weight 768x3072 and an attention head block 64x768; on CPU at reduced
                     size by default (192x768, 64x768), --full for the real sizes
    time             median wall time of the whole schedule on a batch of the MLP-shaped input in
                     each form/dtype mango runs on a CPU (bf16 and fp32 textbook, fp32 Gram), all
                     of them in interleaved rounds

Writes schedules_<device>_<time>.{json,md,png} under --out (default bench/results/).
"Best" (what bench.train compares with Muon's 5 steps): among schedules of at most 5 steps, the
smallest worst-case distance max(1 - σ_min, σ_max - 1) of the textbook bf16 output on the Gaussian
input of the MLP shape, ties broken by fewer steps.

    python -m bench.schedules              # CPU, reduced sizes, ~1 min
    python -m bench.schedules --quick      # tiny shapes, seconds (tests)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

import torch

from mango import config
from mango.backends.torch_backend import batched_newton_schulz

from .measure import configure_threads, time_interleaved

__all__ = ["VARIANTS", "make_input", "sigma_range", "schedule_coefficients", "run", "best_schedule", "markdown", "main"]

# (form, dtype) pairs: what mango runs somewhere, plus float64 for the exact polynomial
VARIANTS = (
    ("textbook", torch.float64),
    ("textbook", torch.bfloat16),
    ("textbook", torch.float32),
    ("gram", torch.float64),
    ("gram", torch.float32),
    ("gram", torch.float16),
)
TIMED = (("textbook", torch.bfloat16), ("textbook", torch.float32), ("gram", torch.float32))
ANY_STEPS = 8  # steps shown for schedules of any length ("muon", "polar_express")
BEST_MAX_STEPS = 5


def _name(dt) -> str:
    return str(dt).replace("torch.", "")


def make_input(kind: str, rows: int, cols: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A (batch, rows, cols) float64 stack: "gaussian" entries, or a "gradient"-like power-law spectrum."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, rows, cols, generator=gen, dtype=torch.float64)
    if kind == "gaussian":
        return X
    if kind != "gradient":
        raise ValueError(f"unknown input kind {kind!r}")
    m = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(batch, rows, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, cols, m, generator=gen, dtype=torch.float64))
    s = (torch.arange(m, dtype=torch.float64) + 1) ** -1.5
    return U @ torch.diag_embed(s.expand(batch, m)) @ V.mT


def sigma_range(X: torch.Tensor) -> dict:
    """σ_min, p10, median, σ_max of the singular values of every matrix of a stack (pooled)."""
    s = torch.linalg.svdvals(X.to(torch.float64)).reshape(-1).sort().values
    n = s.numel()
    return {"min": float(s[0]), "p10": float(s[int(0.1 * (n - 1))]), "median": float(s[(n - 1) // 2]), "max": float(s[-1])}


def schedule_coefficients(name: str) -> tuple:
    """The (a, b, c) of every step of a named schedule at its own length, or ANY_STEPS for those of any length."""
    fixed = config.NS_SCHEDULES[name]["steps"]
    return config.normalize_ns_coefficients(name, fixed if fixed is not None else ANY_STEPS)


def default_steps(name: str) -> int:
    fixed = config.NS_SCHEDULES[name]["steps"]
    return fixed if fixed is not None else config.DEFAULT_NS_STEPS


def _orthogonalize(X64, coeffs, method, dtype):
    return batched_newton_schulz(X64.to(dtype), coeffs, "frobenius", 1e-7, dtype=dtype, method=method)


def run(shapes, kinds=("gaussian", "gradient"), schedules=None, variants=VARIANTS, time_budget_s=0.3, time_batch=4,
        seed=0) -> dict:  # fmt: skip
    """σ ranges of every schedule × variant × input × step, and the time of each schedule."""
    schedules = list(schedules or config.NS_SCHEDULES)
    out = {"inputs": [], "schedules": {}, "timing": []}
    for name in schedules:
        co = schedule_coefficients(name)
        out["schedules"][name] = {"steps": len(co), "default_steps": default_steps(name), "coefficients": [list(t) for t in co],
                                  "source": config.NS_SCHEDULES[name]["source"]}  # fmt: skip
    for label, (r, c) in shapes:
        for kind in kinds:
            X = make_input(kind, r, c, seed=seed)
            inp = {"shape": label, "rows": r, "cols": c, "kind": kind, "input_sigma": sigma_range(X / torch.linalg.matrix_norm(X, keepdim=True)),
                   "rows_by_schedule": {}}  # fmt: skip
            for name in schedules:
                co = schedule_coefficients(name)
                per = {}
                for method, dt in variants:
                    curve = []
                    for k in range(1, len(co) + 1):
                        Y = _orthogonalize(X, co[:k], method, dt)
                        curve.append(sigma_range(Y))
                    per[f"{method}/{_name(dt)}"] = curve
                inp["rows_by_schedule"][name] = per
            out["inputs"].append(inp)
    # time per schedule (at its default length), on a batch shaped like the first (MLP) shape; every
    # schedule x form/dtype is one stepper of interleaved rounds (load drift hits all alike)
    label, (r, c) = shapes[0]
    Xb = make_input("gaussian", r, c, seed=seed, batch=time_batch)
    steppers, keys = [], []
    for name in schedules:
        co = config.normalize_ns_coefficients(name, None)  # the schedule's own length (5 for any-length ones)
        for method, dt in TIMED:
            Xd = Xb.to(dt)
            steppers.append((lambda Xd=Xd, co=co, method=method, dt=dt: batched_newton_schulz(Xd, co, "frobenius", 1e-7, dtype=dt, method=method),
                             lambda: None))  # fmt: skip
            keys.append((name, len(co), f"{method}/{_name(dt)}"))
    plan = dict(warmup=1, min_steps=2, max_steps=2, budget_s=0.0) if time_budget_s <= 0 else dict(warmup=2, min_steps=15, max_steps=200, budget_s=time_budget_s)
    timings = time_interleaved(steppers, "cpu", **plan)
    rows = {}
    for (name, steps, v), t in zip(keys, timings):
        row = rows.setdefault(name, {"schedule": name, "steps": steps, "shape": f"{time_batch}x{r}x{c}"})
        row[f"{v}_s"] = statistics.median(t["times_s"])
        row[f"{v}_rounds"] = len(t["times_s"])
    out["timing"] = list(rows.values())
    out["timing_method"] = f"median wall time over {plan['min_steps']}+ interleaved rounds (bench.measure.time_interleaved), warm-up excluded"
    return out


def _worst(sig: dict) -> float:
    return max(1.0 - sig["min"], sig["max"] - 1.0)


def best_schedule(result: dict, variant: str = "textbook/bfloat16", kind: str = "gaussian", max_steps: int = BEST_MAX_STEPS) -> dict:
    """The schedule (at its default length, at most max_steps) whose output is closest to orthogonal."""
    inp = next(i for i in result["inputs"] if i["kind"] == kind)
    cands = []
    for name, s in result["schedules"].items():
        k = s["default_steps"]
        if k > max_steps:
            continue
        sig = inp["rows_by_schedule"][name][variant][k - 1]
        # ties (the same polynomials under two names): fewer steps, then a schedule of fixed length
        cands.append((round(_worst(sig), 9), k, config.NS_SCHEDULES[name]["steps"] is None, name, sig))
    worst, k, _, name, sig = min(cands)
    return {"schedule": name, "steps": k, "worst_distance": worst, "sigma": sig, "variant": variant, "input": f"{kind} {inp['shape']}",
            "criterion": f"smallest max(1 - σ_min, σ_max - 1) of the {variant} output on the {kind} {inp['shape']} input, "
                         f"schedules of at most {max_steps} steps at their default length"}  # fmt: skip


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------


def _rng(sig) -> str:
    return f"[{sig['min']:.3f}, {sig['max']:.3f}]"


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"## Newton–Schulz schedules: orthogonality and time{' (--quick)' if m['quick'] else ''}", "",
             f"**Machine:** {m['device']} ({m['threads']} threads; load average {m['loadavg'][0]:.1f} at start, "
             f"{m['loadavg_end'][0]:.1f} at end) · torch {m['torch']} · python {m['python']} · {m['created']} · "
             f"`{m['command']}`", "",
             "σ range [σ_min, σ_max] of the NS output at each schedule's own length (1 = orthogonal), Frobenius "
             "pre-scaling, mango's batched NS (`batched_newton_schulz`, as the torch backend runs it).", ""]  # fmt: skip
    variants = list(next(iter(result["inputs"][0]["rows_by_schedule"].values())))
    for inp in result["inputs"]:
        s0 = inp["input_sigma"]
        lines += [f"### {inp['kind']} {inp['rows']}x{inp['cols']} (input after pre-scaling: σ in [{s0['min']:.2e}, {s0['max']:.3f}])", "",
                  "| schedule | steps | " + " | ".join(variants) + " |", "| --- | ---: | " + " | ".join("---" for _ in variants) + " |"]  # fmt: skip
        for name, per in inp["rows_by_schedule"].items():
            k = result["schedules"][name]["default_steps"]
            lines.append(f"| {name} | {k} | " + " | ".join(_rng(per[v][k - 1]) for v in variants) + " |")
        lines.append("")
    # vs steps, for the schedules of any length
    anyl = [n for n, s in result["schedules"].items() if config.NS_SCHEDULES.get(n, {}).get("steps", 0) is None]
    if anyl:
        inp = result["inputs"][0]
        v2 = [v for v in ("textbook/float64", "textbook/bfloat16", "gram/float32") if v in variants]
        lines += [f"σ range vs steps ({inp['kind']} {inp['rows']}x{inp['cols']}):", "",
                  "| schedule | form/dtype | " + " | ".join(f"k={k}" for k in range(1, ANY_STEPS + 1)) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in range(ANY_STEPS)) + " |"]  # fmt: skip
        for name in anyl:
            for v in v2:
                curve = inp["rows_by_schedule"][name][v]
                lines.append(f"| {name} | {v} | " + " | ".join(_rng(c) for c in curve) + " |")
        lines.append("")
    t = result["timing"]
    if t:
        cols = [k[:-2] for k in t[0] if k.endswith("_s")]
        lines += [f"Time per schedule (ms, batch {t[0]['shape']}; {result.get('timing_method', '')}):", "",
                  "| schedule | steps | " + " | ".join(cols) + " |", "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]  # fmt: skip
        for row in t:
            lines.append(f"| {row['schedule']} | {row['steps']} | " + " | ".join(f"{row[c + '_s'] * 1e3:.2f}" for c in cols) + " |")
        lines.append("")
    b = result.get("best")
    if b:
        lines += [f"**Best schedule:** `{b['schedule']}` ({b['steps']} steps): σ in {_rng(b['sigma'])}; criterion: {b['criterion']}.", ""]
    return "\n".join(lines)


def _families(result: dict) -> dict:
    """name -> (family curve name, marker): a schedule whose coefficients are a prefix of another's
    (mango_jax of muon, polar_express_4/5 of polar_express) is drawn as a marker on that curve."""
    sch = result["schedules"]
    out = {}
    for name, s in sch.items():
        fam = next((f for f, t in sch.items() if f != name and t["steps"] > s["steps"]
                    and t["coefficients"][: s["steps"]] == s["coefficients"]), None)  # fmt: skip
        out[name] = fam
    return out


def plot(result: dict, path: str) -> None:
    """σ_min and σ_max of X_k vs k per input: one curve per distinct schedule (fp64 textbook solid,
    bf16 textbook dashed, fp32 Gram dotted), named fixed-length schedules as markers at their length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = result["inputs"]
    fams = _families(result)
    curves = [n for n, f in fams.items() if f is None]
    fig, axes = plt.subplots(len(inputs), 2, figsize=(11, 2.8 * len(inputs)), squeeze=False)
    colors = dict(zip(curves, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"]))
    markers = ["o", "s", "^", "D", "v"]
    styles = {"textbook/float64": "-", "textbook/bfloat16": "--", "gram/float32": ":"}
    for i, (row, inp) in enumerate(zip(axes, inputs)):
        per_s = inp["rows_by_schedule"]
        for name in curves:
            for v, ls in styles.items():
                curve = per_s[name].get(v)
                if not curve:
                    continue
                ks = range(1, len(curve) + 1)
                lab = f"{name} ({v})" if i == 0 else None
                row[0].plot(ks, [c["min"] for c in curve], ls, color=colors[name], lw=1.2, label=lab)
                row[1].plot(ks, [c["max"] for c in curve], ls, color=colors[name], lw=1.2)
        for j, (name, fam) in enumerate((n, f) for n, f in fams.items() if f is not None):
            k = result["schedules"][name]["steps"]
            c = per_s[name]["textbook/float64"][k - 1]
            lab = f"{name} ({k} steps)" if i == 0 else None
            row[0].plot([k], [c["min"]], markers[j % len(markers)], color=colors.get(fam, "k"), ms=7, mfc="none", label=lab)
            row[1].plot([k], [c["max"]], markers[j % len(markers)], color=colors.get(fam, "k"), ms=7, mfc="none")
        row[0].set_yscale("log")
        row[0].set_ylabel("σ_min of X_k")
        row[1].set_ylabel("σ_max of X_k")
        for ax in row:
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_xlabel("NS steps k")
            ax.set_title(f"{inp['kind']} {inp['rows']}x{inp['cols']}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle("Newton–Schulz schedules: singular-value range of the output vs steps (solid fp64 textbook, dashed bf16 textbook, "
                 "dotted fp32 Gram; markers: named schedules at their length)", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m bench.schedules", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds (tests); no timing claims")
    p.add_argument("--full", action="store_true", help="the real GPT-2 shapes 768x3072 and 64x768 (slow on CPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), help="results folder")
    p.add_argument("--threads", default="auto", help="torch CPU threads: N or auto")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--redraw", metavar="JSON", help="only redraw the .md and .png of a schedules_*.json")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.redraw:
        with open(args.redraw) as f:
            result = json.load(f)
        stem = args.redraw[: -len(".json")]
        with open(stem + ".md", "w") as f:
            f.write(markdown(result) + "\n")
        plot(result, stem + ".png")
        print(markdown(result))
        return result
    threads = configure_threads(args.threads)
    if args.quick:
        shapes = [("mlp/4", (24, 96)), ("head block", (8, 96))]
    elif args.full:
        shapes = [("mlp", (768, 3072)), ("head block", (64, 768))]
    else:
        shapes = [("mlp/4", (192, 768)), ("head block", (64, 768))]
    t0 = time.perf_counter()
    result = run(shapes, time_budget_s=0.0 if args.quick else 0.3)
    result["best"] = best_schedule(result)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "cpu"
    result["meta"] = {"kind": "bench.schedules", "created": created, "quick": args.quick, "device": name, "threads": threads["threads"],
                      "loadavg": [threads.get("loadavg_1min") or float("nan")], "torch": torch.__version__,
                      "python": sys.version.split()[0], "command": "python -m bench.schedules " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "shapes": [[lab, list(s)] for lab, s in shapes], "wall_s": time.perf_counter() - t0}  # fmt: skip
    result["meta"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else [float("nan")]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"schedules_cpu{'_quick' if args.quick else ''}_{created.replace('-', '').replace(':', '').replace('+0000', '').replace('+00:00', '')}")
    paths = {"json": stem + ".json", "md": stem + ".md"}
    if not args.no_png:
        paths["png"] = stem + ".png"
    result["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = markdown(result)
    with open(paths["md"], "w") as f:
        f.write(md + "\n")
    if not args.no_png:
        plot(result, paths["png"])
    print(md)
    print("wrote " + ", ".join(paths.values()))
    result["paths"] = paths
    return result


if __name__ == "__main__":
    main()
