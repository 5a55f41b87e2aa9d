"""mango.param_groups on real architectures, with no hints (the roles: real models come first, docs/architectures.md).

Each model is built from a tiny config (no weights, no download) and every parameter's label
is written out: role, head_dim, orientation and experts. A wrong label would silently pick the
wrong norm on the wrong axis (GPT-2's Conv1D stores (in, out); Mixtral's experts are 4 matrices,
not one), so nothing is checked by sampling.
"""

from __future__ import annotations

import ast
import re
import warnings

import pytest
import torch
import transformers
from torch import nn

import mango
from mango.roles import describe, param_groups

from third_party import torchvision

OI, IO = "out_in", "in_out"
EMB = ("embedding", None, OI, False)
VW = ("vector_weight", None, OI, False)
VB = ("vector_bias", None, OI, False)
MAT = ("matrix", None, OI, False)
CONV1D = ("matrix", None, IO, False)  # HF Conv1D weight: stored (in, out)
HEAD = ("head", None, OI, False)
EXPERTS = ("matrix", None, OI, True)  # [E, out, in], one NS per expert
EXPERTS_T = ("matrix", None, IO, True)  # [E, in, out]
EXPERT_BIAS = ("vector_bias", None, OI, True)  # [E, out], one l2 per expert


def qkv(head_dim, orientation=OI):
    return ("qkv_weight", head_dim, orientation, False)


def qkv_bias(head_dim):
    return ("qkv_bias", head_dim, OI, False)


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)  # inside the tiny vocab: no config warnings

BUILDERS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, **TOKENS)
    ),
    "gpt2_cross": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True, **TOKENS
        )
    ),
    "neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**TINY, **TOKENS)),
    "llama_gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2, **TOKENS)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, num_key_value_heads=2, **TOKENS)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, num_key_value_heads=2, **TOKENS)),
    # head_dim 16 != hidden 32 / 4 heads: the config's explicit head_dim must win
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16, **TOKENS)
    ),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**TINY, max_position_embeddings=16, **TOKENS)),
    "roberta": lambda: transformers.RobertaForMaskedLM(
        transformers.RobertaConfig(**TINY, max_position_embeddings=20, **TOKENS)
    ),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **TOKENS)
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            **TINY, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            **TOKENS,
        )  # fmt: skip
    ),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            **{**TINY, "intermediate_size": 24}, num_key_value_heads=2, head_dim=8, num_local_experts=4,
            num_experts_per_tok=2, **TOKENS,
        )  # fmt: skip
    ),
    # fused qkv_proj [q | k | v] with GQA: (4 + 2·2)·8 rows; heads from the module and the config
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY, num_key_value_heads=2, **TOKENS)),
    "distilbert": lambda: transformers.DistilBertForMaskedLM(
        transformers.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48, max_position_embeddings=16, pad_token_id=2
        )
    ),
    # d_kv 16 != d_model 32 / 4 heads: T5Attention's key_value_proj_dim must win
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0, **TOKENS
        )
    ),
    # multi-head latent attention: q_a_proj -> q_b_proj (4 heads of 8 + 4), kv_a_proj_with_mqa -> kv_b_proj
    # (4 heads of 8 key + 6 value rows); layer 0 dense, layer 1 MoE (4 routed experts, 1 shared)
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **{**TINY, "num_hidden_layers": 2}, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, moe_intermediate_size=16, first_k_dense_replace=1,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, **TOKENS,
        )  # fmt: skip
    ),
    # MLA without the query bottleneck (q_proj) and with qk_nope == v_head_dim, as DeepSeek-V2/V3 ship
    "deepseek_v2": lambda: transformers.DeepseekV2ForCausalLM(
        transformers.DeepseekV2Config(
            **TINY, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=1, **TOKENS,
        )  # fmt: skip
    ),
    # gated attention: q_proj holds each head's query, then its output gate: (4 + 4)·8 rows
    "qwen3_next": lambda: transformers.Qwen3NextForCausalLM(
        transformers.Qwen3NextConfig(
            **TINY, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=24, layer_types=["full_attention"], **TOKENS,
        )  # fmt: skip
    ),
    # mixture of attention heads: a fused kv_proj (2 key + 2 value heads of 8); each of 4 attention experts
    # projects 2 query heads (input_linear [4, 16, 32]); num_key_value_groups = 1 beside 4 query heads
    "jetmoe": lambda: transformers.JetMoeForCausalLM(
        transformers.JetMoeConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8,
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **TOKENS,
        )  # fmt: skip
    ),
    "resnet18": lambda: torchvision().models.resnet18(num_classes=10),
    "vit": lambda: torchvision().models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    ),
}

_built: dict[str, nn.Module] = {}


def model(name: str) -> nn.Module:
    """Each model is built once per test process (building is the slow part)."""
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = BUILDERS[name]()
    return _built[name]


# --------------------------------------------------------------------------- expected labels


def gpt2_block(p, cross=False):
    out = {
        p + "ln_1.weight": VW, p + "ln_1.bias": VB,
        p + "attn.c_attn.weight": qkv(8, IO), p + "attn.c_attn.bias": qkv_bias(8),
        p + "attn.c_proj.weight": CONV1D, p + "attn.c_proj.bias": VB,
        p + "ln_2.weight": VW, p + "ln_2.bias": VB,
        p + "mlp.c_fc.weight": CONV1D, p + "mlp.c_fc.bias": VB,
        p + "mlp.c_proj.weight": CONV1D, p + "mlp.c_proj.bias": VB,
    }  # fmt: skip
    if cross:
        out.update({
            p + "crossattention.c_attn.weight": qkv(8, IO), p + "crossattention.c_attn.bias": qkv_bias(8),
            p + "crossattention.q_attn.weight": qkv(8, IO), p + "crossattention.q_attn.bias": qkv_bias(8),
            p + "crossattention.c_proj.weight": CONV1D, p + "crossattention.c_proj.bias": VB,
            p + "ln_cross_attn.weight": VW, p + "ln_cross_attn.bias": VB,
        })  # fmt: skip
    return out


def gpt2_expected(cross=False):
    # lm_head.weight is tied to wte: listed once, as the embedding (with the tie warning)
    return {
        "transformer.wte.weight": EMB, "transformer.wpe.weight": EMB,
        **gpt2_block("transformer.h.0.", cross),
        "transformer.ln_f.weight": VW, "transformer.ln_f.bias": VB,
    }  # fmt: skip


NEOX = {
    "gpt_neox.embed_in.weight": EMB,
    "gpt_neox.layers.0.input_layernorm.weight": VW, "gpt_neox.layers.0.input_layernorm.bias": VB,
    "gpt_neox.layers.0.post_attention_layernorm.weight": VW, "gpt_neox.layers.0.post_attention_layernorm.bias": VB,
    # rows interleave [q_h k_h v_h] per head: every block of head_size rows is still one head's q, k or v
    "gpt_neox.layers.0.attention.query_key_value.weight": qkv(8),
    "gpt_neox.layers.0.attention.query_key_value.bias": qkv_bias(8),
    "gpt_neox.layers.0.attention.dense.weight": MAT, "gpt_neox.layers.0.attention.dense.bias": VB,
    "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": MAT, "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": VB,
    "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": MAT, "gpt_neox.layers.0.mlp.dense_4h_to_h.bias": VB,
    "gpt_neox.final_layer_norm.weight": VW, "gpt_neox.final_layer_norm.bias": VB,
    "lm_head.weight": HEAD,
}  # fmt: skip


def decoder_expected(head_dim, attn_bias=False, qk_norm=False, mlp=None):
    """Llama-family causal LM with one layer: separate q/k/v split head-wise, o_proj a matrix."""
    p = "model.layers.0."
    out = {"model.embed_tokens.weight": EMB}
    for proj in ("q_proj", "k_proj", "v_proj"):
        out[p + f"self_attn.{proj}.weight"] = qkv(head_dim)
        if attn_bias:
            out[p + f"self_attn.{proj}.bias"] = qkv_bias(head_dim)
    out[p + "self_attn.o_proj.weight"] = MAT
    if qk_norm:
        out.update({p + "self_attn.q_norm.weight": VW, p + "self_attn.k_norm.weight": VW})
    out.update(mlp or {p + "mlp.gate_proj.weight": MAT, p + "mlp.up_proj.weight": MAT, p + "mlp.down_proj.weight": MAT})
    out.update({p + "input_layernorm.weight": VW, p + "post_attention_layernorm.weight": VW, "model.norm.weight": VW})
    out["lm_head.weight"] = HEAD
    return out


# Router (E, H): an ordinary matrix, whole-matrix NS (docs/architectures.md: it maps H -> E logits like any Linear).
MOE_MLP = {
    "model.layers.0.mlp.gate.weight": MAT,
    "model.layers.0.mlp.experts.gate_up_proj": EXPERTS,  # (4, 2I, H): one operator H -> 2I per expert
    "model.layers.0.mlp.experts.down_proj": EXPERTS,  # (4, H, I)
}
GPT_OSS_MLP = {
    "model.layers.0.mlp.router.weight": MAT, "model.layers.0.mlp.router.bias": VB,
    "model.layers.0.mlp.experts.gate_up_proj": EXPERTS_T,  # (4, H, 2I), is_transposed=True
    "model.layers.0.mlp.experts.gate_up_proj_bias": EXPERT_BIAS,
    "model.layers.0.mlp.experts.down_proj": EXPERTS_T,
    "model.layers.0.mlp.experts.down_proj_bias": EXPERT_BIAS,
}  # fmt: skip


def bert_expected(prefix, head):
    p = f"{prefix}.encoder.layer.0."
    out = {
        f"{prefix}.embeddings.word_embeddings.weight": EMB,
        f"{prefix}.embeddings.position_embeddings.weight": EMB,
        f"{prefix}.embeddings.token_type_embeddings.weight": EMB,
        f"{prefix}.embeddings.LayerNorm.weight": VW, f"{prefix}.embeddings.LayerNorm.bias": VB,
    }  # fmt: skip
    for proj in ("query", "key", "value"):
        out[p + f"attention.self.{proj}.weight"] = qkv(8)
        out[p + f"attention.self.{proj}.bias"] = qkv_bias(8)
    out.update({
        p + "attention.output.dense.weight": MAT, p + "attention.output.dense.bias": VB,
        p + "attention.output.LayerNorm.weight": VW, p + "attention.output.LayerNorm.bias": VB,
        p + "intermediate.dense.weight": MAT, p + "intermediate.dense.bias": VB,
        p + "output.dense.weight": MAT, p + "output.dense.bias": VB,
        p + "output.LayerNorm.weight": VW, p + "output.LayerNorm.bias": VB,
    })  # fmt: skip
    out.update(head)  # the decoder weight is tied to word_embeddings: listed once, as the embedding
    return out


BERT_HEAD = {
    "cls.predictions.bias": VB,  # the same tensor as cls.predictions.decoder.bias
    "cls.predictions.transform.dense.weight": MAT, "cls.predictions.transform.dense.bias": VB,
    "cls.predictions.transform.LayerNorm.weight": VW, "cls.predictions.transform.LayerNorm.bias": VB,
}  # fmt: skip
ROBERTA_HEAD = {
    "lm_head.bias": VB,
    "lm_head.dense.weight": MAT, "lm_head.dense.bias": VB,
    "lm_head.layer_norm.weight": VW, "lm_head.layer_norm.bias": VB,
}  # fmt: skip


PHI3 = {
    "model.embed_tokens.weight": EMB,
    "model.layers.0.self_attn.qkv_proj.weight": qkv(8),  # (64, 32): 4 q + 2 k + 2 v heads of 8
    "model.layers.0.self_attn.o_proj.weight": MAT,
    "model.layers.0.mlp.gate_up_proj.weight": MAT, "model.layers.0.mlp.down_proj.weight": MAT,
    "model.layers.0.input_layernorm.weight": VW, "model.layers.0.post_attention_layernorm.weight": VW,
    "model.norm.weight": VW,
    "lm_head.weight": HEAD,
}  # fmt: skip


