"""Parameter sets the step benchmark runs on: the tensor shapes and MANGO roles of real models.

An optimizer step does not depend on the model's forward pass, only on the parameter tensors
(shapes, dtypes, roles), so a set is a list of named shapes with their role. No ``nn.Module``
is built: `ParamSet.build` allocates the tensors directly, `mango_groups` labels them the way
`mango.param_groups` labels the GPT of ``bench.gpt`` (tests/test_bench.py checks the two agree).

GPT-2 layout (nanoGPT / ``bench.gpt`` naming), per layer::

    h.{i}.ln_1.{weight,bias}            (d,)        vector_weight / vector_bias
    h.{i}.attn.c_attn.weight            (3d, d)     qkv_weight, head_dim 64 (head-wise NS)
    h.{i}.attn.c_attn.bias              (3d,)       qkv_bias,   head_dim 64 (head-wise l2)
    h.{i}.attn.c_proj.{weight,bias}     (d, d)      matrix / vector_bias
    h.{i}.ln_2.{weight,bias}            (d,)
    h.{i}.mlp.c_fc.{weight,bias}        (4d, d)     matrix / vector_bias
    h.{i}.mlp.c_proj.{weight,bias}      (d, 4d)     matrix / vector_bias

plus ``wte.weight`` (vocab, d), ``wpe.weight`` (block, d) (embedding) and ``ln_f``. The output
projection is tied to ``wte.weight`` (one tensor). Which role that one tensor gets is a choice:
``tied_role="head"`` (default) orthogonalizes it with NS, which is what the performance contract counts (1.77 TFLOP
of NS for GPT-2 124M); ``tied_role="embedding"`` is what ``mango.param_groups`` picks for a tied
model (the embedding owns the tensor; no NS on it, 1.17 TFLOP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

__all__ = ["TensorSpec", "ParamSet", "gpt_set", "SETS", "HF_SET_NAMES", "CPU_LADDER", "resolve_set", "mango_groups", "TIED_ROLES"]

TIED_ROLES = ("head", "embedding")
HEAD_DIM = 64  # GPT-2's attention head size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # the (out, in) operator's shape, as the NS and the norms see it
    role: str
    head_dim: int | None = None
    layout: tuple = ()  # mango group keys beyond role and head_dim, e.g. (("orientation", "in_out"),)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_shape(self) -> tuple:
        """The tensor's shape in memory: transposed for matrices stored (in, out) (HF GPT-2's Conv1D)."""
        if dict(self.layout).get("orientation") == "in_out" and len(self.shape) == 2:
            return (self.shape[1], self.shape[0])
        return self.shape


@dataclass
class ParamSet:
    """A named list of tensors with roles; `targets` names the CPU targets of the performance contract it carries."""

    name: str
    title: str
    tensors: tuple
    config: dict = field(default_factory=dict)
    targets: tuple = ()  # "overhead" (torch vs reference speedup), "ns"/"ns_gram" (torch step / bare NS matmuls; bench/targets.py)
    note: str = ""
    default_skip: tuple = ()  # optimizers left out unless --optimizers names them
    default_add: tuple = ()  # optimizers run on this set beyond the device's defaults unless --optimizers is given

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def describe(self) -> dict:
        roles: dict = {}
        for t in self.tensors:
            r = roles.setdefault(t.role, {"tensors": 0, "numel": 0})
            r["tensors"] += 1
            r["numel"] += t.numel
        return {
            "name": self.name,
            "title": self.title,
            "config": dict(self.config),
            "tensors": len(self.tensors),
            "numel": self.numel,
            "roles": roles,
            "targets": list(self.targets),
            "note": self.note,
        }

    def build(self, device, dtype=torch.float32, seed: int = 0) -> list:
        """Fresh leaf parameters (GPT-2-like init scale) with zero gradients allocated, in their
        stored shapes. On a GPU the random matrices are drawn there (a billion parameters drawn on
        the host would cost each contender seconds)."""
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        gen = torch.Generator(device=device if on_gpu else "cpu").manual_seed(seed)
        params = []
        for t in self.tensors:
            shape = t.stored_shape
            if t.role in ("vector_weight",):
                data = torch.ones(shape, dtype=dtype)
            elif len(shape) == 1:
                data = torch.zeros(shape, dtype=dtype)
            else:
                where = device if on_gpu else "cpu"
                data = (torch.randn(shape, generator=gen, dtype=torch.float32, device=where) * 0.02).to(dtype)
            p = torch.nn.Parameter(data.to(device))
            p.grad = torch.zeros_like(p)
            params.append(p)
        return params


def mango_groups(pset: ParamSet, params: list) -> list[dict]:
    """Mango param groups, one per (role, head_dim, layout), as `mango.param_groups` would return them."""
    groups: dict = {}
    for spec, p in zip(pset.tensors, params):
        key = (spec.role, spec.head_dim, spec.layout)
        g = groups.setdefault(key, {"params": [], "param_names": [], "role": spec.role, "head_dim": spec.head_dim, **dict(spec.layout)})
        g["params"].append(p)
        g["param_names"].append(spec.name)
    return list(groups.values())


def gpt_set(
    name: str,
    n_layer: int,
    d: int,
    vocab: int,
    block: int,
    n_head: int | None = None,
    tied_role: str = "head",
    title: str | None = None,
    targets: tuple = (),
    note: str = "",
    default_skip: tuple = (),
    default_add: tuple = (),
) -> ParamSet:
    """The parameters of a GPT-2-style model (fused QKV, biases, LayerNorms, tied head)."""
    if tied_role not in TIED_ROLES:
        raise ValueError(f"tied_role={tied_role!r}: must be one of {TIED_ROLES}")
    n_head = n_head or max(1, d // HEAD_DIM)
    if d % n_head:
        raise ValueError(f"d={d} is not a multiple of n_head={n_head}")
    hd = d // n_head
    T = []
    T.append(TensorSpec("wte.weight", (vocab, d), tied_role))  # == lm_head.weight (tied)
    T.append(TensorSpec("wpe.weight", (block, d), "embedding"))
    for i in range(n_layer):
        p = f"h.{i}."
        T += [
            TensorSpec(p + "ln_1.weight", (d,), "vector_weight"),
            TensorSpec(p + "ln_1.bias", (d,), "vector_bias"),
            TensorSpec(p + "attn.c_attn.weight", (3 * d, d), "qkv_weight", hd),
            TensorSpec(p + "attn.c_attn.bias", (3 * d,), "qkv_bias", hd),
            TensorSpec(p + "attn.c_proj.weight", (d, d), "matrix"),
            TensorSpec(p + "attn.c_proj.bias", (d,), "vector_bias"),
            TensorSpec(p + "ln_2.weight", (d,), "vector_weight"),
            TensorSpec(p + "ln_2.bias", (d,), "vector_bias"),
            TensorSpec(p + "mlp.c_fc.weight", (4 * d, d), "matrix"),
            TensorSpec(p + "mlp.c_fc.bias", (4 * d,), "vector_bias"),
            TensorSpec(p + "mlp.c_proj.weight", (d, 4 * d), "matrix"),
            TensorSpec(p + "mlp.c_proj.bias", (d,), "vector_bias"),
        ]
    T += [TensorSpec("ln_f.weight", (d,), "vector_weight"), TensorSpec("ln_f.bias", (d,), "vector_bias")]
    cfg = dict(n_layer=n_layer, n_embd=d, n_head=n_head, head_dim=hd, vocab_size=vocab, block_size=block,
               tie_weights=True, tied_role=tied_role)  # fmt: skip
    title = title or f"GPT {n_layer}L d{d} vocab {vocab}"
    return ParamSet(name, title, tuple(T), cfg, tuple(targets), note, tuple(default_skip), tuple(default_add))


# name -> keyword arguments of gpt_set
_SET_ARGS = {
    "gpt2-124m": dict(n_layer=12, d=768, vocab=50257, block=1024, title="GPT-2 124M (12L d768)"),
    "gpt2-350m": dict(n_layer=24, d=1024, vocab=50257, block=1024, title="GPT-2 350M (24L d1024)"),
    # CPU targets of the performance contract: byte-level vocab (as bench.train) so the named cost dominates.
    # Compiling the reference over 150-300 tensors takes minutes on a CPU and is not part of
    # these targets: left out unless asked for (--optimizers ...,compile).
    "gpt-24l-d64": dict(n_layer=24, d=64, vocab=256, block=128, title="GPT 24L d64 (per-tensor overhead)",
                        targets=("overhead",), default_skip=("compile",)),
    # Here mango "auto" also runs beside every forced NS dtype and form and beside the peer packages
    "gpt-12l-d256": dict(n_layer=12, d=256, vocab=256, block=128, title="GPT 12L d256 (NS matmuls)",
                         targets=("ns", "ns_gram"), default_skip=("compile",),
                         default_add=("torch_bf16", "torch_fp32_textbook", "torch_fp32_gram", "torch_fp16_gram", "torch_fp32",
                                      "kj_muon", "heavyball_muon", "emerging_muon")),
    # --quick: exercises every path (both targets included) in seconds; no timing claims.
    "tiny": dict(n_layer=2, d=64, vocab=64, block=16, title="tiny GPT 2L d64 (--quick)", targets=("overhead", "ns", "ns_gram")),
}

# gpt-cpu: the largest of these whose estimated mango step fits the machine (see resolve_set).
CPU_LADDER = (
    dict(n_layer=4, d=128),
    dict(n_layer=6, d=192),
    dict(n_layer=8, d=256),
    dict(n_layer=12, d=384),
    dict(n_layer=12, d=512),
    dict(n_layer=12, d=768),
)
CPU_VOCAB, CPU_BLOCK = 256, 1024
# Hugging Face models built from their configs and labelled by mango.param_groups (bench/hf_sets.py)
HF_SET_NAMES = ("hf-gpt2-124m", "hf-gpt2-350m", "llama-1b", "hf-gpt2-tiny", "llama-tiny")
SETS = tuple(_SET_ARGS) + ("gpt-cpu",) + HF_SET_NAMES


def resolve_set(name: str, tied_role: str = "head", estimate_s=None, budget_s: float = 0.15) -> ParamSet:
    """The ParamSet called `name`. "gpt-cpu" picks the largest CPU_LADDER entry whose estimated
    step time `estimate_s(pset)` (seconds) is at most `budget_s` (the smallest when no estimator)."""
    if name in _SET_ARGS:
        return gpt_set(name, tied_role=tied_role, **_SET_ARGS[name])
    if name in HF_SET_NAMES:  # tied_role does not apply: param_groups decides, as for a user's model
        from .hf_sets import hf_set

        return hf_set(name)
    if name == "gpt-cpu":
        chosen = None
        for rung in CPU_LADDER:
            ps = gpt_set("gpt-cpu", vocab=CPU_VOCAB, block=CPU_BLOCK, tied_role=tied_role, **rung)
            if chosen is None or (estimate_s is not None and estimate_s(ps) <= budget_s):
                chosen = ps
            else:
                break
        est = f"{estimate_s(chosen) * 1e3:.0f} ms estimated" if estimate_s is not None else "no estimate"
        return replace(
            chosen,
            title=f"CPU-sized GPT {chosen.config['n_layer']}L d{chosen.config['n_embd']}",
            note=f"largest CPU_LADDER rung with an estimated step <= {budget_s * 1e3:.0f} ms on this machine ({est})",
        )
    raise ValueError(f"unknown parameter set {name!r}; known: {', '.join(SETS)}")
