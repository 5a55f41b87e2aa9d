"""mango under torch.distributed on CPU (gloo): DDP, FSDP2 (DTensor shards), HSDP, distributed checkpoint.

The checks live in tests/dist_worker.py and run in 2 and in 4 processes; each launch (LAUNCHES: a
world size and its checks, the Triton interpreter's apart) runs once per test session (one
process imports torch and forks the ranks), and every test below reads its own check's result.
Under pytest-xdist a launch is shared between workers through a lock file, so it still runs
exactly once.

What they establish (every comparison is against a single-process `mango.Mango` on the torch
backend, itself tested against the float64 reference elsewhere; float64 unless noted):
- fsdp2_presets: FSDP2 parameters, 10 steps, presets mango / muon / lamb / novograd, and mango
  against the reference oracle: params and state equal to 1e-10 (they agree to ~1e-16). The
  tiny GPT's shapes make shard boundaries cut attention heads (45 QKV rows of head_dim 5 split
  23/22 and 12/12/12/9), uneven splits everywhere, an empty shard (3 rows on 4 ranks), and a
  23x2 matrix tall enough for row-sharded Newton–Schulz.
- fsdp2_settings: every norm (l2_col with an empty shard, whole-QKV ns, l2 on matrices, sign),
  trust ratio on NS buckets, adam, spectral NS prescale, maximize; 18 param groups.
- fsdp2_moe: HF Mixtral from a config, labelled with no hints, 10 steps: experts Shard(0) on the expert
  dim stay whole on their rank and are orthogonalized there; E = 4 (divides 2 and 4 ranks) and E = 3
  (does not; an empty shard at 4 ranks); and GPT-OSS (3 experts stored (E, in, out), per-expert biases
  with one l2 each): equal to one process and to the reference within 1e-10.
- fsdp2_conv1d: HF GPT-2 from a config: Shard(0) splits every Conv1D weight on its input axis (heads
  are column blocks, so every shard holds part of every head), also with l2_col on a Conv1D: equal to
  one process and to the reference within 1e-10.
- fsdp2_float32: mango with float32 params and NS within 1e-5 (the correctness contract's fp32 NS trajectory bound
  is 1e-4); with bf16 NS operands, and with bfloat16 params, within the bf16 NS bound 2e-2.
- fsdp2_training / hsdp: real fully_shard forward/backward (FSDP2's reduce-scatter; HSDP on a
  2×2 mesh) equal to one process training on all ranks' batches.
- ddp: DDP; bit-identical params and state on every rank, equal to one process.
- checkpoint: torch.distributed.checkpoint sharded save → load into a fresh model/optimizer →
  resume is bit-identical to never stopping; state is restored as sharded DTensors.
- load_single_process_state: a single-process state_dict loads into the FSDP2 optimizer.
- collectives: the same collectives per step for 2 and 4 layers (the count does not grow with
  depth): per round one all-reduce of sums of squares and one all_to_all pair, plus one Gram
  all-reduce per NS step for the row-sharded tall matrices.
- nonfinite_skip: a NaN on one rank's shard makes every rank skip the step.
- errors: Shard(1) / Partial placements and DTensor params on backend="reference" are clear
  errors naming the parameter; Replicate() DTensors behave like plain tensors.
- fsdp2_triton: FSDP2 with backend="triton" (kernels under TRITON_INTERPRET=1) equal to one process:
  mango / novograd (NovoGrad's v on a rank with no rows of the tensor), every norm and setting
  (trust ratios included), the layouts model (a GQA and a Conv1D fused QKV cut by shard boundaries,
  experts with an empty shard at 4 ranks, a tied head) in float64 within 1e-10, in float32 with
  bf16 NS within the bf16 bound; one all-reduce and one all_to_all pair per step.
  fsdp2_triton_launches: the step's launches are one process's elementwise ones, the same for 2
  and 4 layers. fsdp2_triton_checkpoint: a DCP checkpoint with an LR scheduler saved under one
  backend resumes under the other. triton_policies: nonfinite skip / raise under FSDP2 and the DDP
  split on the triton backend, and the split's resume with a scheduler.
- ddp_split*: DDP with the Newton–Schulz work split across ranks (`Mango(..., process_group=...)`):
  equal to one process within 1e-10 (bit for bit except the row-split tall `up`; the tiny GPT's
  head blocks, every norm and setting, HF GPT-2's Conv1D, Mixtral's experts and GQA, float32), ranks identical; the busiest
  rank's NS FLOPs (FlopCounterMode) within 1/world of the total plus one tensor's; a NaN on one
  rank skips or raises everywhere; save -> load -> resume with a scheduler is exact; the all-gathers
  per step do not grow with depth. On the triton backend (interpreter): the layouts model with the
  bf16 NS kernels bit for bit, float64, and every bucket on the cuBLAS engine (each rank's slice of
  every bucket, the tall `up`s row-split) with the busiest rank's FlopCounterMode FLOPs within
  1/world of the total plus one tensor's, also with every bucket in place (results in the shifted
  second place, a row-split one's too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.tensor")
fcntl = pytest.importorskip("fcntl")  # POSIX: the cross-worker lock (and fork) below

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
TRITON_CHECKS = ["fsdp2_triton", "fsdp2_triton_launches", "triton_policies", "fsdp2_triton_checkpoint", "ddp_split_triton",
                 "ddp_split_triton_cublas"]  # fmt: skip
LAUNCHES = {  # each: (world size, checks), run in its own processes under the worker's timeout
    "2ranks": (2, ["fsdp2_presets", "fsdp2_settings", "fsdp2_moe", "fsdp2_conv1d", "fsdp2_training", "ddp", "checkpoint",
                   "collectives", "errors", "ddp_split", "ddp_split_flops", "ddp_split_policies"]),
    "4ranks": (4, ["fsdp2_presets", "fsdp2_settings", "fsdp2_moe", "fsdp2_conv1d", "fsdp2_float32", "fsdp2_training", "hsdp",
                   "ddp", "checkpoint", "load_single_process_state", "collectives", "nonfinite_skip", "errors",
                   "ddp_split", "ddp_split_flops", "ddp_split_policies"]),
    "2ranks-triton": (2, TRITON_CHECKS),  # the Triton interpreter: most of the time, so apart
    "4ranks-triton": (4, TRITON_CHECKS),
}  # fmt: skip
_cache: dict = {}


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory every xdist worker of this session sees (pytest's own basetemp; cleaned by pytest)."""
    base = tmp_path_factory.getbasetemp()
    return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def _results(launch: str, shared: str) -> dict:
    """Run (once per session, shared across xdist workers) every check of `launch`."""
    if launch in _cache:
        return _cache[launch]
    world, checks = LAUNCHES[launch]
    base = os.path.join(shared, f"mango-dist-{launch}")
    with open(base + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(base + ".json"):
            env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
            cmd = [sys.executable, WORKER, str(world), base + ".json", *checks]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                why = f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            except subprocess.TimeoutExpired as e:
                why = f"timed out after {e.timeout}s"
            if not os.path.exists(base + ".json"):  # record the failure once for every test
                with open(base + ".json", "w") as f:
                    json.dump({"-1": {"_setup": {"ok": False, "error": f"{launch} worker produced no result ({why})"}}}, f)
        with open(base + ".json") as f:
            _cache[launch] = {int(r): v for r, v in json.load(f).items()}
    return _cache[launch]


@pytest.fixture
def check(shared_dir):
    return lambda world, name: _check(world, name, shared_dir)


def _check(world: int, name: str, shared: str):
    (launch,) = [k for k, (w, checks) in LAUNCHES.items() if w == world and name in checks]
    results = _results(launch, shared)
    failures = []
    for rank, res in sorted(results.items()):
        if "_setup" in res:
            failures.append(f"rank {rank}: setup failed:\n{res['_setup']['error']}")
            continue
        r = res.get(name)
        if r is None:
            failures.append(f"rank {rank}: check {name} did not run")
        elif not r["ok"]:
            failures.append(f"rank {rank}:\n{r['error']}")
    if failures:
        pytest.fail(f"{name} at {world} ranks failed:\n" + "\n".join(failures[:2]))
    return results[0][name]["value"]


def _params(name):
    return [pytest.param(w, id=f"{w}ranks") for w, checks in LAUNCHES.values() if name in checks]


@pytest.mark.parametrize("world", _params("fsdp2_presets"))
def test_fsdp2_presets_equal_single_process(world, check):
    worst = check(world, "fsdp2_presets")
    assert set(worst) == {"mango", "muon", "lamb", "novograd", "mango_vs_reference"}
    assert max(worst.values()) <= 1e-10


@pytest.mark.parametrize("world", _params("fsdp2_settings"))
def test_fsdp2_every_norm_and_setting_equals_single_process(world, check):
    assert check(world, "fsdp2_settings") <= 1e-10


@pytest.mark.parametrize("world", _params("fsdp2_moe"))
def test_fsdp2_mixtral_experts_equal_single_process(world, check):
    worst = check(world, "fsdp2_moe")
    assert set(worst) == {"E4", "E4_vs_reference", "E3", "E3_vs_reference", "gpt_oss_E3", "gpt_oss_E3_vs_reference"}
    assert max(worst.values()) <= 1e-10


@pytest.mark.parametrize("world", _params("fsdp2_conv1d"))
def test_fsdp2_gpt2_conv1d_equals_single_process(world, check):
    worst = check(world, "fsdp2_conv1d")
    assert set(worst) == {"gpt2", "gpt2_vs_reference", "gpt2_l2_col"}
    assert max(worst.values()) <= 1e-10


@pytest.mark.parametrize("world", _params("fsdp2_float32"))
def test_fsdp2_float32_and_bfloat16_within_spec(world, check):
    worst = check(world, "fsdp2_float32")
    assert worst["float32"] <= 1e-5 and worst["bf16_ns"] <= 2e-2 and worst["bfloat16"] <= 2e-2


@pytest.mark.parametrize("world", _params("fsdp2_training"))
def test_fsdp2_training_equals_single_process(world, check):
    assert check(world, "fsdp2_training") <= 1e-9


@pytest.mark.parametrize("world", _params("hsdp"))
def test_hsdp_training_equals_single_process(world, check):
    assert check(world, "hsdp") <= 1e-9


@pytest.mark.parametrize("world", _params("ddp"))
def test_ddp_identical_ranks_equal_single_process(world, check):
    assert check(world, "ddp") <= 1e-9


@pytest.mark.parametrize("world", _params("checkpoint"))
def test_distributed_checkpoint_resume_is_exact(world, check):
    assert check(world, "checkpoint") > 0


@pytest.mark.parametrize("world", _params("load_single_process_state"))
def test_single_process_state_loads_into_fsdp2(world, check):
    assert check(world, "load_single_process_state") <= 1e-9


@pytest.mark.parametrize("world", _params("collectives"))
def test_collectives_per_step_do_not_grow_with_depth(world, check):
    counts = check(world, "collectives")
    assert counts["2"] == counts["4"]


@pytest.mark.parametrize("world", _params("nonfinite_skip"))
def test_nonfinite_gradient_on_one_rank_skips_everywhere(world, check):
    assert check(world, "nonfinite_skip") is True


@pytest.mark.parametrize("world", _params("errors"))
def test_unsupported_placements_and_backends_are_clear_errors(world, check):
    assert check(world, "errors") is True


@pytest.mark.parametrize("world", _params("fsdp2_triton"))
def test_fsdp2_on_the_triton_backend_equals_single_process(world, check):
    worst = check(world, "fsdp2_triton")
    calls = worst.pop("collectives")
    assert set(worst) == {"mango", "novograd", "settings", "layouts", "float32_bf16_ns"}
    assert worst.pop("float32_bf16_ns") <= 2e-2 and max(worst.values()) <= 1e-10
    assert calls["all_reduce: sums of squares"] == 1 and calls["all_to_all: NS gather"] == 1


@pytest.mark.parametrize("world", _params("fsdp2_triton_launches"))
def test_fsdp2_triton_step_makes_one_process_launches_flat_in_depth(world, check):
    launches = check(world, "fsdp2_triton_launches")
    assert launches["2"] == launches["4"] == {"moments": 1, "segment_sums": 1, "apply": 1}


@pytest.mark.parametrize("world", _params("triton_policies"))
def test_triton_nonfinite_policies_and_split_resume_with_a_scheduler(world, check):
    assert check(world, "triton_policies") is True


@pytest.mark.parametrize("world", _params("fsdp2_triton_checkpoint"))
def test_fsdp2_checkpoint_moves_between_torch_and_triton(world, check):
    worst = check(world, "fsdp2_triton_checkpoint")
    assert set(worst) == {"triton_to_torch", "torch_to_triton"} and max(worst.values()) <= 1e-12


@pytest.mark.parametrize("world", _params("ddp_split"))
def test_ddp_split_ns_equals_single_process(world, check):
    worst = check(world, "ddp_split")
    assert set(worst) == {"mango", "settings", "muon", "gpt2_conv1d", "mixtral_experts_gqa", "float32"}
    assert worst.pop("float32") <= 1e-6  # the row-split tall matrix's Gram sums in another order, in fp32
    assert max(worst.values()) <= 1e-10


@pytest.mark.parametrize("world", _params("ddp_split_flops"))
def test_ddp_split_busiest_rank_does_its_share_of_the_ns(world, check):
    f = check(world, "ddp_split_flops")
    assert f["total"] <= sum(f["per_rank"]) <= 1.01 * f["total"]
    assert f["busiest"] <= f["total"] / world + f["largest_job"]
    assert f["busiest"] < 0.6 * f["total"] if world == 2 else f["busiest"] < 0.35 * f["total"]


@pytest.mark.parametrize("world", _params("ddp_split_policies"))
def test_ddp_split_nonfinite_resume_schedulers_and_flat_collectives(world, check):
    calls = check(world, "ddp_split_policies")
    assert calls["all_gather"] >= 1 and calls["all_reduce"] == 5  # NS results; the tall `up`'s Gram matrices, one per NS step


@pytest.mark.parametrize("world", _params("ddp_split_triton"))
def test_ddp_split_ns_on_the_triton_backend_equals_single_process(world, check):
    worst = check(world, "ddp_split_triton")
    assert worst["float32"] <= 1e-6 and worst["float64"] <= 1e-10


@pytest.mark.parametrize("world", _params("ddp_split_triton_cublas"))
def test_ddp_split_on_the_cublas_engine_gives_each_rank_its_share(world, check):
    f = check(world, "ddp_split_triton_cublas")
    assert f["error"] <= 1e-6 and f["row_split_error"] <= 2e-2 and len(f["row_split"]) == 2
    assert f["total"] <= sum(f["per_rank"]) <= 1.01 * f["total"]
    assert f["busiest"] <= f["total"] / world + f["largest_job"]
    assert f["busiest"] < 0.6 * f["total"] if world == 2 else f["busiest"] < 0.35 * f["total"]
    # every bucket in place, its results in the shifted second place; rank 0 runs a cut of the
    # 24x96 and 96x20 buckets and none of the row-split 300x24
    assert f["in_place_error"] <= 1e-6 and f["in_place_row_split_error"] <= 2e-2 and len(f["in_place_row_split"]) == 1
    assert [tuple(s) for s in f["shifted"]] == [(24, 96), (96, 20), (300, 24)]
    shares = {k: tuple(v) for k, v in f["shares"].items()}
    assert shares["(300, 24)"] == (0, 0, 1) and all(0 < stop - first < n for first, stop, n in (shares["(24, 96)"], shares["(96, 20)"]))


def test_process_group_must_be_a_group_or_a_1d_mesh():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="process_group"):
        import mango

        mango.Mango([p], process_group="world")


# ------------------------------------------------------------------------------------------
# single-process pieces: no DTensor, no processes
# ------------------------------------------------------------------------------------------


def test_owner_assignment_balances_flops_deterministically():
    from mango.distributed import assign_owners, ns_flops, row_sharded_ns_flops, use_row_sharded_ns

    # GPT-2 124M's NS matrices (12 layers) and the tied 50257x768 head, at 4 ranks
    layers = [((2304, 768), (64, 768))] * 12 + [((768, 768), (768, 768))] * 12
    layers += [((3072, 768), (3072, 768))] * 12 + [((768, 3072), (768, 3072))] * 12
    costs = [ns_flops(shape, block, 5) for shape, block in layers]
    head = ns_flops((50257, 768), (50257, 768), 5)
    owners, loads = assign_owners(costs + [head], 4)
    assert (owners, loads) == assign_owners(costs + [head], 4)  # every rank computes the same plan
    assert sorted(set(owners)) == [0, 1, 2, 3]
    assert abs(sum(loads) - sum(costs) - head) < 1e-6 * sum(loads)
    assert max(loads) == pytest.approx(head)  # gathered on one owner, the head alone bounds the step
    # ... so it runs row-sharded instead: every rank does a quarter, and the rest balances around it
    assert use_row_sharded_ns((50257, 768), "ns", "frobenius", 5, 4)
    assert not use_row_sharded_ns((3072, 768), "ns", "frobenius", 5, 4)  # 4x taller only: gathering is cheaper
    assert not use_row_sharded_ns((50257, 768), "ns_split", "frobenius", 5, 4)
    assert not use_row_sharded_ns((50257, 768), "ns", "spectral", 5, 4)
    assert not use_row_sharded_ns((50257, 768), "ns", "frobenius", 5, 1)
    rows = [12565, 12565, 12565, 12562]  # fully_shard's split of 50257 rows
    owners, loads = assign_owners(costs, 4, [row_sharded_ns_flops(r, 768, 5) for r in rows])
    assert max(loads) / (sum(loads) / 4) < 1.01
    # A·Aᵀ, A·A and B·X per step: 4·r²·c + 2·r³ for r ≤ c
    assert ns_flops((8, 5), (8, 5), 1) == 4 * 25 * 8 + 2 * 125


@pytest.mark.parametrize("engine", ["auto", "triton"])
def test_triton_split_places_each_ns_engine_as_an_sm90_step_runs_it(engine):
    """Where DDP's NS split runs each bucket on the triton backend, with the engines an sm_90 step
    takes (a CPU dry run: the choice is made on the host): head blocks (≤ 128 rows) in the on-chip
    kernels and larger blocks as cuBLAS GEMMs, each tensor on one owner and each rank's tensors of
    a bucket consecutive (a cuBLAS bucket runs on the owner's slice); a vocabulary-like tall matrix
    on cuBLAS row-split over every rank. ns_engine="triton" puts the large blocks in the tiled
    kernels, whose Gram-form large items iterate as one batch: those run on every rank, and the tall
    matrix keeps one owner (a row split would change its engine)."""
    import mango
    import mango_kernels as mk
    from mango import ddp
    from mango.distributed import ns_flops, row_sharded_ns_flops

    torch.manual_seed(0)
    model = torch.nn.ModuleDict(dict(qkv=torch.nn.Linear(192, 3 * 192, bias=False), head=torch.nn.Linear(192, 2000, bias=False),
                                     **{f"fc{i}": torch.nn.Linear(192, 160, bias=False) for i in range(5)}))  # fmt: skip
    groups = mango.param_groups(model, qkv_heads={"qkv": 3}, overrides={"head.weight": {"norm": "ns"}})
    opt = mango.Mango(groups, backend="triton", ns_engine=engine, ns_method="gram" if engine == "triton" else "auto")
    opt._backend_for(torch.device("cpu")).ns_target = "sm_90"
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with mk.count_launches(dry_run=True):
        opt.step()
    kinds = ddp._engine_kinds(opt._plan.cache["triton"][1])
    world = 4
    loads = ddp.assign_plan(opt, opt._plan, world, lambda nb, group, w: ddp._triton_placement(kinds[id(nb)], nb, group, w))
    owners = {b.slots[i].name: q
              for b in opt._plan.buckets for nb in b.norm_buckets if nb.norm in ("ns", "ns_split")
              for i, q in zip(nb.slots, nb.cache["mango.ddp.owners"])}  # fmt: skip
    fc = [owners[f"fc{i}.weight"] for i in range(5)]
    if engine == "auto":
        assert {k for k in kinds.values()} == {"kernels", "gemms"}
        assert owners["head.weight"] == ddp.ROW_SPLIT and fc == sorted(fc) and min(fc) >= 0 and len(set(fc)) > 1
        assert owners["qkv.weight"] >= 0
        costs = [ns_flops((160, 192), (160, 192), 5)] * 5 + [ns_flops((576, 192), (64, 192), 5)]
        head = [row_sharded_ns_flops(n, 192, 5) for n in ddp.row_split(2000, world)]
        assert sum(loads) == pytest.approx(sum(costs) + sum(head))
        assert max(loads) <= sum(loads) / world + max(costs)
    else:
        assert "one_batch" in kinds.values()
        assert owners["head.weight"] == ddp.EVERY_RANK and set(fc) == {ddp.EVERY_RANK}  # Gram form, large: one batch
        assert owners["qkv.weight"] >= 0  # head blocks: on-chip, one owner


def test_auto_takes_the_sharded_triton_backend_for_fsdp2_params_on_cuda(monkeypatch):
    """backend="auto" with DTensor (FSDP2) params builds the sharded triton backend on a CUDA device,
    the sharded torch backend on a CPU. No GPU here: the CUDA queries are stubbed (as in
    test_unvalidated_warning.py) and the backends are only constructed."""
    from test_unvalidated_warning import stub_gpu

    import mango.backends as backends
    from mango.distributed import ShardedTorchBackend
    from mango.sharded_triton import ShardedTritonBackend

    h200 = stub_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    assert isinstance(backends.make_backend("auto", h200, sharded=True), ShardedTritonBackend)
    assert isinstance(backends.make_backend("auto", torch.device("cpu"), sharded=True), ShardedTorchBackend)
    assert isinstance(backends.make_backend("torch", h200, sharded=True), ShardedTorchBackend)


def test_fsdp_one_gpu_bench_runs_on_the_cpu(tmp_path):
    """bench/fsdp_one_gpu.py (the GPU run's one-device FSDP2 check) end to end in its CPU dry run: a
    world of one, HF GPT-2 fully_shard'ed on the sharded triton backend against the plain triton step,
    within the NS bound, both timed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "fsdp_one_gpu.json"
    cmd = [sys.executable, "-m", "bench.fsdp_one_gpu", "--cpu-dry-run", "--steps", "1", "--n-layer", "1", "--out", str(out)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        r = json.load(f)
    assert r["sharded_backend"] == "ShardedTritonBackend" and r["world_size"] == 1 and r["process_group"] == "gloo"
    assert r["within_ns_bound"] and 0 < max(r["max_rel_diff"]) <= 2e-2  # torch's NS on the owner vs the kernels'
    assert r["fsdp2_median_ms"] > 0 and r["plain_median_ms"] > 0
    assert "| mango, triton |" in proc.stdout


def test_bench_comm_runs(tmp_path):
    """bench/comm.py end to end on a tiny GPT at 2 ranks: the report adds up."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench.comm", "--model", "tiny", "--world", "2", "--steps", "2", "--out", str(tmp_path)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "comm_tiny_2ranks_mango.json") as f:
        s = json.load(f)
    calls = {k: v["calls"] for k, v in s["collectives_per_step"].items()}
    assert calls["all_to_all: NS gather"] == calls["all_to_all: NS scatter"] >= 1
    assert calls["all_reduce: sums of squares"] == 1
    sent = sum(r["sent_MB"] for r in s["per_rank"])
    assert sent == pytest.approx(s["total_sent_MB"]) and sent > 0
    assert s["ns_balance"]["max_over_mean"] < 1.5


def test_bench_comm_simulation_matches_real_runs(tmp_path):
    """bench.comm's simulated ranks (bench/comm_model.py) against real 2-rank gloo runs of the tiny GPT,
    FSDP2 and DDP with the NS split (the tied head row-sharded / row-split in both): the same
    collectives, bytes on the wire and NS FLOPs per rank."""
    import argparse

    from bench import comm, comm_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    args = comm.build_parser().parse_args(["--model", "tiny", "--ns-steps", "3"])  # 3 steps: the 256x64 head counts as very tall
    opt, _ = comm.simulated_model("tiny", args)
    tensors = comm_model.ns_tensors(opt, device="cpu")  # the NS dtypes of the CPU runs
    for mode, simulate, file in (("fsdp2", comm_model.fsdp2, "comm_tiny_2ranks_mango.json"),
                                 ("ddp-split", comm_model.ddp_split, "comm_tiny_2ranks_mango_ddp_split.json")):  # fmt: skip
        cmd = [sys.executable, "-m", "bench.comm", "--model", "tiny", "--world", "2", "--steps", "1", "--ns-steps", "3", "--mode", mode,
               "--out", str(tmp_path)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(tmp_path / file) as f:
            real = json.load(f)
        sim = simulate(tensors, 2)
        ns_kinds = {k: v for k, v in real["collectives_per_step"].items() if "NS" in k}
        assert {k: v["calls"] for k, v in ns_kinds.items()} == {k: v for k, v in sim["collectives"].items() if "NS" in k}
        sent = sum(v["sent_MB_total"] for v in ns_kinds.values()) * 1e6
        assert sent == pytest.approx(sum(sim["sent"]), rel=1e-9)
        assert [r["ns_GFLOP"] * 1e9 for r in real["per_rank"]] == pytest.approx(sim["ns_flops"], rel=1e-9)
