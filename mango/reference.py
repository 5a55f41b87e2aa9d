"""The reference implementation: one tensor at a time, plain PyTorch, written to be read.

This is the oracle every other backend is tested against (the correctness contract,
docs/design.md). It follows the update (docs/design.md) line by line and runs in float64 when
given float64 tensors. Nothing here is fused, batched or clever; if a fast path disagrees with
this file, the fast path is wrong.

Update for a tensor W with gradient g (settings come from the param group):

    precondition  v ← β2·v + (1−β2)·g²        u ← g / (√v + ε)        (laprop)
    momentum      m ← β1·m + c·u               d ← β1·m + c·u (Nesterov) or d ← m
                  (c = 1−β1 with ema_momentum, else 1 as in the report)
    normalize     Δ ← N_norm(d)                k ← shape factor (NS norms) × φ (trust ratio)
                  φ = min(‖W‖, trust_clamp); at φ = 0, Δ ← d for norm l2 (LAMB) and k is unchanged
    scale         s ← lr·k·Δ
    offset        O ← β_off·O + (1−β_off)·s
    apply         W ← W − (s + O) − lr·λ·W
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import newton_schulz as _ns
from .config import NS_NORMS, ns_schedule
from .layout import block_shape, norm_blocks, shape_factor_of

__all__ = [
    "compute_dtype",
    "newton_schulz",
    "normalize",
    "shape_factor",
    "init_state",
    "state_keys",
    "update",
]


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """State and arithmetic dtype for a parameter: float64 stays float64, the rest is float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Newton–Schulz (the readable textbook and Gram forms live in mango.newton_schulz)
# ----------------------------------------------------------------------------------------


def newton_schulz(
    X: torch.Tensor,
    coefficients: "Sequence[tuple[float, float, float]]",
    prescale: str = "frobenius",
    eps: float = 1e-7,
    method: str = "textbook",
) -> torch.Tensor:
    """Apply the Newton–Schulz polynomial to each (r, c) matrix of a (..., r, c) batch.

    The matrix is used transposed when r > c so the Gram matrix is the small one; it is
    first divided by max(‖X‖, eps) (Frobenius, or spectral) so its singular values lie in
    [0, 1], then each step computes A = X·Xᵀ, B = b·A + c·A·A, X ← a·X + B·X (method
    "textbook"), or the same polynomial on the Gram matrix (method "gram", see
    mango.newton_schulz). `coefficients` holds one (a, b, c) triple per step (see
    config.ns_schedule). Runs in X's dtype: float64 in, float64 evaluation out.
    """
    return _ns.newton_schulz(X, coefficients, prescale, eps, method)


# ----------------------------------------------------------------------------------------
# Normalizations
# ----------------------------------------------------------------------------------------


def _unit_l2(x: torch.Tensor, dim) -> torch.Tensor:
    """x / ‖x‖ over `dim`; blocks whose norm is zero stay zero."""
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return torch.where(n > 0, x / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(x))


def _layout(settings: dict) -> dict:
    return dict(orientation=settings.get("orientation", "out_in"), experts=settings.get("experts", False))


def shape_factor(norm: str, shape, head_dim, shape_scale, orientation: str = "out_in", experts: bool = False) -> float:
    """k_role: Muon's learning-rate adjustment for NS updates (from the operator block's
    rows and cols: per head block for ns_split, per expert), 1 for every other norm."""
    if norm not in NS_NORMS or shape_scale is None:
        return 1.0
    _, rows, cols = block_shape(shape, norm, head_dim, orientation, experts)
    return shape_factor_of(rows, cols, shape_scale)


def normalize(d: torch.Tensor, norm: str, settings: dict) -> torch.Tensor:
    """Δ = argmax_{‖Δ‖=1} ⟨Δ, d⟩ for the chosen norm (NS approximates the spectral case).

    Matrix norms act on the operators of the tensor (mango.layout): per expert, on the (out, in)
    orientation, per head block for the split norms."""
    if d.numel() == 0 or norm == "none":
        return d
    if norm == "sign":
        return torch.sign(d)
    d = d.contiguous()
    blocks = norm_blocks(d, d.shape, norm, settings.get("head_dim"), **_layout(settings))
    if norm in ("l2", "l2_split"):  # one unit vector per operator / head block
        out = _unit_l2(blocks, dim=(-2, -1))
    elif norm == "l2_col":  # one unit vector per operator row (output neuron, token embedding)
        out = _unit_l2(blocks, dim=-1)
    elif norm in ("ns", "ns_split"):
        # the oracle holds no policy: the form and dtype it is handed, "auto" as textbook in d's dtype
        ns_dtype = settings.get("ns_dtype", "auto")
        work = blocks if ns_dtype == "auto" else blocks.to(ns_dtype)
        method = "textbook" if settings.get("ns_method", "auto") == "auto" else settings["ns_method"]
        out = newton_schulz(work, ns_schedule(settings), settings["ns_prescale"], settings["ns_eps"], method)
    else:
        raise ValueError(f"mango: invalid norm={norm!r}")
    result = torch.empty_like(d)
    norm_blocks(result, d.shape, norm, settings.get("head_dim"), **_layout(settings)).copy_(out)
    return result


