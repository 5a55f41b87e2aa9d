"""Shared test utilities: parameter sets for every norm, trajectories, relative errors."""

from __future__ import annotations

import copy

import torch

import mango

# Shapes per norm, including odd sizes, 1×n, n×1, tall, wide, conv-shaped and 0-d tensors.
NORM_CASES = {
    "ns": ("matrix", None, [(8, 5), (5, 8), (8, 5), (1, 7), (7, 1), (3, 4, 2, 2)]),
    "ns_split": ("qkv_weight", 3, [(9, 5), (12, 4), (9, 5)]),
    "l2_split": ("qkv_bias", 3, [(9,), (12,)]),
    "l2_col": ("embedding", None, [(8, 5), (1, 7), (7, 1), (3, 4, 2, 2)]),
    "l2": ("vector_bias", None, [(7,), (1,), (5,)]),
    "sign": ("vector_weight", None, [(7,), (), (6,)]),
    "none": ("matrix", None, [(8, 5), (3, 3)]),
}
ALL_NORMS = tuple(NORM_CASES)


def make_groups(norms=ALL_NORMS, dtype=torch.float64, seed=0, device="cpu", **settings):
    """One param group per norm with the NORM_CASES shapes, filled with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for norm in norms:
        role, head_dim, shapes = NORM_CASES[norm]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)) for s in shapes]
        groups.append(dict(params=params, role=role, norm=norm, head_dim=head_dim, **settings))
    return groups


def clone_groups(groups, dtype=None):
    """Independent copies of the groups' parameters (optionally cast), same settings."""
    out = []
    for g in groups:
        params = [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in g["params"]]
        out.append(dict({k: v for k, v in g.items() if k != "params"}, params=params))
    return out


def all_params(groups_or_opt):
    groups = groups_or_opt.param_groups if hasattr(groups_or_opt, "param_groups") else groups_or_opt
    return [p for g in groups for p in g["params"]]


def random_grads(params, step, seed=1234):
    """Deterministic fresh gradients per step, same values for every copy of a parameter set."""
    gen = torch.Generator().manual_seed(seed + 7919 * step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def run_trajectory(opt, steps=10, seed=1234, grad_fn=random_grads):
    params = all_params(opt)
    for t in range(steps):
        for p, g in zip(params, grad_fn(params, t, seed)):
            p.grad = g.to(dtype=p.dtype, device=p.device)
        opt.step()
    return params


def rel_err(actual, expected) -> float:
    """‖a − b‖ / ‖b‖ over a list of tensors, computed in float64."""
    num = sum(float(torch.sum((a.detach().double().cpu() - b.detach().double().cpu()) ** 2)) for a, b in zip(actual, expected))
    den = sum(float(torch.sum(b.detach().double().cpu() ** 2)) for b in expected)
    return (num / max(den, 1e-300)) ** 0.5


def state_snapshot(opt):
    return copy.deepcopy({i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(all_params(opt)) if p in opt.state})


def mango_opt(groups, backend, **kw):
    return mango.Mango(groups, backend=backend, **kw)


def small_ns_launch(batch) -> str:
    """The name of an NS batch's on-chip launch: it follows the form "auto" chose for the batch's
    buckets on its device (the Gram form where its fewer FLOPs pay, e.g. fp16 on CUDA)."""
    return "ns_small_gram" if batch.method == "gram" else "ns_small"


def choose_ns_as_on(monkeypatch, device_type: str) -> None:
    """Make the triton backend choose every NS bucket's form as it would on `device_type`. The
    choice is made on the host from the device type, shapes and settings, so a CPU dry run then
    launches what a step on that device launches: CI sees the CUDA launch structure without a GPU."""
    import mango.backends.triton_backend as tb
    from mango import ns_engine

    arch = "sm_90" if device_type == "cuda" else None  # the committed table's architecture

    def as_on(nb, bucket, group, backend, profile=None):
        r, c = nb.block_shape
        count = nb.blocks_per_tensor * len(nb.slots)
        nb.ns_choice = ns_engine.choose(group, r, c, bucket.dtype, bucket.device, backend, count, profile, arch=arch)
        return nb.ns_choice

    monkeypatch.setattr(tb, "choose_for_bucket", as_on)
