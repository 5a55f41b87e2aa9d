"""The prepared GPU run (`bash ci/gpu.sh`, bench/gpu/): its CPU dry run end to end, the test
stage's per-test timeout and recovery from hangs and crashes, and the performance contract's headline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench.gpu import proc, summary, tests_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# bash ci/gpu.sh --cpu-dry-run
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry_run")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MANGO_TEST_DEVICE")}
    env.update(OUT=str(out), PYTHON=sys.executable)  # ci/gpu.sh runs $PYTHON: this interpreter, not the first on PATH
    # ~140 s on a quiet 2-core machine; the budget is 2.5x the dry run's own so that a loaded one
    # (the suite's other workers) does not cut stages short: this test is about what the run does, not how fast
    cmd = ["bash", "ci/gpu.sh", "--cpu-dry-run", "--budget", "475"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
    return out, p


def test_dry_run_passes_and_fills_one_folder_within_the_limits(dry_run):
    out, p = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert names == ["results.json", "run.log", "step.json", "step.md", "step.png", "summary.md", "sweep.json", "train.png"]
    for n in names:  # what can come back from the GPU machine: <= 8 plain files of <= 16 MB, no folders
        assert os.path.isfile(out / n) and 0 < os.path.getsize(out / n) <= 16 * 2**20, n
    for png in ("step.png", "train.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_reports_every_stage(dry_run):
    out, _ = dry_run
    r = json.loads((out / "results.json").read_text())
    assert r["dry_run"] and r["status"] == "passed" and r["wall_s"] < r["budget_s"]
    assert [r["stages"][s]["status"] for s in ("env", "tests", "host", "sweep", "step", "fsdp", "train")] == ["ok"] * 7
    t = r["stages"]["tests"]
    assert t["selected"] >= 2 and t["counts"] == {"passed": t["selected"]}
    assert {a["cmd"].split("--gpu-shard=")[1].split()[0] for a in t["attempts"]} == {"0/2", "1/2"}
    a = r["stages"]["train"]["agreement"]
    assert a["passed"] and a["steps_compared"] == a["steps_wanted"] and a["first_step_abs_diff"] == 0.0
    assert [x["spec"] for x in r["stages"]["train"]["runs"]] == ["adamw", "muon", "mango:backend=triton"]
    # the step stage: the GPU run's sets at tiny sizes, every contender on every set, run or saying why
    from bench.gpu.profiles import CONTENDERS, DRY_SETS

    step = json.loads((out / "step.json").read_text())
    assert [s["set"]["name"] for s in step["sets"]] == DRY_SETS.split(",")
    for s in step["sets"]:
        by = {o["key"]: o for o in s["optimizers"]}
        assert set(by) == set(CONTENDERS.split(",")) | {"compile"}
        assert all(o["status"] == "ok" or o["reason"] for o in by.values())
        assert by["torch"]["status"] == by["muon_adamw"]["status"] == by["adamw"]["status"] == "ok"
        assert by["triton_graph"]["status"] == "n/a" and s["bare_ns"]["bfloat16"]["median_s"] > 0
    reference = [next(o for o in s["optimizers"] if o["key"] == "reference") for s in step["sets"]]
    assert reference[0]["status"] == "ok" and all(o["status"] == "skipped" and "gpt2-124m only" in o["reason"] for o in reference[1:])
    assert r["stages"]["host"]["rows"] and all(x["median_us"] > 0 for x in r["stages"]["host"]["rows"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert r["stages"]["sweep"]["arch_table_line"] == sweep["arch_table_line"] and sweep["buckets"]
    assert {"small", "large", "tiles"} == set(sweep["entry"]["entry"])
    # FSDP2 in a world of one: the sharded triton backend against the plain triton step, within the NS bound
    fsdp = r["stages"]["fsdp"]["result"]
    assert fsdp["sharded_backend"] == "ShardedTritonBackend" and fsdp["world_size"] == 1 and fsdp["within_ns_bound"]
    assert 0 < max(fsdp["max_rel_diff"]) <= 2e-2 and fsdp["fsdp2_median_ms"] > 0 and fsdp["plain_median_ms"] > 0
    md = (out / "summary.md").read_text()
    for row in ("| env | ok", "| tests | ok", "| host | ok", "| sweep | ok", "| step | ok", "| fsdp | ok", "| train | ok",
                "Overall: **passed**", "Triton vs torch backend", "mango's step against every peer", "## Host time per triton step",
                "ARCH_TABLE", "ShardedTritonBackend vs the plain triton step", "| mango, triton |"):
        assert row in md, row
    assert len(md.splitlines()) < 90  # one page
    log = (out / "run.log").read_text()
    assert "[tests 1/2]" in log and "[step]" in log and "[sweep]" in log and "[host]" in log and "[fsdp]" in log
    assert "[train mango:backend=triton]" in log


# ----------------------------------------------------------------------------------------
# the test stage: per-test timeout, past failures, hangs and crashes
# ----------------------------------------------------------------------------------------

SYNTHETIC = {
    "conftest.py": """
        import pytest

        @pytest.fixture
        def device():
            return "cpu"
    """,
    "test_a.py": """
        import signal, time

        def test_pass(device): pass
        def test_fail(device): assert 1 == 2
        def test_slow(device): time.sleep(30)
        def test_hang(device):  # SIGALRM blocked: the per-test timeout cannot fire, only the parent can end it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        def test_after_hang(device): pass
        def test_without_cuda_mode(): pass
    """,
    "test_b.py": """
        import os

        def test_crash(device): os._exit(3)
        def test_sticky_cuda_error(device): raise RuntimeError("CUDA error: an illegal memory access was encountered")
        def test_after_crashes(device): pass
    """,
}


def test_test_stage_goes_on_past_failures_timeouts_hangs_and_crashes(tmp_path):
    src = tmp_path / "synthetic"
    src.mkdir()
    for name, code in SYNTHETIC.items():
        (src / name).write_text(textwrap.dedent(code))
    profile = {"paths": [str(src)], "shards": 2, "test_timeout_s": 1.5, "grace_s": 1.5, "first": ["test_b"], "env": {}}
    log = proc.Log(str(tmp_path / "run.log"), echo=False)
    res = tests_stage.run(profile, str(tmp_path), log, budget_s=120)
    log.close()
    outcome = {p["nodeid"].split("::")[1]: p["outcome"] for p in res["problems"]}
    assert outcome == {"test_fail": "failed", "test_slow": "timeout", "test_hang": "hung", "test_crash": "crashed",
                       "test_sticky_cuda_error": "failed"}  # fmt: skip
    assert res["counts"] == {"passed": 3, "failed": 2, "timeout": 1, "hung": 1, "crashed": 1}
    assert res["selected"] == 8 and res["status"] == "failed" and not res["errors"]  # test_without_cuda_mode not selected
    # test_b restarted after the crash and after the sticky error; test_a after the hang
    assert len(res["attempts"]) == 5
    assert "test_hang" in (tmp_path / "run.log").read_text().split("most recent call first")[1]  # faulthandler's stack of the hang


def test_test_stage_reports_what_the_budget_left_unrun(tmp_path):
    src = tmp_path / "synthetic"
    src.mkdir()
    (src / "test_c.py").write_text("import time\n\n" + "".join(f"def test_{i}(device): time.sleep(2)\n" for i in range(6)))
    (src / "conftest.py").write_text(textwrap.dedent(SYNTHETIC["conftest.py"]))
    profile = {"paths": [str(src)], "shards": 1, "test_timeout_s": 30, "first": [], "env": {}}
    log = proc.Log(str(tmp_path / "run.log"), echo=False)
    res = tests_stage.run(profile, str(tmp_path), log, budget_s=6)
    log.close()
    c = res["counts"]
    assert c.get("passed", 0) >= 1 and c.get("not run", 0) >= 1 and sum(c.values()) == 6 and res["status"] == "failed"


# ----------------------------------------------------------------------------------------
# the performance contract's headline
# ----------------------------------------------------------------------------------------


def _opt(key, ms, **kw):
    return {"key": key, "status": "ok", "median_s": ms / 1e3, **kw}


def test_headline_ratios_and_verdicts_against_the_performance_contract():
    step = {"settings": {"tied_role": "head"}, "sets": [{
        "set": {"name": "gpt2-124m", "title": "GPT-2 124M"}, "floor": {"floor_s": 3e-3},
        "optimizers": [_opt("triton", 4.0, x_floor=4.0 / 3, launches=20, state_bytes=int(1.5e9), peak_extra_bytes=int(1.6e9)),
                       _opt("torch", 12.0), _opt("reference", 40.0), _opt("muon_adamw", 6.0), _opt("adamw", 1.0),
                       {"key": "compile", "status": "failed", "reason": "compile failed: no result within --compile-timeout 45 s"}],
    }]}  # fmt: skip
    [h] = summary.headline(step)
    assert h["mango"] == "triton" and h["step_ms"] == pytest.approx(4.0)
    assert h["vs_muon_adamw"] == pytest.approx(1.5) and h["vs_reference"] == pytest.approx(10.0) and h["vs_compile"] is None
    assert "compile-timeout" in h["vs_compile_why"]
    bucket = 50257 * 768 * 2  # the tied 50257x768 head is GPT-2's largest NS bucket, in bf16
    assert h["memory_x_budget"] == pytest.approx(1.6e9 / (1.5e9 + 2 * bucket))
    md = summary._step_md({"headline": [h]}, dry=False)
    row = next(line for line in md if line.startswith("| gpt2-124m"))
    assert "1.33× (met)" in row and "1.50× (**missed**)" in row and "3.00× (met)" in row and "10.00× (met)" in row and "20 (met)" in row
    assert any("compile" in line and "--compile-timeout 45 s" in line for line in md)  # a contender that did not run says why


def test_headline_has_every_peer_the_bare_ns_and_the_captured_step():
    mem = {"budget": {"budget_bytes": int(4e8)}}
    step = {"settings": {}, "sets": [{
        "set": {"name": "llama-1b", "title": "Llama"}, "floor": {"floor_s": 50e-3},
        "bare_ns": {"bfloat16": {"median_s": 80e-3}},
        "graph_check": {"status": "ok", "steps": 3, "warmup_steps": 3, "identical": True,
                        "eager": {"max_abs_diff": 0.0, "identical": True}, "eager_capturable": {"max_abs_diff": 0.0, "identical": True}},
        "optimizers": [_opt("triton", 70.0, launches=60, state_bytes=int(15e9), peak_extra_bytes=int(15.2e9), memory=mem),
                       _opt("triton_graph", 60.0, launches=1, state_bytes=int(15e9), peak_extra_bytes=int(15.1e9), memory=mem),
                       _opt("torch", 100.0), _opt("muon_adamw", 104.0), _opt("kj_muon", 140.0, label="muon-optimizer"),
                       _opt("heavyball_muon", 35.0, label="heavyball"),
                       {"key": "emerging_muon", "label": "emerging", "status": "n/a", "reason": "emerging-optimizers is not importable"}],
    }]}  # fmt: skip
    [h] = summary.headline(step)
    assert h["x_bare_ns"] == pytest.approx(70 / 80) and h["memory_x_budget"] == pytest.approx(15.2e9 / (15e9 + 4e8))
    assert h["vs_peers"]["kj_muon"]["ratio"] == pytest.approx(2.0) and h["vs_peers"]["heavyball_muon"]["ratio"] == pytest.approx(0.5)
    assert h["vs_peers"]["emerging_muon"]["ratio"] is None and "not importable" in h["vs_peers"]["emerging_muon"]["why"]
    assert h["graph"]["launches"] == 1 and h["graph"]["vs_triton"] == pytest.approx(70 / 60)
    md = summary._step_md({"headline": [h]}, dry=False)
    assert any(line.startswith("| llama-1b | graph replay | 60.00 |") and "1 (met)" in line for line in md)
    row = next(line for line in md if line.startswith("| llama-1b | ") and "bit-identical" in line)
    assert "2.00× (met)" in row and "0.50× (**missed**)" in row and "| n/a |" in row and "80.00 (0.88×)" in row


def test_gpu_profile_names_only_flags_sets_and_contenders_that_exist():
    """The GPU profile cannot be run here; what it asks of bench.step, bench.sweep and bench.train is
    checked instead: the performance contract's sets, every peer on every set, and <= 7 minutes."""
    from bench import fsdp_one_gpu, optimizers, params, peers, step, sweep, train
    from bench.gpu.profiles import DRY, GPU

    st = step.build_parser().parse_args(GPU["stages"]["step"]["args"] + ["--out", "x", "--time-budget", "1"])
    assert st.sets.split(",") == ["gpt2-124m", "hf-gpt2-124m", "hf-gpt2-350m", "llama-1b"] and set(st.sets.split(",")) <= set(params.SETS)
    keys = st.optimizers.split(",")
    assert set(keys) <= set(optimizers.ALL_CONTENDERS) and {"triton", "triton_graph", "muon_adamw", *peers.PEERS} <= set(keys)
    left_out = {item.split("=")[0] for item in st.leave_out}
    # what leaves a set: compile and gram-newton-schulz everywhere (with their reasons), the reference and
    # the one-round variant beyond the first set; no peer of torch's or the carried packages
    assert left_out == {"compile", "gram_ns", "reference@hf-gpt2-124m,hf-gpt2-350m,llama-1b", "triton_one_round@hf-gpt2-124m,hf-gpt2-350m,llama-1b"}
    sweep.build_parser().parse_args(GPU["stages"]["sweep"]["args"] + ["--out", "x", "--time-budget", "1"])
    cfg = GPU["stages"]["train"]
    for spec in cfg["specs"] + ["mango:backend=torch"]:
        train.RunSpec.parse(spec)
        train.build_parser().parse_args([spec, *cfg["args"], "--out", "x", "--tag", "t", "--time-budget", "1", "--stop-after", "50"])
    for profile in (GPU, DRY):
        fsdp_one_gpu.build_parser().parse_args(profile["stages"]["fsdp"]["args"] + ["--out", "x"])
    assert "--cpu-dry-run" in DRY["stages"]["fsdp"]["args"] and "--cpu-dry-run" not in GPU["stages"]["fsdp"]["args"]
    from bench.gpu.run import STAGES

    for profile in (GPU, DRY):  # every stage has its budget, and together they fit the run's
        assert set(profile["stages"]) == set(STAGES) - {"env"}
        assert sum(s["budget_s"] for s in profile["stages"].values()) <= profile["budget_s"]
    assert GPU["budget_s"] <= 420 and DRY["budget_s"] <= 190  # <= 7 minutes: a device session's 15 include the start, transfers, a follow-up


def test_carried_wheels_follow_the_manifest(tmp_path):
    from bench.gpu import wheels

    wanted = wheels.manifest()
    assert set(wanted) == {"heavyball", "muon_optimizer", "emerging_optimizers"} and all(wanted.values())
    names = [str(tmp_path / f"{n}-{v}-py3-none-any.whl") for n, v in wanted.items()]
    assert wheels.check(names, wanted) == {"missing": [], "other_version": [], "not_in_manifest": []}
    names[0] = names[0].replace(wanted["heavyball"], "0.0.1")
    got = wheels.check(names[:2] + [str(tmp_path / "extra-1.0-py3-none-any.whl")], wanted)
    assert got == {"missing": ["emerging_optimizers"], "other_version": [f"heavyball 0.0.1 (manifest {wanted['heavyball']})"],
                   "not_in_manifest": ["extra"]}  # fmt: skip
    fetch = open(os.path.join(ROOT, "ci", "fetch_wheels.sh")).read()
    assert "bench/gpu/wheels.txt" in fetch and "--python-version" in fetch and "-d .whl" in fetch
    assert "/.whl/" in open(os.path.join(ROOT, ".gitignore")).read().split()
