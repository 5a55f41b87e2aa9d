"""Label every parameter of a model with its MANGO role (the roles, docs/guide.md).

MANGO picks a different dual norm per kind of tensor (Newton–Schulz for hidden matrices,
head-wise NS for fused QKV, nothing for embeddings, l2 for biases, ...), so the optimizer
must know what each tensor *is* and how it stores its operator. Shapes alone cannot tell an
embedding from a hidden matrix, or a fused QKV projection from an MLP layer, so the labels
come from the module tree: the module that owns a tensor says what it is, and the
conventions of Hugging Face / torchvision models (``mango.architectures``) say where their
heads, transposed weights and expert stacks are. Where the tree cannot say (a fused QKV
``nn.Linear`` in a module that does not state its heads) the caller declares it, and anything
ambiguous or impossible is an error naming the parameter rather than a silent guess.

    groups = param_groups(hf_model)                                  # no hints needed
    groups = param_groups(model, qkv_heads={"h.*.attn.c_attn": 12})  # a custom fused QKV
    print(describe(groups))
    opt = mango.Mango(groups, lr=0.01)
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from math import prod

import torch
from torch import nn

from . import architectures, config
from .architectures import Label as _Label
from .config import DEFAULTS, ROLE_DEFAULT_NORM, ROLES, SPLIT_NORMS

__all__ = ["param_groups", "describe"]

QKV_ROLES = ("qkv_weight", "qkv_bias")
HEAD_MODULE_NAMES = ("head", "lm_head")
EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)

# When one tensor is reached through modules that disagree on its role (weight tying), the
# more specific label wins: the embedding owns a tied unembedding, a declaration beats the
# generic shape rule. The tied input/output embedding is the documented case (role `embedding`,
# shown by describe()); any other disagreement is announced with a warning.
TIED_EMBEDDING_ROLES = frozenset({"embedding", "head"})
_ROLE_PRIORITY = ("embedding", "head", "qkv_weight", "qkv_bias", "matrix", "vector_bias", "vector_weight")

# Keys of a param group that describe the labelling itself, not an optimizer setting.
_LABEL_KEYS = ("params", "param_names", "role", "norm", "head_dim", "orientation", "experts", "name", "tied")


@dataclass
class _Tensor:
    """A distinct parameter tensor and every name/label under which the module tree reaches it."""

    param: torch.Tensor
    names: list[str]
    labels: list[_Label]


@dataclass(frozen=True)
class _QkvDeclaration:
    module_name: str
    key: str  # the qkv_heads key that matched it
    n_q: int
    n_kv: int


# --------------------------------------------------------------------------- public API


def param_groups(model: nn.Module, qkv_heads=None, head=None, overrides=None) -> list[dict]:
    """Split ``model``'s trainable parameters into MANGO param groups, one per role setting.

    Args:
        model: the ``nn.Module`` whose parameters to label.
        qkv_heads: ``{module name or fnmatch glob: n_heads | (n_q, n_kv)}`` declaring fused QKV
            projections (``nn.Linear``, or HF ``Conv1D`` stored (in, out), whose output features
            are the q, k and v heads stacked). Needed only where the model does not say its
            heads: ``nn.MultiheadAttention`` and the Hugging Face / torchvision architectures
            of the table in docs/architectures.md are recognised without it (a warning names the
            modules that look like attention but are not).
        head: name (or glob, or list of them) of the output-projection module, for heads not
            tied to an embedding and not named ``head``/``lm_head``.
        overrides: ``{parameter name or glob: {setting: value}}`` merged into the matching
            parameters' groups (``role``, ``norm``, ``head_dim``, ``lr``, any Mango group setting);
            later keys win over earlier ones where several match the same parameter.

    Returns:
        A list of param-group dicts, one per distinct (role, head_dim, layout, overridden
        settings), in order of first appearance, each with ``params``, ``param_names`` (same
        order), ``role``, ``head_dim``, the layout keys where not the default
        (``orientation="in_out"`` for weights stored (in, out), ``experts=True`` for stacks of
        expert matrices on dim 0) and the overridden settings. Every trainable tensor appears
        exactly once, under its first name; ``requires_grad=False`` tensors are left out. A tensor
        reached under several names (tied weights) is listed in ``tied``
        (``{first name: [other names]}``); a tied input/output embedding gets role ``embedding``.

    Raises:
        ValueError naming the module or parameter for anything that cannot be labelled:
        a declaration that matches nothing, a head count that does not divide the QKV rows,
        a non-Linear module declared as QKV/head, an override role/norm/setting the parameter
        cannot take.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"mango.param_groups: expected an nn.Module, got {type(model).__name__}; "
            "pass plain tensors or your own groups to mango.Mango directly"
        )
    modules = list(model.named_modules(remove_duplicate=False))
    qkv_modules = _resolve_qkv_declarations(modules, qkv_heads)
    head_modules = _resolve_head_modules(modules, head, qkv_modules)
    recognised = architectures.recognise(modules, model)
    tensors = _collect_tensors(modules, qkv_modules, head_modules, recognised)

    trainable = [t for t in tensors if t.param.requires_grad]
    frozen_names = [n for t in tensors if not t.param.requires_grad for n in t.names]
    settings_by_tensor = _match_overrides(overrides, trainable, frozen_names)
    _warn_tied_overrides(overrides, trainable, settings_by_tensor)
    _warn_unresolved(recognised.unresolved, qkv_modules, trainable, settings_by_tensor)

    groups: dict[tuple, dict] = {}
    for tensor, settings in zip(trainable, settings_by_tensor):
        label = _choose_label(tensor, settings)
        label, settings = _apply_overrides(tensor, label, settings)
        layout = _layout_keys(label)
        key = (label.role, label.head_dim, repr(sorted(layout.items())), repr(sorted(settings.items())))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "params": [], "param_names": [], "role": label.role, "head_dim": label.head_dim, **layout, **settings,
            }  # fmt: skip
        group["params"].append(tensor.param)
        group["param_names"].append(tensor.names[0])
        if len(tensor.names) > 1:  # one tensor reached under several names: describe() shows them
            group.setdefault("tied", {})[tensor.names[0]] = list(dict.fromkeys(tensor.names[1:]))
    return list(groups.values())


def _layout_keys(label: _Label) -> dict:
    """The group keys that say how the tensor stores its operator, only where not the default."""
    keys = {}
    if label.orientation != DEFAULTS["orientation"]:
        keys["orientation"] = label.orientation
    if label.experts != DEFAULTS["experts"]:
        keys["experts"] = label.experts
    return keys


def describe(groups_or_optimizer) -> str:
    """Render the labelling as a fixed-width table, one row per parameter.

    Shows what the optimizer will actually do with each tensor: its group, its name (a tied tensor
    with all its names, ``transformer.wte.weight = lm_head.weight``), the role, the norm
    after resolving the role default, the QKV head size, how it stores its operator
    (``layout``: ``(out,in)``, ``(in,out)ᵀ`` for a transposed store, ``4 experts ×(out,in)``),
    the blocks one normalization sees (operator shape per head or expert, e.g.
    ``12 heads ×(64,768)``) and any setting that differs from the defaults. Accepts the list
    returned by :func:`param_groups` or any ``torch.optim.Optimizer`` (names come from the
    groups' ``param_names``; ``param{i}`` where a group has none).
    """
    if isinstance(groups_or_optimizer, torch.optim.Optimizer):
        groups = groups_or_optimizer.param_groups
        defaults = groups_or_optimizer.defaults
    else:
        groups = list(groups_or_optimizer)
        defaults = None

    header = ("group", "name", "shape", "role", "norm", "head_dim", "layout", "blocks", "settings")
    rows = []
    index = numel = 0
    for group_index, group in enumerate(groups):
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = list(group.get("param_names") or [])
        tied = group.get("tied") if isinstance(group.get("tied"), dict) else {}
        settings = _shown_settings(group, defaults)
        for i, param in enumerate(params):
            name = names[i] if i < len(names) and names[i] else f"param{index}"
            if tied.get(name):
                name = " = ".join([name, *tied[name]])
            rows.append((str(group_index), name, *_describe_cells(group, param), settings))
            index += 1
            numel += param.numel()

    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [_format_row(header, widths), _format_row(tuple("-" * w for w in widths), widths)]
    lines += [_format_row(r, widths) for r in rows]
    lines.append(f"{len(rows)} parameters ({numel:,} elements) in {len(groups)} groups")
    if hasattr(groups_or_optimizer, "ns_choices"):  # after a step: where each NS bucket runs, and why
        from .ns_engine import describe_choices

        lines += describe_choices(groups_or_optimizer.ns_choices())
    return "\n".join(lines)


# --------------------------------------------------------------------------- declarations


def _resolve_qkv_declarations(modules, qkv_heads) -> dict[int, _QkvDeclaration]:
    """Map id(module) -> its QKV declaration; every key must match a Linear-like module."""
    if qkv_heads is None:
        return {}
    if not isinstance(qkv_heads, dict):
        raise TypeError(
            f"mango.param_groups: qkv_heads must be a dict {{module name: n_heads | (n_q, n_kv)}}, got {qkv_heads!r}"
        )
    declared: dict[int, _QkvDeclaration] = {}
    for key, heads in qkv_heads.items():
        n_q, n_kv = _parse_head_count(key, heads)
        matched = _match_modules(modules, key)
        if not matched:
            raise ValueError(
                f"mango.param_groups: qkv_heads key {key!r} matches no module of the model"
                f"{_suggest(key, [n for n, _ in modules])}"
            )
        for name, module in matched:
            rows = _operator_rows(name, module, what=f"declared fused QKV (qkv_heads[{key!r}])")
            blocks = n_q + 2 * n_kv
            if rows % blocks != 0:
                what_rows = "output features (Conv1D weight columns)" if architectures.is_conv1d(module) else "weight rows"
                raise ValueError(
                    f"mango.param_groups: fused QKV module {name!r} has {rows} {what_rows}, not a multiple of "
                    f"the {blocks} q/k/v head blocks of {_heads_text(n_q, n_kv)} (qkv_heads[{key!r}])"
                )
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (rows,):
                raise ValueError(
                    f"mango.param_groups: fused QKV module {name!r} has bias shape {tuple(bias.shape)}, "
                    f"expected ({rows},) to match its weight rows"
                )
            declaration = _QkvDeclaration(name, key, n_q, n_kv)
            previous = declared.get(id(module))
            if previous is not None and (previous.n_q, previous.n_kv) != (n_q, n_kv):
                raise ValueError(
                    f"mango.param_groups: module {name!r} is declared twice with different head counts: "
                    f"qkv_heads[{previous.key!r}]={_heads_value(previous)} and qkv_heads[{key!r}]={heads!r}"
                )
            declared.setdefault(id(module), declaration)
    return declared


def _resolve_head_modules(modules, head, qkv_modules) -> dict[int, str]:
    """Map id(module) -> reason, for output projections: declared, or nn.Linear named head/lm_head."""
    heads: dict[int, str] = {}
    if head is not None:
        patterns = [head] if isinstance(head, str) else list(head)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"mango.param_groups: head must be a module name or a list of names, got {head!r}")
            matched = _match_modules(modules, pattern)
            if not matched:
                raise ValueError(
                    f"mango.param_groups: head={pattern!r} matches no module of the model"
                    f"{_suggest(pattern, [n for n, _ in modules])}"
                )
            for name, module in matched:
                _operator_rows(name, module, what=f"declared output head (head={pattern!r})")
                if id(module) in qkv_modules:
                    raise ValueError(f"mango.param_groups: module {name!r} is declared both as head and in qkv_heads")
                heads[id(module)] = f"declared head={pattern!r}"
    for name, module in modules:
        if isinstance(module, nn.Linear) and id(module) not in qkv_modules and _named_as_head(name):
            heads.setdefault(id(module), f"nn.Linear named {name!r}")
    return heads


def _named_as_head(name: str) -> bool:
    """``head``/``lm_head`` anywhere; ``fc``/``classifier``/``score`` as a direct child of the model."""
    local = name.rsplit(".", 1)[-1]
    return local in HEAD_MODULE_NAMES or ("." not in name and name in architectures.TOP_LEVEL_HEAD_NAMES)


