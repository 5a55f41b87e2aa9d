"""Recognise how the architectures people train lay out their tensors, so labels need no hints.

The module tree says what a tensor is, but only to a reader who knows the conventions of the
libraries that build it: Hugging Face's GPT-2 stores its projections transposed in a ``Conv1D``
and fuses q/k/v in ``c_attn``; Llama/Mistral/Qwen keep q/k/v in separate Linears whose head size
sits on the attention module or in the model's config; BERT calls them query/key/value; MoE
models stack their experts in one 3-D parameter. This module reads those conventions by duck
typing (no library is imported) and returns labels for :func:`mango.param_groups`.

Head counts come from the attention module or the model's config, never from shapes: a wrong
head split cannot be seen in the loss, only in a worse optimizer. Where a module looks like
attention but its heads cannot be found, it is reported (with the hint that fixes it) and left
to the generic ``matrix`` rule; where module, config and tensor contradict, a ValueError names
the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# Children of an attention module that are its separate q, k, v projections (Llama/Mistral/Qwen,
# GPT-OSS: *_proj; BERT/RoBERTa: query/key/value).
SEPARATE_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
# Children that are one fused q/k/v projection (GPT-2 c_attn, timm/ViT qkv, GPT-NeoX query_key_value).
FUSED_QKV_NAMES = ("c_attn", "qkv", "query_key_value")
# GPT-2 cross-attention: `q_attn` holds the queries, `c_attn` only the keys and values.
CROSS_QUERY_NAME = "q_attn"
# Learned position / class / register tokens: trained like embedding rows, not as one matrix.
LEARNED_TOKEN_NAMES = (
    "pos_embedding", "pos_embed", "position_embedding", "position_embeddings", "absolute_pos_embed",
    "class_token", "cls_token", "dist_token", "mask_token", "register_tokens",
)  # fmt: skip
# Direct children of the model that are its output layer (torchvision `fc`, HF `classifier`/`score`).
TOP_LEVEL_HEAD_NAMES = ("fc", "classifier", "score")

_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_N_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_N_KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_N_EXPERTS_CONFIG_ATTRS = ("num_local_experts", "num_experts")


@dataclass(frozen=True)
class Label:
    """One module's opinion on the role of one tensor, with the reason (for messages)."""

    role: str
    head_dim: int | None
    reason: str
    orientation: str = "out_in"
    experts: bool = False


@dataclass(frozen=True)
class Unresolved:
    """An attention-looking module whose heads could not be found: its projections stay `matrix`."""

    module_name: str
    projection_ids: tuple[int, ...]  # id() of its q/k/v (or fused) projection modules
    weight_names: tuple[str, ...]  # full names of those projections' weights
    hint: str  # the qkv_heads= / overrides= argument that labels them (layers globbed)


@dataclass
class Recognised:
    """What the known conventions say: labels by (id(module), local parameter name), and gaps."""

    labels: dict[tuple[int, str], Label] = field(default_factory=dict)
    unresolved: list[Unresolved] = field(default_factory=list)


@dataclass(frozen=True)
class _Heads:
    n_q: int | None
    n_kv: int | None
    head_dim: int | None
    source: str  # where they were read, for messages


# --------------------------------------------------------------------------- Linear-like modules


def is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2 family): a Linear whose weight is stored (in, out), out = ``nf``."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(nf, int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == nf
    )


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def operator_rows(module: nn.Module) -> int:
    """Output features of a Linear-like module: the rows of its (out, in) operator."""
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


# --------------------------------------------------------------------------- entry point


def recognise(modules, root: nn.Module) -> Recognised:
    """Labels for attention projections and expert stacks of every module of ``root``."""
    by_name = dict(modules)
    found = Recognised()
    seen: set[int] = set()
    for name, module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        children = dict(module.named_children())
        separate = _separate_projections(children)
        fused = _fused_projection(children)
        if separate or fused:
            heads = _find_heads(name, module, _config_of(name, module, by_name, root))
            if separate:
                _label_separate(name, separate, heads, found)
            else:
                _label_fused(name, fused, children.get(CROSS_QUERY_NAME), heads, found)
        _label_experts(name, module, found)
    return found


# --------------------------------------------------------------------------- attention


def _separate_projections(children) -> list[tuple[str, nn.Module]] | None:
    for names in SEPARATE_QKV_NAMES:
        projections = [(n, children.get(n)) for n in names]
        if all(m is not None and is_linear_like(m) for _, m in projections):
            return projections
    return None


def _fused_projection(children) -> tuple[str, nn.Module] | None:
    for name in FUSED_QKV_NAMES:
        module = children.get(name)
        if module is not None and is_linear_like(module):
            return name, module
    return None


def _config_of(name, module, by_name, root):
    """The config that describes ``module``: its own, else its nearest ancestor's (HF models)."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        owner = by_name.get(".".join(parts[:depth]), root if depth == 0 else None)
        config = getattr(owner, "config", None) if owner is not None else None
        if config is not None and not isinstance(config, (nn.Module, torch.Tensor)):
            return config
    return None


def _find_heads(name, module, config) -> _Heads:
    """Heads of an attention module, from its attributes first, then from the model's config."""
    kind = f"{type(module).__name__} {name!r}"
    head_dim = _positive_int_attr(module, _HEAD_DIM_ATTRS)
    n_q = _positive_int_attr(module, _N_HEADS_ATTRS)
    n_kv = _positive_int_attr(module, _N_KV_HEADS_ATTRS)
    if config is not None:
        config_heads = _positive_int_attr(config, ("num_attention_heads",))
        n_q = n_q or config_heads
        n_kv = n_kv or _positive_int_attr(config, ("num_key_value_heads",))
        head_dim = head_dim or _positive_int_attr(config, ("head_dim",)) or _exact_ratio(
            _positive_int_attr(config, ("hidden_size",)), config_heads
        )
    groups = _positive_int_attr(module, ("num_key_value_groups",))
    if groups is not None and n_q is not None:
        if n_q % groups != 0 or (n_kv is not None and n_kv * groups != n_q):
            raise ValueError(
                f"mango.param_groups: attention module {name!r}: num_key_value_groups={groups} contradicts "
                f"{n_q} query heads and {n_kv} key/value heads (module attributes and model config); "
                "label its projections with overrides={...: {'role': 'qkv_weight', 'head_dim': ...}}"
            )
        n_kv = n_q // groups
    return _Heads(n_q, n_kv, head_dim, kind)


def _label_separate(name, projections, heads: _Heads, found: Recognised) -> None:
    """q, k, v each split into heads: q has n_q heads, k and v n_kv (GQA), all of head_dim rows."""
    (q_name, q), *_ = projections
    head_dim = heads.head_dim or _exact_ratio(operator_rows(q), heads.n_q)
    if head_dim is None:
        found.unresolved.append(_unresolved(name, projections, _separate_hint(name, projections)))
        return
    counts = (heads.n_q, heads.n_kv, heads.n_kv)
    for (local, module), count in zip(projections, counts):
        _check_rows(f"{name}.{local}" if name else local, module, head_dim, count, heads)
        _label_projection(module, head_dim, f"{heads.source}: {local} in heads of {head_dim}", found)


def _label_fused(name, fused, cross_query, heads: _Heads, found: Recognised) -> None:
    """One fused q/k/v projection ([q | k | v] head blocks; GPT-2 cross-attention: [k | v] plus q_attn).

    Without a key/value head count the module is taken as plain multi-head (n_kv = n_q), as
    ``qkv_heads={...: n}`` means; rows that do not fit that are reported, not guessed at.
    """
    local, module = fused
    if cross_query is not None and not is_linear_like(cross_query):
        cross_query = None
    n_kv = heads.n_kv or heads.n_q
    blocks = None if heads.n_q is None else (2 * n_kv if cross_query is not None else heads.n_q + 2 * n_kv)
    rows = operator_rows(module)
    head_dim = heads.head_dim or _exact_ratio(rows, blocks)
    maybe_grouped = (  # heads divide the rows, but not as n_q + 2·n_q blocks, and no kv count is given
        heads.n_kv is None and blocks is not None and head_dim and rows % head_dim == 0 and rows != blocks * head_dim
    )
    if head_dim is None or maybe_grouped:
        found.unresolved.append(_unresolved(name, [fused], _fused_hint(name, local)))
        return
    full = f"{name}.{local}" if name else local
    _check_rows(full, module, head_dim, blocks, heads)
    _label_projection(module, head_dim, f"{heads.source}: fused {local} in heads of {head_dim}", found)
    if cross_query is not None:
        query_name = f"{name}.{CROSS_QUERY_NAME}" if name else CROSS_QUERY_NAME
        _check_rows(query_name, cross_query, head_dim, heads.n_q, heads)
        _label_projection(cross_query, head_dim, f"{heads.source}: {CROSS_QUERY_NAME} in heads of {head_dim}", found)


def _check_rows(module_name, module, head_dim, blocks, heads: _Heads) -> None:
    """The projection's output rows must be ``blocks`` head blocks of ``head_dim`` (when known)."""
    rows = operator_rows(module)
    expected = None if blocks is None else blocks * head_dim
    if rows % head_dim == 0 and expected in (None, rows):
        return
    want = f"{blocks} head blocks of head_dim {head_dim} = {expected}" if expected else f"a multiple of head_dim {head_dim}"
    raise ValueError(
        f"mango.param_groups: parameter {module_name + '.weight'!r} has {rows} output rows, expected {want} "
        f"(heads read from {heads.source}: n_q={heads.n_q}, n_kv={heads.n_kv}, head_dim={heads.head_dim}); "
        f"fix the model's config, or label it with overrides={{{module_name + '.weight'!r}: "
        "{'role': 'qkv_weight', 'head_dim': ...}}"
    )


