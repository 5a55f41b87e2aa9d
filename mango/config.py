"""Hyperparameter names, defaults and validation shared by every backend.

One place defines what a param group may contain, so the frontend, the reference,
the torch and triton backends and the presets agree on spelling and defaults, and
bad input is rejected before any state is touched (SPEC §9).
"""

from __future__ import annotations

import math
from numbers import Real

ROLES = (
    "matrix",
    "qkv_weight",
    "qkv_bias",
    "embedding",
    "head",
    "vector_weight",
    "vector_bias",
)

NORMS = ("ns", "ns_split", "l2", "l2_split", "l2_col", "sign", "none")
NS_NORMS = ("ns", "ns_split")
SPLIT_NORMS = ("ns_split", "l2_split")
PRECONDITIONERS = (None, "laprop", "adam", "novograd")
NS_PRESCALES = ("frobenius", "spectral")
SHAPE_SCALES = (None, "original", "match_rms_adamw")
SECOND_MOMENTS = ("ema", "sum")
NONFINITE_POLICIES = ("propagate", "skip", "raise")
BACKENDS = ("auto", "torch", "triton", "reference")
# How a tensor stores its operator: "out_in" as nn.Linear (conv kernels (out, in, kh, kw)),
# "in_out" transposed (HF GPT-2's Conv1D; experts stored [E, in, out]). Norms see (out, in).
ORIENTATIONS = ("out_in", "in_out")
MATRIX_NORMS = ("ns", "ns_split", "l2_col")

# The report's best norm per role (SPEC §3).
ROLE_DEFAULT_NORM = {
    "matrix": "ns",
    "qkv_weight": "ns_split",
    "qkv_bias": "l2_split",
    "embedding": "none",
    "head": "ns",
    "vector_weight": "none",
    "vector_bias": "l2",
}

# Norms each role accepts (SPEC §3 "default" + "alternatives").
ROLE_NORMS = {
    "matrix": ("ns", "l2", "l2_col", "sign", "none"),
    "qkv_weight": ("ns_split", "ns", "l2", "l2_col", "sign", "none"),
    "qkv_bias": ("l2_split", "l2", "sign", "none"),
    "embedding": ("none", "l2_col", "sign", "l2"),
    "head": ("ns", "none", "l2_col", "l2", "sign"),
    "vector_weight": ("none", "sign", "l2"),
    "vector_bias": ("l2", "none", "sign"),
}

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Defaults of every group setting (the MANGO report's values, SPEC §4 `mango`).
DEFAULTS = dict(
    lr=0.01,
    beta1=0.95,
    beta2=0.95,
    eps=1e-8,
    preconditioner="laprop",
    second_moment="ema",
    nesterov=True,
    ema_momentum=False,
    bias_correction=False,  # laprop only: LaProp's 1/(1-β2^t) in v and 1/(1-β1^t) on an ema momentum
    role=None,  # None: inferred per tensor from ndim (>=2-D matrix, else vector_weight)
    norm=None,  # None: the role's default norm
    head_dim=None,
    orientation="out_in",
    experts=False,  # True: dim 0 indexes independent matrices (MoE experts), normalized one by one
    ns_steps=5,
    ns_coefficients=MUON_COEFFICIENTS,
    ns_prescale="frobenius",
    ns_eps=1e-7,
    ns_dtype="auto",  # torch backend: bfloat16 on CUDA, float32 on CPU; reference: input dtype
    shape_scale="original",
    trust_ratio=False,
    beta_offset=0.99,
    weight_decay=0.0,
    maximize=False,
)


def _err(name: str, value, why: str) -> ValueError:
    return ValueError(f"mango: invalid {name}={value!r}: {why}")


def _check_real(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _err(name, value, "must be a real number")
    v = float(value)
    if math.isnan(v):
        raise _err(name, value, "must not be NaN")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _err(name, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise _err(name, value, f"must be {'<' if hi_open else '<='} {hi}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise _err(name, value, f"must be one of {choices}")


def normalize_ns_coefficients(coeffs, ns_steps: int) -> tuple[tuple[float, float, float], ...]:
    """Return one (a, b, c) triple per NS step from a triple or a per-step list of triples."""
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) == 0:
        raise _err("ns_coefficients", coeffs, "must be (a, b, c) or a list of ns_steps such triples")
    if all(isinstance(c, Real) and not isinstance(c, bool) for c in coeffs):
        if len(coeffs) != 3:
            raise _err("ns_coefficients", coeffs, "a single triple must have exactly 3 numbers (a, b, c)")
        triples = [tuple(float(c) for c in coeffs)] * ns_steps
    else:
        if len(coeffs) != ns_steps:
            raise _err("ns_coefficients", coeffs, f"a per-step list must have ns_steps={ns_steps} triples")
        triples = []
        for t in coeffs:
            if not isinstance(t, (list, tuple)) or len(t) != 3:
                raise _err("ns_coefficients", coeffs, "every per-step entry must be an (a, b, c) triple")
            triples.append(tuple(float(c) for c in t))
    for t in triples:
        for c in t:
            if not math.isfinite(c):
                raise _err("ns_coefficients", coeffs, "must be finite")
    return tuple(triples)


def validate_group(group: dict) -> None:
    """Raise ValueError naming the offending setting; never modifies the group."""
    unknown = set(group) - set(DEFAULTS) - {"params", "param_names", "name"}
    if unknown:
        raise ValueError(f"mango: unknown param-group setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    _check_real("lr", group["lr"], lo=0.0)
    _check_real("beta1", group["beta1"], lo=0.0, hi=1.0, hi_open=True)
    _check_real("eps", group["eps"], lo=0.0)
    _check_choice("preconditioner", group["preconditioner"], PRECONDITIONERS)
    if group["preconditioner"] is not None:
        _check_real("beta2", group["beta2"], lo=0.0, hi=1.0, hi_open=True)
    _check_choice("second_moment", group["second_moment"], SECOND_MOMENTS)
    if group["bias_correction"] and group["preconditioner"] != "laprop":
        raise _err(
            "bias_correction", True,
            f"only applies to preconditioner='laprop' (got {group['preconditioner']!r}; 'adam' always corrects)",
        )  # fmt: skip
    for flag in ("nesterov", "ema_momentum", "bias_correction", "trust_ratio", "maximize", "experts"):
        if not isinstance(group[flag], bool):
            raise _err(flag, group[flag], "must be True or False")
    if group["role"] is not None:
        _check_choice("role", group["role"], ROLES)
    if group["norm"] is not None:
        _check_choice("norm", group["norm"], NORMS)
        if group["role"] is not None and group["norm"] not in ROLE_NORMS[group["role"]]:
            raise _err("norm", group["norm"], f"role {group['role']!r} accepts {ROLE_NORMS[group['role']]}")
    hd = group["head_dim"]
    if hd is not None and (isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0):
        raise _err("head_dim", hd, "must be a positive int")
    _check_choice("orientation", group["orientation"], ORIENTATIONS)
    if isinstance(group["ns_steps"], bool) or not isinstance(group["ns_steps"], int) or group["ns_steps"] < 0:
        raise _err("ns_steps", group["ns_steps"], "must be an int >= 0")
    normalize_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
    _check_choice("ns_prescale", group["ns_prescale"], NS_PRESCALES)
    _check_real("ns_eps", group["ns_eps"], lo=0.0, lo_open=True)
    if group["ns_dtype"] != "auto":
        import torch

        if group["ns_dtype"] not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            raise _err("ns_dtype", group["ns_dtype"], "must be 'auto' or a torch float dtype")
    _check_choice("shape_scale", group["shape_scale"], SHAPE_SCALES)
    _check_real("beta_offset", group["beta_offset"], lo=0.0, hi=1.0, hi_open=True, allow_none=True)
    _check_real("weight_decay", group["weight_decay"], lo=0.0)


def resolve_role(group: dict, param) -> str:
    """The role of one tensor: the group's, or inferred from its shape when the group has none."""
    if group["role"] is not None:
        return group["role"]
    return "matrix" if param.dim() >= 2 else "vector_weight"


def resolve_norm(group: dict, role: str) -> str:
    return group["norm"] if group["norm"] is not None else ROLE_DEFAULT_NORM[role]


def operator_rows(shape, orientation: str = "out_in", experts: bool = False) -> int:
    """Rows of the (out, in) operator a tensor stores (per expert): what head splits divide."""
    if experts:
        shape = shape[1:]
    if len(shape) == 0:
        return 1
    return shape[1] if orientation == "in_out" else shape[0]


def check_param_for_norm(name: str, param, role: str, norm: str, head_dim, orientation="out_in", experts=False) -> None:
    """Shape checks that depend on the tensor (SPEC §9): clear error naming the parameter."""
    shape = tuple(param.shape)
    if experts and param.dim() < (3 if norm in MATRIX_NORMS else 2):
        raise ValueError(
            f"mango: parameter {name} with shape {shape} cannot use experts=True with norm={norm!r} "
            f"(needs dim 0 = experts and {'a matrix' if norm in MATRIX_NORMS else 'a vector'} per expert)"
        )
    if orientation == "in_out" and param.dim() != (3 if experts else 2):
        raise ValueError(
            f"mango: parameter {name} with shape {shape} cannot use orientation='in_out' "
            f"(needs a {'3-D [E, in, out]' if experts else '2-D (in, out)'} tensor)"
        )
    if norm in ("ns", "l2_col") and param.dim() < 2:
        raise ValueError(f"mango: parameter {name} with shape {tuple(param.shape)} cannot use norm={norm!r} (needs >= 2 dims)")
    if norm == "ns_split" and param.dim() < 2:
        raise ValueError(f"mango: parameter {name} with shape {tuple(param.shape)} cannot use norm='ns_split' (needs >= 2 dims)")
    if norm in SPLIT_NORMS:
        if head_dim is None:
            raise ValueError(f"mango: parameter {name} uses norm={norm!r} but its group has no head_dim")
        rows = operator_rows(shape, orientation, experts)
        if rows % head_dim != 0:
            raise ValueError(
                f"mango: parameter {name}: head_dim={head_dim} does not divide its {rows} rows "
                f"(of the (out, in) operator; QKV head count does not match the tensor)"
            )
