"""`python -m bench.fsdp_one_gpu`: the FSDP2 step on the triton backend, on one GPU, against the plain step.

A process group of one rank (nccl, or gloo where nccl is missing), a small HF GPT-2 built from a
config and `fully_shard`ed (every parameter a DTensor, so mango takes its sharded triton backend,
mango.sharded_triton: the fused kernels on the local shards, NS on the owner rank through the
collectives, here with itself), and an identical unsharded copy on the plain triton backend. Both
take the same seeded gradients for `--steps` steps; reported: the largest |Δ| between their
parameters (relative to the largest parameter) after each step, then each step's median time
(bench.measure: CUDA events around the step, the two interleaved, after warm-up).

    python -m bench.fsdp_one_gpu --out fsdp_one_gpu.json          # CUDA
    python -m bench.fsdp_one_gpu --cpu-dry-run --steps 1 --out x.json   # CPU, TRITON_INTERPRET=1, tiny sizes (the suite's run)

The two steps need not agree bit for bit: the sharded step orthogonalizes on its owner rank with
torch's batched NS where one GPU may run the NS kernels, so they agree within the NS operand
dtype's bound (bf16/fp16: 2e-2). Prints a markdown block and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

SIZES = {  # HF GPT-2 configs: a small model on the GPU (the tied 50257-row head included), a tiny one on the CPU
    "gpu": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=4, n_head=12),
    "cpu": dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2),
}
NS_BOUND = 2e-2  # the correctness contract's bound for NS in bf16 / fp16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fsdp_one_gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--cpu-dry-run", action="store_true", help="CPU tensors, the Triton interpreter, the tiny model: checks the script runs")
    p.add_argument("--steps", type=int, default=3, help="compared steps (the same gradients on both)")
    p.add_argument("--timed-steps", type=int, default=20, help="timed steps of each (after 3 warm-up steps)")
    p.add_argument("--n-layer", type=int, help="override the model's depth")
    return p


def init_single_rank_group(cuda: bool) -> str:
    """A world of one: nccl on a GPU where torch has it, else gloo; the store in this process."""
    import torch.distributed as dist

    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return backend


def build_models(config: dict, device, mesh):
    """An HF GPT-2 from `config` (float32, seeded), fully_shard'ed on `mesh`, and an identical plain copy."""
    import torch
    import transformers

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**config, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    plain = transformers.GPT2LMHeadModel(cfg).to(device)
    sharded = copy.deepcopy(plain)
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded, plain


def gradients(plain, step: int) -> dict:
    """Seeded gradients, one per parameter name (the same for both models)."""
    import torch

    gen = torch.Generator().manual_seed(1234 + step)
    return {n: torch.randn(p.shape, generator=gen).to(p.device) for n, p in plain.named_parameters()}


def set_grads(sharded, plain, grads: dict) -> None:
    from torch.distributed.tensor import DTensor

    for n, p in sharded.named_parameters():
        p.grad = DTensor.from_local(grads[n].clone(), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    for n, p in plain.named_parameters():
        p.grad = grads[n].clone()


def max_difference(sharded, plain) -> tuple:
    """max |Δ| over every parameter, and that relative to the largest |parameter|."""
    theirs = dict(plain.named_parameters())
    diff = scale = 0.0
    for n, p in sharded.named_parameters():
        mine = p.full_tensor().detach()
        diff = max(diff, float((mine - theirs[n].detach()).abs().max()))
        scale = max(scale, float(theirs[n].detach().abs().max()))
    return diff, diff / scale


def run(args) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import mango

    from . import measure

    cuda = not args.cpu_dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("python -m bench.fsdp_one_gpu: no CUDA device (--cpu-dry-run runs it on the CPU under the Triton interpreter)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    pg_backend = init_single_rank_group(cuda)
    mesh = init_device_mesh(device.type, (1,))
    config = dict(SIZES["gpu" if cuda else "cpu"])
    if args.n_layer:
        config["n_layer"] = args.n_layer
    sharded, plain = build_models(config, device, mesh)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"mango\.param_groups: parameter .* is tied into modules")
        opt_sharded = mango.presets.mango(sharded, backend="triton")
        opt_plain = mango.presets.mango(plain, backend="triton")
    out = dict(device=torch.cuda.get_device_name(device) if cuda else f"CPU ({mango.ns_engine.cpu_model()}), Triton interpreter",
               torch=torch.__version__, process_group=pg_backend, world_size=1, model=dict(kind="HF GPT-2", **config),
               params=sum(p.numel() for p in plain.parameters()), preset="mango", backend="triton")  # fmt: skip
    diffs = []
    for step in range(args.steps):
        set_grads(sharded, plain, gradients(plain, step))
        opt_sharded.step()
        opt_plain.step()
        diffs.append(max_difference(sharded, plain))
    backend = opt_sharded._backend_for(device, True)
    out["sharded_backend"] = type(backend).__name__
    out["max_abs_diff"] = [d for d, _ in diffs]
    out["max_rel_diff"] = [r for _, r in diffs]
    out["within_ns_bound"] = max(r for _, r in diffs) <= NS_BOUND
    fixed = gradients(plain, args.steps)
    steppers = [(opt.step, lambda: set_grads(sharded, plain, fixed)) for opt in (opt_sharded, opt_plain)]
    timed = args.timed_steps if cuda else 1  # the interpreter: seconds per step
    runs = measure.time_interleaved(steppers, device, warmup=3 if cuda else 0, min_steps=timed, max_steps=timed, budget_s=0.0)
    for name, r in zip(("fsdp2", "plain"), runs):
        out[f"{name}_median_ms"] = measure.summarize(r["times_s"])["median_s"] * 1e3
        out[f"{name}_steps_timed"] = len(r["times_s"])
    out["fsdp2_over_plain"] = out["fsdp2_median_ms"] / out["plain_median_ms"]
    import torch.distributed as dist

    dist.destroy_process_group()
    return out


def markdown(r: dict) -> str:
    m = r["model"]
    return "\n".join([
        f"### FSDP2 on one device, triton backend ({r['device']}; process group {r['process_group']}, world size 1)",
        "",
        f"HF GPT-2 (n_layer {m['n_layer']}, n_embd {m['n_embd']}, vocab {m['vocab_size']}: {r['params'] / 1e6:.1f}M params), "
        f"mango preset; the fully_shard'ed model on `{r['sharded_backend']}` against an identical plain copy.",
        "",
        "| step | FSDP2 (ms, median) | plain (ms, median) | FSDP2 / plain | max abs diff | relative | within the NS bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| mango, triton | {r['fsdp2_median_ms']:.2f} | {r['plain_median_ms']:.2f} | {r['fsdp2_over_plain']:.2f} | "
        f"{max(r['max_abs_diff']):.2e} | {max(r['max_rel_diff']):.2e} | {'yes' if r['within_ns_bound'] else 'NO'} (2e-2) |",
        "",
    ])  # fmt: skip


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    result = run(args)
    text = markdown(result)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