# ----------------------------------------------------------------------------------------
# The per-tensor update
# ----------------------------------------------------------------------------------------


def state_keys(settings: dict) -> set:
    """The state entries a tensor needs under these settings (what `init_state` creates)."""
    keys = {"step", "exp_avg"}
    if settings["preconditioner"] in ("laprop", "adam", "novograd"):
        keys.add("exp_avg_sq")
    if settings["beta_offset"]:
        keys.add("offset")
    return keys


def init_state(param: torch.Tensor, settings: dict) -> dict:
    """Fresh state with the layout every backend shares (see module docstring of mango.optimizer)."""
    dt = compute_dtype(param)
    state = {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros(param.shape, dtype=dt, device=param.device),
    }
    pre = settings["preconditioner"]
    if pre in ("laprop", "adam"):
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dt, device=param.device)
    elif pre == "novograd":
        state["exp_avg_sq"] = torch.zeros((), dtype=dt, device=param.device)
    if settings["beta_offset"]:
        state["offset"] = torch.zeros(param.shape, dtype=dt, device=param.device)
    return state


def update(param: torch.Tensor, grad: torch.Tensor, state: dict, settings: dict) -> None:
    """One MANGO step for one tensor, in place on `param` and `state`.

    `settings` is the param group with "role" and "norm" already resolved for this tensor.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    if settings["maximize"]:
        g = -g
    W = param.detach().to(dt)
    state["step"] += 1
    t = float(state["step"])
    lr, b1, b2, eps = float(settings["lr"]), settings["beta1"], settings["beta2"], settings["eps"]
    wd, pre = settings["weight_decay"], settings["preconditioner"]
    ema_v = settings["second_moment"] == "ema"
    m = state["exp_avg"]

    # precondition + momentum -> direction d
    if pre == "adam":
        v = state["exp_avg_sq"]
        v.mul_(b2).add_((1 - b2) * g * g if ema_v else g * g)
        m.mul_(b1).add_((1 - b1) * g)
        num = b1 * m + (1 - b1) * g if settings["nesterov"] else m
        d = (num / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    else:
        if pre is None:
            u = g
        elif pre == "laprop":
            v = state["exp_avg_sq"]
            v.mul_(b2).add_((1 - b2) * g * g if ema_v else g * g)
            v_hat = v / (1 - b2**t) if settings["bias_correction"] else v
            u = g / (torch.sqrt(v_hat) + eps)
        elif pre == "novograd":
            v = state["exp_avg_sq"]
            sq = torch.sum(g * g)
            if t == 1:  # NovoGrad's first-step initialization v₁ = ‖g₁‖²
                v.copy_(sq)
            else:
                v.mul_(b2).add_((1 - b2) * sq if ema_v else sq)
            u = g / (torch.sqrt(v) + eps) + wd * W
        else:
            raise ValueError(f"mango: invalid preconditioner={pre!r}")
        c = (1 - b1) if settings["ema_momentum"] else 1.0
        m.mul_(b1).add_(c * u)
        d = b1 * m + c * u if settings["nesterov"] else m.clone()
        if settings["bias_correction"] and settings["ema_momentum"]:
            d = d / (1 - b1**t)

    # normalize and scale
    norm = settings["norm"]
    delta = normalize(d, norm, settings)
    k = shape_factor(norm, tuple(param.shape), settings.get("head_dim"), settings["shape_scale"], **_layout(settings))
    if settings["trust_ratio"]:  # LAMB: φ = min(‖W‖, trust_clamp)
        phi = float(torch.linalg.vector_norm(W))
        if settings.get("trust_clamp") is not None:
            phi = min(phi, settings["trust_clamp"])
        if phi > 0:
            k *= phi
        elif norm == "l2":  # W = 0: LAMB's trust ratio 1 on the raw Adam step r, not on r/‖r‖
            delta = d
    s = (lr * k) * delta

    # offset momentum, decoupled weight decay (NovoGrad has its decay inside u), apply
    if "offset" in state:
        O = state["offset"]
        bo = settings["beta_offset"]
        O.mul_(bo).add_((1 - bo) * s)
        s = s + O
    decay = 0.0 if pre == "novograd" else lr * wd
    W_new = W - s - decay * W
    param.data.copy_(W_new.to(param.dtype))
