"""Checks the frontend runs on param groups and on loaded checkpoints, before anything changes.

A rejected group or checkpoint must leave the optimizer as it was (the reliability contract), so everything
that can fail is checked here first: every parameter against its group's settings, and a
loaded state dict's groups and state shapes against the parameters they will be attached to.
"""

from __future__ import annotations

import copy

import torch

from . import config, distributed
from .reference import compute_dtype

_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "offset")


def check_param(name: str, p, group: dict) -> None:
    """A clear error for a parameter the group's settings cannot handle (dtype, norm, head size, placement)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"mango: parameter {name} is a {type(p).__name__}, not a tensor")
    if p.is_complex():
        raise ValueError(f"mango: parameter {name} is complex ({p.dtype}); complex parameters are not supported")
    if not p.is_floating_point():
        raise ValueError(f"mango: parameter {name} has dtype {p.dtype}; only floating-point parameters can be optimized")
    role = config.resolve_role(group, p)
    norm = config.resolve_norm(group, role)
    if group["norm"] is not None and norm not in config.ROLE_NORMS[role]:
        raise ValueError(f"mango: parameter {name}: norm={norm!r} is not available for role {role!r}")
    config.check_param_for_norm(name, p, role, norm, group["head_dim"], group["orientation"], group["experts"])
    distributed.check_param(name, p)  # DTensor placements mango cannot handle


def upgrade_group(group: dict) -> dict:
    """Fill settings a group saved by an older mango lacks (their defaults) and torch's `betas`."""
    for key, value in config.DEFAULTS.items():
        group.setdefault(key, value)
    group.setdefault("betas", (group["beta1"], group["beta2"]))
    return group


def check_loadable(opt, state_dict) -> list:
    """The state dict's param groups, upgraded, after checking them and the state's shapes
    against `opt`'s parameters; raises ValueError naming the group or parameter."""
    saved_groups = [upgrade_group(copy.copy(g)) for g in state_dict["param_groups"]]
    same_layout = len(saved_groups) == len(opt.param_groups) and all(
        len(s["params"]) == len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
    )
    if not same_layout:
        return saved_groups  # torch.optim raises its own clear error for these
    state = state_dict["state"]
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        try:
            config.validate_group(saved)
        except ValueError as e:
            raise ValueError(f"mango: loaded param_groups[{i}]: {e}") from None
        for index, p, name in zip(saved["params"], group["params"], group["param_names"]):
            check_param(name, p, saved)
            for key in _SHAPED_STATE:
                value = state.get(index, {}).get(key)
                if isinstance(value, torch.Tensor):
                    _check_state_shape(name, p, key, value, saved)
    return saved_groups


def _check_state_shape(name, p, key, value, group) -> None:
    scalar_v = key == "exp_avg_sq" and group["preconditioner"] == "novograd"  # NovoGrad: one v per tensor
    expected = () if scalar_v else tuple(p.shape)
    if tuple(value.shape) != expected:
        why = "NovoGrad keeps one scalar v per tensor" if scalar_v else "it must match the parameter"
        raise ValueError(
            f"mango: cannot load the state of parameter {name}: saved {key} has shape {list(value.shape)}, "
            f"expected {list(expected)} ({why}; parameter shape {list(p.shape)})"
        )


def restore_state_dtypes(opt, saved_groups, saved_state) -> None:
    """torch.optim casts loaded floating state to the param dtype; mango keeps fp32 state for
    bf16/fp16 params and the step counters on the CPU, so copy them again from the saved tensors."""
    for saved, group in zip(saved_groups, opt.param_groups):
        for index, p in zip(saved["params"], group["params"]):
            st = opt.state[p]
            for key, value in saved_state.get(index, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":  # host-side counter, as in torch.optim
                    st[key] = value.to(device="cpu", dtype=torch.float32, copy=True)
                else:
                    st[key] = value.to(device=p.device, dtype=compute_dtype(p), copy=True)
