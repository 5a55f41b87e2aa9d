"""The step stage: `python -m bench.step` on the GPT-2 sets with every contender, under a budget.

bench.step itself stops starting contenders when its --time-budget is spent and still writes
its JSON/md/PNG; the parent's budget (a little longer) is the backstop. If the run dies (the
Triton contender can take the process down with it: an illegal address poisons the CUDA
context), it is run once more without that contender when time is left, and both are recorded.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time

from . import proc

BACKSTOP_S = 30.0  # default: the parent's kill comes this long after bench.step's own --time-budget


def _bench(profile: dict, out_dir: str, log: proc.Log, budget_s: float, skip: str = "") -> tuple:
    os.makedirs(out_dir, exist_ok=True)
    backstop = profile.get("backstop_s", BACKSTOP_S)
    args = list(profile["args"]) + ["--out", out_dir, "--time-budget", f"{max(budget_s - backstop, 10):.0f}"]
    if skip:
        args += ["--skip", skip]
    if not profile.get("png", True):
        args.append("--no-png")
    r = proc.run([sys.executable, "-m", "bench.step", *args], log, budget_s, env=proc.python_env(**profile["env"]), prefix="[step] ")
    found = sorted(glob.glob(os.path.join(out_dir, "step_*.json")))
    return r, (found[-1] if found else None)


def run(profile: dict, workdir: str, out: str, log: proc.Log, budget_s: float) -> dict:
    """Returns the stage record; copies the result to OUT/step.{json,md,png}."""
    t0 = time.perf_counter()
    r, path = _bench(profile, os.path.join(workdir, "step"), log, budget_s)
    attempts = [r.to_dict()]
    if path is None and "triton" not in profile.get("skip", "") and budget_s - (time.perf_counter() - t0) > 60:
        log.write("[step] no result: running once more without the triton contender")
        r, path = _bench(profile, os.path.join(workdir, "step_retry"), log, budget_s - (time.perf_counter() - t0), skip="triton")
        attempts.append({**r.to_dict(), "note": "retry without the triton contender after the first run gave no result"})
    rec = {"status": "failed", "seconds": 0.0, "attempts": attempts, "files": []}
    if path:
        stem = path[: -len(".json")]
        for ext in ("json", "md", "png"):
            if os.path.exists(f"{stem}.{ext}"):
                shutil.copyfile(f"{stem}.{ext}", os.path.join(out, f"step.{ext}"))
                rec["files"].append(f"step.{ext}")
        with open(path) as f:
            rec["result"] = json.load(f)
        rec["status"] = "ok" if len(attempts) == 1 and attempts[0]["rc"] == 0 else "partial"
    else:
        rec["error"] = " | ".join(r.tail[-10:])
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec
