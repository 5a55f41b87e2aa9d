"""Hyperparameter names, defaults and validation shared by every backend.

One place defines what a param group may contain, so the frontend, the reference,
the torch and triton backends and the presets agree on spelling and defaults, and
bad input is rejected before any state is touched (the reliability contract, docs/design.md).
"""

from __future__ import annotations

import difflib
import math
import warnings
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
NS_METHODS = ("auto", "textbook", "gram")
NS_ENGINES = ("auto", "triton", "cublas")  # triton backend: Triton kernels, or torch batched GEMMs (cuBLAS on CUDA)
SHAPE_SCALES = (None, "original", "match_rms_adamw")
SECOND_MOMENTS = ("ema", "sum")
NONFINITE_POLICIES = ("propagate", "skip", "raise")
BACKENDS = ("auto", "torch", "triton", "reference")
# How a tensor stores its operator: "out_in" as nn.Linear (conv kernels (out, in, kh, kw)),
# "in_out" transposed (HF GPT-2's Conv1D; experts stored [E, in, out]). Norms see (out, in).
ORIENTATIONS = ("out_in", "in_out")
MATRIX_NORMS = ("ns", "ns_split", "l2_col")

# The report's best norm per role (the roles, docs/guide.md).
ROLE_DEFAULT_NORM = {
    "matrix": "ns",
    "qkv_weight": "ns_split",
    "qkv_bias": "l2_split",
    "embedding": "none",
    "head": "ns",
    "vector_weight": "none",
    "vector_bias": "l2",
}

# Norms each role accepts (the roles table of docs/guide.md: "default norm" + "alternatives").
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

# Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign Methods
# and Their Application to the Muon Algorithm", arXiv:2505.16932, Algorithm 1): per-step optimal
# degree-5 polynomials for singular values in [1e-3, 1], each divided by the paper's safety factor
# 1.01 (a/1.01, b/1.01³, c/1.01⁵) except the last, which later steps repeat.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFICIENTS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + _POLAR_EXPRESS_RAW[-1:]


def _polar_express(steps: int) -> tuple:
    pe = POLAR_EXPRESS_COEFFICIENTS
    return tuple(pe[:steps]) + (pe[-1],) * max(0, steps - len(pe))


# Named coefficient schedules for `ns_coefficients` (the kernel design: schedules are data). Each maps a
# step count to one (a, b, c) per step; `steps` is the schedule's own length (None: any, default 5).
NS_SCHEDULES = {
    "muon": dict(steps=None, make=lambda n: (MUON_COEFFICIENTS,) * n,
                 source="Keller Jordan's Muon quintic (3.4445, -4.7750, 2.0315), the same every step"),
    "mango_jax": dict(steps=6, make=lambda n: (MUON_COEFFICIENTS,) * n,
                      source="the MANGO authors' JAX code: 6 steps of Muon's quintic"),
    "polar_express": dict(steps=None, make=_polar_express,
                          source="Polar Express (Amsel et al. 2025, arXiv:2505.16932, Algorithm 1), first ns_steps polynomials"),
    "polar_express_4": dict(steps=4, make=_polar_express, source="Polar Express, 4 steps"),
    "polar_express_5": dict(steps=5, make=_polar_express, source="Polar Express, 5 steps"),
}
DEFAULT_NS_STEPS = 5

# Defaults of every group setting (the MANGO report's values, the `mango` preset of docs/guide.md).
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
    ns_steps=None,  # None: the schedule's own length (5 for a single triple or "muon")
    ns_coefficients=MUON_COEFFICIENTS,
    ns_method="auto",  # "textbook" X ← p(XXᵀ)X, "gram" (iterate on the Gram matrix), "auto": fewer FLOPs per shape
    ns_prescale="frobenius",
    ns_eps=1e-7,
    ns_dtype="auto",  # decided per NS bucket by mango.ns_engine (measured on CPUs); reference: input dtype
    ns_engine="auto",  # triton backend: "triton" kernels, "cublas" (torch batched GEMMs), "auto": per bucket (mango.ns_engine)
    shape_scale="original",
    orientation="out_in",  # how a matrix is stored: (out, in) like nn.Linear, or "in_out" (HF Conv1D)
    experts=False,  # dim 0 indexes independent matrices (MoE experts): every norm is taken per expert
    trust_ratio=False,
    trust_clamp=None,  # trust ratio uses min(‖W‖, trust_clamp); None: no clamp
    beta_offset=0.99,
    weight_decay=0.0,
    maximize=False,
)


