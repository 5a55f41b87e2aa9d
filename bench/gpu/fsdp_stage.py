"""The FSDP2 stage: mango's sharded triton step in a world of one, from `python -m bench.fsdp_one_gpu`.

bench.fsdp_one_gpu `fully_shard`s a small HF GPT-2 on one GPU (nccl, world size 1: every parameter a
DTensor, so mango takes its sharded triton backend) and steps it beside an identical plain copy on
the triton backend with the same gradients. The stage carries its result into the summary: which
backend the sharded model got, the largest difference of the two after each step against the NS
operand dtype's bound, and both step times. The one GPU path of the distributed code the rest of
the run does not touch; short, so it runs after the step stage, whose Triton kernels it reuses.
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import proc

FIELDS = ("device", "process_group", "world_size", "model", "params", "sharded_backend", "max_abs_diff", "max_rel_diff",
          "within_ns_bound", "fsdp2_median_ms", "plain_median_ms", "fsdp2_over_plain", "fsdp2_steps_timed", "plain_steps_timed")  # fmt: skip


def run(profile: dict, workdir: str, log: proc.Log, budget_s: float) -> dict:
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "fsdp_one_gpu.json")
    cmd = [sys.executable, "-m", "bench.fsdp_one_gpu", *profile["args"], "--out", path]
    r = proc.run(cmd, log, budget_s, env=proc.python_env(**profile["env"]), prefix="[fsdp] ")
    rec = {"status": "failed", "process": r.to_dict()}
    if r.ok and os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        rec["result"] = {k: res.get(k) for k in FIELDS}
        rec["status"] = "ok" if res.get("within_ns_bound") and res.get("sharded_backend") == "ShardedTritonBackend" else "failed"
    else:
        rec["error"] = " | ".join(r.tail[-10:]) or (r.killed or f"rc {r.rc}")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec
