"""No-hint labelling over a wide set of Hugging Face architectures built from tiny configs.

For each: the q/k/v projections (by their local names, written here from each architecture's
code) and only they are head-wise with the head size its config implies; every embedding is an
embedding, every 3-D expert stack per expert, an untied output layer a head; every parameter is
labelled once; nothing warns. tests/test_roles_hf.py writes out every label of fewer models.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

from mango.roles import param_groups

TOK = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
D = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, **TOK)
G = dict(D, num_key_value_heads=2)  # grouped-query attention: 2 kv heads for 4 query heads


def arch(model_class, config_class, projections, split, **config):
    """(builder, the names of its q/k/v projections, their head_dim: one, or per projection name).

    A projection is named by its module's local name, or by the last parts of its module path
    where the local name alone is ambiguous (JetMoe's `input_linear`: the queries of its attention
    experts, and the fused gate/up projection of its MLP experts).
    """
    build = lambda: getattr(transformers, model_class)(getattr(transformers, config_class)(**config))  # noqa: E731
    return build, projections, split


ARCHS = {
    "gpt2": arch("GPT2LMHeadModel", "GPT2Config", ('c_attn',), 8, vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, **TOK),
    "neox": arch("GPTNeoXForCausalLM", "GPTNeoXConfig", ('query_key_value',), 8, **D),
    "llama": arch("LlamaForCausalLM", "LlamaConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "mistral": arch("MistralForCausalLM", "MistralConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "qwen2": arch("Qwen2ForCausalLM", "Qwen2Config", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "qwen3": arch("Qwen3ForCausalLM", "Qwen3Config", ('k_proj', 'q_proj', 'v_proj'), 16, **G, head_dim=16),
    "qwen3_moe": arch("Qwen3MoeForCausalLM", "Qwen3MoeConfig", ('k_proj', 'q_proj', 'v_proj'), 16, **G, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
    "mixtral": arch("MixtralForCausalLM", "MixtralConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": arch("GptOssForCausalLM", "GptOssConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **{**G, "intermediate_size": 24}, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    "gemma": arch("GemmaForCausalLM", "GemmaConfig", ('k_proj', 'q_proj', 'v_proj'), 16, **G, head_dim=16),
    "gemma2": arch("Gemma2ForCausalLM", "Gemma2Config", ('k_proj', 'q_proj', 'v_proj'), 16, **G, head_dim=16),
    "gemma3": arch("Gemma3ForCausalLM", "Gemma3TextConfig", ('k_proj', 'q_proj', 'v_proj'), 16, **G, head_dim=16),
    "phi": arch("PhiForCausalLM", "PhiConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **D),
    "phi3": arch("Phi3ForCausalLM", "Phi3Config", ('qkv_proj',), 8, **G),
    "falcon": arch("FalconForCausalLM", "FalconConfig", ('query_key_value',), 8, **D),
    "falcon_new": arch("FalconForCausalLM", "FalconConfig", ('query_key_value',), 8, **D, new_decoder_architecture=True, num_kv_heads=2),
    "bloom": arch("BloomForCausalLM", "BloomConfig", ('query_key_value',), 8, vocab_size=64, hidden_size=32, n_layer=1, n_head=4, **TOK),
    "opt": arch("OPTForCausalLM", "OPTConfig", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=16, **TOK),
    "gptj": arch("GPTJForCausalLM", "GPTJConfig", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=16, **TOK),
    "gpt_neo": arch("GPTNeoForCausalLM", "GPTNeoConfig", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, attention_types=[[["global"], 1]], max_position_embeddings=16, **TOK),
    "gpt_bigcode": arch("GPTBigCodeForCausalLM", "GPTBigCodeConfig", ('c_attn',), 8, vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, multi_query=True, **TOK),
    "codegen": arch("CodeGenForCausalLM", "CodeGenConfig", ('qkv_proj',), 8, vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=16, **TOK),
    "olmo2": arch("Olmo2ForCausalLM", "Olmo2Config", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "olmoe": arch("OlmoeForCausalLM", "OlmoeConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G, num_experts=4, num_experts_per_tok=2),
    "stablelm": arch("StableLmForCausalLM", "StableLmConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "starcoder2": arch("Starcoder2ForCausalLM", "Starcoder2Config", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "cohere": arch("CohereForCausalLM", "CohereConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "granite": arch("GraniteForCausalLM", "GraniteConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G),
    "persimmon": arch("PersimmonForCausalLM", "PersimmonConfig", ('query_key_value',), 8, **D),
    "mpt": arch("MptForCausalLM", "MptConfig", ('Wqkv',), 8, vocab_size=64, d_model=32, n_layers=1, n_heads=4, expansion_ratio=2, max_seq_len=16),
    "qwen2_moe": arch("Qwen2MoeForCausalLM", "Qwen2MoeConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24),
    "phimoe": arch("PhimoeForCausalLM", "PhimoeConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v2": arch("DeepseekV2ForCausalLM", "DeepseekV2Config", ('kv_b_proj', 'q_proj'), {'q_proj': 12, 'kv_b_proj': 14}, **{**D, "num_key_value_heads": 4}, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    "deepseek_v3": arch("DeepseekV3ForCausalLM", "DeepseekV3Config", ('kv_b_proj', 'q_b_proj'), {'q_b_proj': 12, 'kv_b_proj': 14}, **{**D, "num_hidden_layers": 2, "num_key_value_heads": 4}, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    "bert": arch("BertForMaskedLM", "BertConfig", ('key', 'query', 'value'), 8, **D, max_position_embeddings=16),
    "roberta": arch("RobertaForMaskedLM", "RobertaConfig", ('key', 'query', 'value'), 8, **D, max_position_embeddings=20),
    "xlm_roberta": arch("XLMRobertaForMaskedLM", "XLMRobertaConfig", ('key', 'query', 'value'), 8, **D, max_position_embeddings=20),
    "electra": arch("ElectraForMaskedLM", "ElectraConfig", ('key', 'query', 'value'), 8, **D, embedding_size=16, max_position_embeddings=16),
    "albert": arch("AlbertForMaskedLM", "AlbertConfig", ('key', 'query', 'value'), 8, **D, embedding_size=16, max_position_embeddings=16),
    "distilbert": arch("DistilBertForMaskedLM", "DistilBertConfig", ('k_lin', 'q_lin', 'v_lin'), 8, vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48, max_position_embeddings=16, pad_token_id=0),
    "deberta_v2": arch("DebertaV2ForMaskedLM", "DebertaV2Config", ('key_proj', 'query_proj', 'value_proj'), 8, **D, max_position_embeddings=16),
    "mobilebert": arch("MobileBertForMaskedLM", "MobileBertConfig", ('key', 'query', 'value'), 4, **D, embedding_size=16, intra_bottleneck_size=16, max_position_embeddings=16),
    "t5": arch("T5ForConditionalGeneration", "T5Config", ('k', 'q', 'v'), 16, vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0, **TOK),
    "mt5": arch("MT5ForConditionalGeneration", "MT5Config", ('k', 'q', 'v'), 16, vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0, **TOK),
    "switch": arch("SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig", ('k', 'q', 'v'), 8, vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0, **TOK),
    "bart": arch("BartForConditionalGeneration", "BartConfig", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=16, decoder_start_token_id=0, forced_eos_token_id=1, **TOK),
    "marian": arch("MarianMTModel", "MarianConfig", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=16, decoder_start_token_id=0, **TOK),
    "whisper": arch("WhisperForConditionalGeneration", "WhisperConfig", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=8, max_target_positions=16, decoder_start_token_id=0, **TOK),
    "clip": arch("CLIPModel", "CLIPConfig", ('k_proj', 'q_proj', 'v_proj'), 8, text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16), vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8), projection_dim=16),
    "vit": arch("ViTForImageClassification", "ViTConfig", ('k_proj', 'q_proj', 'v_proj'), 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=8),
    "swin": arch("SwinForImageClassification", "SwinConfig", ('k_proj', 'q_proj', 'v_proj'), 8, image_size=16, patch_size=4, embed_dim=16, depths=[1], num_heads=[2], window_size=2),
    "wav2vec2": arch("Wav2Vec2ForCTC", "Wav2Vec2Config", ('k_proj', 'q_proj', 'v_proj'), 8, vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2),
    "qwen3_next": arch("Qwen3NextForCausalLM", "Qwen3NextConfig", ('k_proj', 'q_proj', 'v_proj'), 8, **G, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24, layer_types=["full_attention"]),
    "jetmoe": arch("JetMoeForCausalLM", "JetMoeConfig", ('kv_proj', 'self_attention.experts.input_linear'), 8, vocab_size=64, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **TOK),
    "led": arch("LEDForConditionalGeneration", "LEDConfig", ('k_proj', 'q_proj', 'v_proj', 'key', 'query', 'value', 'key_global', 'query_global', 'value_global'), 8, vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_encoder_position_embeddings=32, max_decoder_position_embeddings=16, attention_window=[4], decoder_start_token_id=0, **TOK),
    "segformer": arch("SegformerForImageClassification", "SegformerConfig", ('k_proj', 'q_proj', 'v_proj'), 8, num_encoder_blocks=1, depths=[1], sr_ratios=[2], hidden_sizes=[16], num_attention_heads=[2], patch_sizes=[3], strides=[2], mlp_ratios=[2], image_size=16),
}  # fmt: skip


def labels(groups) -> dict:
    """name -> group (each parameter listed once)."""
    out = {}
    for g in groups:
        for name in g["param_names"]:
            assert name not in out, f"{name} listed twice"
            out[name] = g
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_no_hint_labelling(name):
    build, projections, head_dim = ARCHS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own config notes
        net = build()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        groups = param_groups(net)
    assert [str(w.message) for w in record if "mango" in str(w.message)] == []
    by_name = labels(groups)
    assert sorted(id(g["params"][g["param_names"].index(n)]) for n, g in by_name.items()) == sorted(
        id(p) for p in net.parameters() if p.requires_grad
    )  # every trainable tensor, once (sinusoidal position tables are frozen)

    def projection(n):
        return next((p for p in projections if n.endswith(f".{p}.weight")), None)

    head_wise = {n: g for n, g in by_name.items() if g["role"] == "qkv_weight"}
    expected = {n for n in by_name if projection(n) is not None}
    assert set(head_wise) == expected and expected
    for n, g in head_wise.items():
        assert g["head_dim"] == (head_dim[projection(n)] if isinstance(head_dim, dict) else head_dim), n

    modules = dict(net.named_modules())
    config = net.config
    n_experts = next((getattr(config, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
                      if isinstance(getattr(config, a, None), int)), None)  # fmt: skip
    for n, g in by_name.items():
        owner = modules[n.rsplit(".", 1)[0]] if "." in n else net
        p = g["params"][g["param_names"].index(n)]
        if isinstance(owner, nn.Embedding):
            assert g["role"] == "embedding", n
        if p.dim() == 3 and n_experts and p.shape[0] == n_experts:  # stacked experts: one matrix each
            assert g.get("experts") is True and g["role"] == ("qkv_weight" if n in head_wise else "matrix"), n
        if g["role"] == "qkv_bias":
            assert n[: -len("bias")] + "weight" in head_wise, n

    output = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if isinstance(output, nn.Linear):
        inputs = net.get_input_embeddings()
        tied = inputs is not None and output.weight is inputs.weight
        (group,) = [g for g in groups if any(p is output.weight for p in g["params"])]
        assert group["role"] == ("embedding" if tied else "head")  # a tied one is the embedding
