"""The performance contract's figures (docs/design.md, *Performance contract*) as bench reports them.

One place for the numbers, with no torch import, so that bench.step and the GPU run's summary judge
against them and bench.docs_tables prints them beside old results without drifting apart.

CPU: the torch backend's two targets, and one yardstick of the bench's own that is not part of the
contract (`ns_gram`: how far the Gram form and shorter schedules bring a step below the bare textbook
NS). GPU: the targets on an H100/H200, keyed by the figure of the GPU run's summary.
"""

from __future__ import annotations

CPU = {
    "overhead": dict(
        name="torch backend vs reference speedup",
        spec="Performance contract: torch backend on CPU >= 3x faster than the reference where per-tensor overhead "
             "dominates (24 layers, d=64)",
        target=3.0,
        better="higher",
    ),
    "ns": dict(
        name="torch step / bare NS matmuls",
        spec="Performance contract: torch backend on CPU <= 1.1x the bare textbook NS matmul time where FLOPs dominate "
             "(12 layers, d=256)",
        target=1.1,  # runs before 2026-12-07 were held to 1.3x (their JSON says so)
        better="lower",
    ),
    "ns_gram": dict(
        name="torch step / bare textbook NS matmuls (Gram form and schedules)",
        spec="NS-method yardstick of the bench (not a contract target): mango's step <= 0.7x the bare batched textbook "
             "NS matmul time on the FLOP-bound CPU set (12 layers, d=256), by the Gram form and schedules",
        target=0.7,
        better="lower",
    ),
}

# figure of the GPU run's summary: (column label, comparison, target)
GPU = {
    "x_floor": ("× floor", "<=", 1.5),  # step time / roofline floor measured on this device (the target is an H100's)
    "vs_muon_adamw": ("vs Muon+AdamW", ">=", 3.0),  # speed-up vs torch.optim.Muon + AdamW(fused)
    "vs_torch": ("vs mango torch", ">=", 1.0),  # never slower than mango's own torch backend
    "vs_reference": ("vs eager ref.", ">=", 5.0),
    "launches": ("launches", "<=", 64),  # per step, the kernel design's budget
    "memory_x_budget": ("peak mem / budget", "<=", 1.0),  # peak extra / (state + 2 × largest NS bucket in its NS dtype)
}
HOST_US = 300  # host work per triton step at GPT-2 124M, launch dry run on a CPU


def met(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target