# Keys mango reads besides DEFAULTS: torch's spelling of the two betas (kept equal to
# beta1/beta2, see mango.betas) and the bookkeeping torch.optim and mango.param_groups add.
OWN_KEYS = frozenset(DEFAULTS) | {"betas"}
BOOKKEEPING_KEYS = frozenset({"params", "param_names", "name"})


# Foreign keys others are known to put in param groups (LR and momentum schedulers, torch.optim's
# own options, common per-group multipliers and tags): kept silently, never taken for a misspelling.
KNOWN_FOREIGN_KEYS = frozenset({
    "initial_lr", "max_lr", "min_lr", "base_lr", "lr_scale", "lr_mult", "weight_decay_mult", "layer_scale",
    "momentum", "base_momentum", "max_momentum", "dampening", "foreach", "fused", "capturable",
    "differentiable", "amsgrad", "decoupled_weight_decay", "layer_id", "tag", "group_name",
})  # fmt: skip
_warned_keys: set = set()


def foreign_keys(group: dict) -> list:
    """Keys mango neither owns nor reads (a scheduler's initial_lr, a user's lr_scale): kept as is."""
    return sorted(set(group) - OWN_KEYS - BOOKKEEPING_KEYS, key=str)


def resembled_setting(key) -> str | None:
    """The mango setting a foreign key looks like a misspelling of (`weight_decai` → `weight_decay`),
    or None: known foreign keys and keys that resemble nothing."""
    if not isinstance(key, str) or key in KNOWN_FOREIGN_KEYS:
        return None
    close = difflib.get_close_matches(key, sorted(OWN_KEYS), n=1, cutoff=0.8)
    return close[0] if close else None


def warn_misspelt_keys(group: dict) -> None:
    """Once per process and key: a foreign key that resembles one of mango's settings is kept (as
    torch.optim keeps every key) but is most likely a typo whose value mango never reads."""
    for key in foreign_keys(group):
        setting = resembled_setting(key)
        if setting is None or key in _warned_keys:
            continue
        _warned_keys.add(key)
        warnings.warn(f"mango: param group key {key!r} is not a mango setting and is ignored (kept, as torch.optim keeps "
                      f"foreign keys); did you mean {setting!r}?", UserWarning, stacklevel=4)  # fmt: skip


def _err(name: str, value, why: str) -> ValueError:
    return ValueError(f"mango: invalid {name}={value!r}: {why}")