def _label_projection(module, head_dim, reason, found: Recognised) -> None:
    found.labels[(id(module), "weight")] = Label("qkv_weight", head_dim, reason)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1:
        found.labels[(id(module), "bias")] = Label("qkv_bias", head_dim, reason)


def _unresolved(name, projections, hint) -> Unresolved:
    prefix = f"{name}." if name else ""
    weight_names = tuple(f"{prefix}{local}.weight" for local, _ in projections)
    return Unresolved(name, tuple(id(m) for _, m in projections), weight_names, hint)


def _fused_hint(name, local) -> str:
    module = _glob_layers(f"{name}.{local}" if name else local)
    return f"qkv_heads={{{module!r}: n_heads}} (or (n_q, n_kv) for grouped-query attention)"


def _separate_hint(name, projections) -> str:
    """overrides= labelling each projection's weight (and bias) head-wise, layers globbed."""
    prefix = _glob_layers(f"{name}.") if name else ""
    locals_ = [local for local, _ in projections]
    has_bias = any(isinstance(getattr(m, "bias", None), torch.Tensor) for _, m in projections)
    patterns = _char_class(locals_)
    entries = [f"'{prefix}{p}.weight': {{'role': 'qkv_weight', 'head_dim': HEAD_DIM}}" for p in patterns]
    if has_bias:
        entries += [f"'{prefix}{p}.bias': {{'role': 'qkv_bias', 'head_dim': HEAD_DIM}}" for p in patterns]
    return "overrides={" + ", ".join(entries) + "}"


def _char_class(names) -> list[str]:
    """['q_proj', 'k_proj', 'v_proj'] -> ['[qkv]_proj'] (one glob) where the names allow it."""
    rests = {n[1:] for n in names}
    if len(rests) == 1 and len({n[0] for n in names}) == len(names):
        return [f"[{''.join(n[0] for n in names)}]{rests.pop()}"]
    return list(names)


def _glob_layers(name: str) -> str:
    """'model.layers.3.self_attn' -> 'model.layers.*.self_attn': one hint for every layer."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


# --------------------------------------------------------------------------- experts


def _label_experts(name, module, found: Recognised) -> None:
    """A module holding E experts stacked on dim 0: each expert is normalized on its own."""
    n_experts = _experts_count(module)
    if n_experts is None:
        return
    own = dict(module.named_parameters(recurse=False))
    stacked = {local: p for local, p in own.items() if p.dim() >= 3 and p.shape[0] == n_experts}
    if not stacked:
        return
    reason = f"{type(module).__name__} {name!r}: {n_experts} experts on dim 0"
    for local, param in stacked.items():
        orientation = _experts_orientation(module, local, param, own)
        found.labels[(id(module), local)] = Label("matrix", None, reason, orientation, True)
    for local, param in own.items():
        if param.dim() == 2 and param.shape[0] == n_experts and local.endswith("bias"):
            found.labels[(id(module), local)] = Label("vector_bias", None, reason, experts=True)


def _experts_count(module) -> int | None:
    """E from the module's ``num_experts``, else from its own config (HF experts modules)."""
    count = _positive_int_attr(module, ("num_experts",))
    config = getattr(module, "config", None)
    if count is None and config is not None and not isinstance(config, (nn.Module, torch.Tensor)):
        count = _positive_int_attr(config, _N_EXPERTS_CONFIG_ATTRS)
    return count


def _experts_orientation(module, local, param, own) -> str:
    """[E, out, in] (F.linear per expert, HF's default) unless the module says it stores [E, in, out].

    Said by ``is_transposed=True`` (HF's experts implementations), else by a per-expert bias
    ``<name>_bias`` of shape [E, out] whose length matches only the last dim (GPT-OSS).
    """
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool):
        return "in_out" if transposed and param.dim() == 3 else "out_in"
    bias = own.get(f"{local}_bias")
    if param.dim() == 3 and bias is not None and bias.dim() == 2 and param.shape[1] != param.shape[2] == bias.shape[1]:
        return "in_out"
    return "out_in"


# --------------------------------------------------------------------------- helpers


def _positive_int_attr(obj, names) -> int | None:
    """The first of ``names`` that ``obj`` has as a positive int (configs may hold None)."""
    for attr in names:
        try:
            value = getattr(obj, attr, None)
        except Exception:  # a config property that cannot be computed for this model
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _exact_ratio(total, parts) -> int | None:
    if total is None or parts is None or total % parts != 0:
        return None
    return total // parts
