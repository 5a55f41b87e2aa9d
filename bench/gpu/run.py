"""`bash ci/gpu.sh` (= `python -m bench.gpu`): the whole GPU check in one command, one folder.

Stages, in order, each under its own time budget (time a stage leaves unused goes to the next):
env (versions, device; the carried peer wheels installed first), tests (every test with a CUDA
mode, compiled for real), host (the Python time of a triton step, bench.host), sweep (every NS
engine on the sets' NS buckets, and the ARCH_TABLE entry they give), step (bench.step on bench
GPT-2 124M, HF GPT-2 124M/350M and a Llama-3.2-1B-shaped model: every contender, the captured
step and its replay-vs-eager check), fsdp (FSDP2 in a world of one on the sharded triton backend
against the plain triton step, bench.fsdp_one_gpu), train (AdamW vs Muon vs MANGO at the GPT-2
124M shape, plus triton-vs-torch loss agreement). A stage that fails or runs out of time is recorded and the run
goes on. After every stage the folder gets an up-to-date `summary.md` and `results.json`, so
whatever stops the run, the summary is there.

The folder (`$OUT` when set, else `--out`, else bench/results/gpu_<device>_<UTC time>/) holds at
most 8 files, none over 16 MB, nothing in subfolders: summary.md, results.json, run.log,
step.json, step.md, step.png, sweep.json, train.png. Scratch work goes to a temporary folder.

    bash ci/gpu.sh                    # on the GPU machine (installs nothing; <= 7 min)
    bash ci/gpu.sh --cpu-dry-run      # the same stages on CPU at tiny sizes (~2.5 min)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback

from . import env_stage, fsdp_stage, host_stage, proc, step_stage, summary, sweep_stage, tests_stage, train_stage, wheels
from .profiles import DRY, GPU

STAGES = ("env", "tests", "host", "sweep", "step", "fsdp", "train")
MAX_FILES, MAX_BYTES = 8, 16 * 2**20


class Stopped(Exception):
    """The run got SIGTERM/SIGINT: write what there is and stop."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def _out_dir(args, device_name: str, started: _dt.datetime) -> str:
    out = os.environ.get("OUT") or args.out
    if not out:
        stamp = started.strftime("%Y%m%dT%H%M%S")
        out = os.path.join(proc.ROOT, "bench", "results", f"gpu_{_slug(device_name)}_{stamp}")
    os.makedirs(out, exist_ok=True)
    return out


def _device_name(dry: bool) -> str:
    if dry:
        return "cpu-dry-run"
    import torch

    return torch.cuda.get_device_name(0)


def _cap_files(out: str, log: proc.Log) -> list:
    """Files in OUT; a log over the size limit keeps its head and tail."""
    names = sorted(os.listdir(out))
    for n in names:
        p = os.path.join(out, n)
        if os.path.isfile(p) and os.path.getsize(p) > MAX_BYTES and n.endswith(".log"):
            with open(p, "rb") as f:
                data = f.read()
            keep = MAX_BYTES // 2 - 1024
            with open(p, "wb") as f:
                f.write(data[:keep] + b"\n\n[... log cut to fit 16 MB ...]\n\n" + data[-keep:])
    if len(names) > MAX_FILES:
        log.write(f"!! {out} holds {len(names)} files (limit {MAX_FILES}): {names}")
    return names


def _write(out: str, results: dict, log: proc.Log) -> None:
    results["files"] = sorted(set(os.listdir(out)) | {"summary.md", "results.json"})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    try:
        page = summary.markdown(results)
    except Exception:  # a record the summary did not expect must not cost the run its folder
        page = f"# mango GPU run\n\nThe summary could not be written; every figure is in results.json.\n\n```\n{traceback.format_exc()[-3000:]}```"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(page + "\n")
    results["files"] = _cap_files(out, log)


