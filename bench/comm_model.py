"""Simulated ranks: what one optimizer step communicates, from the plan alone (no processes, no NS).

`python -m bench.comm --simulate` uses this for world sizes and models a CPU box cannot run for
real (Llama-1B's fp32 state alone is ~20 GB). The model is built on the meta device, mango builds
its plan, and the same functions the distributed backends use decide owners and layouts
(`mango.distributed.assign_owners`, `ns_flops`, `use_row_sharded_ns`, fully_shard's row split), so the
bytes are the ones those backends would move; `tests/test_distributed.py` checks them against a
real gloo run. Per rank and step:

FSDP2 (mango.distributed)
    owner NS: all_to_all of every matrix's rows to its owner and back, each rank's block padded to
    the largest shard; very tall matrices row-sharded (one cols×cols fp32 all-reduce per NS step).
    Minimum: the unpadded rows, to the owner and back — every row of a matrix must meet on one
    rank for its NS — and, for the row-sharded ones, their Gram all-reduces.
DDP with the NS split (mango.ddp, torch backend)
    one all-gather per NS bucket of the results, each rank's share padded to the largest share; very
    tall matrices row-split over every rank (one cols×cols fp32 all-reduce per NS step, rows gathered).
    Minimum: every result a rank did not compute, received once (and those Gram all-reduces).

all_reduce / all_gather wire bytes are the ring algorithm's, as `CommStats` counts them.
"""

from __future__ import annotations

import math
import torch

import mango

from mango.distributed import assign_owners, ns_flops, row_sharded_ns_flops, use_row_sharded_ns

NS_NORMS = ("ns", "ns_split")


def shard_rows(rows: int, world: int) -> list:
    """fully_shard's split of dim 0 (torch.chunk): ceil(rows / world) per rank, the last ones short or empty."""
    chunk = -(-rows // world) if rows else 0
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def ns_tensors(opt, device="cuda") -> list:
    """Every NS-bound tensor of the plan `opt` (a mango optimizer, params on the meta device) builds,
    in plan order: dict(group, bucket, shape, block, norm, experts, steps, prescale, esize), esize
    being the bytes of one element in the NS operand dtype the backends pick for it on `device`."""
    from mango import ns_engine

    device = torch.device(device)
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.empty_like(p)
    active, _, key = opt._collect()
    plan = opt._build_plan(active, key)
    out = []
    for bi, b in enumerate(plan.buckets):
        group = opt.param_groups[b.group_index]
        steps = len(mango.config.ns_schedule(group))
        requests = 0  # the FSDP2 backend's round of each norm bucket: its place among the bucket's collectives
        for ni, nb in enumerate(b.norm_buckets):
            talks = not nb.experts and (nb.norm in (*NS_NORMS, "l2", "l2_split") or (nb.norm == "l2_col" and nb.orientation == "in_out"))
            requests += talks
            if nb.norm not in NS_NORMS:
                continue
            for i in nb.slots:
                p = b.slots[i].param
                r, c = nb.block_shape
                dt = ns_engine.choose(group, r, c, b.dtype, device, "torch").dtype
                out.append(dict(group=b.group_index, bucket=(bi, ni), shape=tuple(p.shape), block=tuple(nb.block_shape), norm=nb.norm,
                                experts=nb.experts, orientation=nb.orientation, round=requests - 1, steps=steps, prescale=group["ns_prescale"], esize=torch.finfo(dt).bits // 8))  # fmt: skip
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = None
    return out


def _cost(t) -> float:
    return ns_flops(t["shape"], t["block"], max(t["steps"], 1)) if math.prod(t["shape"]) else 0.0


def _row_split(t, world) -> bool:
    return not t["experts"] and t["orientation"] == "out_in" and use_row_sharded_ns(t["shape"], t["norm"], t["prescale"], t["steps"], world)


def ddp_split(tensors, world: int) -> dict:
    """mango.ddp (torch backend): owners over the NS tensors, one all-gather per NS bucket; very tall
    matrices row-split over every rank (a Gram all-reduce per NS step, their rows all-gathered)."""
    base = [0.0] * world
    owned = [t for t in tensors if not _row_split(t, world)]
    tall = [t for t in tensors if _row_split(t, world)]
    for t in tall:
        for q, n in enumerate(shard_rows(t["shape"][0], world)):
            base[q] += row_sharded_ns_flops(n, math.prod(t["shape"][1:]), t["steps"])
    owners, loads = assign_owners([_cost(t) for t in owned], world, base)
    buckets: dict = {}  # NS bucket -> (rank, bytes) of the pieces its all-gather carries
    for t, q in zip(owned, owners):
        buckets.setdefault(t["bucket"], []).append((q, math.prod(t["shape"]) * t["esize"]))
    for t in tall:
        cols = math.prod(t["shape"][1:])
        for q, n in enumerate(shard_rows(t["shape"][0], world)):
            buckets.setdefault(t["bucket"], []).append((q, n * cols * t["esize"]))
    ring, row_sharded_calls = 0, 0
    for b in {t["bucket"] for t in tall}:  # per NS step one all-reduce of the bucket's fp32 Gram matrices
        members = [t for t in tall if t["bucket"] == b]
        n = sum(math.prod(t["shape"][1:]) ** 2 * 4 for t in members)
        ring += members[0]["steps"] * (2 * (world - 1) * n // world)
        row_sharded_calls += members[0]["steps"]
    sent = [ring] * world
    own = [0] * world
    total = 0
    for pieces in buckets.values():
        share = [0] * world
        for q, n in pieces:
            share[q] += n
            own[q] += n
            total += n
        chunk = max(share)
        for r in range(world):
            sent[r] += (world - 1) * chunk
    recv_min = [total - own[r] + ring for r in range(world)]
    collectives = {"all_gather: NS results": len(buckets)}
    if row_sharded_calls:
        collectives["all_reduce: NS Gram"] = row_sharded_calls
    return dict(mode="ddp-split", world=world, collectives=collectives, sent=sent, recv=list(sent),
                recv_min=recv_min, sent_min=recv_min, ns_flops=loads, ns_total=sum(loads))  # fmt: skip


def fsdp2(tensors, world: int) -> dict:
    """mango.distributed: owner NS (all_to_all gather + scatter, padded blocks), row-sharded tall
    matrices (Gram all-reduces), experts whole on their ranks (no NS traffic)."""
    base = [0.0] * world
    jobs = []
    row_sharded_rounds: dict = {}  # round -> (NS steps, fp32 cols² bytes of its row-sharded matrices)
    expert_flops = [0.0] * world
    rounds = set()  # the rounds (of the coroutine batching, mango.distributed) with owner-mode NS
    for t in tensors:
        rows, cols = t["shape"][0], math.prod(t["shape"][1:])
        split = shard_rows(rows, world)
        if t["experts"]:  # Shard(0) splits the expert dim: whole experts, NS local
            per = ns_flops(t["shape"][1:] if len(t["shape"]) > 2 else t["shape"], t["block"], max(t["steps"], 1))
            for r in range(world):
                expert_flops[r] += split[r] * per
            continue
        if use_row_sharded_ns(t["shape"], t["norm"], t["prescale"], t["steps"], world):
            for r in range(world):
                base[r] += row_sharded_ns_flops(split[r], cols, t["steps"])
            steps, n = row_sharded_rounds.get(t["round"], (0, 0))
            row_sharded_rounds[t["round"]] = (max(steps, t["steps"]), n + cols * cols * 4)
            continue
        jobs.append((t, split, cols))
        rounds.add(t["round"])
    owners, loads = assign_owners([_cost(t) for t, _, _ in jobs], world, base)
    sent = [0] * world
    sent_min = [0] * world
    for (t, split, cols), q in zip(jobs, owners):
        esize = t["esize"]
        pad = max(split) * cols * esize
        for r in range(world):
            if r == q:
                sent[r] += (world - 1) * pad  # scatter: a padded block to every other rank
                sent_min[r] += (sum(split) - split[r]) * cols * esize
            else:
                sent[r] += pad  # gather: its padded block to the owner
                sent_min[r] += split[r] * cols * esize
    ring = sum(steps * (2 * (world - 1) * n // world) for steps, n in row_sharded_rounds.values())
    sent = [s + ring for s in sent]
    sent_min = [s + ring for s in sent_min]
    collectives = {"all_to_all: NS gather": len(rounds), "all_to_all: NS scatter": len(rounds), "all_reduce: sums of squares": 1}
    if row_sharded_rounds:
        collectives["all_reduce: NS Gram"] = sum(steps for steps, _ in row_sharded_rounds.values())
    flops = [a + b for a, b in zip(loads, expert_flops)]
    return dict(mode="fsdp2", world=world, collectives=collectives, sent=sent, recv=list(sent), sent_min=sent_min, recv_min=list(sent_min),
                ns_flops=flops, ns_total=sum(flops))  # fmt: skip


MODES = {"fsdp2": fsdp2, "ddp-split": ddp_split}


def simulate(tensors, modes, worlds) -> list:
    return [MODES[m](tensors, w) for m in modes for w in worlds]


def markdown(name: str, dtype: str, results: list) -> str:
    MB = 1e6
    lines = [
        f"### {name}: communication and NS work per optimizer step, simulated ranks (NS operands {dtype})",
        "",
        "| mode | ranks | collectives / step | busiest rank sent (MB) | minimum (MB) | ratio | NS TFLOP, busiest rank | of the whole NS |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        calls = " + ".join(f"{v} {k.split(': ')[0]} ({k.split(': ')[1]})" for k, v in r["collectives"].items() if v)
        busiest = max(range(r["world"]), key=lambda q: r["sent"][q])
        s, m = r["sent"][busiest] / MB, r["sent_min"][busiest] / MB
        share = max(r["ns_flops"]) / r["ns_total"] if r["ns_total"] else float("nan")
        lines.append(f"| {r['mode']} | {r['world']} | {calls} | {s:.1f} | {m:.1f} | {s / m if m else float('nan'):.2f} | "
                     f"{max(r['ns_flops']) / 1e12:.3f} | {share:.3f} (1/{r['world']} = {1 / r['world']:.3f}) |")  # fmt: skip
    return "\n".join(lines) + "\n"
