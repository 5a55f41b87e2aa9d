"""What each stage runs, and its time budget: on the GPU machine, and in the CPU dry run.

GPU (one H200, ≤ 8 min for everything; the budgets add up to 470 s, leaving start-up slack):
tests in 3 parallel shards (most of a first run is Triton compiling on the CPU; 107 s on the
H200, 2026-12-04); the step benchmark on GPT-2 124M and 350M (~120 s of contenders there),
mango's backends and the peers first, the slow eager reference, the peers that compile and the
one-round variant after them, so a spent budget cuts the least telling contenders;
torch.compile(reference) is left out with its reason in every output (on the H200 it did not
compile GPT-2 124M's step in 50 s, and 350M has twice the tensors); training at the
GPT-2 124M shape (12 layers, d=768, 12 heads, context 1024, byte vocabulary, bf16 autocast) for
400 steps of 16 sequences (~25 s of training per optimizer at ~60 ms/step; a run that needs
longer is stopped at its share of the budget and compared at the common step), then the first
50 steps again on the torch backend.

Dry run (CPU, < 2 min): the same stages and files at tiny sizes, kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from .train_stage import TRITON_SPEC

FIRST = ["test_kernels", "test_newton_schulz", "test_triton_backend"]  # kernels and backends first
# cheapest and most telling first; the peers that compile (heavyball, gram-newton-schulz's torch
# path) after the eager reference, so a spent budget cuts them and the one-round variant first
CONTENDERS = "triton,torch,muon_adamw,adamw,kj_muon,emerging_muon,reference,heavyball_muon,gram_ns,triton_one_round"
COMPILE_LEFT_OUT = ("compile=left out of the GPU run: compiling the reference's whole step did not finish in 50 s for "
                    "GPT-2 124M on an H200, more than the run's 8 minutes can spare; `python -m bench.step --optimizers "
                    "compile --compile-timeout 900` measures it")  # fmt: skip

GPU = {
    "budget_s": 470,
    "stages": {
        "tests": {"budget_s": 125, "paths": ["tests"], "shards": 3, "test_timeout_s": 120, "grace_s": 20, "first": FIRST,
                  "env": {"MANGO_TEST_DEVICE": "cuda", "TRITON_INTERPRET": None}},
        "step": {"budget_s": 215, "args": ["--sets", "gpt2-124m,gpt2-350m", "--optimizers", CONTENDERS, "--budget", "1",
                                           "--leave-out", COMPILE_LEFT_OUT],
                 "env": {"TRITON_INTERPRET": None}},
        "train": {"budget_s": 130, "specs": ["adamw", "muon", TRITON_SPEC],
                  "args": ["--size", "gpt2", "--steps", "400", "--warmup", "40", "--batch", "16", "--micro-batch", "16",
                           "--eval-every", "100", "--eval-batches", "4", "--max-bytes", "16000000"],
                  "agreement_steps": 50, "agreement_tolerance": 0.05, "agreement_budget_s": 25,
                  "env": {"TRITON_INTERPRET": None}},
    },
}  # fmt: skip

DRY = {
    "budget_s": 115,
    "stages": {
        "tests": {"budget_s": 35, "paths": ["tests/test_kernels.py", "tests/test_triton_backend.py"], "shards": 2,
                  "test_timeout_s": 60, "grace_s": 10, "first": FIRST, "sample": 2,
                  "env": {"MANGO_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1"}},
        "step": {"budget_s": 40, "backstop_s": 10, "args": ["--quick", "--device", "cpu", "--threads", "1"],
                 "env": {"TRITON_INTERPRET": "1"}},
        "train": {"budget_s": 60, "specs": ["adamw", "muon", TRITON_SPEC],
                  "args": ["--quick", "--device", "cpu", "--threads", "1", "--steps", "4", "--warmup", "1", "--eval-every", "2",
                           "--eval-batches", "1"],
                  "agreement_steps": 3, "agreement_tolerance": 0.05, "agreement_budget_s": 15,
                  "env": {"TRITON_INTERPRET": "1"}},
    },
}  # fmt: skip
