"""Ready optimizers: the same engine configured as MANGO, Muon, LAMB, LaProp or NovoGrad (the presets, docs/guide.md).

Each preset takes an `nn.Module` (labelled with `mango.param_groups`; pass `qkv_heads=`,
`head=` or `overrides=` through), an iterable of params, or param-group dicts, and returns a
`mango.Mango`. Keyword arguments not consumed by the preset are passed to `Mango` and so
apply to every group (e.g. `backend="torch"`, `weight_decay=0.1`).
"""

from __future__ import annotations

import torch

from . import config, plain
from .optimizer import Mango
from .roles import param_groups

# Roles Muon orthogonalizes; everything else gets AdamW (Keller Jordan's recipe).
MUON_ROLES = ("matrix", "qkv_weight")
_LABEL_KW = ("qkv_heads", "head", "overrides")


def _groups(model_or_params, kw) -> list[dict]:
    """Param groups from a module (labelled), a list of group dicts, or tensors / named parameters."""
    label = {k: kw.pop(k) for k in _LABEL_KW if k in kw}
    if isinstance(model_or_params, torch.nn.Module):
        return param_groups(model_or_params, **label)
    if label:
        raise ValueError(f"mango.presets: {sorted(label)} only apply when a model (nn.Module) is given")
    return [dict(g) for g in plain.groups_from(model_or_params)]


def _split_by_role(groups, chosen_roles) -> tuple[list[dict], list[dict]]:
    """Split groups into (tensors whose role is in chosen_roles, the rest); roles inferred from ndim when unset."""
    chosen, rest = [], []
    for g in groups:
        params = list(g["params"])
        names = g.get("param_names") or [None] * len(params)
        parts: dict = {True: ([], []), False: ([], [])}
        for name, p in zip(names, params):
            role = config.resolve_role({"role": g.get("role")}, p)
            parts[role in chosen_roles][0].append(p)
            parts[role in chosen_roles][1].append(name)
        for is_chosen, (ps, ns) in parts.items():
            if ps:
                sub = dict(g, params=ps)
                if g.get("param_names") is not None:
                    sub["param_names"] = ns
                (chosen if is_chosen else rest).append(sub)
    return chosen, rest


def mango(model_or_params, lr: float = 0.01, **kw) -> Mango:
    """The report's MANGO: LaProp (β2 0.95), Nesterov β1 0.95, offset momentum 0.99, norms per role."""
    groups = _groups(model_or_params, kw)
    settings = dict(beta1=0.95, beta2=0.95, preconditioner="laprop", nesterov=True, beta_offset=0.99)
    settings.update(kw)
    return Mango(groups, lr=lr, **settings)


def muon(
    model_or_params,
    lr: float = 0.01,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    adamw_lr: float = 3e-4,
    adamw_betas=(0.9, 0.95),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
    **kw,
) -> Mango:
    """Muon on hidden matrices (Nesterov EMA momentum, NS on the whole matrix, lr × √max(1, rows/cols),
    matching `torch.optim.Muon`), AdamW on embeddings, head and vectors."""
    groups = _groups(model_or_params, kw)
    backend = {k: kw.pop(k) for k in ("backend", "nonfinite") if k in kw}
    plain.warn_shape_only(plain.shape_only_names(groups), "mango.presets.muon")  # the split below is by role
    matrices, rest = _split_by_role(groups, MUON_ROLES)
    muon_settings = dict(
        lr=lr, beta1=momentum, preconditioner=None, nesterov=True, ema_momentum=True, norm="ns",
        shape_scale="original", beta_offset=None, weight_decay=weight_decay, head_dim=None,
    )  # fmt: skip
    adamw_settings = dict(
        lr=adamw_lr, beta1=adamw_betas[0], beta2=adamw_betas[1], eps=adamw_eps, preconditioner="adam",
        nesterov=False, norm="none", beta_offset=None, weight_decay=adamw_weight_decay,
    )  # fmt: skip
    out = [{**g, **muon_settings, **kw} for g in matrices] + [{**g, **adamw_settings, **kw} for g in rest]
    return Mango(out, **backend)


def lamb(model_or_params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, trust_clamp=None, **kw) -> Mango:
    """LAMB (You et al.): W ← W − lr·(φ/‖r‖)·r with the bias-corrected Adam step r and
    φ = min(‖W‖, trust_clamp); the ratio is 1 where φ or ‖r‖ is 0 (so W = 0 takes the raw
    step lr·r). torch-optimizer and pytorch_optimizer clamp at 10; here no clamp unless asked.
    Weight decay, if given, is decoupled (applied after the trust-ratio step)."""
    groups = _groups(model_or_params, kw)
    settings = dict(beta1=betas[0], beta2=betas[1], eps=eps, preconditioner="adam", nesterov=False,
                    norm="l2", trust_ratio=True, trust_clamp=trust_clamp, beta_offset=None, shape_scale=None)  # fmt: skip
    settings.update(kw)
    return Mango([dict(g, head_dim=None) for g in groups], lr=lr, **settings)


def laprop(model_or_params, lr: float = 4e-4, betas=(0.9, 0.999), eps: float = 1e-15, **kw) -> Mango:
    """LaProp (Ziyin et al.): m ← β1·m + (1−β1)·g/√v̂, both bias-corrected; no normalization."""
    groups = _groups(model_or_params, kw)
    settings = dict(beta1=betas[0], beta2=betas[1], eps=eps, preconditioner="laprop", nesterov=False,
                    ema_momentum=True, bias_correction=True, norm="none", beta_offset=None)  # fmt: skip
    settings.update(kw)
    return Mango([dict(g, head_dim=None) for g in groups], lr=lr, **settings)


def novograd(model_or_params, lr: float = 0.01, betas=(0.95, 0.98), eps: float = 1e-8, weight_decay: float = 1e-3, **kw) -> Mango:
    """NovoGrad (Ginsburg et al.): layer-wise scalar v (v₁ = ‖g₁‖²), weight decay inside the
    moment, m ← β1·m + g/(√v+ε) + λ·W, W ← W − lr·m."""
    groups = _groups(model_or_params, kw)
    settings = dict(beta1=betas[0], beta2=betas[1], eps=eps, preconditioner="novograd", nesterov=False,
                    ema_momentum=False, norm="none", beta_offset=None, weight_decay=weight_decay)  # fmt: skip
    settings.update(kw)
    return Mango([dict(g, head_dim=None) for g in groups], lr=lr, **settings)
