"""bench.step: the --quick run end to end, and the arithmetic the report rests on.

No test here asserts a timing (SPEC §8: performance is reported, never asserted).
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
from bench import kernels, optimizers, params, report, roofline

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
        assert st["step"] > 0 and st["moments"] > 0 and st["ns"] > 0
        # mango's state: m, v, offset in fp32 for every parameter
        assert by["torch"]["state_bytes"] >= 3 * 4 * s["set"]["numel"]
        assert s["ns_buckets"]["buckets"] and all(b["ours_s"] > 0 and b["bare_bfloat16_s"] > 0 for b in s["ns_buckets"]["buckets"])


def test_quick_triton_not_faked_without_cuda(quick_run):
    _, _, result, stdout = quick_run
    tri = next(o for o in result["sets"][0]["optimizers"] if o["key"] == "triton")
    if result["device"]["type"] == "cpu":
        assert tri["status"] == "n/a" and tri["reason"] == "no CUDA" and "median_s" not in tri
        assert "| mango triton | n/a (no CUDA) |" in stdout


def test_quick_reports_both_cpu_targets(quick_run):
    _, _, result, _ = quick_run
    names = sorted(t["id"] for t in result["targets"])
    assert names == ["ns", "overhead"]
    for t in result["targets"]:
        assert t["value"] is not None and t["value"] > 0 and isinstance(t["met"], bool)
        assert t["dominant_stage"] in t["stage_fractions"]


# ----------------------------------------------------------------------------------------
# roofline arithmetic against SPEC §8
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


def test_ns_step_flops_by_hand():
    assert roofline.ns_step_flops(64, 768) == roofline.ns_step_flops(768, 64) == 4 * 64 * 64 * 768 + 2 * 64**3
    r, c = 3, 5
    assert roofline.ns_step_flops(r, c, symmetric=True) == r * (r + 1) * c + r * r * (r + 1) + 2 * r * r * c


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
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 2e-2  # SPEC §7 bf16 NS tolerance


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
