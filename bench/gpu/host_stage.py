"""The host stage: the Python time of one triton step, per step, from `python -m bench.host`.

bench.host builds HF GPT-2 124M (tied and untied head) on the CPU and times `opt.step()` as a launch
dry run (every launch decided, none executed): the host work a GPU step pays before its kernels,
with and without `capturable=True`. It needs no GPU, so this stage runs it on the GPU machine's CPU
beside the rest and carries its rows into the summary.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

from . import proc


def run(profile: dict, workdir: str, log: proc.Log, budget_s: float) -> dict:
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.host", *profile["args"], "--out", workdir]
    r = proc.run(cmd, log, budget_s, env=proc.python_env(**profile["env"]), prefix="[host] ")
    found = sorted(glob.glob(os.path.join(workdir, "host_*.json")))
    rec = {"status": "failed", "process": r.to_dict()}
    if found:
        with open(found[-1]) as f:
            res = json.load(f)
        rec["rows"] = res.get("rows", [])
        rec["status"] = "ok" if r.ok and rec["rows"] else "failed"
    else:
        rec["error"] = " | ".join(r.tail[-10:]) or (r.killed or f"rc {r.rc}")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec
