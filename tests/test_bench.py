"""bench.step: the --quick run end to end, and the arithmetic the report rests on.

No test here asserts a timing (the performance contract: performance is reported, never asserted).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import mango
from bench import kernels, memory, optimizers, params, report, roofline, schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("MANGO_TEST_DEVICE", "cpu")  # as tests/conftest.py


def _bench(*args, timeout=300):
    """Run `python -m bench.step --quick --device <test device> ARGS` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if DEVICE == "cuda":
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU, not the interpreter
    cmd = [sys.executable, "-m", "bench.step", "--quick", "--device", DEVICE, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------------------------------
# python -m bench.step --quick
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step")
    proc = _bench("--out", out)
    files = sorted(os.listdir(out))
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1, files
    with open(out / js[0]) as f:
        result = json.load(f)
    return out, files, result, proc.stdout


def test_quick_writes_json_md_png(quick_run):
    out, files, result, stdout = quick_run
    stem = result["files"]["json"][: -len(".json")]
    assert stem.startswith("step_") and stem + ".md" in files and stem + ".png" in files
    png = out / (stem + ".png")
    assert png.stat().st_size > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| optimizer | step ms (median) |" in stdout  # the markdown table is printed


def test_quick_json_has_every_field(quick_run):
    _, _, result, _ = quick_run
    for k in report.REQUIRED_FIELDS:
        assert k in result, k
    assert result["quick"] is True
    assert result["device"]["type"] in ("cpu", "cuda") and result["device"]["name"]
    assert result["versions"]["torch"] == torch.__version__
    r = result["rates"]
    assert r["copy_bytes_per_s"] > 0 and r["peak_matmul_flops"] > 0 and r["matmul_flops"]["float32"] > 0
    assert len(result["sets"]) >= 1
    for s in result["sets"]:
        for k in report.SET_FIELDS:
            assert k in s, k
        fl = s["floor"]
        assert fl["ns_flops"] > fl["ns_flops_symmetric"] > 0 and fl["state_bytes"] > 0
        assert math.isclose(fl["floor_s"], fl["ns_s"] + fl["state_s"])
        keys = [o["key"] for o in s["optimizers"]]
        assert keys == result["settings"]["optimizers"]  # every optimizer is reported, run or not
        assert set(optimizers.CONTENDERS) - set(keys) <= {"torch_bf16"}
        for o in s["optimizers"]:
            for k in report.OPTIMIZER_FIELDS:
                assert k in o, (o["key"], k)
            if o["status"] != "ok":
                assert o["reason"]
                continue
            for k in report.OK_FIELDS:
                assert k in o, (o["key"], k)
            assert o["median_s"] > 0 and o["steps"] == len(o["times_s"]) >= 1
            assert o["x_floor"] == pytest.approx(o["median_s"] / fl["floor_s"])
            assert o["launches"] > 0 and o["state_bytes"] >= 0
            assert "vs_primary" in o
        assert s["primary"] in ("triton", "torch")
        by = {o["key"]: o for o in s["optimizers"]}
        for k in ("torch", "reference", "compile", "muon_adamw", "adamw"):
            assert by[k]["status"] == "ok", (k, by[k].get("reason"))
        st = by["torch"]["stages"]
        assert "error" not in st, st.get("error")
        # the tiny set has l2 (biases) and l2_split (QKV bias) norms: that stage ran, and is not a silent 0
        assert st["step"] > 0 and st["moments"] > 0 and st["ns"] > 0 and st["other_norms"] > 0
        assert st["calls"]["other_norms"] > 0 and st["apply_and_rest"] > 0
        # memory: every contender counted; resident = state + persistent; extra = persistent + transient
        for o in s["optimizers"]:
            if o["status"] != "ok":
                continue
            m = o["memory"]
            assert m["state_bytes"] == o["state_bytes"] or o["key"] == "compile", o["key"]
            assert m["resident_bytes"] == m["state_bytes"] + m["persistent_bytes"]
            assert m["extra_beyond_state_bytes"] == m["persistent_bytes"] + m["peak_transient_bytes"]
            assert m["persistent_bytes"] >= 0 and m["peak_transient_bytes"] >= 0
            assert m["step_net_bytes"] == 0, (o["key"], m)  # nothing grows from step to step
            assert ("budget" in m) == (o["key"] in optimizers.MANGO_KEYS)
        # mango torch keeps its workspace between steps and little else (a few small index tensors
        # of its plan); AdamW keeps nothing but state. "Little" is bytes on CPU, where the profiler
        # reports each allocation's own size; on CUDA it reports the caching allocator's block
        # (at least 512 bytes each), so the same handful weighs KBs there: bounded by the state.
        mt = by["torch"]["memory"]
        little = 4096 if result["device"]["type"] == "cpu" else 0.01 * mt["state_bytes"]
        assert mt["workspace_bytes"] > 0 and 0 <= mt["persistent_other_bytes"] < little
        assert by["adamw"]["memory"]["persistent_bytes"] == 0
        assert by["torch"]["memory"]["budget"]["budget_bytes"] > 0
        nm = s["ns_methods"]
        assert nm["auto"]["flops"]["textbook"] == nm["float32"]["flops"]["textbook"] > nm["float32"]["flops"]["auto"]
        # mango's state: m, v, offset in fp32 for every parameter
        assert by["torch"]["state_bytes"] >= 3 * 4 * s["set"]["numel"]
        assert s["ns_buckets"]["buckets"] and all(b["ours_s"] > 0 and b["bare_bfloat16_s"] > 0 for b in s["ns_buckets"]["buckets"])


def test_a_result_written_between_sets_says_it_is_partial(quick_run):
    _, _, result, _ = quick_run
    assert "partial" not in result  # the finished run's files replace those written after each set
    assert "**Partial result:** 1 of 3 sets" in report.markdown(dict(result, partial="1 of 3 sets"))


def test_quick_triton_not_faked_without_cuda(quick_run):
    _, _, result, stdout = quick_run
    tri = next(o for o in result["sets"][0]["optimizers"] if o["key"] == "triton")
    if result["device"]["type"] == "cpu":
        assert tri["status"] == "n/a" and tri["reason"] == "no CUDA" and "median_s" not in tri
        assert "| mango triton | n/a (no CUDA) |" in stdout


def test_quick_reports_both_cpu_targets(quick_run):
    _, _, result, _ = quick_run
    names = sorted(t["id"] for t in result["targets"])
    assert names == ["ns", "ns_gram", "overhead"]
    ns, gram = (next(t for t in result["targets"] if t["id"] == i) for i in ("ns", "ns_gram"))
    assert gram["value"] == ns["value"] and (gram["target"], ns["target"]) == (0.7, 1.1)  # one ratio, two bounds
    assert gram["variants"]["torch"]["value"] == pytest.approx(gram["value"])
    assert "muon_adamw" in gram["variants"]
    for t in result["targets"]:
        assert t["value"] is not None and t["value"] > 0 and isinstance(t["met"], bool)
        assert t["dominant_stage"] in t["stage_fractions"]


# ----------------------------------------------------------------------------------------
# roofline arithmetic against the performance contract
# ----------------------------------------------------------------------------------------


def test_roofline_reproduces_spec_gpt2_124m():
    ps = params.resolve_set("gpt2-124m")
    assert ps.numel == 124_439_808  # GPT-2 small with tied head and 1024 positions
    assert roofline.ns_flops(ps) / 1e12 == pytest.approx(1.77, abs=0.01)
    assert roofline.ns_flops(ps, symmetric=True) / 1e12 == pytest.approx(1.28, abs=0.01)
    assert roofline.state_bytes(ps) / 2**30 == pytest.approx(4.2, abs=0.1)
    h100 = {"peak_matmul_flops": 800e12, "peak_matmul_dtype": "bfloat16", "copy_bytes_per_s": 3e12}
    assert roofline.floor(ps, h100)["floor_s"] == pytest.approx(3e-3, rel=0.05)


def test_roofline_tied_embedding_has_no_head_ns():
    head = params.resolve_set("gpt2-124m", tied_role="head")
    emb = params.resolve_set("gpt2-124m", tied_role="embedding")
    hd = 768**2 * 50257 * 4 + 2 * 768**3  # one NS step on the (768, 50257) head
    assert roofline.ns_flops(head) - roofline.ns_flops(emb) == 5 * hd


# ----------------------------------------------------------------------------------------
# parameter sets
# ----------------------------------------------------------------------------------------


def test_gpt_set_matches_bench_gpt_labelling():
    """The shapes and roles built without a model are what mango.param_groups gives bench.gpt's GPT."""
    from bench.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=128, tie_weights=True)
    model = GPT(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied wte/lm_head warning
        groups = mango.param_groups(model, qkv_heads=model.qkv_heads)
    got = {n: (tuple(p.shape), g["role"], g["head_dim"]) for g in groups for n, p in zip(g["param_names"], g["params"])}
    ps = params.gpt_set("t", n_layer=2, d=128, vocab=96, block=32, n_head=2, tied_role="embedding")
    want = {t.name: (t.shape, t.role, t.head_dim) for t in ps.tensors}
    assert got == want
    assert ps.numel == sum(p.numel() for p in model.parameters())


def test_ns_buckets_match_the_plan():
    ps = params.resolve_set("tiny")
    ps_params = ps.build("cpu")
    opt = mango.presets.mango(params.mango_groups(ps, ps_params), backend="torch")
    opt.step()
    plan = getattr(opt, "_plan", None)
    if plan is None:
        pytest.skip("optimizer has no cached plan to compare with")
    got = []
    for b in plan.buckets:
        for nb in b.norm_buckets:
            if nb.norm in ("ns", "ns_split"):
                per = nb.shape[0] // nb.block_shape[0]
                got.append((nb.norm, tuple(nb.shape), tuple(nb.block_shape), len(nb.slots) * per))
    want = [(b.norm, tuple(b.param_shape), tuple(b.block), b.batch) for b in roofline.ns_buckets(ps)]
    assert sorted(got) == sorted(want)


def test_gpt_cpu_picks_the_largest_rung_that_fits():
    est = lambda ps: ps.numel * 1e-8  # noqa: E731
    sizes = [params.gpt_set("x", vocab=params.CPU_VOCAB, block=params.CPU_BLOCK, **r).numel for r in params.CPU_LADDER]
    budget = (sizes[2] * 1e-8 + sizes[3] * 1e-8) / 2
    ps = params.resolve_set("gpt-cpu", estimate_s=est, budget_s=budget)
    assert ps.numel == sizes[2] and "estimated" in ps.note
    assert params.resolve_set("gpt-cpu").numel == sizes[0]  # no estimator: the smallest
    with pytest.raises(ValueError, match="unknown parameter set"):
        params.resolve_set("gpt-9000")


# ----------------------------------------------------------------------------------------
# kernels and optimizers
# ----------------------------------------------------------------------------------------


def test_bare_ns_is_the_same_polynomial_as_the_torch_backend():
    from mango.backends.torch_backend import batched_newton_schulz

    X = torch.randn(3, 6, 10, dtype=torch.float64)
    X = X / torch.linalg.matrix_norm(X, keepdim=True)
    ref = batched_newton_schulz(X, kernels.COEFFS, "frobenius", 1e-7)
    torch.testing.assert_close(kernels.bare_ns(X), ref, rtol=1e-12, atol=1e-12)
    tall = X.mT.contiguous()  # the backend orients r <= c itself; the bare NS is given that shape
    torch.testing.assert_close(batched_newton_schulz(tall, kernels.COEFFS, "frobenius", 1e-7).mT, ref, rtol=1e-12, atol=1e-12)


def test_compile_failure_is_reported_not_raised():
    ps = params.resolve_set("tiny")
    with pytest.raises(optimizers.Unavailable, match="^compile failed: "):
        optimizers.build("compile", ps, ps.build("cpu"), "cpu", compile_backend="no_such_backend")


def test_triton_is_unavailable_on_cpu():
    ps = params.resolve_set("tiny")
    with pytest.raises(optimizers.Unavailable, match="no CUDA"):
        optimizers.build("triton", ps, ps.build("cpu"), "cpu")


def test_muon_adamw_split_follows_keller_jordan():
    ps = params.resolve_set("tiny")
    runner = optimizers.build("muon_adamw", ps, ps.build("cpu"), "cpu")
    n_mats = sum(1 for t in ps.tensors if t.role in ("matrix", "qkv_weight"))
    assert runner.info["muon_tensors"] == n_mats
    assert runner.info["adamw_tensors"] == len(ps.tensors) - n_mats
    runner.step()
    assert optimizers.state_nbytes(runner.state()) > 0


def test_triton_ns_microbenchmark_runs_the_kernels(device):
    """The NS microbenchmark's Triton path (interpreter on CPU): right math, counted launches."""
    mk = pytest.importorskip("mango_kernels")
    if device.type == "cpu" and not getattr(mk, "INTERPRET", False):
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    b = roofline.NSBucket("qkv_weight", "ns_split", (24, 16), (8, 16), batch=6, tensors=2)
    t = kernels.TritonNS([b], device)
    assert t.launches() == 1  # small blocks: every NS step in one launch
    for x, y in zip(t.inputs(), t.outputs()):
        x64 = x.double().cpu()
        ref = kernels.bare_ns(x64 / torch.linalg.matrix_norm(x64, keepdim=True))
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 2e-2  # the correctness contract's bf16 NS bound


def test_sequential_mode_and_explicit_optimizers(tmp_path):
    """One optimizer at a time (the CUDA default, where peak memory is measured per optimizer)."""
    _bench("--out", tmp_path, "--interleave", "off", "--optimizers", "torch,reference,adamw", "--no-kernels", "--no-png")
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    with open(tmp_path / js) as f:
        result = json.load(f)
    s = result["sets"][0]
    assert s["interleaved"] is False and s["ns_buckets"] is None
    assert [o["key"] for o in s["optimizers"]] == ["torch", "reference", "adamw"]
    assert all(o["status"] == "ok" and o["median_s"] > 0 for o in s["optimizers"])
    overhead = next(t for t in s["targets"] if t["id"] == "overhead")
    assert overhead["value"] == pytest.approx(s["optimizers"][1]["median_s"] / s["optimizers"][0]["median_s"])
    ns = next(t for t in s["targets"] if t["id"] == "ns")
    bare = s["bare_ns"][ns["bare_ns_dtype"]]["median_s"]  # the torch backend's NS dtype on this device
    assert ns["value"] == pytest.approx(s["optimizers"][0]["median_s"] / bare)


def test_peer_packages_run_beside_mango_or_say_why(tmp_path):
    """Other packages' Muon (bench/peers.py) on the same set: each installed one steps (heavyball and
    muon-optimizer come with the bench extra); a missing one is "n/a" naming its package."""
    import importlib.util

    from bench import peers

    _bench("--out", tmp_path, "--interleave", "off", "--optimizers", ",".join(peers.PEERS), "--no-kernels", "--no-png")
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    by = {o["key"]: o for o in json.loads((tmp_path / js).read_text())["sets"][0]["optimizers"]}
    assert set(by) == set(peers.PEERS)
    for key, o in by.items():
        module = peers._MODULES[key]
        runs_here = importlib.util.find_spec(module) is not None and (key != "emerging_muon" or sys.version_info >= (3, 12))
        if runs_here:
            assert o["status"] == "ok" and o["median_s"] > 0 and o["launches"] > 0, (key, o.get("reason"))
        else:
            assert o["status"] == "n/a" and peers.DISTRIBUTIONS[key] in o["reason"], (key, o)


def test_contenders_not_run_say_why_in_every_output(tmp_path):
    """A contender left out (with its reason) or cut by --time-budget is reported as skipped with
    that reason in the JSON, the markdown and the chart's label, never as "not run by default"."""
    why = "left out here: its compile takes longer than this run has"
    _bench("--out", tmp_path, "--interleave", "off", "--optimizers", "adamw", "--no-kernels", "--no-png",
           "--leave-out", f"compile={why}", "--time-budget", "0")  # fmt: skip
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / js).read_text())
    by = {o["key"]: o for o in result["sets"][0]["optimizers"]}
    assert by["compile"] == {**by["compile"], "status": "skipped", "reason": why}
    assert by["adamw"]["status"] == "skipped" and "--time-budget 0 s spent" in by["adamw"]["reason"]
    assert result["settings"]["left_out"] == {"compile": why} and "compile" in result["settings"]["optimizers"]
    md = (tmp_path / js.replace(".json", ".md")).read_text()
    assert f"skipped ({why})" in md and "skipped (--time-budget 0 s spent before it started)" in md
    for o in by.values():
        assert report.not_run_note(o) == f"skipped ({o['reason']})"


# ----------------------------------------------------------------------------------------
# memory accounting (bench/memory.py)
# ----------------------------------------------------------------------------------------


def test_allocation_trace_counts_known_allocations():
    """The profiler-event method on allocations whose sizes and order are known."""
    with memory.AllocationTrace("cpu") as tr:
        a = torch.empty(1000)  # +4000            -> 4000
        b = torch.empty(2000)  # +8000            -> 12000
        del a  # -4000                            -> 8000
        c = torch.empty(500, dtype=torch.float64)  # +4000 -> 12000
        x = torch.ones(64, 64)  # +16384          -> 28384
        y = x @ x  # +16384 (the product)         -> 44768 (peak)
        del x, y, b  # -40768                     -> 4000
    assert tr.peak_bytes == 44768
    assert tr.net_bytes == c.numel() * c.element_size() == 4000
    assert tr.allocated_bytes == 48768
    flat = torch.zeros(100)
    assert memory.storage_bytes([flat[:50], flat[50:], flat, torch.zeros(3)]) == 412  # one storage counted once


def test_account_of_optimizers_with_known_memory():
    """torch.optim.SGD with momentum keeps one buffer per parameter and nothing else; mango's torch
    backend keeps its state plus exactly its workspace (and a few index tensors)."""
    n = 10_000
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    with memory.AllocationTrace("cpu") as res:
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=False)
        opt.step()
    with memory.AllocationTrace("cpu") as step:
        opt.step()
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    rec = memory.account(res, step, state, 4 * n, "cpu")
    assert rec["state_bytes"] == 4 * n and rec["persistent_bytes"] == 0 and rec["x_params"]["state"] == 1.0
    assert rec["step_net_bytes"] == 0

    ps = params.resolve_set("tiny")
    ws = ps.build("cpu")
    with memory.AllocationTrace("cpu") as res:
        opt = mango.presets.mango(params.mango_groups(ps, ws), backend="torch")
        opt.step()
    with memory.AllocationTrace("cpu") as step:
        opt.step()
    (be,) = opt._backends.values()
    work = sum(b.numel() for b in be._workspace.values())
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    budget = memory.ns_bucket_budget(ps, "cpu")
    rec = memory.account(res, step, state, 4 * ps.numel, "cpu", workspace_bytes=work, budget=budget)
    assert rec["state_bytes"] == 3 * 4 * ps.numel + 4 * len(ps.tensors)  # m, v, O in fp32 + one fp32 step count per tensor
    assert 0 <= rec["persistent_other_bytes"] < 4096
    assert rec["peak_transient_bytes"] > 0 and rec["step_net_bytes"] == 0
    assert rec["extra_vs_budget"] == pytest.approx(rec["extra_beyond_state_bytes"] / budget["budget_bytes"])


def test_ns_bucket_budget_follows_the_ns_dtype():
    ps = params.gpt_set("t", n_layer=1, d=64, vocab=32, block=8)
    b32 = memory.ns_bucket_budget(ps, "cpu", {"ns_dtype": torch.float32})
    b16 = memory.ns_bucket_budget(ps, "cpu", {"ns_dtype": torch.bfloat16})
    assert b32["bucket"] == b16["bucket"] == "matrix 256x64 x1" and b32["bucket_bytes"] == 256 * 64 * 4
    assert b32["budget_bytes"] == 2 * b32["bucket_bytes"] == 2 * b16["budget_bytes"]


# ----------------------------------------------------------------------------------------
# NS FLOPs per method (bench/roofline.py) and the stage breakdown (bench/kernels.py)
# ----------------------------------------------------------------------------------------


def test_ns_methods_flops_and_floors_by_hand():
    from mango import newton_schulz as ns

    ps = params.ParamSet("w", "one wide matrix and one square", (params.TensorSpec("a", (64, 256), "matrix"),
                                                                   params.TensorSpec("b", (32, 32), "matrix")))  # fmt: skip
    rates = {"matmul_flops": {"float32": 1e11, "bfloat16": 4e11}, "copy_bytes_per_s": 1e10}
    r = roofline.ns_methods(ps, rates, "cpu", {"ns_dtype": torch.float32})
    tb = 5 * (4 * 64 * 64 * 256 + 2 * 64**3) + 5 * 6 * 32**3
    big, small = 2 * 64 * 64 * 256, 2 * 64**3  # Gram, 5 steps, restart before step 2: 4 big products, 14 small
    assert ns.gram_flops(64, 256, 5) == 4 * big + 14 * small
    assert r["flops"]["textbook"] == tb
    assert r["flops"]["gram"] == ns.gram_flops(64, 256, 5) + ns.gram_flops(32, 32, 5)
    assert [b["auto"] for b in r["buckets"]] == ["gram", "textbook"]  # fp32: Gram where wide, textbook where square
    assert r["flops"]["auto"] == ns.gram_flops(64, 256, 5) + 5 * 6 * 32**3
    t_state = roofline.state_bytes(ps) / 1e10
    assert r["floors"]["textbook"]["floor_s"] == pytest.approx(tb / 1e11 + t_state)
    assert r["floors"]["auto"]["floor_s"] == pytest.approx(r["flops"]["auto"] / 1e11 + t_state)
    r4 = roofline.ns_methods(ps, rates, "cpu", {"ns_dtype": torch.float32, "ns_coefficients": "polar_express_4"})
    assert r4["steps"] == 4 and r4["flops"]["textbook"] == tb * 4 // 5


def test_stage_breakdown_refuses_renamed_methods(monkeypatch):
    ps = params.resolve_set("tiny")
    runner = optimizers.build("torch", ps, ps.build("cpu"), "cpu")
    runner.step()
    monkeypatch.setattr(kernels, "STAGES", kernels.STAGES + (("gone", ("_no_such_stage",)),))
    out = kernels.stage_breakdown(runner, lambda: None, torch.device("cpu"), ps.numel, 1e10, steps=1)
    assert "_no_such_stage" in out["error"] and "gone" not in out


# ----------------------------------------------------------------------------------------
# python -m bench.schedules
# ----------------------------------------------------------------------------------------


def test_schedules_quick_writes_a_table_with_every_schedule(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.schedules", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    (js,) = [f for f in files if f.endswith(".json")]
    assert js.replace(".json", ".md") in files and js.replace(".json", ".png") in files
    with open(tmp_path / js) as f:
        result = json.load(f)
    assert set(result["schedules"]) == set(mango.config.NS_SCHEDULES)
    assert {(i["kind"], i["shape"]) for i in result["inputs"]} >= {("gaussian", "mlp/4"), ("gradient", "head block")}
    for inp in result["inputs"]:
        for name, per in inp["rows_by_schedule"].items():
            assert set(per) == {f"{m}/{str(d).replace('torch.', '')}" for m, d in schedules.VARIANTS}
            for curve in per.values():
                assert len(curve) == result["schedules"][name]["steps"]
                assert all(0 <= c["min"] <= c["p10"] <= c["median"] <= c["max"] for c in curve)
            # the Gram form is the same polynomial: in float64 it gives the textbook's singular values
            for a, b in zip(per["textbook/float64"], per["gram/float64"]):
                assert a["min"] == pytest.approx(b["min"], rel=1e-6) and a["max"] == pytest.approx(b["max"], rel=1e-6)
    assert {t["schedule"] for t in result["timing"]} == set(mango.config.NS_SCHEDULES)
    assert result["best"]["steps"] <= 5 and result["best"]["schedule"] in mango.config.NS_SCHEDULES
    assert "| polar_express_5 | 5 |" in proc.stdout


def test_schedule_sigma_range_by_hand():
    X = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))[None]
    s = schedules.sigma_range(X)
    assert (s["min"], s["median"], s["max"]) == (1.0, 2.0, 3.0)
    G = schedules.make_input("gradient", 16, 48, seed=1)
    sv = torch.linalg.svdvals(G[0])
    torch.testing.assert_close(sv / sv[0], (torch.arange(16, dtype=torch.float64) + 1) ** -1.5)


def test_rounds_report_on_a_dry_run(tmp_path):
    """bench.rounds: within the budget the arena is far below one round's and the launches grow
    with the rounds (one moments pass per round)."""
    from bench import rounds

    rows = rounds.main(["--sets", "tiny", "--out", str(tmp_path)])
    assert len(rows) == 2 * len(rounds.FORMS) and sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    by = {(r["form"], r["one_round"]): r for r in rows}
    for form in rounds.FORMS:
        bounded, one = by[form, False], by[form, True]
        assert one["rounds"] == 1 and bounded["rounds"] >= 1
        assert bounded["arena_bytes"] <= one["arena_bytes"] and bounded["launches"] >= one["launches"]
        assert bounded["budget_bytes"] == one["budget_bytes"] > 0
        assert bounded["by_name"]["moments"] == bounded["rounds"] and one["by_name"]["moments"] == 1
        assert one["launches"] == 1 + sum(one["by_name"].values())


@pytest.mark.parametrize("set_kw", [dict(n_layer=3, d=128, vocab=128, block=8), dict(n_layer=1, d=128, vocab=4096, block=8)],
                         ids=["mlp-largest", "head-largest"])  # fmt: skip
def test_torch_backend_fp32_step_within_the_budget(set_kw):
    """The memory budget on the torch backend, counted from allocator events: with fp32 NS everything a step
    holds beyond the state (workspace + peak transient) is at most 2× the largest NS bucket —
    the NS's m×m temporaries live in room of its two buffers. Where the largest bucket is one
    matrix filling both buffers (the head), its m×m temporaries are the only thing above. (Sets
    big enough that two minimum-size elementwise chunk buffers fit in the budget.)"""
    ps = params.gpt_set("t", **set_kw)
    ws = ps.build("cpu")
    settings = {"ns_dtype": torch.float32}
    with memory.AllocationTrace("cpu") as res:
        opt = mango.presets.mango(params.mango_groups(ps, ws), backend="torch", **settings)
        opt.step()
    with memory.AllocationTrace("cpu") as step:
        opt.step()
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    budget = memory.ns_bucket_budget(ps, "cpu", settings)
    rec = memory.account(res, step, state, 4 * ps.numel, "cpu", budget=budget)
    assert rec["step_net_bytes"] == 0
    small = 8192  # per-step scalars (norms, trust ratios) and the plan's index tensors
    if budget["bucket"].startswith("head"):  # 4096×128: the Gram form, five 128×128 fp32 iterates
        m = min(set_kw["d"], set_kw["vocab"])
        assert budget["budget_bytes"] < rec["extra_beyond_state_bytes"] <= budget["budget_bytes"] + 5 * m * m * 4 + small
    else:
        assert rec["extra_beyond_state_bytes"] <= budget["budget_bytes"] + small, rec


def test_ns_bucket_table_times_the_triton_forms(device):
    """The per-bucket NS table's Triton columns (on by default on CUDA; the interpreter here): the
    bf16 textbook and fp16 Gram kernels of every bucket are timed side by side."""
    mk = pytest.importorskip("mango_kernels")
    if device.type == "cpu" and not getattr(mk, "INTERPRET", False):
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    ps = params.gpt_set("t", n_layer=1, d=32, vocab=32, block=8)
    out = kernels.ns_buckets_bench(ps, device, rates={}, budget_s=0.01, forms=False, triton_forms=True)
    for b in out["buckets"]:
        assert "triton_forms_error" not in b, b
        assert b["triton_textbook_s"] > 0 and b["triton_gram_s"] > 0
        assert b["triton_gram_vs_textbook"] == pytest.approx(b["triton_gram_s"] / b["triton_textbook_s"])


# ----------------------------------------------------------------------------------------
# Hugging Face sets (bench/hf_sets.py), the captured step (bench/graphs.py), per-set options
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hf-gpt2-tiny", "llama-tiny"])
def test_hf_sets_are_what_param_groups_gives_the_model(name):
    """A set built from a transformers config is the model's own labelling: the same groups (role,
    head size, layout) over the same tensors in their stored shapes, and the NS buckets the plan
    runs (HF GPT-2's Conv1D matrices stored (in, out): the same blocks, transposed)."""
    from bench import hf_sets

    ps = params.resolve_set(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = mango.param_groups(hf_sets.build_model(name))
    got = params.mango_groups(ps, ps.build("cpu"))
    strip = lambda g: {k: v for k, v in g.items() if k not in ("params", "tied")}  # noqa: E731
    assert [strip(g) for g in got] == [strip(g) for g in want]
    assert [[tuple(p.shape) for p in g["params"]] for g in got] == [[tuple(p.shape) for p in g["params"]] for g in want]
    opt = mango.presets.mango(got, backend="torch")
    opt.step()
    plan = sorted((nb.norm, tuple(sorted(nb.block_shape)), len(nb.slots) * nb.blocks_per_tensor)
                  for b in opt._plan.buckets for nb in b.norm_buckets if nb.norm in ("ns", "ns_split"))  # fmt: skip
    assert plan == sorted((b.norm, tuple(sorted(b.block)), b.batch) for b in roofline.ns_buckets(ps))


def test_full_size_hf_sets_have_the_models_shapes():
    gpt2, llama = params.resolve_set("hf-gpt2-124m"), params.resolve_set("llama-1b")
    assert gpt2.numel == 124_439_808 and llama.numel == 1_235_814_400
    # tied: the embedding owns the head (no NS on it); Conv1D's (in, out) matrices as (out, in) operators
    assert [b.label for b in roofline.ns_buckets(gpt2)] == ["qkv_weight 64x768 x432", "matrix 768x768 x12",
                                                            "matrix 3072x768 x12", "matrix 768x3072 x12"]  # fmt: skip
    assert [b.label for b in roofline.ns_buckets(llama)] == ["qkv_weight 64x2048 x512", "qkv_weight 64x2048 x256", "matrix 2048x2048 x16",
                                                             "matrix 8192x2048 x32", "matrix 2048x8192 x16"]  # fmt: skip
    c_fc = next(t for t in gpt2.tensors if t.name.endswith("h.0.mlp.c_fc.weight"))
    assert c_fc.shape == (3072, 768) and c_fc.stored_shape == (768, 3072) and dict(c_fc.layout) == {"orientation": "in_out"}


def _fake_capture(skip_warmup: int = 0):
    """A stand-in for CUDA-graph capture on the CPU: the warm-up steps, then the step itself as "replay"."""
    from bench import graphs

    def capture(step):
        for _ in range(graphs.WARMUP - skip_warmup):
            step()
        return step

    return capture


def test_replay_check_compares_every_parameter_on_the_same_gradients():
    """Everything around the capture (copies, gradient stream, warm-up, comparison) on the CPU: a
    faithful capture gives identical parameters; one that loses a warm-up step is caught."""
    from bench import graphs

    ps = params.resolve_set("tiny")
    same = graphs.replay_equals_eager(ps, "cpu", steps=2, capture=_fake_capture(), backend="torch")
    assert same["identical"] and same["eager"] == {"max_abs_diff": 0.0, "identical": True}
    off = graphs.replay_equals_eager(ps, "cpu", steps=2, capture=_fake_capture(skip_warmup=1), backend="torch")
    assert not off["identical"] and off["eager"]["max_abs_diff"] > 0


def test_graph_contender_is_one_launch_and_says_why_without_cuda():
    from bench import graphs

    ps = params.resolve_set("tiny")
    with pytest.raises(optimizers.Unavailable, match="no CUDA"):
        optimizers.build("triton_graph", ps, ps.build("cpu"), "cpu")
    r = graphs.graph_runner(ps, ps.build("cpu"), "cpu", optimizers.Unavailable, optimizers._graph_runner, capture=_fake_capture(),
                            backend="torch")  # fmt: skip
    assert r.key == "triton_graph" and r.info["launches_per_step"] == 1 and r.optimizer.capturable
    r.step()
    assert optimizers.state_nbytes(r.state()) > 0


def test_leave_out_per_set_and_ns_choices_in_the_report(tmp_path):
    """--leave-out KEY@SET skips on that set only; every NS form forced beside "auto", each bucket's
    engine, form and dtype in the markdown; the bare bf16 NS yardstick on a set without targets."""
    _bench("--out", tmp_path, "--interleave", "off", "--sets", "tiny,llama-tiny", "--no-kernels", "--no-png", "--bare-ns",
           "--optimizers", "torch," + ",".join(optimizers.NS_FORMS), "--leave-out", "torch_fp32_gram@llama-tiny=not here")  # fmt: skip
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / js).read_text())
    tiny, llama = ({o["key"]: o for o in s["optimizers"]} for s in result["sets"])
    assert tiny["torch_fp32_gram"]["status"] == "ok" and llama["torch_fp32_gram"] == {**llama["torch_fp32_gram"], "status": "skipped",
                                                                                     "reason": "not here"}  # fmt: skip
    choices = {c["method"] + " " + c["dtype"] for c in llama["torch_fp16_gram"]["info"]["ns_choices"]}
    assert choices == {"gram float16"} and all(c["why"] for c in llama["torch"]["info"]["ns_choices"])
    assert result["sets"][1]["bare_ns"]["bfloat16"]["median_s"] > 0
    md = (tmp_path / js.replace(".json", ".md")).read_text()
    assert "NS per bucket as each mango contender runs it" in md and "torch gram float16" in md and "torch textbook bfloat16" in md


def test_each_set_gets_its_share_of_the_time_budget(monkeypatch):
    from bench import step

    sets = [params.resolve_set("tiny"), params.resolve_set("gpt2-124m")]
    clock = [100.0]
    monkeypatch.setattr(step.time, "perf_counter", lambda: clock[0])
    args = step.build_parser().parse_args(["--time-budget", "60", "--optimizers", "torch,adamw,reference", "--leave-out", "reference@tiny=x"])
    args.optimizers, args.optimizers_given, args.skip_set, args._started = args.optimizers.split(","), True, set(), 100.0
    args.left_out = {"reference": ({"tiny"}, "x")}
    step._start_set(args, sets, 0)
    w = [step._set_weight(args, ps) for ps in sets]
    assert w == pytest.approx([2 * (1 + sets[0].numel / 1e9), 3 * (1 + sets[1].numel / 1e9)])  # contenders x size
    assert args._set_deadline[1] == pytest.approx(60 * w[0] / sum(w))
    clock[0] += args._set_deadline[1] + 1e-6
    assert "this set's share" in step._out_of_time(args)
    clock[0] = 110.0  # the first set left time unused: the second gets all that is left
    step._start_set(args, sets, 1)
    assert args._set_deadline[1] == pytest.approx(50.0) and step._out_of_time(args) is None
    plan = dict(warmup=5, min_steps=20, max_steps=200, budget_s=0.5)
    assert step._set_plan(plan, {"floor_s": 0.05}, torch.device("cuda"))["min_steps"] == 5
    assert step._set_plan(plan, {"floor_s": 0.001}, torch.device("cuda")) == plan


