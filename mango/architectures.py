"""Recognise how the architectures people train lay out their tensors, so labels need no hints.

The module tree says what a tensor is, but only to a reader who knows the conventions of the
libraries that build it: Hugging Face's GPT-2 stores its projections transposed in a ``Conv1D``
and fuses q/k/v in ``c_attn``; Llama/Mistral/Qwen keep q/k/v in separate Linears whose head size
sits on the attention module or in the model's config; BERT calls them query/key/value,
DistilBERT q_lin/k_lin/v_lin, T5 q/k/v, Phi-3 fuses them in qkv_proj; DeepSeek's latent
attention projects per-head rows from shared latents; MoE models stack their experts in one 3-D
parameter. This module reads those conventions by duck typing (no library is imported): the
projections of an attention module by the words of their names, or by rows that fit exactly one
q/k/v layout of the heads it states, and returns labels for :func:`mango.param_groups`.

Head counts come from the attention module or the model's config, never from shapes alone: a
wrong head split cannot be seen in the loss, only in a worse optimizer. Where a module looks
like attention but its heads or its projections cannot be found, it is reported (with the hint
that fixes it) and left to the generic ``matrix`` rule; where module, config and tensor
contradict, a ValueError names the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# A child projection's kind, read from the words of its name: q_proj, q_lin, q, query, to_q, wq
# are queries; k*/v* keys and values; qkv, qkv_proj, Wqkv, query_key_value are fused q/k/v; kv_proj,
# to_kv fused k/v. Names that say nothing (GPT-2's c_attn, Baichuan's W_pack) are listed.
_QUERY_WORDS = frozenset({"q", "query", "queries"})
_KEY_WORDS = frozenset({"k", "key", "keys"})
_VALUE_WORDS = frozenset({"v", "value", "values"})
FUSED_QKV_NAMES = ("c_attn", "W_pack")
# GPT-2 cross-attention: `q_attn` holds the queries, `c_attn` only the keys and values.
CROSS_QUERY_NAME = "q_attn"
# JetMoe's mixture of attention heads: each expert's query projection, in the attention's `experts` child.
EXPERT_QUERY_NAME = "input_linear"
# Class names of modules that hold attention projections (LlamaAttention, T5Attention, MptAttention,
# DistilBertSelfAttention, GPT2Attention, ...); their `...Output` siblings hold the output projection.
_ATTENTION_CLASS = re.compile(r"attention|attn|multihead", re.IGNORECASE)
# Learned position / class / register tokens: trained like embedding rows, not as one matrix.
LEARNED_TOKEN_NAMES = (
    "pos_embedding", "pos_embed", "position_embedding", "position_embeddings", "absolute_pos_embed",
    "class_token", "cls_token", "dist_token", "mask_token", "register_tokens",
)  # fmt: skip
# Direct children of the model that are its output layer (torchvision `fc`, HF `classifier`/`score`).
TOP_LEVEL_HEAD_NAMES = ("fc", "classifier", "score")

_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "dim_head", "d_head")
_N_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_N_KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")
# Multi-head latent attention (DeepSeek-V2/V3): per-head sizes of the query and of the key/value up-projection.
_MLA_ATTRS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
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
    any_override: bool = False  # which projections are q/k/v is unknown: a role override on any one settles it


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


@dataclass(frozen=True)
class _Unnamed:
    """A module that looks like attention but names none of its projections: its Linear children,
    decided by their rows once the modules inside it are labelled."""

    name: str
    module: nn.Module
    children: list  # (local name, Linear-like child)
    heads: _Heads


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
    unnamed: list[_Unnamed] = []
    for name, module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        if not isinstance(module, nn.MultiheadAttention):  # its in_proj_* are labelled by mango.roles
            candidate = _label_attention(name, module, by_name, root, found)
            if candidate is not None:
                unnamed.append(candidate)
        _label_experts(name, module, found)
    _label_unnamed(unnamed, found)
    return found


# --------------------------------------------------------------------------- attention


def projection_kind(local: str) -> str | None:
    """'q', 'k', 'v', 'kv' or 'qkv' for a child named as an attention projection, else None."""
    if local in FUSED_QKV_NAMES:
        return "qkv"
    words = set()
    for word in re.findall(r"[a-z]+", local.lower()):  # 'Wqkv' -> 'wqkv', 'q_lin' -> 'q', 'lin'
        words.add(word[1:] if word[:1] == "w" and word[1:] in ("q", "k", "v", "kv", "qkv") else word)
    if "qkv" in words or {"query", "key", "value"} <= words:
        return "qkv"
    if "kv" in words or {"key", "value"} <= words:
        return "kv"
    kinds = [kind for kind, vocab in (("q", _QUERY_WORDS), ("k", _KEY_WORDS), ("v", _VALUE_WORDS)) if words & vocab]
    return kinds[0] if len(kinds) == 1 else None


def looks_like_attention(module: nn.Module) -> bool:
    """By its class name: LlamaAttention, T5Attention, GPT2Attention, ...; not BertSelfOutput."""
    kind = type(module).__name__
    return bool(_ATTENTION_CLASS.search(kind)) and not kind.endswith("Output")


def _label_attention(name, module, by_name, root, found: Recognised) -> _Unnamed | None:
    """q/k/v projections of one module, by name, split into the heads it states.

    A module is taken as attention when its Linear children are named as q/k/v projections
    (any spelling: ``q_proj``, ``q_lin``, ``q``, ``query``, fused ``qkv_proj`` / ``Wqkv``), or when
    its class name says attention or it states its head count. Its projections are the children
    named so; where none is, the module is returned, to be decided by the rows of its children
    (`_label_unnamed`) once the modules inside it are labelled.
    """
    children = [(local, child) for local, child in module.named_children() if is_linear_like(child)]
    if not children:
        return None
    if _is_mla(module, children):
        _label_mla(name, module, children, _config_of(name, module, by_name, root), found)
        return None
    kinds: dict[str, list[tuple[str, nn.Module]]] = {}
    for local, child in children:
        kind = projection_kind(local)
        if kind is not None:
            kinds.setdefault(kind, []).append((local, child))
    named = "qkv" in kinds or ("q" in kinds and ("kv" in kinds or ("k" in kinds and "v" in kinds)))
    attention_like = looks_like_attention(module) or _states_head_count(module)
    if not (named or attention_like):
        return None
    heads = _find_heads(name, module, _config_of(name, module, by_name, root))
    # Keys and values without a query child (JetMoe: the queries are computed by its experts).
    keys_and_values = "q" not in kinds and ("kv" in kinds or ("k" in kinds and "v" in kinds))
    if named or (attention_like and keys_and_values):
        head_dim = _label_named(name, kinds, heads, found)
        if keys_and_values and head_dim is not None:
            _label_expert_queries(name, module, head_dim, heads, found)
        return None
    return _Unnamed(name, module, children, heads)


def _states_head_count(module) -> bool:
    """A head count on the module itself (timm's Attention, nanoGPT's ``n_head``): evidence of attention."""
    return _positive_int_attr(module, _N_HEADS_ATTRS) is not None


def _label_unnamed(unnamed: list[_Unnamed], found: Recognised) -> None:
    """Attention-like modules without named projections, innermost first (``unnamed`` is in
    module-tree pre-order): one whose attention lives in a module inside it is a wrapper (HF
    LED's ``LEDEncoderAttention``, holding only the output Linear beside its self-attention),
    neither labelled by the rows of its own children nor reported; the others get the q/k/v layout
    their children's rows fit, or are reported with the hint that labels them."""
    held = {module_id for (module_id, _), label in found.labels.items() if label.role == "qkv_weight"}
    held.update(i for item in found.unresolved for i in item.projection_ids)
    gaps = []
    for item in reversed(unnamed):
        if _wraps_attention(item.module, held):
            continue
        projections = _label_by_structure(item.name, item.children, item.heads, found)
        if projections is None:
            gaps.append(_unresolved(item.name, item.children, _unknown_hint(item.name, item.children), any_override=True))
            projections = item.children
        held.update(id(child) for _, child in projections)
    found.unresolved.extend(reversed(gaps))  # in module-tree order, as the warnings name them


def _wraps_attention(module, held: set[int]) -> bool:
    """Its attention lives deeper: a projection (labelled or reported) below its own Linear children."""
    own = {id(child) for _, child in module.named_children() if is_linear_like(child)}
    return any(id(inner) in held for inner in module.modules() if inner is not module and id(inner) not in own)


def _label_named(name, kinds, heads: _Heads, found: Recognised) -> int | None:
    """Projections found by name: q has n_q heads, k and v n_kv (GQA), fused ones their sum.

    A fused projection beside a separate query (GPT-2 cross-attention's c_attn next to q_attn)
    holds only the keys and values. Without a key/value head count a fused projection is taken
    as plain multi-head (n_kv = n_q), as ``qkv_heads={...: n}`` means; rows that do not fit that
    are reported, not guessed at. Separate k and v then need only be whole heads. Returns the
    head size the projections were split into, or None where they were reported instead.
    """
    has_query = "q" in kinds
    n_kv = heads.n_kv or heads.n_q
    fused_blocks = None if heads.n_q is None else (2 * n_kv if has_query else heads.n_q + 2 * n_kv)
    counts = {
        "q": heads.n_q, "k": heads.n_kv, "v": heads.n_kv,
        "kv": None if heads.n_q is None else 2 * n_kv, "qkv": fused_blocks,
    }  # fmt: skip
    ordered = [(kind, local, child) for kind in ("q", "qkv", "kv", "k", "v") for local, child in kinds.get(kind, [])]
    first_kind, _, first = ordered[0]
    rows = operator_rows(first)
    head_dim = heads.head_dim or _exact_ratio(rows, counts[first_kind])
    maybe_grouped = (  # heads divide the rows, but not as n_q + 2·n_q blocks, and no kv count is given
        first_kind == "qkv" and not has_query and heads.n_kv is None and fused_blocks is not None
        and head_dim and rows % head_dim == 0 and rows != fused_blocks * head_dim
    )  # fmt: skip
    projections = [(local, child) for _, local, child in ordered]
    if head_dim is None or maybe_grouped:
        found.unresolved.append(_unresolved(name, projections, _named_hint(name, kinds)))
        return None
    prefix = f"{name}." if name else ""
    for kind, local, child in ordered:
        what = "fused " if kind in ("qkv", "kv") else ""
        if kind == "q" and _gated_query(child, head_dim, heads, kinds):
            counts = {**counts, "q": 2 * heads.n_q}
            what = "query and output gate of each head, "
        _check_rows(prefix + local, child, head_dim, counts[kind], heads)
        _label_projection(child, head_dim, f"{heads.source}: {what}{local} in heads of {head_dim}", found)
    return head_dim


def _gated_query(query, head_dim, heads: _Heads, kinds) -> bool:
    """A separate query of exactly 2·n_q·head_dim rows beside separate k and v: each head's query and its gate.

    Qwen3-Next and Qwen3.5 compute a sigmoid output gate per head in ``q_proj``: per head,
    head_dim query rows then head_dim gate rows. Every block of head_dim rows is then one head's
    query or one head's gate, two operators, as the k and v blocks of a fused projection are.
    """
    return (
        heads.n_q is not None and "k" in kinds and "v" in kinds
        and operator_rows(query) == 2 * heads.n_q * head_dim
    )  # fmt: skip


def _label_by_structure(name, children, heads: _Heads, found: Recognised) -> list | None:
    """The children whose rows are exactly one q/k/v layout of the stated heads are its projections.

    Layouts: one fused q/k/v of ``(n_q + 2·n_kv)·head_dim`` rows; separate q, k, v of
    ``n_q·head_dim``, ``n_kv·head_dim``, ``n_kv·head_dim``; q and a fused k/v of
    ``2·n_kv·head_dim``. Which of them is q, k or v does not matter (they get one label), only
    that no other child has such rows: an output projection as wide as the queries (``d_model
    = n_q·head_dim``) makes separate projections ambiguous, and then nothing is guessed. Returns
    the children labelled, or None.
    """
    if heads.n_q is None or heads.head_dim is None:
        return None
    n_q, n_kv, head_dim = heads.n_q, heads.n_kv or heads.n_q, heads.head_dim
    layouts = {
        "fused q/k/v": [n_q + 2 * n_kv],
        "separate q, k, v": [n_q, n_kv, n_kv],
        "q and fused k/v": [n_q, 2 * n_kv],
    }
    matches = []
    for what, blocks in layouts.items():
        sizes = sorted(b * head_dim for b in blocks)
        chosen = [(local, child) for local, child in children if operator_rows(child) in sizes]
        if sorted(operator_rows(child) for _, child in chosen) == sizes:
            matches.append((what, chosen))
    if len(matches) != 1:
        return None
    (what, chosen), = matches
    locals_ = ", ".join(local for local, _ in chosen)
    for _, child in chosen:
        reason = f"{heads.source}: {locals_} have the rows of {what} in heads of {head_dim}"
        _label_projection(child, head_dim, reason, found)
    return chosen


def _label_expert_queries(name, module, head_dim, heads: _Heads, found: Recognised) -> None:
    """Queries projected by experts (JetMoe's mixture of attention heads): head-wise per expert.

    JetMoe's attention has only a fused ``kv_proj``; each of the ``num_experts`` experts of its
    ``experts`` child projects the queries of ``num_key_value_heads`` heads in its
    ``input_linear`` ``[E, heads·head_dim, H]`` (and maps them back in ``output_linear``, a
    plain matrix per expert).
    """
    for local, child in module.named_children():
        n_experts = _experts_count(child)
        query = getattr(child, EXPERT_QUERY_NAME, None)
        weight = getattr(query, "weight", None)
        if n_experts is None or not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] != n_experts:
            continue
        full = f"{name}.{local}.{EXPERT_QUERY_NAME}.weight" if name else f"{local}.{EXPERT_QUERY_NAME}.weight"
        if weight.shape[1] % head_dim != 0:
            raise ValueError(
                f"mango.param_groups: parameter {full!r} has {weight.shape[1]} output rows per expert, expected a "
                f"multiple of head_dim {head_dim} (heads read from {heads.source}); label it with "
                f"overrides={{{full!r}: {{'role': 'qkv_weight', 'head_dim': ..., 'experts': True}}}}"
            )
        reason = (
            f"{heads.source}: {local}.{EXPERT_QUERY_NAME} holds each of {n_experts} experts' queries, "
            f"{weight.shape[1] // head_dim} heads of {head_dim}"
        )
        found.labels[(id(query), "weight")] = Label("qkv_weight", head_dim, reason, experts=True)


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
    """Heads of an attention module, from its attributes first, then from the model's config.

    A key/value head count on the module itself sizes its key and value projections and wins
    over ``num_key_value_groups``, which only says how the forward repeats them: JetMoe states
    ``num_key_value_groups = 1`` beside twice as many query heads as key/value heads (its experts
    each project one group of queries). Otherwise the groups give n_kv = n_q / groups.
    """
    kind = f"{type(module).__name__} {name!r}"
    head_dim = _positive_int_attr(module, _HEAD_DIM_ATTRS)
    n_q = _positive_int_attr(module, _N_HEADS_ATTRS)
    n_kv = _positive_int_attr(module, _N_KV_HEADS_ATTRS)
    n_kv_stated = n_kv is not None
    if config is not None:
        config_heads = _positive_int_attr(config, ("num_attention_heads",))
        n_q = n_q or config_heads
        n_kv = n_kv or _positive_int_attr(config, ("num_key_value_heads",))
        head_dim = head_dim or _positive_int_attr(config, ("head_dim",)) or _exact_ratio(
            _positive_int_attr(config, ("hidden_size",)), config_heads
        )
    groups = _positive_int_attr(module, ("num_key_value_groups",))
    if groups is not None and n_q is not None and not n_kv_stated:
        if n_q % groups != 0 or (n_kv is not None and n_kv * groups != n_q):
            raise ValueError(
                f"mango.param_groups: attention module {name!r}: num_key_value_groups={groups} contradicts "
                f"{n_q} query heads and {n_kv} key/value heads (module attributes and model config); "
                "label its projections with overrides={...: {'role': 'qkv_weight', 'head_dim': ...}}"
            )
        n_kv = n_q // groups
    return _Heads(n_q, n_kv, head_dim, kind)