def distilbert_expected():
    p = "distilbert.transformer.layer.0."
    out = {
        "distilbert.embeddings.word_embeddings.weight": EMB, "distilbert.embeddings.position_embeddings.weight": EMB,
        "distilbert.embeddings.LayerNorm.weight": VW, "distilbert.embeddings.LayerNorm.bias": VB,
    }  # fmt: skip
    for proj in ("q_lin", "k_lin", "v_lin"):
        out[p + f"attention.{proj}.weight"] = qkv(8)
        out[p + f"attention.{proj}.bias"] = qkv_bias(8)
    out.update({
        p + "attention.out_lin.weight": MAT, p + "attention.out_lin.bias": VB,
        p + "sa_layer_norm.weight": VW, p + "sa_layer_norm.bias": VB,
        p + "ffn.lin1.weight": MAT, p + "ffn.lin1.bias": VB, p + "ffn.lin2.weight": MAT, p + "ffn.lin2.bias": VB,
        p + "output_layer_norm.weight": VW, p + "output_layer_norm.bias": VB,
        "vocab_transform.weight": MAT, "vocab_transform.bias": VB,
        "vocab_layer_norm.weight": VW, "vocab_layer_norm.bias": VB,
        "vocab_projector.bias": VB,  # vocab_projector.weight is word_embeddings.weight: listed once
    })  # fmt: skip
    return out


def t5_expected():
    out = {"shared.weight": EMB}  # = encoder/decoder embed_tokens and lm_head: one tensor
    attention = {"encoder": ["block.0.layer.0.SelfAttention"],
                 "decoder": ["block.0.layer.0.SelfAttention", "block.0.layer.1.EncDecAttention"]}  # fmt: skip
    for stack, modules in attention.items():
        for module in modules:
            p = f"{stack}.{module}."
            out.update({p + f"{proj}.weight": qkv(16) for proj in "qkv"})  # 4 heads of d_kv 16
            out[p + "o.weight"] = MAT
        # bucketed relative position bias, an nn.Embedding (buckets, heads): looked up, not a matrix
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = EMB
        ffn = len(modules)  # the feed-forward sublayer follows the attention ones
        out.update({
            f"{stack}.block.0.layer.{ffn}.DenseReluDense.wi.weight": MAT,
            f"{stack}.block.0.layer.{ffn}.DenseReluDense.wo.weight": MAT,
            **{f"{stack}.block.0.layer.{i}.layer_norm.weight": VW for i in range(ffn + 1)},
            f"{stack}.final_layer_norm.weight": VW,
        })  # fmt: skip
    return out


def mla_expected(layers, query, kv_head_dim, moe_layers=()):
    """DeepSeek-style attention: per-head q_proj/q_b_proj (heads of qk_nope + qk_rope = 12) and kv_b_proj
    (blocks of `kv_head_dim`) head-wise; the shared low-rank q_a_proj / kv_a_proj_with_mqa whole matrices."""
    out = {"model.embed_tokens.weight": EMB}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + f"self_attn.{query}.weight"] = qkv(12)
        if query == "q_b_proj":
            out.update({p + "self_attn.q_a_proj.weight": MAT, p + "self_attn.q_a_layernorm.weight": VW})
        out.update({
            p + "self_attn.kv_a_proj_with_mqa.weight": MAT, p + "self_attn.kv_a_layernorm.weight": VW,
            p + "self_attn.kv_b_proj.weight": qkv(kv_head_dim), p + "self_attn.o_proj.weight": MAT,
            p + "input_layernorm.weight": VW, p + "post_attention_layernorm.weight": VW,
        })  # fmt: skip
        if i in moe_layers:
            out.update({
                p + "mlp.gate.weight": MAT,  # the router
                p + "mlp.experts.gate_up_proj": EXPERTS, p + "mlp.experts.down_proj": EXPERTS,
                **{p + f"mlp.shared_experts.{proj}.weight": MAT for proj in ("gate_proj", "up_proj", "down_proj")},
            })  # fmt: skip
        else:
            out.update({p + f"mlp.{proj}.weight": MAT for proj in ("gate_proj", "up_proj", "down_proj")})
    out.update({"model.norm.weight": VW, "lm_head.weight": HEAD})
    return out


# Gated attention: q_proj (64, 32) holds per head 8 query rows then 8 gate rows; each block of 8 is one
# head's query or its gate, split as q heads are
QWEN3_NEXT = decoder_expected(8, qk_norm=True, mlp={
    "model.layers.0.mlp.gate.weight": MAT,  # the router
    "model.layers.0.mlp.experts.gate_up_proj": EXPERTS, "model.layers.0.mlp.experts.down_proj": EXPERTS,
    **{f"model.layers.0.mlp.shared_expert.{proj}.weight": MAT for proj in ("gate_proj", "up_proj", "down_proj")},
    "model.layers.0.mlp.shared_expert_gate.weight": MAT,  # (1, H): one logit
})  # fmt: skip

JETMOE = {
    "model.embed_tokens.weight": EMB,  # = lm_head.weight (tied)
    "model.layers.0.self_attention.kv_proj.weight": qkv(8),  # (32, 32): 2 key heads, then 2 value heads, of 8
    "model.layers.0.self_attention.experts.input_linear.weight": ("qkv_weight", 8, OI, True),  # 2 query heads per expert
    "model.layers.0.self_attention.experts.output_linear.weight": EXPERTS,  # (4, 32, 16): back to the model width
    "model.layers.0.self_attention.experts.router.layer.weight": MAT,
    "model.layers.0.self_attention.experts.bias": VB,
    "model.layers.0.mlp.input_linear.weight": EXPERTS,  # (4, 96, 32): fused gate and up per expert
    "model.layers.0.mlp.output_linear.weight": EXPERTS,
    "model.layers.0.mlp.router.layer.weight": MAT,
    "model.layers.0.mlp.bias": VB,
    "model.layers.0.input_layernorm.weight": VW, "model.layers.0.post_attention_layernorm.weight": VW,
    "model.norm.weight": VW,
}  # fmt: skip


