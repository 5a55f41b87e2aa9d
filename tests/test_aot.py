"""Ahead-of-time compile check (bench.aot, mango_kernels.aot) and the launch capture it rests on.

The compile check runs in a subprocess without TRITON_INTERPRET (in this process the kernels
are interpreter objects) and compiles with the installed Triton, no GPU needed: a GPT-2 step for
sm_90, and on sm_80, sm_86, sm_89 and sm_90 the tiled NS kernels at the tile sizes mango.ns_engine
picks there. Compiled specializations land in Triton's cache, so a second run only compiles what
changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mango
import mango_kernels as mk
from helpers import make_groups, small_ns_launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled_env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return env


def _python(code: str, *args, timeout=600):
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT, env=_compiled_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_capture_records_every_launch_and_runs_none(device):
    """capture=True keeps kernel, grid and arguments of each launch and executes nothing."""
    groups = make_groups(("ns", "l2", "sign"), dtype=torch.float32, device=device)
    opt = mango.Mango(groups, backend="triton")
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with mk.count_launches(capture=True) as log:
        opt.step()
    assert [x.name for x in log.launches] == [e for e in log.events if e in {x.name for x in log.launches}]
    (lg,) = opt._plan.cache["triton"][1]
    on_chip = {small_ns_launch(b) for r in lg.rounds for b, _ in r.ns_batches if b.small}
    assert on_chip and {"moments", "apply"} | on_chip <= {x.name for x in log.launches}
    for x in log.launches:
        assert hasattr(x.kernel, "run") or hasattr(x.kernel, "fn"), x.name  # a Triton kernel object
        assert all(g > 0 for g in x.grid) and x.args and isinstance(x.kwargs, dict)
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # nothing ran


def test_triton_backend_builds_on_cpu_only_during_a_dry_run(monkeypatch):
    """Without the interpreter a CPU tensor is accepted by backend="triton" only while launches are
    suppressed (that is how bench.aot captures a GPU step on a CPU-only machine)."""
    from mango.backends import triton_usable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert not triton_usable(cpu)
    with mk.count_launches(dry_run=True):
        assert triton_usable(cpu)
    assert not triton_usable(cpu)


def test_gpt2_step_compiles_for_sm90(tmp_path):
    """Every specialization a GPT-2 124M step launches, in every configuration of bench.aot's core
    set, compiles to sm_90 cubin with the installed Triton; none needs more shared memory than an
    H100/H200 block has. Which kernels those are comes from the capture, not from this test."""
    out = tmp_path / "aot.json"
    proc = _python("", "-m", "bench.aot", "--core", "--json", str(out), timeout=1800)  # ~90 s of CPU with a cold Triton cache
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and report["target"]["arch"] == 90
    captured = {k for c in report["configs"] for k in c["kernels"]}
    compiled = {r["name"] for r in report["results"]}
    assert compiled == captured and {"moments", "apply", "ns_small", "ns_xxt", "ns_poly", "ns_update", "novograd_prepass"} <= captured
    dtypes = {r["constexprs"].get("DTYPE") for r in report["results"]} - {None}
    assert dtypes == {"bf16", "fp16", "fp32"}  # every NS operand dtype
    assert {r["constexprs"].get("COMPUTE") for r in report["results"]} - {None} == {"fp32", "fp64"}
    for r in report["results"]:
        assert "cubin" in r["asm"] and r["shared_bytes"] <= 232448, r["name"]
    assert "| ns_xxt |" in proc.stdout


def test_tiled_kernels_fit_every_architecture_at_the_tiles_chosen_there(tmp_path):
    """On sm_80, sm_86, sm_89 and sm_90 the tiled NS kernels compile at the tile sizes
    mango.ns_engine picks there, fit the architecture's shared memory, and take exactly what
    mango_kernels.resources (the model the tiles were picked by) says."""
    out = tmp_path / "tiles.json"
    proc = _python("", "-m", "bench.aot", "--tiles", "--arch", "80,86,89,90", "--json", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failed"] == 0
    for arch in (80, 86, 89, 90):
        mine = [r for r in report["results"] if r["arch"] == arch]
        assert {r["name"] for r in mine} == {"ns_xxt", "ns_poly", "ns_update"}, arch
        assert {r["constexprs"]["DTYPE"] for r in mine} == {"bf16", "fp32"}, arch  # fp16 takes bf16's shared memory
        for r in mine:
            assert "cubin" in r["asm"] and r["shared_bytes"] == r["model_bytes"], (arch, r["name"])


def test_compile_check_reports_a_broken_kernel_without_stopping(tmp_path):
    """A kernel the compiler rejects is reported with its error; the others still compile."""
    code = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from mango_kernels._launch import Launch
        from mango_kernels import aot

        @triton.jit
        def good(X, BLOCK: tl.constexpr):
            tl.store(X + tl.arange(0, BLOCK), tl.load(X + tl.arange(0, BLOCK)) * 2)

        @triton.jit
        def bad(X, BLOCK: tl.constexpr):
            tl.store(X + tl.arange(0, BLOCK), tl.dot(tl.load(X + tl.arange(0, BLOCK)), 1.0))

        x = torch.zeros(64)
        res = aot.compile_launches([Launch("bad", bad, (1,), (x,), {"BLOCK": 64}), Launch("good", good, (1,), (x,), {"BLOCK": 64}),
                                    Launch("good", good, (2,), (x,), {"BLOCK": 64})])
        print([(r.name, r.ok, r.launches, "cubin" in r.asm) for r in res])
        print(res[0].error)
        """
    )
    script = tmp_path / "broken_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    proc = _python("", str(script), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, error = proc.stdout.strip().splitlines()[:2]
    assert first == "[('bad', False, 1, False), ('good', True, 2, True)]"
    assert error.startswith("CompilationError") or "dot" in error


def test_compile_check_refuses_the_interpreter():
    from mango_kernels import aot

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_launches([])