# --------------------------------------------------------------------------- multi-head latent attention


def _is_mla(module, children) -> bool:
    """DeepSeek-V2/V3-style attention: a shared latent ``kv_a_proj_with_mqa``, per-head ``kv_b_proj``."""
    locals_ = {local for local, _ in children}
    return "kv_b_proj" in locals_ and ("kv_a_proj_with_mqa" in locals_ or any(hasattr(module, a) for a in _MLA_ATTRS))


def _label_mla(name, module, children, config, found: Recognised) -> None:
    """Per-head projections head-wise, each with its own block size; shared low-rank ones plain.

    ``q_proj`` (or ``q_b_proj`` after the ``q_a_proj`` bottleneck) has n_heads blocks of
    qk_nope + qk_rope rows: each is one head's query. ``kv_b_proj`` has per head qk_nope key rows
    then v_head_dim value rows; a block never crosses heads: with qk_nope == v_head_dim (DeepSeek-V2
    and V3: 128 and 128) each head's key and its value are separate blocks, as a fused QKV's are;
    otherwise a tensor has one block size, so each head's [key; value] rows are one block.
    ``q_a_proj`` and ``kv_a_proj_with_mqa`` (the latent, plus the rope key shared by all heads)
    belong to no head: they stay whole matrices.
    """
    def size(attr):
        return _positive_int_attr(module, (attr,)) or (_positive_int_attr(config, (attr,)) if config else None)

    n_heads = _positive_int_attr(module, _N_HEADS_ATTRS) or (
        _positive_int_attr(config, ("num_attention_heads",)) if config else None
    )
    nope, rope, v_dim = size("qk_nope_head_dim"), size("qk_rope_head_dim"), size("v_head_dim")
    by_local = dict(children)
    kv_b = by_local["kv_b_proj"]
    if None in (n_heads, nope, rope, v_dim):
        found.unresolved.append(_unresolved(name, [("kv_b_proj", kv_b)], _mla_hint(name, by_local)))
        return
    heads = _Heads(n_heads, n_heads, None, f"{type(module).__name__} {name!r}")
    prefix = f"{name}." if name else ""
    query_local = "q_b_proj" if "q_b_proj" in by_local else "q_proj" if "q_proj" in by_local else None
    if query_local is not None:
        query_dim = nope + rope
        _check_rows(prefix + query_local, by_local[query_local], query_dim, n_heads, heads)
        reason = f"{heads.source}: {query_local} in {n_heads} query heads of qk_nope + qk_rope = {query_dim}"
        _label_projection(by_local[query_local], query_dim, reason, found)
    if nope == v_dim:
        kv_dim, what = nope, f"a key and a value block per head, of qk_nope = v_head_dim = {nope}"
        blocks = 2 * n_heads
    else:
        kv_dim, what = nope + v_dim, f"one [key; value] block per head, of qk_nope + v_head_dim = {nope + v_dim}"
        blocks = n_heads
    _check_rows(prefix + "kv_b_proj", kv_b, kv_dim, blocks, heads)
    _label_projection(kv_b, kv_dim, f"{heads.source}: kv_b_proj in {what}", found)