def _stage(name: str, results: dict, fn) -> None:
    """Run one stage; an exception in the stage code is recorded, not fatal."""
    t0 = time.perf_counter()
    try:
        rec = fn()
    except Stopped:
        results["stages"][name] = {"status": "stopped", "seconds": round(time.perf_counter() - t0, 1)}
        raise
    except Exception as e:
        rec = {"status": "error", "exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    rec.setdefault("seconds", round(time.perf_counter() - t0, 1))
    results["stages"][name] = rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash ci/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="the same stages on CPU at tiny sizes (kernels under TRITON_INTERPRET=1)")
    p.add_argument("--out", help="results folder (default: $OUT, else bench/results/gpu_<device>_<time>/)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--budget", type=float, help="seconds for the whole run, every stage's budget scaled to it (default: GPU 420, dry run 190)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (its path is logged)")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    profile = DRY if dry else GPU
    plan = [s for s in args.stages.split(",") if s]
    unknown = set(plan) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("bash ci/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); "
                         "use `bash ci/gpu.sh --cpu-dry-run` to check the run itself on a CPU")  # fmt: skip
    started = _dt.datetime.now(_dt.timezone.utc)
    out = _out_dir(args, _device_name(dry), started)
    log = proc.Log(os.path.join(out, "run.log"))
    work = tempfile.mkdtemp(prefix="mango_gpu_")
    budget = args.budget or profile["budget_s"]
    t0 = time.perf_counter()
    results = {"kind": "mango GPU run", "dry_run": dry, "started": started.isoformat(timespec="seconds"),
               "command": "bash ci/gpu.sh " + " ".join(sys.argv[1:] if argv is None else argv),
               "budget_s": budget, "plan": plan, "out": out, "stages": {}, "status": "incomplete"}  # fmt: skip

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log.write(f"mango GPU run ({'CPU dry run' if dry else 'GPU'}) -> {out}; scratch {work}; budget {budget:.0f} s")
    spare = 0.0  # time earlier stages left unused
    try:
        if not dry:  # the dry run times no peers
            results["carried_wheels"] = wheels.install(work, log)  # before any stage imports a peer
        if "env" in plan:
            _stage("env", results, lambda: env_stage.run(log, cuda=not dry))
        else:
            results["env"] = env_stage.run(log, cuda=not dry)
        results["env"] = results["stages"].get("env", results.get("env"))
        _write(out, results, log)
        for name in plan:
            if name == "env":
                continue
            left = budget - (time.perf_counter() - t0)
            nominal = profile["stages"][name]["budget_s"] * budget / profile["budget_s"]  # --budget scales every stage
            stage_budget = min(nominal + spare, left - 3)
            if stage_budget < 10:
                results["stages"][name] = {"status": "skipped", "reason": f"only {left:.0f} s of the run's budget left"}
                continue
            log.write(f"== stage {name}: budget {stage_budget:.0f} s ({left:.0f} s left in the run)")
            s0 = time.perf_counter()
            cfg = profile["stages"][name]
            if name == "tests":
                _stage(name, results, lambda: tests_stage.run(cfg, work, log, stage_budget))
            elif name == "host":
                _stage(name, results, lambda: host_stage.run(cfg, os.path.join(work, "host"), log, stage_budget))
            elif name == "sweep":
                _stage(name, results, lambda: sweep_stage.run(cfg, os.path.join(work, "sweep"), out, log, stage_budget))
            elif name == "step":
                _stage(name, results, lambda: _step(cfg, work, out, log, stage_budget))
            elif name == "fsdp":
                _stage(name, results, lambda: fsdp_stage.run(cfg, os.path.join(work, "fsdp"), log, stage_budget))
            elif name == "train":
                _stage(name, results, lambda: train_stage.run(cfg, os.path.join(work, "train"), out, log, stage_budget))
            spare = max(0.0, stage_budget - (time.perf_counter() - s0))
            results["wall_s"] = time.perf_counter() - t0
            _write(out, results, log)
        statuses = [results["stages"].get(n, {}).get("status") for n in plan]
        results["status"] = "passed" if all(s == "ok" for s in statuses) else "failed"
    except Stopped as e:
        results["status"] = f"stopped by {e}"
        log.write(f"!! stopped by {e}: writing what there is")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        results["wall_s"] = time.perf_counter() - t0
        _write(out, results, log)
        log.write(f"{results['status']} in {results['wall_s']:.0f} s: {out}/summary.md ({len(results['files'])} files)")
        log.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if results["status"] == "passed" else 1


def _step(cfg, work, out, log, budget):
    cfg = dict(cfg)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        cfg["png"] = False
    rec = step_stage.run(cfg, work, out, log, budget)
    if "result" in rec:
        rec["headline"] = summary.headline(rec.pop("result"))
    return rec


if __name__ == "__main__":
    sys.exit(main())
