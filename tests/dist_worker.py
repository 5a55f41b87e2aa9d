"""Distributed checks for tests/test_distributed.py, run in WORLD processes (gloo, CPU).

    python tests/dist_worker.py WORLD OUT.json [CHECK ...]

The launcher imports torch once and forks WORLD ranks (cheaper than WORLD fresh interpreters
on a 2-core CI box). The ranks rendezvous through a FileStore in a temporary directory (no TCP
port; gloo talks over the loopback interface), run every requested check in order and write
{check: "ok" | traceback} per rank to OUT.json. A check that fails on one rank makes the others
fail at their next collective within the timeout instead of hanging.

Every check compares the distributed run with a single-process run of `mango.Mango` (torch
backend) computed in the same process from the same initial values and gradients.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's checks run its kernels on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mango  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: E402
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=90)

# --------------------------------------------------------------------------------------------
# a tiny GPT whose shapes exercise every sharding corner at 2 and 4 ranks:
#   c_attn (45, 8), 3 heads of head_dim 5: 45 rows split 23/22 (2 ranks) or 12/12/12/9 (4 ranks),
#       so shard boundaries cut heads and the split is uneven; c_attn.bias (45,) likewise
#   c_fc (13, 8) tall, mlp.c_proj (8, 13) wide, attn.c_proj (8, 15): uneven splits
#   gate (3, 8) and gate.bias (3,): fewer rows than ranks at 4 ranks (an empty shard)
#   up (23, 2): more than ns_steps times taller than wide, so its NS runs row-sharded
#       (Gram matrices all-reduced) instead of on an owner rank
#   two layers: same-shape matrices share one NS bucket spread over owner ranks
# --------------------------------------------------------------------------------------------
VOCAB, D, N_HEAD, HD, D_FF, T, TALL = 11, 8, 3, 5, 13, 6, 23


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * N_HEAD * HD)
        self.c_proj = nn.Linear(N_HEAD * HD, D)
        self.register_buffer("k_mix", torch.linspace(-1, 1, N_HEAD * HD * D).view(N_HEAD * HD, D))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.c_attn(x).split(N_HEAD * HD, dim=-1)
        q, k, v = (t.view(B, L, N_HEAD, HD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # softmax ignores the key bias (its exact gradient is 0, and l2_split would blow rounding
        # noise up to unit head blocks); a small direct use of k gives every head block a gradient
        k_flat = k.transpose(1, 2).reshape(B, L, N_HEAD * HD)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, N_HEAD * HD)) + 0.01 * k_flat @ self.k_mix.to(x.dtype)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(D, D_FF)
        self.c_proj = nn.Linear(D_FF, D)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = Attention()
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = MLP()
        self.up = nn.Linear(2, TALL, bias=False)
        self.register_buffer("up_mix", torch.linspace(-1, 1, TALL * D).view(TALL, D))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + 0.1 * self.up(x[..., :2]) @ self.up_mix.to(x.dtype)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.h = nn.ModuleList(Block() for _ in range(n_layer))
        self.gate = nn.Linear(D, 3)
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.register_buffer("gate_mix", torch.linspace(-1, 1, 3 * D).view(3, D))

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.h:
            x = b(x)
        x = x + self.gate(x) @ self.gate_mix.to(x.dtype)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), idx.roll(-1, dims=1).reshape(-1))


QKV = {"h.*.attn.c_attn": N_HEAD}
PRESETS = {
    "mango": lambda m, backend="torch", **kw: mango.presets.mango(m, qkv_heads=QKV, lr=0.02, weight_decay=0.01, backend=backend, **kw),
    "muon": lambda m, backend="torch", **kw: mango.presets.muon(m, qkv_heads=QKV, lr=0.02, adamw_lr=0.01, backend=backend, **kw),
    "lamb": lambda m, backend="torch", **kw: mango.presets.lamb(m, qkv_heads=QKV, lr=0.01, weight_decay=0.01, backend=backend, **kw),
    "novograd": lambda m, backend="torch", **kw: mango.presets.novograd(m, qkv_heads=QKV, backend=backend, **kw),
}


def make_model(seed=0, dtype=torch.float64, n_layer=2):
    torch.manual_seed(seed)
    model = TinyGPT(n_layer).to(dtype)
    with torch.no_grad():  # nonzero biases and gains, so every norm sees real data
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def shard(model, mesh):
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's piece of a whole tensor laid out like the DTensor `like`."""
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def as_dtensor(full: torch.Tensor, like: DTensor) -> DTensor:
    return DTensor.from_local(local_part(full, like).clone(), like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def synthetic_grads(named, step, seed=1234):
    """Seeded whole gradients, the same on every rank and for every copy of the model."""
    gen = torch.Generator().manual_seed(seed + 7919 * step)
    return {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for n, p in named}


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """‖a − b‖ / ‖scale‖ (scale: the whole single-process tensor, so shards of it are judged alike)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / scale.detach().double().norm().clamp_min(1e-300))


def compare_runs(tag, model, opt, ref_model, ref_opt, tol, tol_for=None, errors=None):
    """This rank's shards of params and optimizer state against the same rows of the single-process
    run (no communication). Returns the worst error relative to each whole tensor's norm.
    `tol_for`: {param name: tol} for params held to another bound; `errors`: filled with each
    param's worst error."""
    ref_params = dict(ref_model.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        bound = (tol_for or {}).get(name, tol)
        q = ref_params[name]
        pairs = [("param", p, q)]
        st, rst = opt.state[p], ref_opt.state[q]
        assert set(st) == set(rst), f"{tag}: {name}: state keys {sorted(st)} vs {sorted(rst)}"
        for k in st:
            if k != "step" and rst[k].dim() > 0 and isinstance(p, DTensor):  # sharded like the param (DCP)
                assert isinstance(st[k], DTensor), f"{tag}: {name}: state {k!r} is {type(st[k]).__name__}, not a DTensor"
                assert tuple(st[k].placements) == tuple(p.placements), f"{tag}: {name}: state {k!r} placed {st[k].placements}"
            pairs.append((k, st[k], rst[k]))
        for what, a, b in pairs:
            if isinstance(a, DTensor):
                a, part = a.to_local(), local_part(b, a)
            else:
                part = b
            assert a.shape == part.shape, f"{tag}: {name} {what}: shape {tuple(a.shape)} vs {tuple(part.shape)}"
            e = rel_err(a, part, b) if b.abs().max() > 0 else float((a.detach() - part).abs().max())
            worst = max(worst, e)
            if errors is not None:
                errors[name] = max(errors.get(name, 0.0), e)
            assert e <= bound, f"{tag}: {name} {what}: error {e:.3g} > {bound} (relative to the whole tensor)"
    return worst


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


@check
def fsdp2_presets(ctx):
    """FSDP2 params, synthetic DTensor gradients, 10 steps, float64: every preset equals the single-process
    run (torch backend), and the mango preset equals the float64 reference oracle."""
    out = {name: run_synthetic(ctx, PRESETS[name], tag=name) for name in ("mango", "muon", "lamb", "novograd")}
    ref_model = make_model()
    ref_opt = PRESETS["mango"](ref_model, backend="reference")
    model = shard(make_model(), ctx["mesh"])
    opt = PRESETS["mango"](model)
    named, ref_named = list(model.named_parameters()), dict(ref_model.named_parameters())
    for step in range(10):
        g = synthetic_grads(named, step)
        for n, p in named:
            p.grad = as_dtensor(g[n], p)
            ref_named[n].grad = g[n].clone()
        opt.step()
        ref_opt.step()
    out["mango_vs_reference"] = compare_runs("mango vs reference", model, opt, ref_model, ref_opt, tol=1e-10)
    return out


def run_synthetic(ctx, make_opt, dtype=torch.float64, steps=10, tol=1e-10, tag="", build=make_model, shard_fn=shard, ref_make_opt=None,
                  keep=None):  # fmt: skip
    """`steps` steps on seeded whole gradients, sharded (FSDP2 params) and single-process; compare.
    `build(dtype=...)` makes the model, `shard_fn(model, mesh)` shards it; the single process uses
    `ref_make_opt` (default: `make_opt`); `keep`: a list the sharded optimizer is appended to."""
    ref_model = build(dtype=dtype)
    model = shard_fn(build(dtype=dtype), ctx["mesh"])
    ref_opt, opt = (ref_make_opt or make_opt)(ref_model), make_opt(model)
    named, ref_named = list(model.named_parameters()), dict(ref_model.named_parameters())
    for step in range(steps):
        g = synthetic_grads(named, step)
        for n, p in named:
            p.grad = as_dtensor(g[n], p)
            ref_named[n].grad = g[n].clone()
        opt.step()
        ref_opt.step()
    if keep is not None:
        keep.append(opt)
    return compare_runs(tag, model, opt, ref_model, ref_opt, tol=tol)


@check
def fsdp2_float32(ctx):
    """Mango preset, 10 steps: float32 params with float32 NS within 1e-5; with bf16 NS operands
    (ns_dtype="auto" on CUDA and on CPUs with bf16 matmul) and with bfloat16 params within the correctness
    contract's bf16 NS bound 2e-2 (sums of squares and Gram matrices add up in another order than in one process)."""

    def mango_with(ns_dtype):
        return lambda model: PRESETS["mango"](model, ns_dtype=ns_dtype)

    out = {"float32": run_synthetic(ctx, mango_with(torch.float32), torch.float32, tol=1e-5, tag="float32")}
    out["bf16_ns"] = run_synthetic(ctx, mango_with(torch.bfloat16), torch.float32, tol=2e-2, tag="bf16 NS")
    out["bfloat16"] = run_synthetic(ctx, mango_with(torch.bfloat16), torch.bfloat16, tol=2e-2, tag="bfloat16")
    return out


# every norm and the settings that take other code paths, on parameters of every sharding kind
SETTINGS_OVERRIDES = {
    "wte.weight": {"norm": "l2_col"},
    "lm_head.weight": {"norm": "l2_col"},
    "gate.weight": {"norm": "l2_col", "trust_ratio": True},  # 3 rows: an empty shard at 4 ranks
    "gate.bias": {"norm": "sign"},
    "h.0.attn.c_attn.weight": {"norm": "ns"},  # whole-matrix NS of a fused QKV
    "h.1.attn.c_attn.bias": {"norm": "l2"},
    "*.ln_1.weight": {"norm": "sign"},
    "*.ln_2.weight": {"norm": "l2"},
    "h.1.mlp.c_fc.weight": {"norm": "l2", "second_moment": "sum"},
    "h.0.mlp.c_proj.weight": {"norm": "sign"},
    "h.0.attn.c_proj.weight": {"trust_ratio": True, "preconditioner": "adam"},
    "h.1.mlp.c_proj.weight": {"ns_prescale": "spectral", "trust_ratio": True},
    "h.1.attn.c_proj.weight": {"maximize": True, "nesterov": False, "beta_offset": None},
}


@check
def fsdp2_settings(ctx):
    """All norms (l2_col with an empty shard, whole-QKV ns, l2 on matrices, sign), trust ratio on NS
    buckets, adam, spectral prescale, maximize: 10 float64 steps equal to the single process."""

    def make_opt(model):
        groups = mango.param_groups(model, qkv_heads=QKV, overrides=SETTINGS_OVERRIDES)
        return mango.Mango(groups, lr=0.02, weight_decay=0.01, backend="torch")

    return run_synthetic(ctx, make_opt, tag="settings")


# --------------------------------------------------------------------------------------------
# Hugging Face models labelled without hints (the roles), under FSDP2 (built from configs, float64):
#   GPT-2 (n_embd 10, 2 heads of 5): every Conv1D weight is stored (in, out), so Shard(0) splits its
#       INPUT axis: c_attn (10, 30) 5/5 or 3/3/3/1 rows, and every shard holds a piece of every head
#       (heads are column blocks); mlp.c_fc (10, 64); mlp.c_proj stored (64, 10) is more than
#       ns_steps times taller than wide, so its NS runs row-sharded on the transposed
#       operator; c_attn.bias (30,) cuts head blocks of 5 (15/15, 8/8/8/6); wte tied to lm_head
#   Mixtral (4 heads of 4, 2 kv heads, intermediate 12): experts gate_up_proj (E, 24, 16) and
#       down_proj (E, 16, 12) are Shard(0) on the expert dim, so every rank holds whole experts and
#       orthogonalizes them locally; E = 4 divides 2 and 4 ranks, E = 3 does not (2/1, and 1/1/1/0:
#       an empty shard, also of the router gate (3, 16)); k_proj (8, 16) at 4 ranks: half a head per shard
#   GPT-OSS (3 experts): experts stored (E, in, out), per-expert biases (E, out) with one l2 per expert
# --------------------------------------------------------------------------------------------
HF_TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
# GPT-2 ties lm_head to wte: param_groups says so in a warning (tested in test_roles_hf.py)
warnings.filterwarnings("ignore", message=r"mango\.param_groups: parameter .* is tied into modules")


def hf_gpt2(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=10, n_layer=2, n_head=2, n_inner=64, **HF_TOKENS)
    return _perturbed(transformers.GPT2LMHeadModel(config).to(dtype))


def hf_mixtral(n_experts):
    def build(dtype=torch.float64):
        import transformers

        torch.manual_seed(0)
        config = transformers.MixtralConfig(
            vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=12, num_local_experts=n_experts, num_experts_per_tok=2, **HF_TOKENS,
        )  # fmt: skip
        return _perturbed(transformers.MixtralForCausalLM(config).to(dtype))

    return build


def hf_gpt_oss(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
        intermediate_size=12, num_local_experts=3, num_experts_per_tok=2, **HF_TOKENS,
    )  # fmt: skip
    return _perturbed(transformers.GptOssForCausalLM(config).to(dtype))


def _perturbed(model):
    with torch.no_grad():  # nonzero biases and gains, so every norm sees real data
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------------------------
# the layouts model: the smallest model with every layout the backends treat apart, for the runs
# where every step costs (the Triton interpreter); no forward (synthetic gradients only):
#   qkv (25, 8): a GQA fused QKV, 3 query heads and 1 kv head of head_dim 5; 25 rows split 13/12 or
#       7/7/7/4, so shard boundaries cut heads; its bias (25,) likewise
#   c_attn: HF's Conv1D fused QKV stored (in, out) = (8, 30), 2 heads of 5: Shard(0) splits its input
#       axis, so every shard holds a piece of every head (column blocks)
#   experts.w (3, 6, 8): 3 experts on dim 0, whole on their rank (1/1/1/0 at 4 ranks: an empty shard)
#   up (23, 2) tall: row-sharded NS; gate (3, 8): an empty shard at 4 ranks; lm_head tied to wte
# --------------------------------------------------------------------------------------------
LAYOUT_HINTS = dict(qkv_heads={"h.*.qkv": (3, 1), "h.*.c_attn": 2}, overrides={"h.*.experts.w": {"experts": True}})


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, D))