def _mla_hint(name, by_local) -> str:
    prefix = _glob_layers(f"{name}.") if name else ""
    query = "q_b_proj" if "q_b_proj" in by_local else "q_proj"
    return (
        f"overrides={{'{prefix}{query}.weight': {{'role': 'qkv_weight', 'head_dim': QK_NOPE + QK_ROPE}}, "
        f"'{prefix}kv_b_proj.weight': {{'role': 'qkv_weight', 'head_dim': QK_NOPE + V_HEAD_DIM}}}}"
    )


# --------------------------------------------------------------------------- checks and hints


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


def _unresolved(name, projections, hint, any_override=False) -> Unresolved:
    prefix = f"{name}." if name else ""
    weight_names = tuple(f"{prefix}{local}.weight" for local, _ in projections)
    return Unresolved(name, tuple(id(m) for _, m in projections), weight_names, hint, any_override)


def _named_hint(name, kinds) -> str:
    """qkv_heads= for one fused projection; else overrides= labelling each projection head-wise."""
    if set(kinds) == {"qkv"} and len(kinds["qkv"]) == 1:
        (local, _), = kinds["qkv"]
        module = _glob_layers(f"{name}.{local}" if name else local)
        return f"qkv_heads={{{module!r}: n_heads}} (or (n_q, n_kv) for grouped-query attention)"
    projections = [p for kind in ("q", "qkv", "kv", "k", "v") for p in kinds.get(kind, [])]
    return _overrides_hint(name, projections)