def resnet18_expected():
    out = {"conv1.weight": MAT, "bn1.weight": VW, "bn1.bias": VB}
    for layer, channels in zip(range(1, 5), (64, 128, 256, 512)):
        for block in range(2):
            p = f"layer{layer}.{block}."
            out.update({p + "conv1.weight": MAT, p + "bn1.weight": VW, p + "bn1.bias": VB})
            out.update({p + "conv2.weight": MAT, p + "bn2.weight": VW, p + "bn2.bias": VB})
            if layer > 1 and block == 0:
                out.update({p + "downsample.0.weight": MAT, p + "downsample.1.weight": VW, p + "downsample.1.bias": VB})
    out.update({"fc.weight": HEAD, "fc.bias": VB})  # top-level fc: the classifier
    return out


VIT = {
    "class_token": EMB,  # (1, 1, D) learned token: trained like an embedding row, not NS on (1, D)
    "conv_proj.weight": MAT, "conv_proj.bias": VB,  # patchify conv: (out, in·k·k)
    "encoder.pos_embedding": EMB,
    "encoder.layers.encoder_layer_0.ln_1.weight": VW, "encoder.layers.encoder_layer_0.ln_1.bias": VB,
    "encoder.layers.encoder_layer_0.self_attention.in_proj_weight": qkv(8),
    "encoder.layers.encoder_layer_0.self_attention.in_proj_bias": qkv_bias(8),
    "encoder.layers.encoder_layer_0.self_attention.out_proj.weight": MAT,
    "encoder.layers.encoder_layer_0.self_attention.out_proj.bias": VB,
    "encoder.layers.encoder_layer_0.ln_2.weight": VW, "encoder.layers.encoder_layer_0.ln_2.bias": VB,
    "encoder.layers.encoder_layer_0.mlp.0.weight": MAT, "encoder.layers.encoder_layer_0.mlp.0.bias": VB,
    "encoder.layers.encoder_layer_0.mlp.3.weight": MAT, "encoder.layers.encoder_layer_0.mlp.3.bias": VB,
    "encoder.ln.weight": VW, "encoder.ln.bias": VB,
    "heads.head.weight": HEAD, "heads.head.bias": VB,
}  # fmt: skip

GPT2_TIED = {"transformer.wte.weight": ["lm_head.weight"]}
BERT_TIED = {"bert.embeddings.word_embeddings.weight": ["cls.predictions.decoder.weight"],
             "cls.predictions.bias": ["cls.predictions.decoder.bias"]}  # fmt: skip
ROBERTA_TIED = {"roberta.embeddings.word_embeddings.weight": ["lm_head.decoder.weight"],
                "lm_head.bias": ["lm_head.decoder.bias"]}  # fmt: skip

# model name -> (expected labels, the tied tensors {first name: other names}); none warns
EXPECTED = {
    "gpt2": (gpt2_expected(), GPT2_TIED),
    "gpt2_cross": (gpt2_expected(cross=True), GPT2_TIED),
    "neox": (NEOX, {}),
    "llama_gqa": (decoder_expected(8), {}),
    "mistral": (decoder_expected(8), {}),
    "qwen2": (decoder_expected(8, attn_bias=True), {}),
    "qwen3": (decoder_expected(16, qk_norm=True), {}),
    "bert": (bert_expected("bert", BERT_HEAD), BERT_TIED),
    "roberta": (bert_expected("roberta", ROBERTA_HEAD), ROBERTA_TIED),
    "mixtral": (decoder_expected(8, mlp=MOE_MLP), {}),
    "qwen3_moe": (decoder_expected(16, qk_norm=True, mlp=MOE_MLP), {}),
    "gpt_oss": ({**decoder_expected(8, attn_bias=True, mlp=GPT_OSS_MLP),
                 "model.layers.0.self_attn.sinks": VW, "model.layers.0.self_attn.o_proj.bias": VB}, {}),
    "phi3": (PHI3, {}),
    "distilbert": (distilbert_expected(), {"distilbert.embeddings.word_embeddings.weight": ["vocab_projector.weight"]}),
    "t5": (t5_expected(), {"shared.weight": ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]}),
    "deepseek_v3": (mla_expected(2, "q_b_proj", 14, moe_layers=(1,)), {}),  # one [8 key; 6 value] block per head
    "deepseek_v2": (mla_expected(1, "q_proj", 8), {}),  # qk_nope = v_head_dim = 8: key and value blocks per head
    "qwen3_next": (QWEN3_NEXT, {}),
    "jetmoe": (JETMOE, {"model.embed_tokens.weight": ["lm_head.weight"]}),
    "resnet18": (resnet18_expected(), {}),
    "vit": (VIT, {}),
}  # fmt: skip


# --------------------------------------------------------------------------- helpers


def labelling(groups):
    """name -> (role, head_dim, orientation, experts); fails if a name or tensor appears twice."""
    out, seen = {}, set()
    for g in groups:
        for key, default in (("orientation", OI), ("experts", False)):
            assert g.get(key, "absent") != default, f"default {key}={default!r} written into a group"
        for p, n in zip(g["params"], g["param_names"], strict=True):
            assert n not in out and id(p) not in seen, f"{n} listed twice"
            seen.add(id(p))
            out[n] = (g["role"], g["head_dim"], g.get("orientation", OI), g.get("experts", False))
    return out


def labelled_quietly(module, **kwargs):
    """param_groups(module), asserting it gives no warning (tied embeddings are the documented case)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        groups = param_groups(module, **kwargs)
    assert [str(w.message) for w in record] == []
    return groups


def tied_of(groups) -> dict:
    """{first name: other names} of every tied tensor, from the groups' `tied` key."""
    out = {}
    for g in groups:
        out.update(g.get("tied", {}))
    return out


# --------------------------------------------------------------------------- labelling


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_parameter_of_real_models_without_hints(name):
    expected, tied = EXPECTED[name]
    net = model(name)
    groups = labelled_quietly(net)
    assert labelling(groups) == expected
    assert tied_of(groups) == tied
    listed = sorted(id(p) for g in groups for p in g["params"])
    assert listed == sorted(id(p) for p in net.parameters())


def test_group_keys_are_exactly_the_interface():
    """Layout keys appear only where not the default; no other key is invented."""
    groups = param_groups(model("gpt_oss"))
    keys = {frozenset(g) - {"params", "param_names"} for g in groups}
    assert keys == {
        frozenset({"role", "head_dim"}),
        frozenset({"role", "head_dim", "orientation", "experts"}),  # transposed experts
        frozenset({"role", "head_dim", "experts"}),  # expert biases
    }
    conv1d = [g for g in param_groups(model("gpt2")) if g.get("orientation") == IO]
    assert {g["role"] for g in conv1d} == {"qkv_weight", "matrix"} and all("experts" not in g for g in conv1d)


def test_gpt2_heads_are_column_blocks_of_the_stored_weight():
    """The head split is on the operator's rows, i.e. c_attn.weight's storage columns (out = nf)."""
    net = model("gpt2")
    attn = net.transformer.h[0].attn
    (group,) = [g for g in param_groups(net) if g["role"] == "qkv_weight"]
    weight = attn.c_attn.weight
    assert tuple(weight.shape) == (32, 96) and group["orientation"] == IO
    assert mango.config.operator_rows(tuple(weight.shape), group["orientation"]) == 3 * attn.num_heads * attn.head_dim


def test_describe_shows_orientation_heads_and_experts():
    text = describe(param_groups(model("gpt2")))
    (c_attn,) = [line for line in text.splitlines() if "attn.c_attn.weight" in line]
    assert "(in,out)ᵀ" in c_attn and "12 heads ×(8,32)" in c_attn  # 4 q + 4 k + 4 v heads of (8, 32)
    (c_fc,) = [line for line in text.splitlines() if "c_fc.weight" in line]
    assert "(in,out)ᵀ" in c_fc and "(128,32)" in c_fc  # stored (32, 128), normalized as the (128, 32) operator

    text = describe(param_groups(model("mixtral")))
    (gate_up,) = [line for line in text.splitlines() if "gate_up_proj" in line]
    assert "4 experts ×(out,in)" in gate_up and "4 experts ×(96,32)" in gate_up
    (k_proj,) = [line for line in text.splitlines() if "k_proj.weight" in line]
    assert "2 heads ×(8,32)" in k_proj  # GQA: 2 kv heads

    text = describe(param_groups(model("gpt_oss")))
    (down,) = [line for line in text.splitlines() if "experts.down_proj " in line + " "]
    assert "4 experts ×(in,out)ᵀ" in down and "4 experts ×(32,24)" in down  # stored (4, 24, 32)
    (bias,) = [line for line in text.splitlines() if "down_proj_bias" in line]
    assert "4 experts ×(32,)" in bias


def test_mango_takes_the_groups_of_every_model():
    """The layout keys are valid settings: Mango validates and registers every group."""
    for name in ("gpt2", "mixtral", "gpt_oss", "vit"):
        with warnings.catch_warnings(action="ignore"):
            groups = param_groups(model(name))
        opt = mango.Mango(groups, backend="reference")
        assert len(opt.param_groups) == len(groups)
        assert {g["orientation"] for g in opt.param_groups} <= {OI, IO}


# --------------------------------------------------------------------------- hints still work


def test_declared_heads_override_what_the_model_says():
    """qkv_heads on HF GPT-2's Conv1D c_attn: accepted, the declaration's count wins."""
    groups = param_groups(model("gpt2"), qkv_heads={"transformer.h.*.attn.c_attn": 2})
    lab = labelling(groups)
    assert lab["transformer.h.0.attn.c_attn.weight"] == qkv(16, IO)
    assert lab["transformer.h.0.attn.c_attn.bias"] == qkv_bias(16)


def test_override_role_on_a_conv1d_keeps_its_orientation():
    overrides = {"transformer.h.0.mlp.c_fc.weight": {"role": "qkv_weight", "head_dim": 16}}
    lab = labelling(param_groups(model("gpt2"), overrides=overrides))
    assert lab["transformer.h.0.mlp.c_fc.weight"] == qkv(16, IO)  # 128 output features = 8 blocks of 16


def test_layout_overrides_are_validated():
    gpt2 = model("gpt2")
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight'.*head_dim=7 does not divide its 96 rows"):
        param_groups(gpt2, overrides={"transformer.h.0.attn.c_attn.weight": {"head_dim": 7}})
    with pytest.raises(ValueError, match=r"'transformer\.ln_f\.bias'.*orientation='in_out'.*2-D"):
        param_groups(gpt2, overrides={"transformer.ln_f.bias": {"orientation": "in_out"}})
    with pytest.raises(ValueError, match=r"'transformer\.wpe\.weight'.*orientation='sideways'"):
        param_groups(gpt2, overrides={"transformer.wpe.weight": {"orientation": "sideways"}})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight'.*experts=True.*norm='ns'"):
        param_groups(gpt2, overrides={"transformer.h.0.mlp.c_fc.weight": {"experts": True}})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight'.*experts=1.*True or False"):
        param_groups(gpt2, overrides={"transformer.h.0.mlp.c_fc.weight": {"experts": 1}})
    with pytest.raises(ValueError, match=r"orientation='sideways'"):
        mango.Mango([nn.Parameter(torch.zeros(3, 3))], orientation="sideways")


# --------------------------------------------------------------------------- contradictions


def test_module_and_config_contradicting_is_an_error_naming_them():
    llama = BUILDERS["llama_gqa"]()
    llama.model.layers[0].self_attn.num_key_value_groups = 3  # 4 q heads cannot share kv heads 3 ways
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn'.*num_key_value_groups=3"):
        param_groups(llama)