def _check_real(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _err(name, value, "must be a real number")
    v = float(value)
    if not math.isfinite(v):
        raise _err(name, value, "must be finite")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _err(name, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise _err(name, value, f"must be {'<' if hi_open else '<='} {hi}")


def _check_lr(lr) -> None:
    """A real number, or (as torch.optim allows, for compiled steps whose lr changes without a
    recompile) a one-element floating-point tensor; >= 0 and finite either way."""
    if hasattr(lr, "is_floating_point") and hasattr(lr, "numel"):  # a tensor (config does not import torch)
        if lr.numel() != 1 or not lr.is_floating_point():
            raise _err("lr", lr, "a tensor lr must have one floating-point element")
        lr = float(lr)
    _check_real("lr", lr, lo=0.0)


def _check_choice(name, value, choices):
    if value not in choices:
        raise _err(name, value, f"must be one of {choices}")


def normalize_ns_coefficients(coeffs, ns_steps) -> tuple[tuple[float, float, float], ...]:
    """One (a, b, c) triple per NS step from a triple, a per-step list of triples, or a schedule
    name (see NS_SCHEDULES). ns_steps=None means the schedule's own length (5 for a triple)."""
    if isinstance(coeffs, str):
        if coeffs not in NS_SCHEDULES:
            raise _err("ns_coefficients", coeffs, f"unknown schedule; named schedules: {sorted(NS_SCHEDULES)}")
        fixed = NS_SCHEDULES[coeffs]["steps"]
        if fixed is not None and ns_steps is not None and ns_steps != fixed:
            raise _err("ns_steps", ns_steps, f"schedule {coeffs!r} has {fixed} steps; leave ns_steps=None or set {fixed}")
        steps = fixed if fixed is not None else (DEFAULT_NS_STEPS if ns_steps is None else ns_steps)
        return tuple(tuple(float(c) for c in t) for t in NS_SCHEDULES[coeffs]["make"](steps))
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) == 0:
        raise _err("ns_coefficients", coeffs, "must be (a, b, c), a list of ns_steps such triples, or a schedule name")
    if all(isinstance(c, Real) and not isinstance(c, bool) for c in coeffs):
        if len(coeffs) != 3:
            raise _err("ns_coefficients", coeffs, "a single triple must have exactly 3 numbers (a, b, c)")
        triples = [tuple(float(c) for c in coeffs)] * (DEFAULT_NS_STEPS if ns_steps is None else ns_steps)
    else:
        if ns_steps is not None and len(coeffs) != ns_steps:
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


def ns_schedule(group: dict) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of every NS step of a param group."""
    return normalize_ns_coefficients(group["ns_coefficients"], group["ns_steps"])


def validate_group(group: dict) -> None:
    """Raise ValueError naming the offending setting; never modifies the group.

    Only mango's own keys are checked: like torch.optim, keys it does not know are kept and
    ignored (LR schedulers add initial_lr, max_lr, ...; see `foreign_keys`)."""
    missing = sorted(set(DEFAULTS) - set(group))
    if missing:
        raise ValueError(f"mango: param group lacks setting(s) {missing}")
    _check_betas(group)
    _check_lr(group["lr"])
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
    steps = group["ns_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise _err("ns_steps", steps, "must be None (the schedule's length) or an int >= 0")
    normalize_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
    _check_choice("ns_prescale", group["ns_prescale"], NS_PRESCALES)
    _check_choice("ns_method", group["ns_method"], NS_METHODS)
    _check_choice("ns_engine", group["ns_engine"], NS_ENGINES)
    _check_choice("orientation", group["orientation"], ORIENTATIONS)
    if not isinstance(group["experts"], bool):
        raise _err("experts", group["experts"], "must be True or False")
    _check_real("ns_eps", group["ns_eps"], lo=0.0, lo_open=True)
    if group["ns_dtype"] != "auto":
        import torch

        if group["ns_dtype"] not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            raise _err("ns_dtype", group["ns_dtype"], "must be 'auto' or a torch float dtype")
        if group["ns_method"] == "gram" and group["ns_dtype"] == torch.bfloat16:
            raise _err("ns_method", "gram", "bfloat16 cannot hold the Gram iterates (~4% error); use ns_dtype=torch.float16, float32 or 'auto'")
    _check_choice("shape_scale", group["shape_scale"], SHAPE_SCALES)
    _check_real("beta_offset", group["beta_offset"], lo=0.0, hi=1.0, hi_open=True, allow_none=True)
    _check_real("weight_decay", group["weight_decay"], lo=0.0)
    _check_real("trust_clamp", group["trust_clamp"], lo=0.0, lo_open=True, allow_none=True)


def _check_betas(group: dict) -> None:
    """torch's `betas` spelling, when present, is a pair equal to (beta1, beta2)."""
    if "betas" not in group:
        return
    betas = group["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise _err("betas", betas, "must be a pair (beta1, beta2)")
    if tuple(betas) != (group["beta1"], group["beta2"]):
        raise _err("betas", betas, f"disagrees with beta1={group['beta1']!r}, beta2={group['beta2']!r}; set one spelling")



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
    """Shape checks that depend on the tensor (the reliability contract): clear error naming the parameter."""
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
