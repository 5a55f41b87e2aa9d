"""A small, clean GPT-2-style language model with NormFormer switches.

Pre-LN GPT-2 block (Radford et al. 2019; nanoGPT naming)::

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))               mlp(x) = c_proj(gelu(c_fc(x)))

NormFormer (Shleifer et al. 2021, section 2.1) adds four operations, each a switch here::

    x = x + attn_ln(attn(ln_1(x)))                          post_attn_ln: LayerNorm after attention
          attn: concat(gamma_1 h_1, ..., gamma_n h_n) W^O   head_scale:   HeadScale, one gain per head
    x = res_scale * x + mlp(ln_2(x))                        res_scale:    ResScale on the FFN residual
          mlp(x) = c_proj(ffn_ln(gelu(c_fc(x))))            ffn_ln:       LayerNorm after the first FFN layer

The new parameters are exactly: ``n_head`` (HeadScale) + ``d`` (ResScale) + ``2 d`` (post-attention
LN) + ``2 * 4d`` (FFN LN) per layer, i.e. ``n_layer * (n_head + 11 d)``: 101,520 for GPT-2 124M
(the paper's "+100,000 parameters").

Parameter names (what ``mango.param_groups`` sees)::

    wte.weight, wpe.weight                       nn.Embedding            -> embedding
    h.{i}.ln_1.{weight,bias}                     LayerNorm               -> vector_weight / vector_bias
    h.{i}.attn.c_attn.{weight,bias}              fused QKV nn.Linear     -> qkv_weight / qkv_bias
    h.{i}.attn.head_scale                        HeadScale, (n_head,)    -> vector_weight
    h.{i}.attn.c_proj.{weight,bias}              nn.Linear               -> matrix / vector_bias
    h.{i}.attn_ln.{weight,bias}                  post-attention LN       -> vector_weight / vector_bias
    h.{i}.ln_2.{weight,bias}
    h.{i}.mlp.c_fc.{weight,bias}                 nn.Linear               -> matrix / vector_bias
    h.{i}.mlp.ffn_ln.{weight,bias}               FFN LN (4d)             -> vector_weight / vector_bias
    h.{i}.mlp.c_proj.{weight,bias}
    h.{i}.res_scale                              ResScale, (d,)          -> vector_weight
    ln_f.{weight,bias}
    lm_head.weight                               output projection       -> head (tied to wte.weight
                                                                            when tie_weights=True)

The fused QKV rows are laid out ``[q_0 .. q_{n-1}, k_0 .. k_{n-1}, v_0 .. v_{n-1}]``, each block
``head_dim`` rows, which is the layout the head-wise ``ns_split`` / ``l2_split`` norms assume.
The only labelling help an optimizer needs is :attr:`GPT.qkv_heads`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "normformer_extra_params"]


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level
    block_size: int = 128  # context length (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    tie_weights: bool = False  # lm_head.weight is wte.weight
    dropout: float = 0.0
    # NormFormer: ``normformer`` turns all four on; each switch left at None follows it.
    normformer: bool = False
    head_scale: Optional[bool] = None
    res_scale: Optional[bool] = None
    post_attn_ln: Optional[bool] = None
    ffn_ln: Optional[bool] = None

    def __post_init__(self):
        for k in ("head_scale", "res_scale", "post_attn_ln", "ffn_ln"):
            if getattr(self, k) is None:
                setattr(self, k, bool(self.normformer))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def normformer_extra_params(cfg: GPTConfig) -> int:
    """Parameters the enabled NormFormer operations add to the Pre-LN model (paper section 2.1)."""
    d, per_layer = cfg.n_embd, 0
    if cfg.head_scale:
        per_layer += cfg.n_head
    if cfg.res_scale:
        per_layer += d
    ln = 2 if cfg.bias else 1  # LayerNorm gain (+ bias)
    if cfg.post_attn_ln:
        per_layer += ln * d
    if cfg.ffn_ln:
        per_layer += ln * 4 * d
    return cfg.n_layer * per_layer


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused QKV
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.head_scale = nn.Parameter(torch.ones(cfg.n_head)) if cfg.head_scale else None
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hd)
        if self.head_scale is not None:  # HeadScale: gamma_i * h_i before W^O
            y = y * self.head_scale.view(1, -1, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.ffn_ln = nn.LayerNorm(4 * cfg.n_embd, bias=cfg.bias) if cfg.ffn_ln else None
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        x = F.gelu(self.c_fc(x))
        if self.ffn_ln is not None:  # NormFormer FFN LN
            x = self.ffn_ln(x)
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.post_attn_ln else None
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.res_scale = nn.Parameter(torch.ones(cfg.n_embd)) if cfg.res_scale else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        a = self.attn(self.ln_1(x))
        if self.attn_ln is not None:  # NormFormer post-attention LN
            a = self.attn_ln(a)
        x = x + self.drop(a)
        r = x if self.res_scale is None else x * self.res_scale.to(x.dtype)  # NormFormer ResScale
        return r + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual output projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def qkv_heads(self) -> dict:
        """The labelling help ``mango.param_groups(model, qkv_heads=model.qkv_heads)`` needs."""
        return {"h.*.attn.c_attn": self.config.n_head}

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
