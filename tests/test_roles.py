"""mango.roles: every parameter of common architectures gets the role the roles (docs/guide.md) ask for.

Each test model is built here, tiny, so the expected labelling can be written out in full:
a wrong role would silently pick the wrong dual norm, so every parameter is checked.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from mango.roles import describe, param_groups

# --------------------------------------------------------------------------- models


class GPTAttention(nn.Module):
    def __init__(self, d, n_head, head_scale=False):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)  # fused QKV, rows [q heads | k heads | v heads]
        self.c_proj = nn.Linear(d, d)
        self.head_scale = nn.Parameter(torch.ones(n_head)) if head_scale else None  # NormFormer HeadScale


class GPTMLP(nn.Module):
    def __init__(self, d, ffn_ln=False):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.ffn_ln = nn.LayerNorm(4 * d) if ffn_ln else None  # NormFormer FFN LayerNorm
        self.c_proj = nn.Linear(4 * d, d)


class GPTBlock(nn.Module):
    def __init__(self, d, n_head, normformer=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPTAttention(d, n_head, head_scale=normformer)
        self.attn_ln = nn.LayerNorm(d) if normformer else None  # NormFormer post-attention LN
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = GPTMLP(d, ffn_ln=normformer)
        self.res_scale = nn.Parameter(torch.ones(d)) if normformer else None  # NormFormer ResScale


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, block=16, d=32, n_head=4, n_layer=2, tie=False, normformer=False):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, d),
                wpe=nn.Embedding(block, d),
                h=nn.ModuleList(GPTBlock(d, n_head, normformer) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for blk in t.h:
            B, T, C = x.shape
            q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(C, dim=2)
            n = blk.attn.head_scale.numel() if blk.attn.head_scale is not None else 4
            q, k, v = (z.view(B, T, n, C // n).transpose(1, 2) for z in (q, k, v))
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(B, T, C)
            x = x + blk.attn.c_proj(y)
            x = x + blk.mlp.c_proj(nn.functional.gelu(blk.mlp.c_fc(blk.ln_2(x))))
        return self.lm_head(t.ln_f(x))


GPT_QKV = {"transformer.h.*.attn.c_attn": 4}


def gpt_expected(n_layer=2, head_dim=8, normformer=False):
    """The full labelling of TinyGPT with c_attn declared: name -> (role, head_dim)."""
    out = {"transformer.wte.weight": ("embedding", None), "transformer.wpe.weight": ("embedding", None)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        out.update(
            {
                p + "ln_1.weight": ("vector_weight", None),
                p + "ln_1.bias": ("vector_bias", None),
                p + "attn.c_attn.weight": ("qkv_weight", head_dim),
                p + "attn.c_attn.bias": ("qkv_bias", head_dim),
                p + "attn.c_proj.weight": ("matrix", None),
                p + "attn.c_proj.bias": ("vector_bias", None),
                p + "ln_2.weight": ("vector_weight", None),
                p + "ln_2.bias": ("vector_bias", None),
                p + "mlp.c_fc.weight": ("matrix", None),
                p + "mlp.c_fc.bias": ("vector_bias", None),
                p + "mlp.c_proj.weight": ("matrix", None),
                p + "mlp.c_proj.bias": ("vector_bias", None),
            }
        )
        if normformer:
            out.update(
                {
                    p + "attn.head_scale": ("vector_weight", None),
                    p + "attn_ln.weight": ("vector_weight", None),
                    p + "attn_ln.bias": ("vector_bias", None),
                    p + "mlp.ffn_ln.weight": ("vector_weight", None),
                    p + "mlp.ffn_ln.bias": ("vector_bias", None),
                    p + "res_scale": ("vector_weight", None),
                }
            )
    out["transformer.ln_f.weight"] = ("vector_weight", None)
    out["transformer.ln_f.bias"] = ("vector_bias", None)
    return out


class GQAModel(nn.Module):
    """Grouped-query attention: 8 query heads share 2 kv heads, head_dim 8, fused qkv rows (8+2*2)*8."""

    def __init__(self, n_q=8, n_kv=2, head_dim=8):
        super().__init__()
        d = n_q * head_dim
        self.embed = nn.Embedding(50, d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, (n_q + 2 * n_kv) * head_dim, bias=True)
        self.attn.o_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, 50, bias=False)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)


CNN_EXPECTED = {
    "conv1.weight": ("matrix", None),
    "conv1.bias": ("vector_bias", None),
    "bn1.weight": ("vector_weight", None),
    "bn1.bias": ("vector_bias", None),
    "conv2.weight": ("matrix", None),
    "bn2.weight": ("vector_weight", None),
    "bn2.bias": ("vector_bias", None),
    "fc.weight": ("head", None),  # a top-level `fc` is the classifier (torchvision's convnets)
    "fc.bias": ("vector_bias", None),
}


def encoder_expected(n_layers=2, head_dim=4):
    out = {}
    for i in range(n_layers):
        p = f"layers.{i}."
        out.update(
            {
                p + "self_attn.in_proj_weight": ("qkv_weight", head_dim),
                p + "self_attn.in_proj_bias": ("qkv_bias", head_dim),
                p + "self_attn.out_proj.weight": ("matrix", None),
                p + "self_attn.out_proj.bias": ("vector_bias", None),
                p + "linear1.weight": ("matrix", None),
                p + "linear1.bias": ("vector_bias", None),
                p + "linear2.weight": ("matrix", None),
                p + "linear2.bias": ("vector_bias", None),
                p + "norm1.weight": ("vector_weight", None),
                p + "norm1.bias": ("vector_bias", None),
                p + "norm2.weight": ("vector_weight", None),
                p + "norm2.bias": ("vector_bias", None),
            }
        )
    out["norm.weight"] = ("vector_weight", None)
    out["norm.bias"] = ("vector_bias", None)
    return out


def tiny_encoder():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(16), enable_nested_tensor=False)


# --------------------------------------------------------------------------- helpers


def labelling(groups):
    """name -> (role, head_dim); fails if any name or tensor appears twice."""
    out, seen = {}, set()
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for p, n in zip(g["params"], g["param_names"]):
            assert n not in out, f"{n} labelled twice"
            assert id(p) not in seen, f"tensor {n} listed twice"
            seen.add(id(p))
            out[n] = (g["role"], g["head_dim"])
    return out


def assert_covers_model(groups, model):
    """Every trainable tensor of the model is in exactly one group, and nothing else is."""
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]  # parameters() dedups tied tensors
    assert sorted(listed) == sorted(trainable)
    assert len(listed) == len(set(listed))


def no_warnings():
    return warnings.catch_warnings(action="error")


# --------------------------------------------------------------------------- labelling


@pytest.mark.parametrize(
    "name, build, kwargs, expected",
    [
        ("gpt_untied", lambda: TinyGPT(), dict(qkv_heads=GPT_QKV), {**gpt_expected(), "lm_head.weight": ("head", None)}),
        (
            "normformer",
            lambda: TinyGPT(normformer=True),
            dict(qkv_heads=GPT_QKV),
            {**gpt_expected(normformer=True), "lm_head.weight": ("head", None)},
        ),
        ("encoder", tiny_encoder, {}, encoder_expected()),
        (
            "gqa",
            lambda: GQAModel(),
            dict(qkv_heads={"attn.qkv": (8, 2)}),
            {
                "embed.weight": ("embedding", None),
                "attn.qkv.weight": ("qkv_weight", 8),
                "attn.qkv.bias": ("qkv_bias", 8),
                "attn.o_proj.weight": ("matrix", None),
                "norm.weight": ("vector_weight", None),
                "head.weight": ("head", None),
            },
        ),
        ("cnn", TinyCNN, {}, CNN_EXPECTED),
        ("cnn_declared_head", TinyCNN, dict(head="fc"), CNN_EXPECTED),  # declaring it agrees
        (
            "rmsnorm",
            lambda: nn.Sequential(nn.Linear(16, 16, bias=False), nn.RMSNorm(16), nn.RMSNorm(16, elementwise_affine=False)),
            {},
            {"0.weight": ("matrix", None), "1.weight": ("vector_weight", None)},
        ),
    ],
)
def test_every_parameter_gets_its_role(name, build, kwargs, expected):
    torch.manual_seed(0)
    model = build()
    with no_warnings():
        groups = param_groups(model, **kwargs)
    assert labelling(groups) == expected
    assert_covers_model(groups, model)


def test_tied_lm_head_is_the_embedding_once_silently_and_described():
    """A tied input/output embedding is the documented case: role embedding, no warning, both names shown."""
    model = TinyGPT(tie=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    with no_warnings():
        groups = param_groups(model, qkv_heads=GPT_QKV)
    assert labelling(groups) == gpt_expected()  # lm_head.weight is not listed separately
    names = [n for g in groups for n in g["param_names"]]
    assert names.count("transformer.wte.weight") == 1 and "lm_head.weight" not in names
    (embedding_group,) = [g for g in groups if "transformer.wte.weight" in g["param_names"]]
    assert embedding_group["tied"] == {"transformer.wte.weight": ["lm_head.weight"]}
    assert [g for g in groups if "tied" in g] == [embedding_group]
    assert_covers_model(groups, model)
    (row,) = [line for line in describe(groups).splitlines() if "wte" in line]
    assert re.search(r"transformer\.wte\.weight = lm_head\.weight\s+\(64, 32\)\s+embedding\s+none", row)


def test_tied_weight_override_that_disagrees_with_the_documented_role_warns():
    model = TinyGPT(tie=True)
    with pytest.warns(UserWarning, match=r"'transformer\.wte\.weight' is one tensor with 'lm_head\.weight' \(tied\), "
                      r"documented as role 'embedding'; the override gives it role 'head' for every use") as record:
        groups = param_groups(model, qkv_heads=GPT_QKV, overrides={"lm_head.weight": {"role": "head"}})
    assert len(record) == 1
    assert labelling(groups)["transformer.wte.weight"] == ("head", None)
    with no_warnings():  # agreeing with the documented role, or other settings: nothing to say
        groups = param_groups(model, qkv_heads=GPT_QKV, overrides={"lm_head.weight": {"role": "embedding", "lr": 0.1}})
    assert labelling(groups)["transformer.wte.weight"] == ("embedding", None)


def test_overrides_that_disagree_across_the_names_of_one_tied_tensor_warn():
    model = TinyGPT(tie=True)
    overrides = {"transformer.wte.weight": {"lr": 0.1}, "lm_head.weight": {"lr": 0.2}}
    with pytest.warns(UserWarning, match=r"overrides 'transformer\.wte\.weight' and 'lm_head\.weight' set lr to "
                      r"0\.1 and 0\.2 .* one tied tensor; the later key wins: lr=0\.2") as record:
        groups = param_groups(model, qkv_heads=GPT_QKV, overrides=overrides)
    assert len(record) == 1
    (group,) = [g for g in groups if "transformer.wte.weight" in g["param_names"]]
    assert group["lr"] == 0.2


def test_a_tie_between_other_roles_is_warned_about():
    """Not the documented embedding tie: a weight shared by a declared fused QKV and a plain Linear."""
    model = nn.Module()
    model.a, model.b = nn.Linear(8, 24), nn.Linear(8, 24)
    model.b.weight = model.a.weight
    with pytest.warns(UserWarning, match=r"'a\.weight' is tied into modules with different roles: "
                      r"'a\.weight' -> qkv_weight .*'b\.weight' -> matrix.*It gets one role, 'qkv_weight'"):
        groups = param_groups(model, qkv_heads={"a": 2})
    assert labelling(groups)["a.weight"] == ("qkv_weight", 4)
    with no_warnings():  # a role override settles it
        param_groups(model, qkv_heads={"a": 2}, overrides={"b.weight": {"role": "matrix"}})


def test_linear_tied_to_embedding_is_head_candidate_whatever_its_name():
    model = nn.Module()
    model.tok = nn.Embedding(20, 8)
    model.decoder = nn.Linear(8, 20, bias=True)
    model.decoder.weight = model.tok.weight
    with no_warnings():
        groups = param_groups(model)
    assert labelling(groups) == {"tok.weight": ("embedding", None), "decoder.bias": ("vector_bias", None)}
    assert groups[0]["tied"] == {"tok.weight": ["decoder.weight"]}


def test_unnamed_fused_qkv_is_not_guessed():
    """Without qkv_heads a fused QKV Linear is just a matrix: no silent guess at a head count,
    and one warning (for both layers) names the declaration that splits it."""
    with pytest.warns(UserWarning, match=r"'transformer\.h\.0\.attn' \(and 1 more like it\) looks like attention") as record:
        groups = param_groups(TinyGPT())
    assert len(record) == 1
    assert "qkv_heads={'transformer.h.*.attn.c_attn': n_heads}" in str(record[0].message)
    assert labelling(groups)["transformer.h.0.attn.c_attn.weight"] == ("matrix", None)
    assert labelling(groups)["transformer.h.0.attn.c_attn.bias"] == ("vector_bias", None)


@pytest.mark.parametrize("key", ["transformer.h.*.attn.c_attn", "*c_attn", "transformer.h.[01].attn.c_attn"])
def test_qkv_heads_globs(key):
    groups = param_groups(TinyGPT(), qkv_heads={key: 4})
    lab = labelling(groups)
    assert lab["transformer.h.0.attn.c_attn.weight"] == ("qkv_weight", 8)
    assert lab["transformer.h.1.attn.c_attn.bias"] == ("qkv_bias", 8)


def test_qkv_heads_exact_names_per_layer():
    qkv = {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.attn.c_attn": 2}
    lab = labelling(param_groups(TinyGPT(), qkv_heads=qkv))
    assert lab["transformer.h.0.attn.c_attn.weight"] == ("qkv_weight", 8)
    assert lab["transformer.h.1.attn.c_attn.weight"] == ("qkv_weight", 16)


def test_multihead_attention_separate_projections_and_kv_bias():
    mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, add_bias_kv=True)
    with no_warnings():
        groups = param_groups(mha)
    assert labelling(groups) == {
        "q_proj_weight": ("matrix", None),
        "k_proj_weight": ("matrix", None),
        "v_proj_weight": ("matrix", None),
        "in_proj_bias": ("qkv_bias", 4),
        "bias_k": ("vector_bias", None),
        "bias_v": ("vector_bias", None),
        "out_proj.weight": ("matrix", None),
        "out_proj.bias": ("vector_bias", None),
    }
    assert_covers_model(groups, mha)


def test_zero_dim_gain_is_vector_weight():
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(1.0))
    model.lin = nn.Linear(4, 4)
    assert labelling(param_groups(model))["scale"] == ("vector_weight", None)


def test_frozen_parameters_are_left_out():
    model = TinyGPT()
    model.transformer.wpe.weight.requires_grad_(False)
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    groups = param_groups(model, qkv_heads=GPT_QKV)
    names = set(labelling(groups))
    assert "transformer.wpe.weight" not in names
    assert not any(n.startswith("transformer.h.0.") for n in names)
    assert_covers_model(groups, model)


def test_shared_module_under_two_names_is_listed_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    groups = param_groups(model)
    assert labelling(groups) == {"0.weight": ("matrix", None), "0.bias": ("vector_bias", None)}


# --------------------------------------------------------------------------- group structure


def test_group_structure_and_order():
    groups = param_groups(TinyGPT(), qkv_heads=GPT_QKV)
    for g in groups:
        assert set(g) == {"params", "param_names", "role", "head_dim"}
        assert all(isinstance(p, nn.Parameter) for p in g["params"])
    # one group per (role, head_dim), in order of first appearance in the model
    assert [g["role"] for g in groups] == ["embedding", "vector_weight", "vector_bias", "qkv_weight", "qkv_bias", "matrix", "head"]
    # params inside a group keep model order
    model_order = [n for n, _ in TinyGPT().named_parameters()]
    for g in groups:
        assert g["param_names"] == sorted(g["param_names"], key=model_order.index)


def test_overrides_merge_settings_and_split_groups():
    overrides = {
        "lm_head.weight": {"norm": "none", "lr": 0.002},
        "*.ln_[12].weight": {"weight_decay": 0.1},
        "transformer.h.1.attn.c_attn.weight": {"role": "matrix"},
        "transformer.h.0.attn.c_attn.*": {"head_dim": 16},
    }
    groups = param_groups(TinyGPT(), qkv_heads=GPT_QKV, overrides=overrides)
    by_name = {n: g for g in groups for n in g["param_names"]}
    head = by_name["lm_head.weight"]
    assert (head["role"], head["norm"], head["lr"]) == ("head", "none", 0.002) and head["param_names"] == ["lm_head.weight"]
    ln = by_name["transformer.h.0.ln_1.weight"]
    assert ln["weight_decay"] == 0.1 and ln is by_name["transformer.h.1.ln_2.weight"]
    assert "weight_decay" not in by_name["transformer.ln_f.weight"]  # ln_f does not match "*.ln_[12].weight"
    assert (by_name["transformer.h.1.attn.c_attn.weight"]["role"], by_name["transformer.h.1.attn.c_attn.weight"]["head_dim"]) == ("matrix", None)
    assert by_name["transformer.h.1.attn.c_attn.weight"] is by_name["transformer.h.0.attn.c_proj.weight"]
    assert by_name["transformer.h.0.attn.c_attn.weight"]["head_dim"] == 16
    assert by_name["transformer.h.0.attn.c_attn.bias"]["head_dim"] == 16
    assert by_name["transformer.h.1.attn.c_attn.bias"]["head_dim"] == 8


def test_override_later_key_wins():
    overrides = {"*": {"lr": 0.1}, "lm_head.weight": {"lr": 0.5}}
    groups = param_groups(TinyGPT(), qkv_heads=GPT_QKV, overrides=overrides)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["lm_head.weight"]["lr"] == 0.5
    assert by_name["transformer.wte.weight"]["lr"] == 0.1


def test_override_role_qkv_with_head_dim():
    groups = param_groups(TinyGPT(), overrides={"*.c_attn.weight": {"role": "qkv_weight", "head_dim": 8}})
    lab = labelling(groups)
    assert lab["transformer.h.0.attn.c_attn.weight"] == ("qkv_weight", 8)
    assert lab["transformer.h.0.attn.c_attn.bias"] == ("vector_bias", None)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        # head count that does not divide the fused rows: names module, rows and head count
        (dict(qkv_heads={"transformer.h.*.attn.c_attn": 5}), r"'transformer\.h\.0\.attn\.c_attn'.*96.*n_heads=5"),
        # declared qkv module that does not exist
        (dict(qkv_heads={"transformer.h.*.attn.qkv": 4}), r"'transformer\.h\.\*\.attn\.qkv' matches no module"),
        # declared qkv module that is not Linear-like
        (dict(qkv_heads={"transformer.h.0.attn": 4}), r"'transformer\.h\.0\.attn'.*not Linear-like"),
        (dict(qkv_heads={"transformer.h.0.ln_1": 4}), r"'transformer\.h\.0\.ln_1'.*not Linear-like"),
        # bad head counts
        (dict(qkv_heads={"transformer.h.0.attn.c_attn": 0}), r"qkv_heads\['transformer\.h\.0\.attn\.c_attn'\]=0"),
        (dict(qkv_heads={"transformer.h.0.attn.c_attn": True}), r"qkv_heads\['transformer\.h\.0\.attn\.c_attn'\]=True"),
        (dict(qkv_heads={"transformer.h.0.attn.c_attn": (4,)}), r"qkv_heads\['transformer\.h\.0\.attn\.c_attn'\]=\(4,\)"),
        (dict(qkv_heads={"transformer.h.0.attn.c_attn": (4, 3)}), r"n_q=4 is not a multiple of n_kv=3"),
        # declared head that does not exist / is not Linear-like / is also qkv
        (dict(head="decoder"), r"head='decoder' matches no module"),
        (dict(head=["lm_head", "transformer.ln_f"]), r"'transformer\.ln_f'.*not Linear-like"),
        (dict(qkv_heads={"*c_attn": 4}, head="transformer.h.0.attn.c_attn"), r"'transformer\.h\.0\.attn\.c_attn'.*both"),
        # overrides
        (dict(overrides={"transformer.h.0.attn.qkv.weight": {"lr": 0.1}}), r"'transformer\.h\.0\.attn\.qkv\.weight' matches no parameter"),
        (dict(overrides={"transformer.ln_f.bias": {"norm": "ns"}}), r"'transformer\.ln_f\.bias'.*norm='ns'"),
        (dict(overrides={"transformer.h.0.mlp.c_fc.weight": {"norm": "ns_split"}}), r"'transformer\.h\.0\.mlp\.c_fc\.weight'.*ns_split"),
        (dict(overrides={"transformer.h.0.mlp.c_fc.weight": {"norm": "frobenius"}}), r"'transformer\.h\.0\.mlp\.c_fc\.weight'.*frobenius"),
        (dict(overrides={"lm_head.weight": {"role": "unembedding"}}), r"'lm_head\.weight'.*unembedding"),
        (dict(overrides={"lm_head.weight": {"lrr": 0.1}}), r"overrides\['lm_head\.weight'\].*lrr"),
        (dict(overrides={"lm_head.weight": {"lr": -1.0}}), r"'lm_head\.weight'.*lr=-1\.0"),
        (dict(overrides={"transformer.h.0.attn.c_proj.weight": {"role": "qkv_weight"}}), r"'transformer\.h\.0\.attn\.c_proj\.weight'.*no head_dim"),
        (dict(overrides={"transformer.h.0.attn.c_proj.weight": {"head_dim": 8}}), r"'transformer\.h\.0\.attn\.c_proj\.weight'.*head_dim only applies"),
        (
            dict(qkv_heads=GPT_QKV, overrides={"transformer.h.0.attn.c_attn.weight": {"head_dim": 7}}),
            r"'transformer\.h\.0\.attn\.c_attn\.weight'.*head_dim=7.*96",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:mango.param_groups. module .* looks like attention")
def test_errors_name_the_culprit(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        param_groups(TinyGPT(), **kwargs)


@pytest.mark.parametrize("heads, text", [((10, 5), r"\(n_q=10, n_kv=5\)"), (7, r"n_heads=7")])
def test_gqa_head_count_not_dividing_rows(heads, text):
    with pytest.raises(ValueError, match=rf"'attn\.qkv' has 96 weight rows.*{text}"):
        param_groups(GQAModel(), qkv_heads={"attn.qkv": heads})


def test_override_on_frozen_parameter_only():
    model = TinyGPT()
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'lm_head\.weight' matches only parameters with requires_grad=False"):
        param_groups(model, overrides={"lm_head.weight": {"lr": 0.1}})


def test_qkv_heads_on_conv1d_splits_its_output_features():
    """HF GPT-2's Conv1D stores (in, out): declared heads split its out axis (storage columns)."""

    class Conv1D(nn.Module):  # HF GPT-2 layout: weight (in, out), nf = out
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.zeros(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    model = nn.Module()
    model.c_attn = Conv1D(96, 32)
    groups = param_groups(model, qkv_heads={"c_attn": 4})
    by_name = {n: g for g in groups for n in g["param_names"]}
    weight, bias = by_name["c_attn.weight"], by_name["c_attn.bias"]
    assert (weight["role"], weight["head_dim"], weight["orientation"]) == ("qkv_weight", 8, "in_out")
    assert (bias["role"], bias["head_dim"]) == ("qkv_bias", 8) and "orientation" not in bias
    with pytest.raises(ValueError, match=r"'c_attn' has 96 output features \(Conv1D weight columns\).*n_heads=5"):
        param_groups(model, qkv_heads={"c_attn": 5})


def test_not_a_module():
    with pytest.raises(TypeError):
        param_groups([nn.Parameter(torch.zeros(2))])


# --------------------------------------------------------------------------- describe


def test_describe_groups_lists_every_parameter_with_role_and_norm():
    model = TinyGPT(normformer=True)
    groups = param_groups(model, qkv_heads=GPT_QKV, overrides={"lm_head.weight": {"lr": 0.002, "norm": "l2_col"}})
    text = describe(groups)
    lines = text.splitlines()
    expected = {**gpt_expected(normformer=True), "lm_head.weight": ("head", None)}
    assert len(lines) == 2 + len(expected) + 1  # header, rule, one row each, summary
    default_norm = {"embedding": "none", "vector_weight": "none", "vector_bias": "l2", "qkv_weight": "ns_split",
                    "qkv_bias": "l2_split", "matrix": "ns", "head": "ns"}
    for name, (role, head_dim) in expected.items():
        (row,) = [line for line in lines if re.search(rf"\s{re.escape(name)}\s", line)]
        cells = row.split()
        assert role in cells
        assert (str(head_dim) if head_dim else "-") in cells
        if name == "lm_head.weight":
            assert "l2_col" in cells and "lr=0.002" in cells
        else:
            assert default_norm[role] in cells
    assert "(96, 32)" in text and "(4,)" in text
    # fixed width: every row starts its columns at the same offsets as the header
    offset = lines[0].index("role")
    assert all(line[offset - 2 : offset] == "  " for line in lines[1:-1])


def test_describe_optimizer_with_names_and_without():
    model = TinyCNN()
    groups = param_groups(model, head="fc", overrides={"fc.bias": {"lr": 0.5}})
    opt = torch.optim.SGD(groups, lr=0.1)
    text = describe(opt)
    for name in CNN_EXPECTED:
        assert name in text
    fc_bias = next(line for line in text.splitlines() if "fc.bias" in line)
    assert "lr=0.5" in fc_bias
    conv = next(line for line in text.splitlines() if "conv1.weight" in line)
    assert "lr=" not in conv and "momentum" not in conv  # optimizer defaults are not repeated

    plain = torch.optim.SGD(TinyCNN().parameters(), lr=0.1)  # no names, no roles: inferred from shape
    text = describe(plain)
    assert "param0" in text and "param8" in text
    assert re.search(r"param0\s+\(8, 3, 3, 3\)\s+matrix\s+ns", text)
    assert re.search(r"param1\s+\(8,\)\s+vector_weight\s+none", text)


# --------------------------------------------------------------------------- integration


def test_mango_accepts_the_groups_and_steps_once():
    import mango

    torch.manual_seed(0)
    model = TinyGPT(tie=True)
    with no_warnings():
        groups = param_groups(model, qkv_heads=GPT_QKV)
        opt = mango.Mango(groups, lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 64, (2, 8))
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, before[name]), f"{name} did not move"
    assert "qkv_weight" in describe(opt)
