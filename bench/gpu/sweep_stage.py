"""The sweep stage: `python -m bench.sweep` under a budget; the ARCH_TABLE entry it measured.

Every NS engine (Triton on-chip, Triton tiled at a few tile sizes, cuBLAS textbook and Gram) on the
NS buckets of the step stage's sets. Its JSON is copied to OUT/sweep.json, and the entry it gives
for this architecture is printed in the summary: `mango/ns_engine.py:ARCH_TABLE` is regenerated
from it.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time

from . import proc

BACKSTOP_S = 15.0  # the parent's kill comes this long after bench.sweep's own --time-budget


def run(profile: dict, workdir: str, out: str, log: proc.Log, budget_s: float) -> dict:
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    own = max(budget_s - profile.get("backstop_s", BACKSTOP_S), 5)
    args = [*profile["args"], "--out", workdir, "--time-budget", f"{own:.0f}"]
    r = proc.run([sys.executable, "-m", "bench.sweep", *args], log, budget_s, env=proc.python_env(**profile["env"]), prefix="[sweep] ")
    found = sorted(glob.glob(os.path.join(workdir, "sweep_*.json")))
    rec = {"status": "failed", "process": r.to_dict(), "files": []}
    if found:
        import json

        shutil.copyfile(found[-1], os.path.join(out, "sweep.json"))
        rec["files"].append("sweep.json")
        with open(found[-1]) as f:
            res = json.load(f)
        missing = sum(len(b["not_measured"]) for b in res["buckets"])
        rec.update(arch=res["arch"], entry=res["entry"]["entry"], partial=res["entry"]["partial"], arch_table_line=res["arch_table_line"],
                   buckets=len(res["buckets"]), not_measured=missing, tiles=res["tiles"],
                   tiles_over_shared_memory=res["tiles_over_shared_memory"])  # fmt: skip
        rec["status"] = "ok" if r.ok else "partial"
    else:
        rec["error"] = " | ".join(r.tail[-10:]) or (r.killed or f"rc {r.rc}")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec
