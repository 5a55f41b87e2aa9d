"""`python -m bench.comm`: bytes communicated per optimizer step under FSDP2, and the NS load balance.

Runs WORLD ranks (gloo on CPU, forked from this process, rendezvous through a FileStore, no TCP
port), shards a GPT of bench/gpt.py with `fully_shard` (built on the meta device, so each rank
only ever allocates its shards), builds a mango preset on it and takes `--steps` optimizer steps
on synthetic sharded gradients (what the optimizer communicates does not depend on the values).
The numbers are what `mango.distributed`'s backend records for the collectives it actually
issues (`CommStats`): payload bytes, and bytes that leave / reach each rank (all_to_all: the
segments for / from other ranks exactly; all-reduce: the ring algorithm's 2·(P−1)/P·payload).
The Newton–Schulz load is the FLOPs each owner rank ran and, measured, the seconds it took.

    python -m bench.comm                                  # GPT-2 124M, tied head with NS, mango preset, 4 ranks
    python -m bench.comm --preset muon --world 2
    python -m bench.comm --tied-role embedding            # what mango.param_groups picks for a tied model
    python -m bench.comm --model tiny --world 2 --steps 2 # seconds, any machine
    python -m bench.comm --ns-dtype bf16                  # NS operands (and their traffic) in bf16, as on CUDA
    python -m bench.comm --mode ddp-split --world 2       # DDP with the NS split (Mango(..., process_group=...))
    python -m bench.comm --simulate                       # GPT-2 124M and Llama-1B, FSDP2 and DDP-split, 2/4/8 ranks
                                                          # from the plan alone (bench/comm_model.py), seconds

Writes comm_<model>_<world>ranks_<preset>[_<tag>].json and .md under --out (bench/results/) and
prints the markdown table. Forward/backward traffic of FSDP2 itself is not measured; the report
gives its usual analytic size for comparison.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mango  # noqa: E402

from .gpt import GPT, GPTConfig  # noqa: E402

MODELS = {
    # GPT-2 124M: 50257-token vocabulary, 1024 positions, 12 layers of d=768 with 12 heads, tied head
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_weights=True),
    "gpt2-untied": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_weights=False),
    "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024, tie_weights=True),
    "tiny": dict(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64, tie_weights=True),
}
PRESETS = ("mango", "muon", "lamb")
MB = 1e6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.comm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--world", type=int, default=4, help="ranks (processes)")
    p.add_argument("--preset", default="mango", choices=PRESETS)
    p.add_argument("--tied-role", default="head", choices=("head", "embedding"),
                   help="role of a tied wte/lm_head tensor: 'head' (NS, what the performance contract counts) "
                        "or 'embedding' (mango.param_groups' pick)")
    p.add_argument("--ns-dtype", default="auto", choices=("auto", "bf16", "fp32"), help="NS operand dtype (auto: fp32 on CPU)")
    p.add_argument("--ns-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="optimizer steps (the last one is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / world)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--mode", default="fsdp2", choices=("fsdp2", "ddp-split"),
                   help="fsdp2: fully_shard'ed model; ddp-split: whole params, NS split by Mango(process_group=)")  # fmt: skip
    p.add_argument("--simulate", action="store_true", help="simulated ranks from the plan (bench/comm_model.py): --models, --worlds, both modes")
    p.add_argument("--models", nargs="+", default=["gpt2", "llama-1b"], help="with --simulate: from " + ", ".join(sorted([*MODELS, "llama-1b"])))
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4, 8], help="with --simulate")
    return p


# ------------------------------------------------------------------------------------------------
# one rank
# ------------------------------------------------------------------------------------------------


def _make_optimizer(model, args, process_group=None):
    overrides = {"wte.weight": {"role": "head"}} if (args.tied_role == "head" and model.config.tie_weights) else None
    with warnings.catch_warnings():  # the tied wte/lm_head gets one role: the one asked for here
        warnings.filterwarnings("ignore", message=".*is tied into modules with different roles.*")
        groups = mango.param_groups(model, qkv_heads=model.qkv_heads, overrides=overrides)
    kw = dict(backend="torch", ns_steps=args.ns_steps)
    if process_group is not None:
        kw["process_group"] = process_group
    if args.ns_dtype != "auto":
        kw["ns_dtype"] = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.ns_dtype]
    return getattr(mango.presets, args.preset)(groups, **kw), groups


def _rank_main(rank, args, store_path, out_path):
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    world = args.world
    split = args.mode == "ddp-split"
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=args.timeout))  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    cfg = GPTConfig(**MODELS[args.model])
    with torch.device("meta"):
        model = GPT(cfg)
    if not split:
        for block in model.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    if split and cfg.tie_weights:  # to_empty gives every module its own tensor: tie the head again
        model.lm_head.weight = model.wte.weight
    gen = torch.Generator().manual_seed(1000 + (0 if split else rank))  # DDP: the same gradients on every rank
    local_of = (lambda p: p) if split else (lambda p: p.to_local())  # noqa: E731
    with torch.no_grad():
        for p in model.parameters():
            local_of(p).normal_(0.0, 0.02, generator=gen)
    opt, groups = _make_optimizer(model, args, process_group=mesh if split else None)
    params = [p for g in opt.param_groups for p in g["params"]]
    backend = None
    step_seconds = []
    for _ in range(args.steps):
        with torch.no_grad():
            for p in params:
                local = torch.randn(local_of(p).shape, generator=gen, dtype=p.dtype)
                p.grad = local if split else type(p).from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        if backend is None:
            backend = opt._backend_for(params[0].device, not split)
            backend.profile = True
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        step_seconds.append(time.perf_counter() - t0)
    mine = dict(
        rank=rank,
        collectives=backend.comm.last_step,
        summary=backend.comm.step_summary(),
        plan_collectives=backend.comm.plan,
        ns_flops=backend.comm.ns_flops,
        ns_seconds=backend.comm.ns_seconds,
        step_seconds=step_seconds,
        ns_loads=({"world": backend.ns_loads} if split else {",".join(map(str, k)): v for k, v in backend.ns_loads.items()}),
        local_param_bytes=sum(local_of(p).numel() * p.element_size() for p in params),
    )
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        from mango.ns_engine import auto_dtype

        described = mango.describe(groups)
        ns_dtypes = sorted({str(auto_dtype(g, "textbook", params[0].device)).replace("torch.", "") for g in opt.param_groups})
        info = dict(
            ns_dtypes=ns_dtypes,
            params=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            ns_param_bytes=sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"]
                               if mango.config.resolve_norm(g, mango.config.resolve_role(g, p)) in ("ns", "ns_split")),  # fmt: skip
            describe=described,
        )
        with open(out_path, "w") as f:
            json.dump(dict(ranks=everyone, model=info), f, default=str)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(args) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mango-comm-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, args, store_path, out_path)) for r in range(args.world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if any(p.exitcode != 0 for p in procs) or not os.path.exists(out_path):
            raise SystemExit(f"bench.comm: ranks exited with {[p.exitcode for p in procs]}")
        with open(out_path) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def summarize(raw: dict, args) -> dict:
    ranks = raw["ranks"]
    P = len(ranks)
    per_rank = []
    for r in ranks:
        s = r["summary"]
        per_rank.append(dict(
            rank=r["rank"],
            sent_MB=sum(v["sent_bytes"] for v in s.values()) / MB,
            recv_MB=sum(v["recv_bytes"] for v in s.values()) / MB,
            ns_GFLOP=r["ns_flops"] / 1e9,
            ns_seconds=r["ns_seconds"],
            step_seconds=r["step_seconds"][-1],
        ))  # fmt: skip
    kinds: dict = {}  # (op, what) -> calls and bytes of this step
    for r in ranks:
        mine: dict = {}
        for c in r["collectives"]:
            m = mine.setdefault((c["op"], c["what"]), dict(calls=0, payload=0, sent=0, recv=0))
            m["calls"] += 1
            m["payload"] += c["payload_bytes"]
            m["sent"] += c["sent_bytes"]
            m["recv"] += c["recv_bytes"]
        for key, m in mine.items():
            k = kinds.setdefault(key, dict(calls=m["calls"], payload_MB_max=0.0, sent_MB_total=0.0, recv_MB_total=0.0))
            k["payload_MB_max"] = max(k["payload_MB_max"], m["payload"] / MB)
            k["sent_MB_total"] += m["sent"] / MB
            k["recv_MB_total"] += m["recv"] / MB
    flops = [x["ns_GFLOP"] for x in per_rank]
    mean = sum(flops) / P
    param_bytes = raw["model"]["param_bytes"]
    return dict(
        config=dict(model=args.model, world=P, preset=args.preset, tied_role=args.tied_role, mode=args.mode,
                    ns_dtype=f"{args.ns_dtype} ({'/'.join(raw['model']['ns_dtypes'])})",
                    ns_steps=args.ns_steps, backend="gloo (CPU)", torch=torch.__version__),  # fmt: skip
        model=dict(params=raw["model"]["params"], param_MB=param_bytes / MB, ns_param_MB=raw["model"]["ns_param_bytes"] / MB),
        collectives_per_step={f"{op}: {what}": v for (op, what), v in kinds.items()},
        per_rank=per_rank,
        total_sent_MB=sum(x["sent_MB"] for x in per_rank),
        max_rank_sent_MB=max(x["sent_MB"] for x in per_rank),
        max_rank_recv_MB=max(x["recv_MB"] for x in per_rank),
        ns_balance=dict(max_over_mean=(max(flops) / mean) if mean else float("nan"), GFLOP_per_rank=flops,
                        total_GFLOP=sum(flops), planned=ranks[0]["ns_loads"]),  # fmt: skip
        fsdp2_reference_MB_per_rank=3 * (P - 1) / P * param_bytes / MB,
        plan_collectives=ranks[0]["plan_collectives"],
    )


def markdown(s: dict) -> str:
    c = s["config"]
    lines = [
        f"### mango under {'DDP, NS split' if c.get('mode') == 'ddp-split' else 'FSDP2'}: communication per optimizer step — "
        f"{c['model']}, {c['preset']} preset, {c['world']} ranks",
        "",
        f"{s['model']['params'] / 1e6:.1f} M params ({s['model']['param_MB']:.0f} MB fp32), of which {s['model']['ns_param_MB']:.0f} MB "
        f"orthogonalized by Newton–Schulz; tied head role: {c['tied_role']}; NS operands: {c['ns_dtype']} "
        f"({c['ns_steps']} steps); measured on {c['backend']}, torch {c['torch']}.",
        "",
        "| collective | what | calls / step | payload per rank (MB, all calls, busiest rank) | sent, all ranks (MB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, k in s["collectives_per_step"].items():
        op, what = key.split(": ", 1)
        lines.append(f"| {op} | {what} | {k['calls']} | {k['payload_MB_max']:.3f} | {k['sent_MB_total']:.1f} |")
    lines += [
        "",
        "| rank | sent (MB) | received (MB) | NS GFLOP | NS seconds | step seconds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in s["per_rank"]:
        lines.append(f"| {x['rank']} | {x['sent_MB']:.1f} | {x['recv_MB']:.1f} | {x['ns_GFLOP']:.1f} | {x['ns_seconds']:.2f} | {x['step_seconds']:.2f} |")
    b = s["ns_balance"]
    balance = (
        f"NS load: {b['total_GFLOP']:.0f} GFLOP, max/mean over ranks **{b['max_over_mean']:.3f}** (the seconds are measured "
        f"on a CPU shared by all ranks: indicative only)"
        if b["total_GFLOP"] > 0
        else "No Newton–Schulz in this preset"
    )
    lines += [
        "",
        f"Total sent per step, all ranks: **{s['total_sent_MB']:.1f} MB** (busiest rank: {s['max_rank_sent_MB']:.1f} MB sent, "
        f"{s['max_rank_recv_MB']:.1f} MB received). {balance}. For comparison, FSDP2's own parameter all-gathers (forward "
        f"and backward) and gradient reduce-scatter move about 3·(P−1)/P·params = {s['fsdp2_reference_MB_per_rank']:.0f} MB "
        f"per rank per step in fp32.",
    ]
    return "\n".join(lines) + "\n"


def simulated_model(name: str, args):
    """(optimizer, label) for a model built on the meta device, labelled and configured as the real run does it."""
    if name == "llama-1b":  # Llama-3.2-1B's shape (the GPU run's set), tied embedding; param_groups with no hints
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                       num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True)  # fmt: skip
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = mango.param_groups(model)
        kw = dict(backend="torch", ns_steps=args.ns_steps)
        if args.ns_dtype != "auto":
            kw["ns_dtype"] = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.ns_dtype]
        return getattr(mango.presets, args.preset)(groups, **kw), "Llama-3.2-1B shape (tied embedding)"
    with torch.device("meta"):
        model = GPT(GPTConfig(**MODELS[name]))
    opt, _ = _make_optimizer(model, args)
    return opt, f"{name} (tied head role: {args.tied_role})"


def simulate(args) -> dict:
    from . import comm_model

    out, md = {}, []
    for name in args.models:
        opt, label = simulated_model(name, args)
        tensors = comm_model.ns_tensors(opt, device="cuda")  # the NS dtypes of a GPU step
        results = comm_model.simulate(tensors, ("fsdp2", "ddp-split"), args.worlds)
        out[name] = results
        md.append(comm_model.markdown(label, f"{args.ns_dtype}, as on CUDA", results))
    return dict(results=out, markdown="\n".join(md))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.simulate:
        s = simulate(args)
        print(s["markdown"])
        os.makedirs(args.out, exist_ok=True)
        name = "comm_simulated_" + "_".join(args.models) + (f"_{args.tag}" if args.tag else "")
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(s["results"], f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(s["markdown"])
        return s
    t0 = time.perf_counter()
    raw = run_ranks(args)
    s = summarize(raw, args)
    s["wall_seconds"] = time.perf_counter() - t0
    md = markdown(s)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    mode = "" if args.mode == "fsdp2" else "_ddp_split"
    name = f"comm_{args.model}_{args.world}ranks_{args.preset}{mode}" + (f"_{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(s, f, indent=1)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(md)
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
