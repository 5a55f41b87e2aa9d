"""Parameter sets of Hugging Face models, built from their configs and labelled as a user's model is.

The model is built on the meta device (no weights, no memory) from a `transformers` config and
labelled by `mango.param_groups(model)` with no hints: the roles, head sizes and layouts are what
mango recognises itself (HF GPT-2's `Conv1D` stores its matrices (in, out): those tensors carry
``orientation="in_out"``; a tied input/output embedding is role ``embedding``, so it gets no NS).
Each trainable tensor becomes a `TensorSpec` in the order of the groups, so `mango_groups` gives
back the same groups in the same order, and the NS buckets are those of the real model.

    hf-gpt2-124m   GPT2LMHeadModel(GPT2Config()): 12 layers, d=768, vocab 50257, tied
    hf-gpt2-350m   the same at GPT-2 medium's size: 24 layers, d=1024, 16 heads, tied
    llama-1b       LlamaForCausalLM at Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 heads /
                   8 kv heads, intermediate 8192, vocab 128256, tied embeddings
    hf-gpt2-tiny, llama-tiny   the same builders at tiny sizes (--quick, the GPU run's CPU dry run)
"""

from __future__ import annotations

import warnings

import torch

from .params import ParamSet, TensorSpec

__all__ = ["HF_SETS", "hf_set"]

_GROUP_META = ("params", "param_names", "role", "head_dim", "tied")  # the rest of a group's keys is layout

# name -> (title, model class, config class, config keyword arguments)
HF_SETS = {
    "hf-gpt2-124m": ("HF GPT-2 124M (tied)", "GPT2LMHeadModel", "GPT2Config", {}),
    "hf-gpt2-350m": ("HF GPT-2 350M (tied)", "GPT2LMHeadModel", "GPT2Config", dict(n_embd=1024, n_layer=24, n_head=16)),
    "llama-1b": ("Llama-3.2-1B shape (tied)", "LlamaForCausalLM", "LlamaConfig",
                 dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True)),
    "hf-gpt2-tiny": ("tiny HF GPT-2 (tied)", "GPT2LMHeadModel", "GPT2Config",
                     dict(n_embd=64, n_layer=2, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)),
    "llama-tiny": ("tiny Llama (tied)", "LlamaForCausalLM", "LlamaConfig",
                   dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, tie_word_embeddings=True)),
}  # fmt: skip


def build_model(name: str) -> torch.nn.Module:
    """The model of set `name` on the meta device."""
    import transformers

    _, model_cls, config_cls, kw = HF_SETS[name]
    config = getattr(transformers, config_cls)(**kw)
    with torch.device("meta"):
        return getattr(transformers, model_cls)(config)


def hf_set(name: str) -> ParamSet:
    """The ParamSet of Hugging Face set `name`: its tensors, roles and layouts from `mango.param_groups`."""
    import mango

    if name not in HF_SETS:
        raise ValueError(f"unknown Hugging Face parameter set {name!r}; known: {', '.join(HF_SETS)}")
    title, model_cls, config_cls, kw = HF_SETS[name]
    model = build_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what param_groups says about a model goes to the user, not the bench
        groups = mango.param_groups(model)
    tensors, tied = [], {}
    for g in groups:
        layout = tuple(sorted((k, v) for k, v in g.items() if k not in _GROUP_META))
        tied.update(g.get("tied") or {})
        for pname, p in zip(g["param_names"], g["params"]):
            shape = tuple(p.shape)
            if dict(layout).get("orientation") == "in_out" and len(shape) == 2:
                shape = (shape[1], shape[0])  # the (out, in) operator
            tensors.append(TensorSpec(pname, shape, g["role"], g["head_dim"], layout))
    config = {"model": model_cls, "config": f"transformers.{config_cls}({', '.join(f'{k}={v}' for k, v in kw.items())})",
              "labelled_by": "mango.param_groups(model), no hints", "tied": tied}  # fmt: skip
    return ParamSet(name, title, tuple(tensors), config)