def _overrides_hint(name, projections) -> str:
    """overrides= labelling each projection's weight (and bias) head-wise, layers globbed."""
    prefix = _glob_layers(f"{name}.") if name else ""
    locals_ = [local for local, _ in projections]
    has_bias = any(isinstance(getattr(m, "bias", None), torch.Tensor) for _, m in projections)
    patterns = _char_class(locals_)
    entries = [f"'{prefix}{p}.weight': {{'role': 'qkv_weight', 'head_dim': HEAD_DIM}}" for p in patterns]
    if has_bias:
        entries += [f"'{prefix}{p}.bias': {{'role': 'qkv_bias', 'head_dim': HEAD_DIM}}" for p in patterns]
    return "overrides={" + ", ".join(entries) + "}"


def _unknown_hint(name, children) -> str:
    """Neither the names nor the shapes say which children are q, k and v: name both ways to say it."""
    prefix = _glob_layers(f"{name}.") if name else ""
    listed = ", ".join(repr(local) for local, _ in children)
    return (
        f"overrides={{'{prefix}NAME.weight': {{'role': 'qkv_weight', 'head_dim': HEAD_DIM}}}} for each of its "
        f"q, k and v projections (its Linear children: {listed}), or qkv_heads={{'{prefix}NAME': n_heads}} "
        "for a fused one"
    )


def _char_class(names) -> list[str]:
    """['q_proj', 'k_proj', 'v_proj'] -> ['[qkv]_proj'] (one glob) where the names allow it."""
    rests = {n[1:] for n in names}
    if len(rests) == 1 and len({n[0] for n in names}) == len(names) and len(names) > 1:
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
        # an attention module above may have found these to be its queries (JetMoe): that label is more precise
        found.labels.setdefault((id(module), local), Label("matrix", None, reason, orientation, True))
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