def test_rows_that_contradict_the_heads_are_an_error_naming_the_parameter():
    llama = BUILDERS["llama_gqa"]()
    llama.model.layers[0].self_attn.k_proj = nn.Linear(32, 24, bias=False)  # 3 kv heads of 8, config says 2
    expected = r"'model\.layers\.0\.self_attn\.k_proj\.weight' has 24 output rows, expected 2 head blocks of head_dim 8 = 16"
    with pytest.raises(ValueError, match=expected):
        param_groups(llama)

    gpt2 = BUILDERS["gpt2"]()
    gpt2.transformer.h[0].attn.head_dim = 5  # does not divide c_attn's 96 output features
    expected = r"'transformer\.h\.0\.attn\.c_attn\.weight' has 96 output rows, expected 12 head blocks of head_dim 5 = 60"
    with pytest.raises(ValueError, match=expected):
        param_groups(gpt2)


# --------------------------------------------------------------------------- attention without heads


class SelfAttention(nn.Module):
    """Llama-shaped attention that does not say its heads (no head_dim, num_heads or config)."""

    def __init__(self, d=16, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o_proj = nn.Linear(d, d)


class BertLike(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(d, d) for _ in range(3))


def stack(block, n=3):
    net = nn.Module()
    net.blocks = nn.ModuleList(nn.ModuleDict(dict(attn=block())) for _ in range(n))
    return net


def test_attention_without_heads_warns_once_with_the_hint_that_fixes_it():
    net = stack(lambda: SelfAttention(bias=True))
    with pytest.warns(UserWarning, match=r"'blocks\.0\.attn' \(and 2 more like it\) looks like attention") as record:
        groups = param_groups(net)
    assert len(record) == 1
    hint = (
        "overrides={'blocks.*.attn.[qkv]_proj.weight': {'role': 'qkv_weight', 'head_dim': HEAD_DIM}, "
        "'blocks.*.attn.[qkv]_proj.bias': {'role': 'qkv_bias', 'head_dim': HEAD_DIM}}"
    )
    assert hint in str(record[0].message)
    assert labelling(groups)["blocks.1.attn.k_proj.weight"] == MAT  # left to the generic rule

    # the hint, as written (HEAD_DIM filled in), labels every layer head-wise and silences the warning
    fixed = ast.literal_eval(hint.split("=", 1)[1].replace("HEAD_DIM", "4"))
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net, overrides=fixed))
    assert lab["blocks.2.attn.v_proj.weight"] == qkv(4) and lab["blocks.2.attn.v_proj.bias"] == qkv_bias(4)
    assert lab["blocks.2.attn.o_proj.weight"] == MAT


def test_attention_without_heads_query_key_value_hint():
    with pytest.warns(UserWarning) as record:
        param_groups(stack(BertLike, n=1))
    assert len(record) == 1
    message = str(record[0].message)
    assert "module 'blocks.0.attn' looks like attention" in message
    for proj in ("query", "key", "value"):
        assert f"'blocks.*.attn.{proj}.weight': {{'role': 'qkv_weight', 'head_dim': HEAD_DIM}}" in message


def test_fused_attention_heads_from_its_module_need_no_hint():
    """timm/nanoGPT style: a fused qkv Linear whose parent says num_heads (and maybe head_dim)."""

    class Attention(nn.Module):
        def __init__(self, d=32, num_heads=4):
            super().__init__()
            self.num_heads = num_heads
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

    net = stack(Attention, n=2)
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net))
    assert lab["blocks.1.attn.qkv.weight"] == qkv(8) and lab["blocks.1.attn.qkv.bias"] == qkv_bias(8)


def test_fused_rows_that_do_not_fit_plain_heads_warn_instead_of_guessing():
    """num_heads alone, but rows that are not 3 blocks per head (GQA?): reported, not guessed."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            self.qkv = nn.Linear(32, 40)  # not 3·4·k

    with pytest.warns(UserWarning, match=re.escape("qkv_heads={'attn.qkv': n_heads}")):
        lab = labelling(param_groups(nn.ModuleDict(dict(attn=Attention()))))
    assert lab["attn.qkv.weight"] == MAT


def test_declaring_the_fused_module_silences_its_warning():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(32, 96)

    net = stack(Attention, n=2)
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net, qkv_heads={"blocks.*.attn.c_attn": 4}))
    assert lab["blocks.0.attn.c_attn.weight"] == qkv(8)


# --------------------------------------------------------------------------- attention found by structure


class MadeUpAttention(nn.Module):
    """Attention with names no architecture uses; it states its heads (4 of 8) on itself."""

    def __init__(self, names=("to_queries", "to_keys", "to_values", "to_out"), d=32, kv_rows=32):
        super().__init__()
        self.num_heads, self.head_dim = 4, 8
        q, k, v, out = names
        setattr(self, q, nn.Linear(d, d))
        setattr(self, k, nn.Linear(d, kv_rows, bias=False))
        setattr(self, v, nn.Linear(d, kv_rows, bias=False))
        setattr(self, out, nn.Linear(d, d))


class Mixer(nn.Module):
    """A fused projection named like nothing, found by its rows: (4 + 2·2) heads of 8 (GQA)."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = 4, 2, 8
        self.mix = nn.Linear(32, 64)
        self.back = nn.Linear(32, 32)