def _parse_head_count(key, heads) -> tuple[int, int]:
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    if positive_int(heads):
        return heads, heads
    if isinstance(heads, (tuple, list)) and len(heads) == 2 and all(positive_int(h) for h in heads):
        n_q, n_kv = heads
        if n_q % n_kv != 0:
            raise ValueError(
                f"mango.param_groups: qkv_heads[{key!r}]={heads!r}: n_q={n_q} is not a multiple of n_kv={n_kv} "
                "(grouped-query attention shares each kv head among n_q/n_kv query heads)"
            )
        return n_q, n_kv
    raise ValueError(
        f"mango.param_groups: qkv_heads[{key!r}]={heads!r}: must be a positive int n_heads "
        "or a pair (n_q, n_kv) of positive ints for grouped-query attention"
    )


def _operator_rows(name, module, what) -> int:
    """Output rows of a module declared as QKV/head (Linear, or HF Conv1D stored (in, out)); error if none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ValueError(
            f"mango.param_groups: module {name!r} ({type(module).__name__}) is {what} but is not "
            f"Linear-like: it needs a 2-D (out, in) `weight` parameter, has weight shape {shape}"
        )
    return architectures.operator_rows(module)


def _match_modules(modules, pattern):
    """Modules whose name equals ``pattern`` or matches it as an fnmatch glob (each object once)."""
    seen, matched = set(), []
    for name, module in modules:
        if (name == pattern or fnmatchcase(name, pattern)) and id(module) not in seen:
            seen.add(id(module))
            matched.append((name, module))
    return matched


# --------------------------------------------------------------------------- labelling


def _collect_tensors(modules, qkv_modules, head_modules, recognised) -> list[_Tensor]:
    """Every distinct parameter tensor, in model order, with all its names and labels."""
    embedding_weights = {
        id(module.weight): name for name, module in modules if isinstance(module, EMBEDDING_MODULES)
    }
    tensors: dict[int, _Tensor] = {}
    for module_name, module in modules:
        for local, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full_name = f"{module_name}.{local}" if module_name else local
            label = _label_parameter(
                module_name, module, local, param, qkv_modules, head_modules, embedding_weights, recognised
            )
            entry = tensors.setdefault(id(param), _Tensor(param, [], []))
            entry.names.append(full_name)
            entry.labels.append(label)
    return list(tensors.values())


def _label_parameter(
    module_name, module, local, param, qkv_modules, head_modules, embedding_weights, recognised
) -> _Label:
    """The role that the owning module gives one of its own parameters, on its operator layout.

    A Conv1D weight is stored (in, out) whatever role it gets, so its orientation is set here
    for every role (an override of the role keeps it).
    """
    label = _role_label(module_name, module, local, param, qkv_modules, head_modules, embedding_weights, recognised)
    if local == "weight" and architectures.is_conv1d(module):
        label = replace(label, orientation="in_out", reason=f"{label.reason}; Conv1D stores (in, out)")
    return label


def _role_label(module_name, module, local, param, qkv_modules, head_modules, embedding_weights, recognised) -> _Label:
    kind = type(module).__name__
    if isinstance(module, EMBEDDING_MODULES) and local == "weight":
        return _Label("embedding", None, f"{kind} {module_name!r}")

    if isinstance(module, nn.MultiheadAttention):
        if local == "in_proj_weight":
            return _Label("qkv_weight", module.head_dim, f"{kind} {module_name!r} fused in-projection")
        if local == "in_proj_bias":
            return _Label("qkv_bias", module.head_dim, f"{kind} {module_name!r} fused in-projection")
        if local in ("bias_k", "bias_v"):  # (1, 1, E) learned key/value biases
            return _Label("vector_bias", None, f"{kind} {module_name!r} {local}")
        # q/k/v_proj_weight (kdim/vdim != embed_dim) are separate projections: the generic rule.

    declaration = qkv_modules.get(id(module))
    if declaration is not None and local in ("weight", "bias"):
        head_dim = architectures.operator_rows(module) // (declaration.n_q + 2 * declaration.n_kv)
        return _Label(
            "qkv_weight" if local == "weight" else "qkv_bias",
            head_dim,
            f"qkv_heads[{declaration.key!r}]={_heads_value(declaration)}",
        )

    known = recognised.labels.get((id(module), local))
    if known is not None:
        return known

    if local == "weight":
        if id(module) in head_modules:
            return _Label("head", None, head_modules[id(module)])
        if isinstance(module, nn.Linear) and id(param) in embedding_weights:
            embedding_name = embedding_weights[id(param)]
            return _Label("head", None, f"nn.Linear {module_name!r} tied to embedding {embedding_name!r}")

    if param.dim() >= 2 and local in architectures.LEARNED_TOKEN_NAMES:
        return _Label("embedding", None, f"learned tokens {local!r} of {kind} {module_name!r}")
    if param.dim() >= 2:
        return _Label("matrix", None, f"{param.dim()}-D parameter")
    if param.dim() == 1 and local == "bias":
        return _Label("vector_bias", None, "1-D parameter named bias")
    return _Label("vector_weight", None, f"{param.dim()}-D parameter")


def _choose_label(tensor: _Tensor, settings: dict) -> _Label:
    """One label per tensor; a tensor tied into modules that disagree gets the most specific.

    A tied input/output embedding (labels ``embedding`` and ``head``) is the documented case: it
    is the embedding, silently. Any other disagreement is warned about unless a role override
    settles it.
    """
    distinct = list(dict.fromkeys((lab.role, lab.head_dim, lab.orientation, lab.experts) for lab in tensor.labels))
    best = min(tensor.labels, key=lambda lab: _ROLE_PRIORITY.index(lab.role))
    documented = {lab.role for lab in tensor.labels} <= TIED_EMBEDDING_ROLES and best.role == "embedding"
    if len(distinct) > 1 and not documented and "role" not in settings:
        ways = "; ".join(f"{name!r} -> {lab.role} ({lab.reason})" for name, lab in zip(tensor.names, tensor.labels))
        warnings.warn(
            f"mango.param_groups: parameter {tensor.names[0]!r} is tied into modules with different roles: "
            f"{ways}. It gets one role, {best.role!r}; override it with "
            f"overrides={{{tensor.names[0]!r}: {{'role': ...}}}}",
            stacklevel=3,
        )
    if documented and "role" in settings and settings["role"] != best.role:
        others = ", ".join(repr(n) for n in dict.fromkeys(tensor.names[1:]))
        warnings.warn(
            f"mango.param_groups: parameter {tensor.names[0]!r} is one tensor with {others} (tied), "
            f"documented as role 'embedding'; the override gives it role {settings['role']!r} for every use",
            stacklevel=3,
        )
    return best


def _warn_tied_overrides(overrides, tensors: list[_Tensor], settings_by_tensor) -> None:
    """Override keys that reach one tied tensor under different names and set different values."""
    if not overrides:
        return
    for tensor, merged in zip(tensors, settings_by_tensor):
        if len(tensor.names) < 2 or not merged:
            continue
        seen: dict[str, tuple] = {}  # setting -> (value, key, the name it matched)
        for pattern, settings in overrides.items():
            name = next((n for n in tensor.names if n == pattern or fnmatchcase(n, pattern)), None)
            if name is None:
                continue
            for setting, value in settings.items():
                previous = seen.get(setting)
                if previous is not None and previous[2] != name and not _same(previous[0], value):
                    warnings.warn(
                        f"mango.param_groups: overrides {previous[1]!r} and {pattern!r} set {setting} to "
                        f"{previous[0]!r} and {value!r} for {previous[2]!r} and {name!r}, which are one tied "
                        f"tensor; the later key wins: {setting}={value!r}",
                        stacklevel=3,
                    )
                seen[setting] = (value, pattern, name)


# --------------------------------------------------------------------------- overrides


def _match_overrides(overrides, tensors: list[_Tensor], frozen_names: list[str]) -> list[dict]:
    """Per trainable tensor, the merged override settings (dict order: later keys win)."""
    merged = [{} for _ in tensors]
    if overrides is None:
        return merged
    if not isinstance(overrides, dict):
        raise TypeError(
            "mango.param_groups: overrides must be a dict {parameter name or glob: {setting: value}}, "
            f"got {overrides!r}"
        )
    allowed = set(DEFAULTS)
    for pattern, settings in overrides.items():
        if not isinstance(settings, dict):
            raise TypeError(f"mango.param_groups: overrides[{pattern!r}] must be a dict of settings, got {settings!r}")
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(
                f"mango.param_groups: overrides[{pattern!r}] has unknown setting(s) {unknown}; known: {sorted(allowed)}"
            )
        hits = [i for i, t in enumerate(tensors) if any(n == pattern or fnmatchcase(n, pattern) for n in t.names)]
        if not hits:
            if any(n == pattern or fnmatchcase(n, pattern) for n in frozen_names):
                raise ValueError(
                    f"mango.param_groups: overrides key {pattern!r} matches only parameters with requires_grad=False"
                )
            all_names = [n for t in tensors for n in t.names]
            raise ValueError(
                f"mango.param_groups: overrides key {pattern!r} matches no parameter of the model"
                f"{_suggest(pattern, all_names)}"
            )
        for i in hits:
            merged[i].update(settings)
    return merged


def _apply_overrides(tensor: _Tensor, label: _Label, settings: dict) -> tuple[_Label, dict]:
    """Final label (role, head_dim, layout) and other settings of a tensor, validated with mango.config."""
    name = tensor.names[0]
    settings = dict(settings)
    role = settings.pop("role", label.role)
    if role not in ROLES:
        raise ValueError(f"mango.param_groups: override for parameter {name!r}: role={role!r} must be one of {ROLES}")

    if "head_dim" in settings:
        head_dim = settings.pop("head_dim")
        if role not in QKV_ROLES and head_dim is not None:
            raise ValueError(
                f"mango.param_groups: override for parameter {name!r} sets head_dim={head_dim!r}, "
                f"but head_dim only applies to roles {QKV_ROLES} (its role is {role!r})"
            )
    else:
        head_dim = label.head_dim if role in QKV_ROLES else None
    if role in QKV_ROLES and head_dim is None:
        raise ValueError(
            f"mango.param_groups: parameter {name!r} has role {role!r} but no head_dim: give 'head_dim' in its "
            "override or declare its module in qkv_heads"
        )
    orientation = settings.pop("orientation", label.orientation)
    experts = settings.pop("experts", label.experts)

    try:
        layout = dict(role=role, head_dim=head_dim, orientation=orientation, experts=experts)
        config.validate_group({**DEFAULTS, **settings, **layout})
        norm = config.resolve_norm({"norm": settings.get("norm")}, role)
        config.check_param_for_norm(name, tensor.param, role, norm, head_dim, orientation, experts)
    except ValueError as err:
        raise ValueError(f"mango.param_groups: parameter {name!r} (role {role!r}): {err}") from None
    return replace(label, role=role, head_dim=head_dim, orientation=orientation, experts=experts), settings


def _warn_unresolved(unresolved, qkv_modules, tensors: list[_Tensor], settings_by_tensor) -> None:
    """One warning per attention pattern whose heads were not found, unless the caller labelled it.

    Modules that differ only in their layer index share one hint (a glob), so a 48-layer model
    gets one warning, not 48. A module counts as labelled when it is declared in qkv_heads or every
    trainable weight of its projections has a role override (any one of its Linear children, where
    nothing says which of them are q, k and v).
    """
    role_overridden = {n: "role" in s for t, s in zip(tensors, settings_by_tensor) for n in t.names}
    pending: dict[str, list[str]] = {}
    for item in unresolved:
        if any(i in qkv_modules for i in item.projection_ids):
            continue
        trainable = [n for n in item.weight_names if n in role_overridden]
        settled = any if item.any_override else all
        if not trainable or settled(role_overridden[n] for n in trainable):
            continue
        pending.setdefault(item.hint, []).append(item.module_name)
    for hint, names in pending.items():
        more = f" (and {len(names) - 1} more like it)" if len(names) > 1 else ""
        warnings.warn(
            f"mango.param_groups: module {names[0]!r}{more} looks like attention, but its heads or its "
            "q/k/v projections are not on the module or in the model's config, so its projections get "
            f"whole-matrix 'matrix' instead of head-wise norms. To split them into heads, pass {hint}",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- text helpers


def _describe_cells(group: dict, param) -> tuple[str, ...]:
    """shape, role, norm, head_dim, layout, blocks of one tensor as its group will treat it."""
    role = group.get("role") or config.resolve_role({"role": None}, param)
    norm = group.get("norm") or ROLE_DEFAULT_NORM[role]
    head_dim = group.get("head_dim")
    orientation = group.get("orientation", DEFAULTS["orientation"])
    experts = group.get("experts", DEFAULTS["experts"])
    shape = tuple(param.shape)
    return (
        str(shape),
        role,
        norm,
        "-" if head_dim is None else str(head_dim),
        _layout_text(shape, orientation, experts, norm),
        _blocks_text(shape, orientation, experts, norm, head_dim),
    )


def _operator_shape(shape, orientation, experts) -> tuple[int | None, tuple]:
    """(number of experts or None, the (out, in) operator shape per expert; vectors as they are)."""
    n_experts, shape = (shape[0], shape[1:]) if experts and len(shape) > 0 else (None, shape)
    if len(shape) < 2:
        return n_experts, shape
    if orientation == "in_out":  # always a 2-D (in, out) per expert (config.check_param_for_norm)
        return n_experts, (shape[1], shape[0])
    return n_experts, (shape[0], prod(shape[1:]))


def _layout_text(shape, orientation, experts, norm) -> str:
    """How the stored tensor maps to its operator: (out,in), (in,out)ᵀ, (out,in·k) for convs.

    Shown where it matters: for matrix norms, a transposed store or a stack of experts.
    """
    inner = shape[1:] if experts else shape
    if len(inner) < 2 or not (norm in config.MATRIX_NORMS or orientation == "in_out" or experts):
        text = "(out,)" if experts and len(inner) == 1 else "-"
    elif orientation == "in_out":
        text = "(in,out)ᵀ"
    else:
        text = "(out,in)" if len(inner) == 2 else "(out,in·k)"
    return f"{shape[0]} experts ×{text}" if experts and shape else text


def _blocks_text(shape, orientation, experts, norm, head_dim) -> str:
    """What one normalization sees: '12 heads ×(64,768)', '4 experts ×(192,64)', '(64,27)'; '-' if elementwise."""
    if norm in ("none", "sign"):
        return "-"
    n_experts, operator = _operator_shape(shape, orientation, experts)
    parts = [] if n_experts is None else [f"{n_experts} experts"]
    if norm in SPLIT_NORMS and head_dim and operator and operator[0] % head_dim == 0:
        parts.append(f"{operator[0] // head_dim} heads")
        operator = (head_dim, *operator[1:])
    text = "(" + ",".join(str(d) for d in operator) + ("," if len(operator) == 1 else "") + ")"
    return " × ".join(parts) + " ×" + text if parts else text


def _shown_settings(group: dict, defaults) -> str:
    """Settings worth showing: all extra keys of a param_groups dict, or non-defaults of an optimizer."""
    shown = []
    for key in sorted(group):
        if key in _LABEL_KEYS:
            continue
        value = group[key]
        if defaults is not None and key in defaults and _same(value, defaults[key]):
            continue
        shown.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return " ".join(shown)


def _same(a, b) -> bool:
    if isinstance(a, list):
        a = tuple(a)
    if isinstance(b, list):
        b = tuple(b)
    try:
        return bool(a == b)
    except Exception:  # tensors of several elements, odd types: only identity counts
        return a is b


def _format_row(cells, widths) -> str:
    return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()


def _heads_value(declaration: _QkvDeclaration):
    return declaration.n_q if declaration.n_q == declaration.n_kv else (declaration.n_q, declaration.n_kv)


def _heads_text(n_q: int, n_kv: int) -> str:
    return f"n_heads={n_q}" if n_q == n_kv else f"(n_q={n_q}, n_kv={n_kv})"


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
