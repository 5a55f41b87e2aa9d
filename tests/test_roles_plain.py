"""What a torch user passes to mango.Mango: the model, named_parameters(), or plain tensors.

`Mango(model)` must be `Mango(param_groups(model))` (the real roles); from names, a 1-D bias is a
bias; where a tensor of 2+ dims would get its role from its shape alone, one warning names the call
that labels the model. On HF GPT-2 the plain path would otherwise orthogonalize the embeddings and
the transposed Conv1D c_attn as one matrix without a word.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import mango

from test_roles_hf import BUILDERS

SHAPE_ONLY = r"get role 'matrix' from their shape alone.*mango\.Mango\(model, \.\.\.\).*mango\.param_groups\(model\)"


def gpt2():
    torch.manual_seed(0)
    return BUILDERS["gpt2"]().double()


def layout(groups):
    """Per group: (role, head_dim, orientation, experts, names) — what decides the update."""
    keys = ("role", "head_dim", "orientation", "experts")
    return [(*(g.get(k, mango.config.DEFAULTS[k]) for k in keys), list(g["param_names"])) for g in groups]


def quiet():
    return warnings.catch_warnings(action="error")


def test_mango_of_the_model_is_mango_of_its_param_groups():
    net = gpt2()
    with quiet():
        from_model = mango.Mango(net, backend="torch")
        from_groups = mango.Mango(mango.param_groups(net), backend="torch")
    assert layout(from_model.param_groups) == layout(from_groups.param_groups)
    assert {g["role"] for g in from_model.param_groups} >= {"embedding", "qkv_weight", "qkv_bias", "vector_bias"}

    twin = copy.deepcopy(net)
    opts = mango.presets.mango(net, backend="torch"), mango.Mango(twin, backend="torch", beta1=0.95, beta2=0.95,
                                                                    nesterov=True, beta_offset=0.99)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # the same steps, bit for bit
        for p, q in zip(net.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_plain_parameters_warn_once_naming_the_model_call():
    net = gpt2()
    with pytest.warns(UserWarning, match=SHAPE_ONLY) as record:
        opt = mango.Mango(net.parameters(), backend="torch")
    assert len(record) == 1
    assert "6 parameter(s) of 2 or more dims" in str(record[0].message)
    assert {mango.config.resolve_role(opt.param_groups[0], p) for p in opt.param_groups[0]["params"]} == {
        "matrix", "vector_weight"
    }


def test_named_parameters_make_biases_biases_and_warn_for_the_matrices():
    net = gpt2()
    with pytest.warns(UserWarning, match=SHAPE_ONLY) as record:
        opt = mango.Mango(net.named_parameters(), backend="torch")
    assert len(record) == 1
    assert "'transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.0.attn.c_attn.weight'" in str(
        record[0].message
    )
    roles = {}
    for g in opt.param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            roles[name] = mango.config.resolve_role(g, p)
    assert roles["transformer.h.0.attn.c_attn.bias"] == roles["transformer.ln_f.bias"] == "vector_bias"
    assert roles["transformer.ln_f.weight"] == "vector_weight"
    assert roles["transformer.wte.weight"] == "matrix"
    assert sorted(roles) == sorted(n for n, _ in net.named_parameters())


def test_named_groups_keep_their_settings_when_split():
    lin = nn.Linear(4, 3)
    with pytest.warns(UserWarning, match=SHAPE_ONLY):
        opt = mango.Mango([{"params": list(lin.named_parameters()), "lr": 0.5, "tag": "mine"}], backend="torch")
    assert [(g["role"], g["param_names"], g["lr"], g["tag"]) for g in opt.param_groups] == [
        (None, ["weight"], 0.5, "mine"), ("vector_bias", ["bias"], 0.5, "mine")
    ]


def test_no_warning_where_the_shape_does_not_decide():
    w, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    with quiet():
        mango.Mango([w], role="matrix")  # the role is given
        mango.Mango([{"params": [w], "role": "head"}, {"params": [b]}])  # given, or a vector
        mango.Mango([w], norm="l2")  # the norm is given: the role does not choose it
        mango.presets.lamb([w])  # every tensor gets l2 and the trust ratio, whatever its role
        mango.presets.laprop([w])
    with pytest.raises(ValueError, match="empty parameter list"):
        mango.Mango([])


def test_muon_preset_on_plain_parameters_warns_too():
    """Muon splits by role (NS on matrices, AdamW on the rest): from shapes, embeddings would get NS."""
    net = gpt2()
    with pytest.warns(UserWarning, match=r"mango\.presets\.muon: .*" + SHAPE_ONLY) as record:
        mango.presets.muon(net.parameters())
    assert len(record) == 1
    with quiet():
        opt = mango.presets.muon(net)
    adamw = [n for g in opt.param_groups if g["preconditioner"] == "adam" for n in g["param_names"]]
    assert "transformer.wte.weight" in adamw


def test_the_lightning_habit_passes_the_module_itself():
    """configure_optimizers(self) -> Mango(self): the LightningModule is an nn.Module like any other."""
    holder = nn.Module()
    holder.net = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    )
    with quiet():
        opt = mango.Mango(holder)
    by_name = {n: g["role"] for g in opt.param_groups for n in g["param_names"]}
    assert by_name["net.model.layers.0.self_attn.k_proj.weight"] == "qkv_weight"
    assert by_name["net.model.embed_tokens.weight"] == "embedding" and by_name["net.lm_head.weight"] == "head"