@pytest.mark.parametrize(
    "names",
    [("to_queries", "to_keys", "to_values", "to_out"), ("wq", "wk", "wv", "wo"), ("q", "k", "v", "o"),
     ("q_lin", "k_lin", "v_lin", "out_lin"), ("query_proj", "key_proj", "value_proj", "dense")],
    ids=lambda names: names[0],
)  # fmt: skip
def test_made_up_attention_with_unusual_names_gets_its_heads(names):
    net = stack(lambda: MadeUpAttention(names, kv_rows=16), n=2)  # 2 kv heads: GQA read from the rows
    q, k, v, out = names
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net))
    p = "blocks.1.attn."
    assert lab[p + f"{q}.weight"] == qkv(8) and lab[p + f"{q}.bias"] == qkv_bias(8)
    assert lab[p + f"{k}.weight"] == lab[p + f"{v}.weight"] == qkv(8)
    assert lab[p + f"{out}.weight"] == MAT and lab[p + f"{out}.bias"] == VB
    assert "2 heads ×(8,32)" in describe(param_groups(net)).split(p + f"{k}.weight")[1].splitlines()[0]


def test_fused_projection_found_by_its_rows_whatever_its_name():
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(stack(Mixer, n=1)))
    assert lab["blocks.0.attn.mix.weight"] == qkv(8) and lab["blocks.0.attn.mix.bias"] == qkv_bias(8)
    assert lab["blocks.0.attn.back.weight"] == MAT


def _labels_warning_once_naming_the_children(net) -> dict:
    """The labels of a 3-block stack whose attention children ('alpha' .. 'delta') say nothing: one
    warning, naming them and the override that labels them."""
    with pytest.warns(UserWarning, match=r"'blocks\.0\.attn' \(and 2 more like it\) looks like attention") as record:
        lab = labelling(param_groups(net))
    assert len(record) == 1
    message = str(record[0].message)
    assert "overrides={'blocks.*.attn.NAME.weight': {'role': 'qkv_weight', 'head_dim': HEAD_DIM}}" in message
    assert "its Linear children: 'alpha', 'beta', 'gamma', 'delta'" in message
    return lab


def test_attention_whose_projections_cannot_be_told_apart_warns_once_naming_them():
    """An attention class (by its name) with children that say nothing: the warning lists them and
    the override that labels them; one override on its q/k/v silences it."""
    net = stack(lambda: MadeUpAttention(("alpha", "beta", "gamma", "delta")), n=3)
    lab = _labels_warning_once_naming_the_children(net)
    assert lab["blocks.0.attn.alpha.weight"] == MAT  # left to the generic rule, not guessed
    fixed = {f"blocks.*.attn.{n}.weight": {"role": "qkv_weight", "head_dim": 8} for n in ("alpha", "beta", "gamma")}
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net, overrides=fixed))
    assert lab["blocks.2.attn.beta.weight"] == qkv(8) and lab["blocks.2.attn.delta.weight"] == MAT


class TokenMixer(nn.Module):
    """Attention in all but its class name: it states its heads; its children say nothing."""

    def __init__(self, rows=(64, 64, 64), d=32, num_heads=4, head_dim=16, **heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        for attr, value in heads.items():  # num_key_value_heads, ...
            setattr(self, attr, value)
        for local, out in zip(("alpha", "beta", "gamma"), rows):
            setattr(self, local, nn.Linear(d, out))
        self.delta = nn.Linear(num_heads * head_dim, d)  # back to the model width


@pytest.mark.parametrize(
    "rows, heads, projections",
    [((64, 64, 64), {}, ("alpha", "beta", "gamma")),  # separate q, k, v: 4 heads of 16 each
     ((64, 64), {"num_key_value_heads": 2}, ("alpha", "beta")),  # q, then k and v fused: 2·2 heads of 16
     ((128,), {"num_key_value_heads": 2}, ("alpha",))],  # fused q/k/v: (4 + 2·2) heads of 16
    ids=["separate", "q-and-fused-kv", "fused"],
)  # fmt: skip
def test_module_stating_heads_gets_them_by_structure_whatever_its_names(rows, heads, projections):
    """No attention in the class name, no q/k/v in the child names: the rows of exactly one
    q/k/v layout of the heads it states decide, and the rest stay matrices."""
    net = stack(lambda: TokenMixer(rows, **heads), n=2)
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net))
    for local in projections:
        assert lab[f"blocks.1.attn.{local}.weight"] == qkv(16) and lab[f"blocks.1.attn.{local}.bias"] == qkv_bias(16)
    assert lab["blocks.1.attn.delta.weight"] == MAT  # (32, 64): rows of no head layout


@pytest.mark.parametrize("say_heads", [dict(num_heads=4, head_dim=8), dict(n_head=4)], ids=["num_heads", "n_head"])
def test_module_stating_heads_that_structure_cannot_settle_warns_once_with_the_hint(say_heads):
    """d_model = n_heads·head_dim: the output projection has the rows of a query, so which three
    of the four children are q, k and v cannot be read from shapes. Not guessed: one warning for
    every layer, naming the children and the overrides that label them."""

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            for attr, value in say_heads.items():
                setattr(self, attr, value)
            self.alpha, self.beta, self.gamma, self.delta = (nn.Linear(32, 32, bias=False) for _ in range(4))

    net = stack(Mixer, n=3)
    net.config = transformers.PretrainedConfig(hidden_size=32, num_attention_heads=4)  # head_dim 8 for n_head alone
    lab = _labels_warning_once_naming_the_children(net)
    assert {lab[f"blocks.0.attn.{local}.weight"] for local in ("alpha", "beta", "gamma", "delta")} == {MAT}


def test_attention_wrapper_around_a_labelled_attention_does_not_warn():
    """HF LED's LEDEncoderAttention holds only its output Linear and the self-attention module
    that holds q/k/v: the inner module is labelled, the wrapper is not a gap."""

    class WrapperAttention(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.output = nn.Linear(32, 32)

    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(stack(lambda: WrapperAttention(MadeUpAttention()), n=2)))
    assert lab["blocks.1.attn.inner.to_keys.weight"] == qkv(8) and lab["blocks.1.attn.output.weight"] == MAT

    # a block that states its heads and holds its attention inside: its MLP is not read as a fused q/k/v
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_head, self.head_dim = 4, 8
            self.attn = MadeUpAttention()
            self.c_fc = nn.Linear(32, 96)  # (4 + 2·4)·8 rows, the size of a fused q/k/v of its heads

    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(stack(Block, n=1)))
    assert lab["blocks.0.attn.c_fc.weight"] == MAT and lab["blocks.0.attn.attn.to_queries.weight"] == qkv(8)

    # a wrapper around a module that is not attention is still a gap, reported once
    with pytest.warns(UserWarning, match=r"'blocks\.0\.attn' \(and 1 more like it\) looks like attention") as record:
        param_groups(stack(lambda: WrapperAttention(nn.Sequential(nn.Linear(32, 32))), n=2))
    assert len(record) == 1 and "its Linear children: 'output'" in str(record[0].message)


def test_stated_key_value_heads_win_over_the_groups_the_forward_uses():
    """JetMoe states num_key_value_groups=1 beside 2·n_kv query heads: its key/value projection
    is sized by num_key_value_heads, so that is what splits it, with no error."""

    class KeyValueAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_key_value_heads, self.num_key_value_groups, self.head_dim = 4, 2, 1, 8
            self.kv_proj = nn.Linear(32, 2 * 2 * 8, bias=False)

    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(nn.ModuleDict(dict(attn=KeyValueAttention()))))
    assert lab["attn.kv_proj.weight"] == qkv(8)


def test_modules_that_do_not_look_like_attention_are_left_alone():
    """No attention class name, no q/k/v names, no heads stated: an MLP stays matrices, silently."""
    mlp = nn.ModuleDict(dict(alpha=nn.Linear(8, 24), beta=nn.Linear(24, 8)))
    with warnings.catch_warnings(action="error"):
        assert set(labelling(param_groups(nn.ModuleDict(dict(mlp=mlp)))).values()) == {MAT, VB}


def test_mla_without_its_head_sizes_warns_with_the_hint():
    """A DeepSeek-style module that says neither heads nor qk/v head sizes: reported, not guessed."""

    class LatentAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(32, 48, bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(32, 12, bias=False)
            self.kv_b_proj = nn.Linear(8, 56, bias=False)
            self.o_proj = nn.Linear(24, 32, bias=False)

    with pytest.warns(UserWarning, match=r"'attn' looks like attention") as record:
        lab = labelling(param_groups(nn.ModuleDict(dict(attn=LatentAttention()))))
    assert len(record) == 1
    assert "'attn.kv_b_proj.weight': {'role': 'qkv_weight', 'head_dim': QK_NOPE + V_HEAD_DIM}" in str(record[0].message)
    assert lab["attn.q_proj.weight"] == lab["attn.kv_b_proj.weight"] == MAT


def test_mla_rows_that_contradict_the_head_sizes_are_an_error():
    net = BUILDERS["deepseek_v3"]()
    attn = net.model.layers[0].self_attn
    attn.kv_b_proj = nn.Linear(8, 60, bias=False)  # 4 heads of 8 + 6 = 56 rows
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has 60 output rows, "
                       r"expected 4 head blocks of head_dim 14 = 56"):
        param_groups(net)


def test_describe_shows_mla_blocks():
    text = describe(param_groups(model("deepseek_v3")))
    (q_b,) = [line for line in text.splitlines() if "layers.0.self_attn.q_b_proj" in line]
    assert "4 heads ×(12,16)" in q_b  # per head: 8 no-rope + 4 rope query rows, from the q_lora_rank 16 latent
    (kv_b,) = [line for line in text.splitlines() if "layers.0.self_attn.kv_b_proj" in line]
    assert "4 heads ×(14,8)" in kv_b  # per head: 8 key + 6 value rows, from the kv_lora_rank 8 latent
    (kv_b,) = [line for line in describe(param_groups(model("deepseek_v2"))).splitlines() if "kv_b_proj" in line]
    assert "8 heads ×(8,8)" in kv_b  # qk_nope = v_head_dim = 8: each head's key and value blocks apart


# --------------------------------------------------------------------------- experts, tokens, heads


class Experts(nn.Module):
    """A custom expert stack: says its count, stores [E, in, out] with a per-expert bias [E, out]."""

    def __init__(self, n_experts=3, d=8, hidden=12, say_count=True):
        super().__init__()
        if say_count:
            self.num_experts = n_experts
        else:
            self.config = type("Config", (), {"num_local_experts": n_experts})()
        self.up = nn.Parameter(torch.zeros(n_experts, d, hidden))
        self.up_bias = nn.Parameter(torch.zeros(n_experts, hidden))
        self.down = nn.Parameter(torch.zeros(n_experts, hidden, d))  # no bias: nothing says it is transposed
        self.stray = nn.Parameter(torch.zeros(2, d, d))  # dim 0 is not the expert count: not an expert stack


@pytest.mark.parametrize("say_count", [True, False], ids=["num_experts", "config.num_local_experts"])
def test_custom_experts_from_the_module_or_its_config(say_count):
    lab = labelling(param_groups(Experts(say_count=say_count)))
    assert lab == {
        "up": EXPERTS_T,  # the [E, out] bias matches the last dim: stored [E, in, out]
        "up_bias": EXPERT_BIAS,
        "down": EXPERTS,  # HF's default, F.linear(x, W[e]): [E, out, in]
        "stray": MAT,
    }


def test_3d_parameters_without_an_expert_count_are_not_experts():
    net = nn.Module()
    net.stack = nn.Parameter(torch.zeros(4, 8, 8))
    assert labelling(param_groups(net)) == {"stack": MAT}


def test_learned_tokens_are_embeddings_and_top_level_classifiers_are_heads():
    net = nn.Module()
    net.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
    net.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
    net.block = nn.Module()
    net.block.classifier = nn.Linear(8, 8)  # not a direct child of the model: a hidden matrix
    net.classifier = nn.Linear(8, 3)
    with warnings.catch_warnings(action="error"):
        lab = labelling(param_groups(net))
    assert lab == {
        "cls_token": EMB, "pos_embed": EMB,
        "block.classifier.weight": MAT, "block.classifier.bias": VB,
        "classifier.weight": HEAD, "classifier.bias": VB,
    }  # fmt: skip