class LayoutBlock(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.ln = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, (3 + 2 * 1) * HD)
        self.c_attn = Conv1D(3 * 2 * HD, D)
        self.experts = Experts()
        self.up = nn.Linear(2, TALL, bias=False)


class LayoutModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.h = nn.ModuleList(LayoutBlock() for _ in range(2))
        self.gate = nn.Linear(D, 3)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight


def make_layout_model(dtype=torch.float64):
    torch.manual_seed(0)
    return _perturbed(LayoutModel().to(dtype))


def layouts_mango(model, backend="torch", **kw):
    return mango.presets.mango(model, **LAYOUT_HINTS, lr=0.02, weight_decay=0.01, backend=backend, **kw)


def shard_layers(model, mesh):
    """fully_shard every decoder layer, then the model (as HF's FSDP2 recipes do)."""
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def group_of(opt, name):
    for g in opt.param_groups:
        if name in g["param_names"]:
            return g
    raise AssertionError(f"{name} is in no param group")


HF_CHECKS = ("fsdp2_moe", "fsdp2_conv1d", "ddp_split", "fsdp2_triton", "fsdp2_triton_launches", "ddp_split_triton")  # transformers


def hf_mango(backend="torch", **kw):
    return lambda model: mango.presets.mango(model, weight_decay=0.01, backend=backend, **kw)


