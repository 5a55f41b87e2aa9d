"""The training stage: AdamW vs Muon vs MANGO on one model, and triton-vs-torch loss agreement.

Each run is its own `python -m bench.train` process (same seed, data and schedule by
construction), so one optimizer failing (or the Triton backend taking the CUDA context with
it) costs that run only. The MANGO run uses backend="triton"; the agreement run repeats its
first steps with backend="torch" (`--stop-after`, the schedule unchanged) and the two training
losses are compared step by step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from . import proc

TRITON_SPEC, TORCH_SPEC = "mango:backend=triton", "mango:backend=torch"


def _one(spec: str, tag: str, profile: dict, workdir: str, log: proc.Log, budget_s: float, extra=()) -> dict:
    args = [spec, *profile["args"], "--out", workdir, "--tag", tag, "--no-plot", "--no-progress", *extra]
    r = proc.run([sys.executable, "-m", "bench.train", *args], log, budget_s, env=proc.python_env(**profile["env"]), prefix=f"[train {spec}] ")
    path = os.path.join(workdir, f"train_{tag}.json")
    rec = {"spec": spec, "process": r.to_dict()}
    if r.ok and os.path.exists(path):
        with open(path) as f:
            rec["log"] = json.load(f)
    else:
        rec["error"] = " | ".join(r.tail[-10:]) or (r.killed or f"rc {r.rc}")
    return rec


def agreement(a: list, b: list, steps: int, tolerance: float) -> dict:
    """Step-by-step |loss_a − loss_b| over the first `steps` training losses."""
    n = min(len(a), len(b), steps)
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    finite = all(math.isfinite(d) for d in diffs)
    worst = max(diffs) if diffs else None
    return {
        "steps_compared": n,
        "steps_wanted": steps,
        "first_step_abs_diff": diffs[0] if diffs else None,
        "max_abs_diff": worst,
        "mean_abs_diff": sum(diffs) / n if n else None,
        "worst_step": diffs.index(worst) if diffs else None,
        "tolerance": tolerance,
        "passed": bool(n == steps and finite and worst <= tolerance),
    }


def run(profile: dict, workdir: str, out: str, log: proc.Log, budget_s: float) -> dict:
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    os.makedirs(workdir, exist_ok=True)
    runs = []
    specs = profile["specs"]
    for i, spec in enumerate(specs):
        left = deadline - time.perf_counter()
        # every run gets an equal share of what is left, keeping room for the short agreement run
        share = (left - profile["agreement_budget_s"]) / (len(specs) - i)
        startup = profile.get("startup_s", 15)  # the process's start, data and first compile, outside its --time-budget
        runs.append(_one(spec, f"run{i}", profile, workdir, log, max(share, 10), extra=["--time-budget", f"{max(share - startup, 5):.0f}"]))
    check = _one(TORCH_SPEC, "agreement", profile, workdir, log, max(deadline - time.perf_counter(), 10),
                 extra=["--stop-after", str(profile["agreement_steps"])])  # fmt: skip
    rec = {"seconds": 0.0, "runs": [], "files": []}
    for r in runs:
        summary = {"spec": r["spec"], "process": r["process"]}
        if "log" in r:
            x = r["log"]["runs"][0]
            summary.update({k: x.get(k) for k in ("steps", "final_train_loss", "final_val_loss", "best_val_loss", "diverged",
                                                  "stopped", "tokens_per_s", "opt_time_share", "train_time_s")})  # fmt: skip
        else:
            summary["error"] = r["error"]
        rec["runs"].append(summary)
    ok_logs = [r["log"] for r in runs if "log" in r]
    common = min((len(x["runs"][0]["train_loss"]) for x in ok_logs), default=0)
    if common:  # a run cut short by its time budget is compared with the others at the same step
        rec["common_step"] = common
        for summary, x in zip([s for s in rec["runs"] if "error" not in s], ok_logs):
            window = x["runs"][0]["train_loss"][max(0, common - 20) : common]
            summary["train_loss_at_common_step"] = sum(window) / len(window)
    if ok_logs:
        rec["config"] = ok_logs[0]["config"]
        merged = {"config": dict(ok_logs[0]["config"], specs=[r["spec"] for r in runs if "log" in r]),
                  "runs": [x["runs"][0] for x in ok_logs]}  # fmt: skip
        rec["losses"] = {x["name"]: x["train_loss"] for x in merged["runs"]}
        rec["val_losses"] = {x["name"]: x["val_loss"] for x in merged["runs"]}
        if profile.get("png", True):
            try:
                from bench.train import plot

                plot(merged, os.path.join(out, "train.png"))
                rec["files"].append("train.png")
            except Exception as e:  # a missing matplotlib must not cost the numbers
                rec["plot_error"] = f"{type(e).__name__}: {e}"
    tri = next((r for r in runs if r["spec"] == TRITON_SPEC and "log" in r), None)
    rec["agreement"] = {"triton_run": TRITON_SPEC, "torch_run": TORCH_SPEC, "process": check["process"]}
    if tri is not None and "log" in check:
        rec["agreement"].update(agreement(tri["log"]["runs"][0]["train_loss"], check["log"]["runs"][0]["train_loss"],
                                          profile["agreement_steps"], profile["agreement_tolerance"]))  # fmt: skip
    else:
        rec["agreement"].update(passed=False, error="the triton run or the torch run gave no losses: "
                                + (tri is None and "triton run failed" or check.get("error", "")))  # fmt: skip
    bad_runs = [r for r in rec["runs"] if "error" in r]  # a diverged run is a result, reported as such
    rec["status"] = "ok" if not bad_runs and rec["agreement"]["passed"] else "failed"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec
