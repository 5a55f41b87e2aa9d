"""The time-budget and partial-run flags the GPU run uses: bench.step --time-budget, bench.train
--stop-after / --time-budget. A budget that is spent must still leave a complete, honest result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from bench import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_time_budget_skips_what_it_cannot_start_and_still_writes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench.step", "--quick", "--device", "cpu", "--interleave", "off", "--time-budget", "0",
           "--no-png", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [name] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / name).read_text())
    opts = result["sets"][0]["optimizers"]
    assert opts and all(o["status"] in ("skipped", "n/a") for o in opts)
    assert all("--time-budget" in o["reason"] for o in opts if o["status"] == "skipped")
    assert result["sets"][0]["ns_buckets"] is None  # the per-bucket benchmark is not started either


def _run(tmp_path, *extra):
    argv = ["adamw", "--quick", "--device", "cpu", "--out", str(tmp_path), "--tag", "t", "--no-progress", "--no-plot",
            "--steps", "8", "--eval-every", "4", *extra]  # fmt: skip
    return train.main(argv)["runs"][0]


def test_train_stop_after_runs_the_first_steps_of_the_same_schedule(tmp_path):
    full, part = _run(tmp_path), _run(tmp_path, "--stop-after", "3")
    assert full["stopped"] is None and full["steps"] == 8
    assert part["steps"] == 3 and part["stopped"] == "--stop-after 3"
    assert part["lr_multiplier"] == full["lr_multiplier"][:3]  # the schedule is still 8 steps long
    assert part["train_loss"] == full["train_loss"][:3]  # same seed, same data: the same first steps


def test_train_time_budget_stops_and_says_so(tmp_path):
    run = _run(tmp_path, "--time-budget", "0")
    assert run["steps"] == 0 and "--time-budget" in run["stopped"]
    assert math.isnan(run["final_train_loss"]) and run["val_loss"][0][0] == 0
