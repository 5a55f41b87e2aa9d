"""Param groups from what a torch user passes: the model, ``named_parameters()``, or plain tensors.

MANGO's update depends on what each tensor *is* (an embedding is not normalized, a q/k/v
projection is orthogonalized per head, a bias gets l2, HF's ``Conv1D`` stores its operator
transposed). The module tree says so (``mango.param_groups``); a flat list of tensors cannot,
yet ``Mango(model.parameters())`` is the commonest habit and what trainers pass. So a module is
labelled as ``param_groups`` would, names decide where they can (a 1-D ``bias`` is a bias), and
where the role of a tensor of two or more dims would come from its shape alone, one warning
names the call that gets the real roles.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .roles import param_groups

__all__ = ["groups_from", "shape_only_names", "warn_shape_only"]


def groups_from(params):
    """Param groups for ``params``: a module labelled by ``param_groups``; otherwise the groups
    as given (a flat iterable becomes one group), each role-less group of named parameters split
    so that 1-D parameters named ``bias`` get role ``vector_bias``."""
    if isinstance(params, nn.Module):
        return param_groups(params)
    if isinstance(params, torch.Tensor):
        return params  # torch.optim's own error: params must be an iterable
    items = list(params)
    if not items:
        return items  # torch.optim's own error: an empty parameter list
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    return [part for group in items for part in _split_named(group)]


def _split_named(group: dict) -> list[dict]:
    """A role-less group of named parameters, split off its biases (order kept within each part)."""
    if not isinstance(group, dict) or group.get("role") is not None:
        return [group]
    params = group.get("params")
    params = [params] if isinstance(params, torch.Tensor) else list(params) if params is not None else []
    named = _named(group, params)
    biases = [(n, p) for n, p in named if _is_bias(n, p)] if named is not None else []
    if not biases:
        return [dict(group, params=params)]  # an iterator of params is read once, here
    rest = [(n, p) for n, p in named if not _is_bias(n, p)]
    base = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    parts = [dict(base, params=[p for _, p in rest], param_names=[n for n, _ in rest])] if rest else []
    parts.append(dict(base, params=[p for _, p in biases], param_names=[n for n, _ in biases], role="vector_bias"))
    return parts


def _named(group, params) -> list[tuple[str, torch.Tensor]] | None:
    """(name, tensor) pairs where the group names its parameters (tuples or ``param_names``)."""
    if params and all(isinstance(item, tuple) and len(item) == 2 for item in params):
        return [(str(n), p) for n, p in params]
    names = group.get("param_names")
    if names is not None and len(names) == len(params):
        return list(zip(map(str, names), params))
    return None


def _is_bias(name: str, param) -> bool:
    local = name.rsplit(".", 1)[-1]
    return isinstance(param, torch.Tensor) and param.dim() == 1 and (local == "bias" or local.endswith("_bias"))


def shape_only_names(groups, role=None, norm=None) -> list[str]:
    """Names (or positions) of the ≥2-D tensors whose role, and with it the norm, would come from
    their shape alone: groups with no role and no norm (``role`` / ``norm``: the optimizer's
    defaults for groups that do not set them)."""
    out = []
    for gi, group in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(group, dict):
            continue
        if group.get("role", role) is not None or group.get("norm", norm) is not None:
            continue
        params = group.get("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        names = list(group.get("param_names") or [])
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) and len(item) == 2 else (names[i] if i < len(names) else None, item)
            if isinstance(p, torch.Tensor) and p.dim() >= 2:
                out.append(str(name) if name is not None else f"param_groups[{gi}].params[{i}]")
    return out


def warn_shape_only(names, where: str) -> None:
    """One warning for all of them, naming the calls that label the model."""
    if not names:
        return
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    warnings.warn(
        f"{where}: {len(names)} parameter(s) of 2 or more dims ({shown}) get role 'matrix' from their shape "
        "alone: from plain tensors mango cannot tell embeddings (no normalization), output heads, q/k/v "
        "projections (head-wise NS) or weights stored transposed (HF Conv1D) from hidden matrices, nor a "
        "bias from a gain without its name. Pass the model instead, mango.Mango(model, ...), or its groups, "
        "mango.Mango(mango.param_groups(model), ...)",
        stacklevel=3,
    )