@check
def fsdp2_moe(ctx):
    """Mixtral under FSDP2, mango preset with no hints, 10 float64 steps: equal to one process (torch
    backend, and the float64 reference) within 1e-10, for E = 4 and E = 3 experts. The experts are
    labelled per expert, and each rank holds whole experts (an empty shard of them for E = 3 at 4 ranks).
    Then GPT-OSS with 3 transposed experts and their biases, likewise."""
    world, rank = ctx["world"], ctx["rank"]
    out = {}
    for n_experts in (4, 3):
        build = hf_mixtral(n_experts)
        probe = shard_layers(build(), ctx["mesh"])
        experts = dict(probe.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
        assert group_of(hf_mango()(probe), "model.layers.0.mlp.experts.gate_up_proj").get("experts") is True
        local = experts.to_local().shape
        chunk = -(-n_experts // world)  # torch.chunk: FSDP2's split of dim 0
        expected_local = max(0, min(chunk, n_experts - rank * chunk))
        assert tuple(local) == (expected_local, 24, 16), f"rank {rank} holds {tuple(local)} of gate_up_proj"
        tag = f"mixtral E={n_experts}"
        out[f"E{n_experts}"] = run_synthetic(ctx, hf_mango(), tag=tag, build=build, shard_fn=shard_layers)
        out[f"E{n_experts}_vs_reference"] = run_synthetic(
            ctx, hf_mango(), tag=tag + " vs reference", build=build, shard_fn=shard_layers, ref_make_opt=hf_mango("reference")
        )
    # GPT-OSS stores its 3 experts (E, in, out) with per-expert biases (E, out): one l2 per expert
    probe = shard_layers(hf_gpt_oss(), ctx["mesh"])
    assert group_of(hf_mango()(probe), "model.layers.0.mlp.experts.down_proj_bias").get("experts") is True
    out["gpt_oss_E3"] = run_synthetic(ctx, hf_mango(), tag="gpt-oss", build=hf_gpt_oss, shard_fn=shard_layers)
    out["gpt_oss_E3_vs_reference"] = run_synthetic(
        ctx, hf_mango(), tag="gpt-oss vs reference", build=hf_gpt_oss, shard_fn=shard_layers, ref_make_opt=hf_mango("reference")
    )
    return out


@check
def fsdp2_conv1d(ctx):
    """HF GPT-2 under FSDP2 (Conv1D weights sharded on their input axis), mango preset with no hints,
    10 float64 steps: equal to one process (torch backend, and the float64 reference) within 1e-10;
    also with l2_col on a Conv1D (its operator rows are storage columns, spread over every shard)."""
    probe = shard_layers(hf_gpt2(), ctx["mesh"])
    assert group_of(hf_mango()(probe), "transformer.h.0.attn.c_attn.weight").get("orientation") == "in_out"
    c_proj = dict(probe.named_parameters())["transformer.h.0.mlp.c_proj.weight"]
    assert mango.distributed.use_row_sharded_ns(tuple(c_proj.shape), "ns", "frobenius", 5, ctx["world"])
    out = {"gpt2": run_synthetic(ctx, hf_mango(), tag="gpt2", build=hf_gpt2, shard_fn=shard_layers)}
    out["gpt2_vs_reference"] = run_synthetic(
        ctx, hf_mango(), tag="gpt2 vs reference", build=hf_gpt2, shard_fn=shard_layers, ref_make_opt=hf_mango("reference")
    )
    l2_col = hf_mango(overrides={"transformer.h.*.mlp.c_fc.weight": {"norm": "l2_col"}})
    assert group_of(l2_col(hf_gpt2()), "transformer.h.1.mlp.c_fc.weight")["norm"] == "l2_col"
    out["gpt2_l2_col"] = run_synthetic(ctx, l2_col, tag="gpt2 l2_col", build=hf_gpt2, shard_fn=shard_layers)
    return out


def batch(step, rank, n=2):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, VOCAB, (n, T), generator=gen)


@check
def fsdp2_training(ctx):
    """Real fully_shard forward/backward (gradients reduce-scattered by FSDP2), mango preset, 6 steps:
    equal to one process training on the union of the ranks' batches."""
    world, rank = ctx["world"], ctx["rank"]
    ref_model = make_model()
    model = shard(make_model(), ctx["mesh"])
    ref_opt, opt = PRESETS["mango"](ref_model), PRESETS["mango"](model)
    for step in range(6):
        model(batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        loss = sum(ref_model(batch(step, r)) for r in range(world)) / world  # FSDP2 averages gradients
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return compare_runs("fsdp2 training", model, opt, ref_model, ref_opt, tol=1e-9)


@check
def hsdp(ctx):
    """HSDP (fully_shard on a 2-D mesh: Replicate() across pairs, Shard(0) within): collectives run on
    the shard groups only; equal to one process training on the union of the ranks' batches."""
    world, rank = ctx["world"], ctx["rank"]
    assert world % 2 == 0 and world >= 4, "hsdp needs an even number of ranks >= 4"
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    ref_model = make_model()
    model = shard(make_model(), mesh)
    placements = {tuple(p.placements) for p in model.parameters()}
    assert placements == {(Replicate(), Shard(0))}, placements
    ref_opt, opt = PRESETS["mango"](ref_model), PRESETS["mango"](model)
    for step in range(4):
        model(batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        loss = sum(ref_model(batch(step, r)) for r in range(world)) / world
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return compare_runs("hsdp", model, opt, ref_model, ref_opt, tol=1e-9)


@check
def load_single_process_state(ctx):
    """A single-process optimizer state_dict (whole tensors) loads into the FSDP2 optimizer: each rank
    keeps its rows, and training continues exactly as the single process would."""
    world, rank = ctx["world"], ctx["rank"]
    ref_model = make_model()
    ref_opt = PRESETS["mango"](ref_model)

    def ref_step(step):
        (sum(ref_model(batch(step, r)) for r in range(world)) / world).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    for step in range(3):
        ref_step(step)
    saved_state = ref_opt.state_dict()
    saved_params = {k: v.clone() for k, v in ref_model.state_dict().items()}
    model = make_model()
    model.load_state_dict(saved_params)
    model = shard(model, ctx["mesh"])
    opt = PRESETS["mango"](model)
    opt.load_state_dict(saved_state)
    for step in range(3, 6):
        ref_step(step)
        model(batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    return compare_runs("single-process state", model, opt, ref_model, ref_opt, tol=1e-9)


@check
def ddp(ctx):
    """DDP (whole params, gradients all-reduced by DDP): every rank ends with bit-identical params and
    state, equal to one process training on the union of the ranks' batches."""
    world, rank = ctx["world"], ctx["rank"]
    ref_model = make_model()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    ref_opt, opt = PRESETS["mango"](ref_model), PRESETS["mango"](model.module)
    for step in range(6):
        model(batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        loss = sum(ref_model(batch(step, r)) for r in range(world)) / world
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    worst = compare_runs("ddp", model.module, opt, ref_model, ref_opt, tol=1e-9)
    flat = torch.cat([t.reshape(-1) for p in model.module.parameters() for t in [p.detach(), *opt.state[p].values()]])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for r in range(world):
        assert torch.equal(gathered[r], flat), f"ddp: rank {r} differs from rank {rank}"
    return worst


def snapshot(model, opt):
    out = {}
    for name, p in model.named_parameters():
        out[name] = local_of(p).clone()
        for k, v in opt.state[p].items():
            out[f"{name}:{k}"] = local_of(v).clone()
    return out


def step_leaves_state_as_it_was(model, opt, policy, rank, before, bad="h.0.mlp.c_fc.weight"):
    """A step whose gradient of `bad` holds a NaN on one rank: nonfinite="skip" skips it on every
    rank, "raise" names the parameter; either way parameters and state stay bit-identical to `before`."""
    if policy == "skip":
        opt.step()
        assert opt.skipped_steps == 1, f"rank {rank} did not skip"
    else:
        try:
            opt.step()
        except ValueError as e:
            assert bad in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank} did not raise")
    after = snapshot(model, opt)
    for k in before:
        assert torch.equal(before[k], after[k]), f"nonfinite={policy}: {k} changed on rank {rank}"


def fsdp2_nan_in_one_shard(ctx, policy, bad="h.0.mlp.c_fc.weight", **settings):
    """FSDP2: one good step, then a step whose gradient of `bad` holds a NaN in rank 1's shard only,
    under nonfinite=`policy` (`step_leaves_state_as_it_was`)."""
    rank = ctx["rank"]
    model = shard(make_model(), ctx["mesh"])
    opt = PRESETS["mango"](model, nonfinite=policy, **settings)
    named = list(model.named_parameters())
    g = synthetic_grads(named, 0)
    for n, p in named:
        p.grad = as_dtensor(g[n], p)
    opt.step()
    before = snapshot(model, opt)
    g = synthetic_grads(named, 1)
    for n, p in named:
        p.grad = as_dtensor(g[n], p)
        if n == bad and rank == 1:
            p.grad.to_local()[0, 0] = float("nan")
    step_leaves_state_as_it_was(model, opt, policy, rank, before, bad)


def local_of(t):
    return t.to_local() if isinstance(t, DTensor) else t.detach()


@check
def checkpoint(ctx):
    """torch.distributed.checkpoint: sharded save at step 3, load into a fresh model and optimizer,
    3 more steps: bit-identical to training 6 steps without interruption."""
    rank, mesh = ctx["rank"], ctx["mesh"]
    path = os.path.join(ctx["tmp"], "ckpt")

    def train(model, opt, steps):
        for step in steps:
            model(batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()

    model = shard(make_model(dtype=torch.float32), mesh)
    opt = PRESETS["mango"](model)
    train(model, opt, range(3))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    train(model, opt, range(3, 6))
    expected = snapshot(model, opt)

    model2 = shard(make_model(seed=1, dtype=torch.float32), mesh)  # different init: the load must matter
    opt2 = PRESETS["mango"](model2)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p in model2.parameters():
        st = opt2.state[p]
        assert isinstance(st["exp_avg"], DTensor) and float(st["step"]) == 3.0, "checkpoint: state not restored as sharded DTensors at step 3"
    train(model2, opt2, range(3, 6))
    got = snapshot(model2, opt2)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"checkpoint: {k} differs after resume (max |Δ| {float((expected[k] - got[k]).abs().max()):.3g})"
    return len(expected)


@check
def collectives(ctx):
    """Collectives per step do not grow with depth: 2 and 4 layers issue the same calls. Per round
    (see mango.distributed) at most one all-reduce of sums of squares (l2, cut-head l2_split, the
    tall matrices' pre-scaling) and one all_to_all pair; plus ns_steps all-reduces of the Gram
    matrices of the tall `up` matrices (row-sharded NS)."""
    counts = {}
    for n_layer in (2, 4):
        model = shard(make_model(n_layer=n_layer), ctx["mesh"])
        opt = PRESETS["mango"](model)
        named = list(model.named_parameters())
        for step in range(2):
            g = synthetic_grads(named, step)
            for n, p in named:
                p.grad = as_dtensor(g[n], p)
            opt.step()
        backend = opt._backend_for(named[0][1].device, True)
        calls: dict = {}
        for r in backend.comm.last_step:
            calls[f"{r['op']}: {r['what']}"] = calls.get(f"{r['op']}: {r['what']}", 0) + 1
        counts[n_layer] = calls
    assert counts[2] == counts[4], f"collectives grow with depth: {counts}"
    c = counts[2]
    # round 1: l2 / l2_split sums; the round of the `up` bucket: its pre-scaling
    assert c.get("all_reduce: sums of squares") == 2, c
    assert c.get("all_reduce: NS Gram") == 5, c  # one per NS step
    # matrix group: NS shapes c_proj 8x15, c_fc 13x8, mlp.c_proj 8x13, gate 3x8 -> at most 4 rounds
    assert c.get("all_to_all: NS gather") == c.get("all_to_all: NS scatter") <= 4, c
    # LAMB: ‖d‖ and the trust ratio's ‖W‖ of every tensor in a single all-reduce
    model = shard(make_model(), ctx["mesh"])
    opt = PRESETS["lamb"](model)
    named = list(model.named_parameters())
    g = synthetic_grads(named, 0)
    for n, p in named:
        p.grad = as_dtensor(g[n], p)
    opt.step()
    lamb = [r["what"] for r in opt._backend_for(named[0][1].device, True).comm.last_step]
    assert lamb == ["sums of squares"], lamb
    counts["lamb"] = len(lamb)
    return counts


@check
def nonfinite_skip(ctx):
    """A NaN in one rank's shard: with nonfinite='skip' every rank skips the step (nothing changes anywhere)."""
    fsdp2_nan_in_one_shard(ctx, "skip")
    return True


@check
def errors(ctx):
    """Placements mango cannot handle, and backends that cannot run DTensor params: clear errors."""
    mesh = ctx["mesh"]
    w = torch.randn(4 * ctx["world"], 6, dtype=torch.float64)
    cases = {
        "Shard(1)": DTensor.from_local(w[:, :3].clone(), mesh, [Shard(1)], run_check=False),
    }
    from torch.distributed.tensor import Partial

    cases["Partial"] = DTensor.from_local(w.clone(), mesh, [Partial()], run_check=False)
    for what, t in cases.items():
        p = nn.Parameter(t)
        try:
            mango.Mango([{"params": [p], "param_names": ["layer.weight"]}])
        except ValueError as e:
            msg = str(e)
            assert "layer.weight" in msg and "Shard(0)" in msg, f"{what}: unclear error: {msg}"
        else:
            raise AssertionError(f"{what}: no error")
    p = nn.Parameter(DTensor.from_local(w[:4].clone(), mesh, [Shard(0)], run_check=False))
    for backend in ("reference",):
        opt = mango.Mango([p], backend=backend)
        p.grad = DTensor.from_local(torch.ones(4, 6, dtype=torch.float64), mesh, [Shard(0)], run_check=False)
        try:
            opt.step()
        except ValueError as e:
            assert "DTensor" in str(e) and backend in str(e), str(e)
        else:
            raise AssertionError(f"backend={backend} accepted DTensor params")
    # a gradient that is not sharded like its parameter
    opt = mango.Mango([{"params": [p], "param_names": ["layer.weight"]}], backend="torch")
    p.grad = torch.ones(p.shape, dtype=torch.float64)
    try:
        opt.step()
    except ValueError as e:
        assert "layer.weight" in str(e) and "gradient" in str(e), str(e)
    else:
        raise AssertionError("a plain gradient for a DTensor parameter was accepted")
    # Replicate() DTensors are whole on every rank: same result as plain tensors
    rp = nn.Parameter(DTensor.from_local(w.clone(), mesh, [Replicate()], run_check=False))
    q = nn.Parameter(w.clone())
    o1, o2 = mango.Mango([rp], backend="torch"), mango.Mango([q], backend="torch")
    for step in range(3):
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        rp.grad = DTensor.from_local(g.clone(), mesh, [Replicate()], run_check=False)
        q.grad = g
        o1.step()
        o2.step()
    assert torch.equal(rp.to_local(), q.detach()), "Replicate() DTensor differs from the plain tensor"
    return True


# --------------------------------------------------------------------------------------------
# FSDP2 on the triton backend (kernels under TRITON_INTERPRET=1): float64 compared with one process
# on the torch backend (the triton backend equals it there: tests/test_triton_backend.py), float32
# with bf16 NS (the kernels' where experts are whole, torch's on the owner ranks) with one process
# running float32 NS, within the bf16 NS bound
# --------------------------------------------------------------------------------------------


def triton_opt(make):
    return lambda model: make(model, backend="triton")


def collective_calls(backend) -> dict:
    calls: dict = {}
    for r in backend.comm.last_step:
        calls[f"{r['op']}: {r['what']}"] = calls.get(f"{r['op']}: {r['what']}", 0) + 1
    return calls


@check
def fsdp2_triton(ctx):
    """FSDP2 + backend="triton", 2 float64 steps each within 1e-10 of one process: the tiny GPT (head
    blocks cut by shard boundaries, uneven and empty shards, the row-sharded tall `up`) under mango
    and novograd (NovoGrad's per-tensor v on a rank with no rows of the tensor); every norm and
    setting of SETTINGS_OVERRIDES; the layouts model (GQA, Conv1D, experts, a tied head), also with
    float32 params and bf16 NS (the kernels' for whole experts, an empty shard of them at 4 ranks)
    within the bf16 NS bound. The mango step makes one all-reduce and one
    all_to_all pair (plus the row-sharded `up`'s Gram all-reduces)."""
    out, kept = {}, []
    for name in ("mango", "novograd"):  # trust ratios: in the settings below
        out[name] = run_synthetic(ctx, triton_opt(PRESETS[name]), steps=2, tag=f"triton {name}", ref_make_opt=PRESETS[name], keep=kept)
    out["settings"] = run_synthetic(ctx, triton_opt(tiny_settings), steps=2, tag="triton settings", ref_make_opt=tiny_settings)
    out["layouts"] = run_synthetic(ctx, triton_opt(layouts_mango), steps=2, tag="triton layouts", build=make_layout_model,
                                   ref_make_opt=layouts_mango)  # fmt: skip
    accurate = lambda model: layouts_mango(model, ns_dtype=torch.float32)  # noqa: E731 - fp32 NS in one process
    out["float32_bf16_ns"] = run_synthetic(ctx, triton_opt(layouts_mango), dtype=torch.float32, steps=2, tol=2e-2, tag="triton fp32",
                                           build=make_layout_model, ref_make_opt=accurate)  # fmt: skip
    backend = kept[0]._backend_for(torch.device("cpu"), True)
    assert type(backend).__name__ == "ShardedTritonBackend", type(backend)
    calls = collective_calls(backend)
    assert calls.get("all_to_all: NS gather") == calls.get("all_to_all: NS scatter") == 1, calls
    out["collectives"] = calls
    return out


@check
def fsdp2_triton_launches(ctx):
    """The FSDP2 triton step's kernel launches (a dry run: recorded, not run) are the same for 2 and 4
    layers, and its elementwise launches are one process's in one round (moments, segment sums,
    apply: every local shard in the same launches as on one GPU); NS kernels launch only for whole
    experts (the rest runs on owner ranks)."""
    import mango_kernels as mk

    ns = ("ns_small", "ns_small_gram", "ns_xxt", "ns_poly", "ns_update")

    def launches(build, make_opt, sharded=True):
        model = build(dtype=torch.float32)  # bf16 NS: the kernels' (float64 NS runs in torch)
        model = shard(model, ctx["mesh"]) if sharded else model
        opt = make_opt(model)
        if not sharded:
            opt._backend_for(torch.device("cpu")).memory_budget = float("inf")  # one round
        named = list(model.named_parameters())
        for step in range(2):  # the second step's: the first builds the plan and tables
            g = synthetic_grads(named, step)
            for n, p in named:
                p.grad = as_dtensor(g[n], p) if sharded else g[n]
            with mk.count_launches(dry_run=True) as log:
                opt.step()
        return log.by_name()

    def elementwise(by_name):
        return {k: v for k, v in by_name.items() if k not in ns}

    out = {}
    for n_layer in (2, 4):
        out[n_layer] = launches(lambda dtype, n=n_layer: make_model(dtype=dtype, n_layer=n), triton_opt(PRESETS["mango"]))
    assert out[2] == out[4], f"launches grow with depth: {out}"
    assert not set(out[2]) & set(ns), out[2]  # no experts: every NS on owner ranks
    one = launches(make_model, triton_opt(PRESETS["mango"]), sharded=False)
    assert elementwise(out[2]) == elementwise(one) == {"moments": 1, "segment_sums": 1, "apply": 1}, (out[2], one)
    out["layouts"] = launches(make_layout_model, triton_opt(layouts_mango))
    assert elementwise(out["layouts"]) == elementwise(one), out["layouts"]
    holds_experts = any(p.to_local().numel() for n, p in shard(make_layout_model(), ctx["mesh"]).named_parameters() if "experts" in n)
    assert out["layouts"].get("ns_small", 0) == int(holds_experts), out["layouts"]  # the whole experts' NS, in one launch
    return {str(k): v for k, v in out.items()}


@check
def triton_policies(ctx):
    """backend="triton", FSDP2: a NaN in one rank's shard makes every rank skip the step
    (nonfinite="skip") or raise naming the parameter ("raise"), nothing changed anywhere. DDP with
    the NS split: likewise, and save -> load -> resume with an LR scheduler equals never stopping,
    bit for bit (one layer, 2 steps: the interpreter's time)."""
    for policy in ("skip", "raise"):
        fsdp2_nan_in_one_shard(ctx, policy, backend="triton")
    split_nonfinite_and_resume(ctx, backend="triton", steps=2, n_layer=1)
    return True


@check
def fsdp2_triton_checkpoint(ctx):
    """A DCP checkpoint saved by the triton backend loads into the torch backend and back, with an LR
    scheduler saved beside it: resuming on the other backend equals never stopping (float64, within 1e-12)."""
    rank, mesh = ctx["rank"], ctx["mesh"]
    out = {}
    for save_on, load_on in (("triton", "torch"), ("torch", "triton")):
        path = os.path.join(ctx["tmp"], f"ckpt-{save_on}")

        def train(model, opt, sched, steps):
            for step in steps:
                model(batch(step, rank)).backward()
                opt.step()
                opt.zero_grad()
                sched.step()

        def fresh(backend, seed):
            model = shard(make_model(seed=seed), mesh)
            opt = PRESETS["mango"](model, backend=backend)
            return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

        model, opt, sched = fresh(save_on, 0)
        train(model, opt, sched, range(1))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        saved_sched = sched.state_dict()
        train(model, opt, sched, range(1, 2))
        expected = snapshot(model, opt)
        model2, opt2, sched2 = fresh(load_on, 1)  # different init: the load must matter
        msd2, osd2 = get_state_dict(model2, opt2)
        state = {"model": msd2, "optim": osd2}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        sched2.load_state_dict(saved_sched)
        train(model2, opt2, sched2, range(1, 2))
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.02, "the scheduler did not resume"
        got = snapshot(model2, opt2)
        diffs = [(expected[k] - got[k]).abs().max() / expected[k].abs().max().clamp_min(1e-300)
                 for k in expected if expected[k].numel()]  # fmt: skip - at 4 ranks some shards are empty
        worst = float(max(diffs))
        assert worst <= 1e-12, f"checkpoint {save_on} -> {load_on}: worst relative difference {worst:.3g}"
        out[f"{save_on}_to_{load_on}"] = worst
    return out


# --------------------------------------------------------------------------------------------
# DDP with the Newton–Schulz work split across ranks (Mango(..., process_group=...)): whole params,
# the same gradients on every rank (what DDP's all-reduce leaves), compared with one process
# --------------------------------------------------------------------------------------------


def run_split(ctx, make_opt, build=make_model, dtype=torch.float64, steps=3, group=None, tol=1e-10, tag="", backend="torch",
              ref_make_opt=None, ref_on_rank0=False, row_split_tol=None, errors=None, flops=None):  # fmt: skip
    """`steps` steps with the NS split over `group` (default: the world's 1-D mesh) and in one process
    (`ref_make_opt`, default `make_opt` on the same backend) on the same seeded gradients; params and
    state compared (they should agree bit for bit), and every rank's copy checked identical.
    `ref_on_rank0`: only rank 0 runs the single process and compares (the ranks are identical, so
    that judges every rank; the others return None as the error). `row_split_tol`: the bound for
    row-split tall matrices (their Gram matrices sum in another order); `errors`: filled with each
    param's worst error; `flops`: filled with the first step's FLOPs (FlopCounterMode), "split" on
    every rank, "one_process" where that runs. Returns (worst error, the split optimizer)."""
    from torch.utils.flop_counter import FlopCounterMode

    ref = not ref_on_rank0 or ctx["rank"] == 0
    model = build(dtype=dtype)
    opt = make_opt(model, backend=backend, process_group=ctx["mesh"] if group is None else group)
    named = list(model.named_parameters())
    if ref:
        ref_model = build(dtype=dtype)
        ref_opt = (ref_make_opt or make_opt)(ref_model, backend=backend)
        ref_named = dict(ref_model.named_parameters())
    for step in range(steps):
        g = synthetic_grads(named, step)
        for n, p in named:
            p.grad = g[n].clone()
            if ref:
                ref_named[n].grad = g[n].clone()
        for what, o in (("split", opt), ("one_process", ref_opt if ref else None)):
            if o is None:
                continue
            if flops is not None and step == 0:
                with FlopCounterMode(display=False) as fc:
                    o.step()
                flops[what] = fc.get_total_flops()
            else:
                o.step()
    worst = None
    if ref:
        tol_for = dict.fromkeys(row_split_names(opt), row_split_tol) if row_split_tol is not None else None
        worst = compare_runs(tag, model, opt, ref_model, ref_opt, tol=tol, tol_for=tol_for, errors=errors)
    assert_ranks_identical(tag, model, opt)
    return worst, opt


def row_split_names(opt):
    """Names of the params whose NS the split runs by rows over every rank."""
    from mango.ddp import ROW_SPLIT

    return [b.slots[i].name for b in opt._plan.buckets for nb in b.norm_buckets
            for i, q in zip(nb.slots, nb.cache.get("mango.ddp.owners", ())) if q == ROW_SPLIT]  # fmt: skip


def assert_ranks_identical(tag, model, opt):
    flat = torch.cat([t.detach().reshape(-1).double() for p in model.parameters() for t in [p, *opt.state[p].values()]])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for r, other in enumerate(gathered):
        assert torch.equal(other, flat), f"{tag}: rank {r} differs from rank {dist.get_rank()}"


def split_backend(opt):
    return next(iter(opt._backends.values()))


def tiny_mango(model, backend="torch", **kw):
    return PRESETS["mango"](model, backend=backend, **kw)


def tiny_settings(model, backend="torch", **kw):
    groups = mango.param_groups(model, qkv_heads=QKV, overrides=SETTINGS_OVERRIDES)
    return mango.Mango(groups, lr=0.02, weight_decay=0.01, backend=backend, **kw)


def hf_split(model, backend="torch", **kw):
    return mango.presets.mango(model, weight_decay=0.01, backend=backend, **kw)


@check
def ddp_split(ctx):
    """NS split over the ranks, torch backend, float64, 3 steps: equal to one process (the tiny GPT's
    head blocks of a fused QKV, the tall `up`, every norm and setting of SETTINGS_OVERRIDES, a
    ProcessGroup instead of a mesh; HF GPT-2's Conv1D weights; Mixtral's experts and GQA projections),
    and every rank's params and state bit-identical."""
    out = {}
    out["mango"], opt = run_split(ctx, tiny_mango, tag="split mango")
    assert split_backend(opt).comm.step_summary()["all_gather"]["calls"] >= 1
    out["settings"], _ = run_split(ctx, tiny_settings, tag="split settings", group=dist.group.WORLD)
    out["muon"], _ = run_split(ctx, lambda m, **kw: PRESETS["muon"](m, **kw), tag="split muon")
    out["gpt2_conv1d"], _ = run_split(ctx, hf_split, build=hf_gpt2, tag="split gpt2")
    out["mixtral_experts_gqa"], _ = run_split(ctx, hf_split, build=hf_mixtral(4), tag="split mixtral")
    out["float32"], _ = run_split(ctx, lambda m, **kw: tiny_mango(m, ns_dtype=torch.float32, **kw), dtype=torch.float32, tol=1e-6, tag="split fp32")
    return out


@check
def ddp_split_flops(ctx):
    """The busiest rank's NS FLOPs, counted by torch.utils.flop_counter.FlopCounterMode over a step
    (torch backend: NS is the step's only matmul work), against one process running all of it: at
    most 1/world of the total plus the largest single tensor's NS (the greedy balance's bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    world = ctx["world"]

    def counted(opt, model):
        named = list(model.named_parameters())
        g = synthetic_grads(named, 0)
        for n, p in named:
            p.grad = g[n]
        with FlopCounterMode(display=False) as fc:
            opt.step()
        return fc.get_total_flops()

    build = lambda dtype=torch.float64: make_model(dtype=dtype, n_layer=4)  # noqa: E731
    textbook = lambda m, **kw: tiny_mango(m, ns_method="textbook", **kw)  # noqa: E731 - the FLOP model's form
    ref_model, model = build(), build()
    total = counted(textbook(ref_model), ref_model)
    opt = textbook(model, process_group=ctx["mesh"])
    mine = counted(opt, model)
    every = [0.0] * world
    dist.all_gather_object(every, mine)
    jobs = [mango.distributed.ns_flops(tuple(p.shape), nb.block_shape, 5)
            for b in opt._plan.buckets for nb in b.norm_buckets if nb.norm in ("ns", "ns_split")
            for p in (b.slots[i].param for i in nb.slots)]  # fmt: skip
    backend = split_backend(opt)
    assert backend.comm.ns_flops == mine == backend.ns_loads[ctx["rank"]], (backend.comm.ns_flops, mine, backend.ns_loads)
    # the row-split tall `up` repeats its small cols×cols products on every rank: a little over the total
    assert total <= sum(every) <= 1.01 * total, f"the ranks' NS FLOPs {every} against one process's {total}"
    assert max(every) <= total / world + max(jobs), f"busiest rank {max(every)} of {total} at {world} ranks (largest job {max(jobs)})"
    return dict(busiest=max(every), total=total, largest_job=max(jobs), per_rank=every)


def split_nonfinite_and_resume(ctx, backend="torch", steps=3, n_layer=2):
    """NS split on `backend`: a NaN on one rank's gradient makes every rank skip (nonfinite="skip") or
    raise ("raise"), nothing changed; state_dict save after steps-1 steps -> load into a fresh split
    optimizer -> resume with an LR scheduler equals never stopping, bit for bit."""
    rank = ctx["rank"]
    for policy in ("skip", "raise"):
        model = make_model(n_layer=n_layer)
        opt = tiny_mango(model, backend=backend, nonfinite=policy, process_group=ctx["mesh"])
        named = list(model.named_parameters())
        for n, p in named:
            p.grad = synthetic_grads(named, 0)[n]
        opt.step()
        before = snapshot(model, opt)
        g = synthetic_grads(named, 1)
        for n, p in named:
            p.grad = g[n]
            if n == "h.0.mlp.c_fc.weight" and rank == 1:
                p.grad[0, 0] = float("nan")
        step_leaves_state_as_it_was(model, opt, policy, rank, before)

    def run(model, opt, sched, steps):
        named = list(model.named_parameters())
        for step in steps:
            g = synthetic_grads(named, step)
            for n, p in named:
                p.grad = g[n]
            opt.step()
            sched.step()

    def fresh():
        model = make_model(n_layer=n_layer)
        opt = tiny_mango(model, backend=backend, process_group=ctx["mesh"])
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

    model, opt, sched = fresh()
    run(model, opt, sched, range(steps))
    expected = snapshot(model, opt)
    model, opt, sched = fresh()
    run(model, opt, sched, range(steps - 1))
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict())
    model, opt, sched = fresh()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    run(model, opt, sched, range(steps - 1, steps))
    assert split_backend(opt).comm.step_summary()["all_gather"]["calls"] >= 1, "the loaded optimizer no longer splits the NS"
    got = snapshot(model, opt)
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"split resume: {k} differs"


@check
def ddp_split_policies(ctx):
    """NS split: nonfinite policies and resume with a scheduler (`split_nonfinite_and_resume`);
    process_group with backend="reference" or FSDP2 params is a clear error; the all-gathers per
    step do not grow with depth."""
    split_nonfinite_and_resume(ctx)
    model = make_model()
    opt = tiny_mango(model, backend="reference", process_group=ctx["mesh"])
    for n, p in model.named_parameters():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
    except ValueError as e:
        assert "process_group" in str(e) and "reference" in str(e), str(e)
    else:
        raise AssertionError("backend='reference' accepted process_group")
    sharded = shard(make_model(), ctx["mesh"])
    try:
        opt = tiny_mango(sharded, process_group=ctx["mesh"])
        for p in sharded.parameters():
            p.grad = DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        opt.step()
    except ValueError as e:
        assert "process_group" in str(e) and "DTensor" in str(e), str(e)
    else:
        raise AssertionError("process_group with FSDP2 parameters was accepted")
    calls = {}
    for n_layer in (2, 4):
        _, opt = run_split(ctx, tiny_mango, build=lambda dtype, n=n_layer: make_model(dtype=dtype, n_layer=n), steps=1, tag=f"split {n_layer} layers")
        calls[n_layer] = {k: v["calls"] for k, v in split_backend(opt).comm.step_summary().items()}
    assert calls[2] == calls[4], f"collectives grow with depth: {calls}"
    return calls[2]


@check
def ddp_split_triton(ctx):
    """NS split on the triton backend (kernels under TRITON_INTERPRET=1), 2 steps of the mango preset,
    equal to one process (only rank 0 runs it; the ranks are checked identical): the layouts model
    (GQA head blocks, Conv1D column blocks, experts, tall `up`s) in float32 with the bf16 NS kernels
    (2 NS steps: the split does not depend on their number), in rounds (the default memory budget:
    one exchange per round), within 1e-6 (bit for bit, in fact); the tiny GPT in float64 (NS by torch in the work buffer, the tall `up`s row-split) within
    1e-10 of the torch backend's step."""
    out = {}
    two_ns_steps = lambda model, **kw: layouts_mango(model, ns_steps=2, **kw)  # noqa: E731 - the interpreter's time is mostly NS steps
    out["float32"], opt = run_split(ctx, two_ns_steps, build=make_layout_model, dtype=torch.float32, steps=2, tol=1e-6,
                                    tag="split triton layouts", backend="triton", ref_on_rank0=True)  # fmt: skip
    assert split_backend(opt).comm.step_summary()["all_gather"]["calls"] > 1  # one per round
    torch_step = lambda model, backend: tiny_mango(model)  # noqa: E731
    out["float64"], opt = run_split(ctx, tiny_mango, steps=2, tag="split triton fp64", backend="triton", ref_make_opt=torch_step,
                                    ref_on_rank0=True)  # fmt: skip
    assert len(row_split_names(opt)) == 2, row_split_names(opt)  # the tall `up`s: NS by torch GEMMs, so row-split
    return out


@check
def ddp_split_triton_cublas(ctx):
    """NS split on the triton backend with every NS bucket on the cuBLAS engine (ns_engine="cublas",
    what a GPU runs its large blocks on: torch batched GEMMs on the NS stacks), float32 params, bf16 NS,
    the tiny GPT, 2 steps: each rank runs the GEMMs on its slice of every bucket and
    row-splits the tall `up`s; equal to one process (bit for bit but the row-split `up`s, within the
    bf16 NS bound); and matrices whose buckets all run in place (a 1-byte memory budget), so that
    each rank's share runs in its bucket's 2X and the results, the row-split one's too, are in the
    shifted second place. The first step's FLOPs (FlopCounterMode: with this engine every NS FLOP is a
    torch matmul, the elementwise kernels count none): the ranks together do the one process's NS
    (plus the row split's small repeated products), and the busiest at most 1/world of it plus the
    largest single tensor's NS."""
    world = ctx["world"]
    cublas = lambda model, **kw: tiny_mango(model, ns_engine="cublas", **kw)  # noqa: E731
    flops, errors = {}, {}
    worst, opt = run_split(ctx, cublas, dtype=torch.float32, steps=2, tol=1e-6, tag="split cublas", backend="triton",
                           ref_on_rank0=True, row_split_tol=2e-2, errors=errors, flops=flops)  # fmt: skip
    backend = split_backend(opt)
    every = [0.0] * world
    dist.all_gather_object(every, flops["split"])
    total = [flops.get("one_process")]
    dist.broadcast_object_list(total, src=0)
    total = total[0]
    assert flops["split"] == backend.ns_loads[ctx["rank"]], (flops["split"], backend.ns_loads)
    jobs = [mango.distributed.ns_flops(tuple(p.shape), nb.block_shape, 5)
            for b in opt._plan.buckets for nb in b.norm_buckets if nb.norm in ("ns", "ns_split")
            for p in (b.slots[i].param for i in nb.slots)]  # fmt: skip
    assert total <= sum(every) <= 1.01 * total, f"the ranks' NS FLOPs {every} against one process's {total}"
    assert max(every) <= total / world + max(jobs), f"busiest rank {max(every)} of {total} at {world} ranks (largest job {max(jobs)})"
    rows = row_split_names(opt)
    out = dict(busiest=max(every), total=total, largest_job=max(jobs), per_rank=every, row_split=rows)
    if ctx["rank"] == 0:
        out["row_split_error"] = max(errors[n] for n in rows)
        out["error"] = max(e for n, e in errors.items() if n not in rows)

    errors = {}
    _, opt = run_split(ctx, in_place_mango, build=in_place_model, dtype=torch.float32, steps=2, tol=1e-6, tag="split cublas in place",
                       backend="triton", ref_on_rank0=True, row_split_tol=2e-2, errors=errors)  # fmt: skip
    (lg,) = opt._plan.cache["triton"][1]
    batches = [b for r in lg.rounds for b, _ in r.ns_batches if getattr(b, "engine", None) == "cublas"]
    # in place after an odd number of moves, a result is in the second place, not where d was written
    out["shifted"] = sorted({tuple(b.nb.shape) for b in batches if b.in_place and b.output_view(0).data_ptr() != b.input_view(0).data_ptr()})
    out["shares"] = {str(tuple(b.nb.shape)): (*b.share, b.count) for b in batches}
    rows = out["in_place_row_split"] = row_split_names(opt)
    if ctx["rank"] == 0:
        out["in_place_row_split_error"] = max(errors[n] for n in rows)
        out["in_place_error"] = max(e for n, e in errors.items() if n not in rows)
    return out


def in_place_model(dtype=torch.float64):
    """Matrices large enough for the cuBLAS engine's in-place layout: four 24×96 (one bucket, cut
    between the ranks), three 96×20, and a 300×24 tall enough to be row-split."""
    torch.manual_seed(0)
    shapes = [(24, 96)] * 4 + [(96, 20)] * 3 + [(300, 24)]
    return torch.nn.Sequential(*[torch.nn.Linear(c, r, bias=False) for r, c in shapes]).to(dtype)


def in_place_mango(model, backend="triton", **kw):
    """Every matrix on the cuBLAS engine with a 1-byte memory budget: every bucket runs in place, in 2X its stack."""
    names, params = zip(*model.named_parameters())
    opt = mango.Mango([dict(params=list(params), param_names=list(names), role="matrix", norm="ns")], lr=0.02, backend=backend,
                      ns_engine="cublas", **kw)  # fmt: skip
    opt._backend_for(torch.device("cpu")).memory_budget = 1
    return opt


# --------------------------------------------------------------------------------------------
# process management
# --------------------------------------------------------------------------------------------


def _rank_main(rank, world, store_path, tmp, checks, out_path):
    torch.set_num_threads(1)
    results = {}
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        mesh = init_device_mesh("cpu", (world,))
        ctx = dict(rank=rank, world=world, mesh=mesh, tmp=tmp)
        for name in checks:
            t0 = time.perf_counter()
            try:
                value = CHECKS[name](ctx)
                results[name] = dict(ok=True, value=value, seconds=time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - reported to the test
                results[name] = dict(ok=False, error=traceback.format_exc(), seconds=time.perf_counter() - t0)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["_setup"] = dict(ok=False, error=traceback.format_exc())
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(results, f, default=str)


def run(world: int, checks, out_path: str, timeout: float = 240.0) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mango-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, store_path, tmp, checks, out_path)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
    merged = {}
    for r in range(world):
        try:
            with open(f"{out_path}.rank{r}") as f:
                merged[r] = json.load(f)
            os.remove(f"{out_path}.rank{r}")
        except FileNotFoundError:
            why = f"exit code {procs[r].exitcode}" + (", killed after the timeout" if r in hung else "")
            merged[r] = {"_setup": dict(ok=False, error=f"rank {r} wrote no result ({why})")}
    with open(out_path, "w") as f:
        json.dump(merged, f, indent=1, default=str)
    return merged


if __name__ == "__main__":
    world = int(sys.argv[1])
    out = sys.argv[2]
    names = sys.argv[3:] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        sys.exit(f"unknown checks {unknown}; known: {list(CHECKS)}")
    t0 = time.perf_counter()
    if any(n in HF_CHECKS for n in names):
        import transformers  # noqa: F401 - once here, not in every forked rank (~2 s each)
    res = run(world, names, out)
    bad = {r: {k: v for k, v in rr.items() if not v.get("ok")} for r, rr in res.items()}
    for r, b in bad.items():
        for k, v in b.items():
            print(f"rank {r} {k}: FAILED\n{v['error']}")
    print(f"{world} ranks, {len(names)} checks, {time.perf_counter() - t0:.1f}s: {'FAILED' if any(bad.values()) else 'ok'}")
    sys.exit(1 if any(bad.values()) else 0)
