"""What each stage runs, and its time budget: on the GPU machine, and in the CPU dry run.

GPU (one H100/H200; a device session has 15 minutes with the machine's start and the transfers,
so the run takes <= 7 minutes by default, leaving room for one short follow-up; the budgets add up
to 410 s of the run's 420):

- tests: every test with a CUDA mode in 3 parallel shards (most of a first run is Triton compiling
  on the CPU; 107 s on the H200, 2026-12-04);
- host: bench.host's Python time per triton step at HF GPT-2 124M with the NS engines an H100/H200
  chooses (`--choices sm_90`; a launch dry run on the CPU);
- sweep: every NS engine on the NS buckets of the step stage's sets, and the ARCH_TABLE entry (the
  cheap timings first, then tile sizes until its budget);
- step: bench.step on bench `gpt2-124m` (its 50257×768 vocabulary matrix under NS, role `head`), HF
  GPT-2 124M and 350M (tied to the embedding: no NS on it) and the Llama-3.2-1B-shaped model, every
  set with its own share of the stage's budget (by its contenders and size), every contender on every set, in the order mango's own, torch's, the peers, the yardsticks: the eager
  reference and the one-round variant on `gpt2-124m` only (the reference alone took 15 s at 350M),
  torch.compile(reference) left out with its reason (it did not compile GPT-2 124M's step in 50 s);
  the per-bucket NS table is the sweep stage's; fewer timed steps on the large sets;
- fsdp: bench.fsdp_one_gpu, a 4-layer HF GPT-2 fully_shard'ed in a world of one (nccl) on the sharded
  triton backend against the plain triton step: their difference and both step times (after the step
  stage, whose Triton kernels it finds compiled; its own share of the time: 20 s);
- train: AdamW vs Muon vs MANGO at the GPT-2 124M shape (12 layers, d=768, context 1024, byte
  vocabulary, bf16 autocast), up to 300 steps of 16 sequences each within its share (~60 ms a
  step: each run trains ~8 s after its ~10 s start, ~130 steps, plus what earlier stages left; a run
  cut by its share is compared with the others at the common step), then the first 50 steps again on
  the torch backend.

Dry run (CPU): the same stages, sets and contenders at tiny sizes, kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from .train_stage import TRITON_SPEC

FIRST = ["test_kernels", "test_newton_schulz", "test_triton_backend"]  # kernels and backends first
SETS = "gpt2-124m,hf-gpt2-124m,hf-gpt2-350m,llama-1b"
DRY_SETS = "tiny,hf-gpt2-tiny,llama-tiny"
# mango first (its step, the captured step, the torch backend), then torch's Muon + AdamW and the
# peers (heavyball compiles: last of them), AdamW, then what runs on the first set only
CONTENDERS = "triton,triton_graph,torch,muon_adamw,kj_muon,emerging_muon,heavyball_muon,adamw,reference,triton_one_round,gram_ns"
ONLY_FIRST_SET = "the eager per-tensor reference runs on gpt2-124m only: at 350M it alone took 15 s of the run's minutes"
ONE_ROUND_FIRST_SET = "the one-round variant (beyond the memory budget) runs on gpt2-124m only, to fit the run's minutes"
COMPILE_LEFT_OUT = ("compile=left out of the GPU run: compiling the reference's whole step did not finish in 50 s for "
                    "GPT-2 124M on an H200, more than the run's minutes can spare; `python -m bench.step --optimizers "
                    "compile --compile-timeout 900` measures it")  # fmt: skip
GRAM_NS_LEFT_OUT = ("gram_ns=left out of the GPU run: gram-newton-schulz's NS runs in CuTe-DSL kernels (nvidia-cutlass-dsl, "
                    "wheels of 75 and 79 MB) that cannot travel to the GPU machine within the device tool's 64 MiB; "
                    "bench/gpu/wheels.txt")  # fmt: skip


def _leave_out(sets: str) -> list:
    first, *rest = sets.split(",")
    out = [COMPILE_LEFT_OUT, GRAM_NS_LEFT_OUT]
    if rest:
        out += [f"reference@{','.join(rest)}={ONLY_FIRST_SET}", f"triton_one_round@{','.join(rest)}={ONE_ROUND_FIRST_SET}"]
    return [a for item in out for a in ("--leave-out", item)]


GPU = {
    "budget_s": 420,
    "stages": {
        "tests": {"budget_s": 95, "paths": ["tests"], "shards": 3, "test_timeout_s": 90, "grace_s": 15, "first": FIRST,
                  "env": {"MANGO_TEST_DEVICE": "cuda", "TRITON_INTERPRET": None}},
        "host": {"budget_s": 15, "args": ["--steps", "50", "--choices", "sm_90"], "env": {"TRITON_INTERPRET": "1"}},
        "sweep": {"budget_s": 35, "args": ["--sets", SETS], "env": {"TRITON_INTERPRET": None}},
        "step": {"budget_s": 170, "args": ["--sets", SETS, "--optimizers", CONTENDERS, "--budget", "0.5", "--no-kernels",
                                           *_leave_out(SETS)],
                 "env": {"TRITON_INTERPRET": None}},
        "fsdp": {"budget_s": 20, "args": ["--steps", "3", "--timed-steps", "20"], "env": {"TRITON_INTERPRET": None}},
        "train": {"budget_s": 75, "specs": ["adamw", "muon", TRITON_SPEC], "startup_s": 10,
                  "args": ["--size", "gpt2", "--steps", "300", "--warmup", "30", "--batch", "16", "--micro-batch", "16",
                           "--eval-every", "100", "--eval-batches", "4", "--max-bytes", "16000000"],
                  "agreement_steps": 50, "agreement_tolerance": 0.05, "agreement_budget_s": 20,
                  "env": {"TRITON_INTERPRET": None}},
    },
}  # fmt: skip

DRY = {
    "budget_s": 190,
    "stages": {
        "tests": {"budget_s": 35, "paths": ["tests/test_kernels.py", "tests/test_triton_backend.py"], "shards": 2,
                  "test_timeout_s": 60, "grace_s": 10, "first": FIRST, "sample": 2,
                  "env": {"MANGO_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1"}},
        "host": {"budget_s": 20, "args": ["--steps", "3", "--sets", "hf-gpt2-124m-tied", "--choices", "sm_90"], "env": {"TRITON_INTERPRET": "1"}},
        "sweep": {"budget_s": 25, "backstop_s": 5, "args": ["--quick", "--device", "cpu"], "env": {"TRITON_INTERPRET": "1"}},
        "step": {"budget_s": 45, "backstop_s": 10,
                 "args": ["--quick", "--device", "cpu", "--threads", "1", "--sets", DRY_SETS, "--optimizers", CONTENDERS,
                          "--no-kernels", "--bare-ns", *_leave_out(DRY_SETS)],
                 "env": {"TRITON_INTERPRET": "1"}},
        "fsdp": {"budget_s": 20, "args": ["--cpu-dry-run", "--steps", "1", "--n-layer", "1"],
                 "env": {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}},
        "train": {"budget_s": 45, "specs": ["adamw", "muon", TRITON_SPEC],
                  "args": ["--quick", "--device", "cpu", "--threads", "1", "--steps", "4", "--warmup", "1", "--eval-every", "2",
                           "--eval-batches", "1"],
                  "agreement_steps": 3, "agreement_tolerance": 0.05, "agreement_budget_s": 15,
                  "env": {"TRITON_INTERPRET": "1"}},
    },
}  # fmt: skip