def test_sweep_entry_from_timings():
    """The ARCH_TABLE entry: per size class the engine of least total time, each bucket in its auto form."""
    from bench import sweep

    def row(name, auto, on_chip, **times):
        return {"bucket": name, "auto_form": auto, "on_chip": {"textbook": on_chip, "gram": on_chip},
                "times": {k.replace("__", " ").replace("_x_", "x"): {"s": v} for k, v in times.items()}}  # fmt: skip

    rows = [row("heads", "gram", True, triton_small__gram=1.0, cublas__gram=2.0, cublas__textbook=0.5),
            row("mlp", "gram", False, cublas__gram=3.0, **{"triton_tiled 64x128x64 gram": 4.0, "triton_tiled 128x128x64 gram": 2.5}),
            row("square", "textbook", False, cublas__textbook=1.0, **{"triton_tiled 64x128x64 textbook": 1.5,
                                                                     "triton_tiled 128x128x64 textbook": 2.0})]  # fmt: skip
    d = sweep.derive_entry(rows, [(64, 128, 64), (128, 128, 64)])
    assert d["entry"] == {"small": "triton_small", "large": "cublas", "tiles": (128, 128, 64)}  # tiled 5.5 or 4.5; cuBLAS 4.0
    assert d["per_class"]["large"] == {"triton_tiled": 4.5, "cublas": 4.0} and not d["partial"]
    del rows[1]["times"]["cublas gram"]
    d = sweep.derive_entry(rows, [(64, 128, 64), (128, 128, 64)])
    assert d["entry"]["large"] == "triton_tiled" and d["partial"] == ["large: no total for cublas"]
    assert sweep.entry_line({"arch": "sm_90", "entry": d}) == '"sm_90": {"small": "triton_small", "large": "triton_tiled", "tiles": (128, 128, 64)},'
