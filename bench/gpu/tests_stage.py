"""The test stage: every test with a CUDA mode, in shards, each test under a timeout, past failures.

Each shard is a pytest process with the `bench.gpu.deadline` plugin writing one results file.
When a shard process dies (a crash, a sticky CUDA error) or hangs in one test (watched from
here: a test started longer ago than its timeout plus a grace period), the test it was running
is recorded as crashed/hung and the shard starts again, skipping everything already recorded.
Shards run in parallel: on the GPU machine most of a first test run is Triton compiling
kernels on the CPU, and that machine has many cores.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time

from . import proc
from . import testlog
from .testlog import STICKY_EXIT, recorded

GRACE_S = 20.0  # default time past the per-test timeout before the parent ends a stuck process
OUTCOMES = ("passed", "failed", "error", "timeout", "hung", "crashed", "skipped", "not run")


def _watch(path: str, timeout_s: float, grace_s: float, stop: threading.Event):
    """A proc.run watch: the reason to end the process when a test has run past timeout + grace
    (or when the whole run is being stopped)."""

    def check():
        if stop.is_set():
            return "the run was stopped"
        for r in recorded(path).values():
            if r["event"] == "start" and time.time() - r["t"] > timeout_s + grace_s:
                return f"{r['nodeid']} has run {time.time() - r['t']:.0f} s (timeout {timeout_s:g} s + {grace_s:g} s grace)"
        return None

    return check


def _close_unfinished(path: str, outcome: str, why: str) -> None:
    """Record an end for the test that was running when its process died or was ended."""
    for nodeid, r in recorded(path).items():
        if r["event"] == "start":
            testlog.append(path, {"event": "end", "nodeid": nodeid, "t": time.time(), "outcome": outcome,
                                  "duration": time.time() - r["t"], "message": why})  # fmt: skip


def _shard(k: int, n: int, profile: dict, workdir: str, log: proc.Log, deadline: float, out: dict, stop: threading.Event) -> None:
    path = os.path.join(workdir, f"tests_{k}.jsonl")
    timeout = profile["test_timeout_s"]
    attempts = []
    while True:
        left = deadline - time.perf_counter()
        if left < 5:
            _close_unfinished(path, "timeout", "the test stage's budget ran out during this test")
            break
        # --opt=value: pytest takes every bare existing path on its command line into its rootdir
        # guess, and the results file exists from the second attempt on (test ids would change)
        cmd = [sys.executable, "-m", "pytest", "-p", "bench.gpu.deadline", "-p", "no:cacheprovider", "-q", "-rN",
               f"--rootdir={profile.get('rootdir', proc.ROOT)}", f"--gpu-results={path}", f"--gpu-timeout={timeout}",
               "--gpu-cuda-mode", f"--gpu-first={','.join(profile['first'])}", f"--gpu-shard={k}/{n}",
               *([f"--gpu-sample={profile['sample']}"] if profile.get("sample") else []), *profile["paths"]]  # fmt: skip
        r = proc.run(cmd, log, left, env=proc.python_env(**profile["env"]), prefix=f"[tests {k + 1}/{n}] ",
                     watch=_watch(path, timeout, profile.get("grace_s", GRACE_S), stop))  # fmt: skip
        attempts.append(r.to_dict())
        if r.over_budget:
            _close_unfinished(path, "timeout", "the test stage's budget ran out during this test")
            break
        if stop.is_set():
            _close_unfinished(path, "timeout", "the run was stopped during this test")
            break
        if r.killed:  # a test hung past its timeout
            _close_unfinished(path, "hung", r.killed)
            continue
        unfinished = [nid for nid, rec in recorded(path).items() if rec["event"] == "start"]
        if unfinished:  # the process died inside a test
            _close_unfinished(path, "crashed", f"the test process exited with rc {r.rc} during this test")
            continue
        if r.rc == STICKY_EXIT:  # the plugin ended it after a sticky CUDA error: go on in a fresh process
            continue
        if r.rc not in (0, 1, 5):  # pytest itself failed (usage error, collection error, ...)
            out.setdefault("errors", []).append(f"shard {k + 1}/{n}: pytest exited with rc {r.rc}: " + " | ".join(r.tail[-8:]))
        break
    out.setdefault("attempts", []).extend(attempts)
    out.setdefault("files", []).append(path)


def run(profile: dict, workdir: str, log: proc.Log, budget_s: float) -> dict:
    """Run the shards in parallel; returns counts per outcome, the failures and the attempts."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed here", "counts": {}}
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    n = profile["shards"]
    out: dict = {}
    stop = threading.Event()
    threads = [threading.Thread(target=_shard, args=(k, n, profile, workdir, log, deadline, out, stop)) for k in range(n)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:  # the run is being stopped (signals reach this thread only): end the shards too
        stop.set()
        for t in threads:
            t.join(timeout=15)
        raise
    results, selected = {}, []
    for path in sorted(out.get("files", [])):
        results.update({k: v for k, v in recorded(path).items()})
        selected += testlog.selected(path)
    for nid in selected:
        results.setdefault(nid, {"event": "end", "nodeid": nid, "outcome": "not run", "message": "the budget ran out first"})
    counts = {o: 0 for o in OUTCOMES}
    for rec in results.values():
        counts[rec.get("outcome", "crashed")] = counts.get(rec.get("outcome", "crashed"), 0) + 1
    bad = [r for r in results.values() if r.get("outcome") not in ("passed", "skipped")]
    status = "ok" if not bad and not out.get("errors") and selected else "failed"
    if not selected and not out.get("errors"):
        out.setdefault("errors", []).append("no test was selected")
    return {
        "status": status,
        "seconds": round(time.perf_counter() - t0, 1),
        "selected": len(selected),
        "counts": {k: v for k, v in counts.items() if v},
        "problems": [{"nodeid": r["nodeid"], "outcome": r["outcome"], "message": r.get("message", "")[-1500:]} for r in bad],
        "durations": sorted(((r["nodeid"], round(r.get("duration", 0.0), 2)) for r in results.values() if "duration" in r),
                            key=lambda x: -x[1])[:15],  # fmt: skip
        "attempts": out.get("attempts", []),
        "errors": out.get("errors", []),
        "settings": {k: profile[k] for k in ("paths", "shards", "test_timeout_s", "first", "sample") if k in profile},
    }
