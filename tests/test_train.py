"""End-to-end training demo (bench.train), the GPT model with NormFormer switches (bench.gpt),
the no-download byte corpus (bench.data), and how mango labels the model's parameters."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

import mango
from bench import train
from bench.data import Batches, make_corpus
from bench.gpt import GPT, GPTConfig, normformer_extra_params

SPECS = ["adamw", "muon", "mango", "mango:beta2=none", "mango:offset=none", "mango:nosplit"]

RUN_FIELDS = {
    "name", "optimizer", "options", "normformer", "model", "n_params", "settings", "labels", "steps",
    "tokens", "train_loss", "lr_multiplier", "val_loss", "initial_val_loss", "final_train_loss",
    "final_train_loss_window", "final_val_loss", "best_val_loss", "diverged", "train_time_s",
    "opt_time_s", "opt_time_share", "tokens_per_s",
}
CONFIG_FIELDS = {
    "argv", "size", "specs", "model", "corpus", "steps", "warmup", "batch", "micro_batch",
    "tokens_per_step", "seed", "clip", "eval_every", "eval_batches", "schedule", "device", "amp",
    "threads", "torch", "python", "machine", "lr_overrides",
}


def _quick(tmp_path, *specs, extra=()):
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--tag", "t", "--no-progress", *extra, *specs]
    log = train.main(argv)
    with open(tmp_path / "train_t.json") as fh:
        assert json.load(fh) == json.loads(json.dumps(log))  # the file is the returned log
    return log


# ----------------------------------------------------------------------------- --quick runs

@pytest.mark.parametrize("spec", SPECS + ["mango:normformer", "adamw:normformer"])
def test_quick_run_loss_falls_and_log_complete(tmp_path, spec):
    log = _quick(tmp_path, spec, extra=["--no-plot"])
    assert CONFIG_FIELDS <= set(log["config"])
    (run,) = log["runs"]
    assert RUN_FIELDS <= set(run), RUN_FIELDS - set(run)
    assert run["name"] == spec and not run["diverged"]
    assert run["steps"] == log["config"]["steps"] == len(run["train_loss"]) == len(run["lr_multiplier"])
    assert all(math.isfinite(x) for x in run["train_loss"])
    first = sum(run["train_loss"][:3]) / 3
    assert run["final_train_loss"] < first - 0.1, (first, run["final_train_loss"])
    assert run["final_val_loss"] < run["initial_val_loss"] - 0.1
    assert run["val_loss"][0][0] == 0 and run["val_loss"][-1][0] == run["steps"]
    assert 0 < run["opt_time_share"] < 1 and run["tokens_per_s"] > 0
    assert run["tokens"] == run["steps"] * log["config"]["tokens_per_step"]
    assert run["normformer"] == spec.endswith(":normformer")
    if run["optimizer"] != "adamw":
        assert "c_attn" in run["labels"]


def test_quick_comparison_writes_table_json_and_png(tmp_path, capsys):
    log = _quick(tmp_path, "adamw", "mango", extra=["--lr", "mango=0.02", "--steps", "6"])
    out = capsys.readouterr().out
    assert "| run" in out and "| adamw" in out and "| mango" in out
    assert [r["name"] for r in log["runs"]] == ["adamw", "mango"]
    assert log["runs"][1]["settings"]["lr"] == 0.02
    png = tmp_path / "train_t.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_data_same_result(tmp_path):
    """Every optimizer sees the same initialisation and batches: a repeated run is identical."""
    log = _quick(tmp_path, "adamw", "adamw:lr=0.001", extra=["--no-plot", "--steps", "5"])
    a, b = log["runs"]
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


# ----------------------------------------------------------------------------- ablations are wired

def _build(spec, cfg=None):
    cfg = cfg or GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    run = train.RunSpec.parse(spec)
    opt, settings = train.build_optimizer(run, model, train.resolve_lr(run, {}))
    return model, opt, settings


def _groups_of(opt, suffix):
    return [g for g in opt.param_groups if any(n.endswith(suffix) for n in g["param_names"])]


def _one_step(model, opt):
    x = torch.randint(0, 256, (2, 8))
    model(x, x)[1].backward()
    opt.step()


def test_mango_ablations_change_exactly_what_they_say():
    model, base, _ = _build("mango")
    for g in base.param_groups:
        assert g["preconditioner"] == "laprop" and g["beta_offset"] == 0.99 and g["lr"] == 0.01
    (qw,) = _groups_of(base, "c_attn.weight")
    (qb,) = _groups_of(base, "c_attn.bias")
    assert qw["role"] == "qkv_weight" and qw["head_dim"] == 8 and qw["norm"] in (None, "ns_split")
    assert qb["role"] == "qkv_bias" and qb["norm"] in (None, "l2_split")
    _one_step(model, base)
    st = base.state[model.h[0].mlp.c_fc.weight]
    assert "exp_avg_sq" in st and "offset" in st

    model, opt, _ = _build("mango:beta2=none")
    assert all(g["preconditioner"] is None and g["beta_offset"] == 0.99 for g in opt.param_groups)
    _one_step(model, opt)
    assert "exp_avg_sq" not in opt.state[model.h[0].mlp.c_fc.weight]

    model, opt, _ = _build("mango:offset=none")
    assert all(g["beta_offset"] is None and g["preconditioner"] == "laprop" for g in opt.param_groups)
    _one_step(model, opt)
    assert "offset" not in opt.state[model.h[0].mlp.c_fc.weight]

    model, opt, settings = _build("mango:nosplit")
    assert settings["nosplit"] is True
    (qw,) = _groups_of(opt, "c_attn.weight")
    (qb,) = _groups_of(opt, "c_attn.bias")
    assert qw["norm"] == "ns" and qb["norm"] == "l2"
    others = [g for g in opt.param_groups if g is not qw and g is not qb]
    assert all(g["norm"] in (None, mango.config.ROLE_DEFAULT_NORM[g["role"]]) for g in others)


def test_named_ns_schedule_spec():
    """mango:ns=NAME / muon:ns=NAME select a named NS schedule (bench.schedules' comparison), and change the step."""
    for spec, want in (("mango:ns=polar_express_5", "polar_express_5"), ("muon:ns=polar_express_4", "polar_express_4")):
        model, opt, settings = _build(spec)
        assert settings["ns_coefficients"] == want
        assert all(g["ns_coefficients"] == want for g in opt.param_groups)
        assert len(mango.config.ns_schedule(opt.param_groups[0])) == int(want[-1])
    runs = {}
    for spec in ("mango", "mango:ns=polar_express_5"):
        model, opt, _ = _build(spec)
        _one_step(model, opt)
        runs[spec] = model.h[0].mlp.c_fc.weight.detach().clone()
    assert not torch.equal(runs["mango"], runs["mango:ns=polar_express_5"])
    with pytest.raises(ValueError, match="unknown schedule"):
        _build("mango:ns=no_such_schedule")


def test_adamw_baseline_is_explicit():
    model, opt, settings = _build("adamw")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95) and decay["lr"] == 1e-3
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert "wte.weight" in settings["decayed"] and "h.0.ln_1.weight" in settings["not_decayed"]


def test_muon_uses_report_learning_rates():
    model, opt, settings = _build("muon")
    assert settings["lr"] == 0.01 and settings["adamw_lr"] == 3e-4
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["h.0.mlp.c_fc.weight"] == 0.01 and lrs["h.0.attn.c_attn.weight"] == 0.01
    assert lrs["wte.weight"] == 3e-4 and lrs["h.0.ln_1.weight"] == 3e-4


def test_per_role_learning_rates_for_sweeps():
    model, opt, settings = _build("mango:lr_ns=0.03,lr=0.001")
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["h.0.mlp.c_fc.weight"] == lrs["h.0.attn.c_attn.weight"] == lrs["lm_head.weight"] == 0.03
    assert lrs["wte.weight"] == lrs["h.0.ln_1.weight"] == lrs["h.0.attn.c_attn.bias"] == 0.001
    assert settings["lr_ns"] == 0.03
    model, opt, _ = _build("mango:lr_embedding=0.002")
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["wte.weight"] == lrs["wpe.weight"] == 0.002 and lrs["h.0.mlp.c_fc.weight"] == 0.01
    with pytest.raises(ValueError, match="lr_bogus"):
        _build("mango:lr_bogus=0.1")


# ----------------------------------------------------------------------------- specs, lrs, schedule

def test_spec_parsing_and_learning_rates():
    r = train.RunSpec.parse("mango:beta2=none,offset=0.9:nosplit")
    assert r.optimizer == "mango" and r.options == {"beta2": None, "offset": 0.9, "nosplit": True}
    assert train.RunSpec.parse("adamw:normformer").options == {"normformer": True}
    for bad in ("sgd", "adamw:nosplit", "mango:bogus"):
        with pytest.raises(ValueError):
            train.RunSpec.parse(bad)
    P = train.RunSpec.parse
    assert train.resolve_lr(P("adamw"), {}) == {"lr": 1e-3}
    assert train.resolve_lr(P("muon"), {}) == {"lr": 0.01, "adamw_lr": 3e-4}
    assert train.resolve_lr(P("mango"), {}) == {"lr": 0.01}
    assert train.resolve_lr(P("mango:nosplit"), {"mango": 0.02}) == {"lr": 0.02}
    assert train.resolve_lr(P("mango:nosplit"), {"mango": 0.02, "mango:nosplit": 0.03}) == {"lr": 0.03}
    assert train.resolve_lr(P("mango:lr=0.05"), {"mango": 0.02}) == {"lr": 0.05}
    assert train.resolve_lr(P("muon"), {"muon_adamw": 1e-3}) == {"lr": 0.01, "adamw_lr": 1e-3}


def test_schedule_linear_warmup_then_linear_decay():
    m = [train.lr_multiplier(s, 100, 10) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[10] == 1.0
    assert all(a >= b for a, b in zip(m[9:], m[10:])) and m[-1] == pytest.approx(1 / 90)
    assert m[55] == pytest.approx(0.5)


def test_progress_printer_plain_stream():
    import io

    buf = io.StringIO()
    p = train.Progress(8, "run", stream=buf)
    for i in range(1, 9):
        p.update(i, f"loss {i}")
    p.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and 2 <= len(lines) <= 6 and lines[-1].startswith("run 8/8 loss 8")


# ----------------------------------------------------------------------------- data

def test_corpus_no_download_byte_level_with_held_out_split(tmp_path):
    c = make_corpus()
    assert c.vocab_size == 256 and c.train.dtype == torch.uint8
    assert 0.05 < c.val.numel() / (c.train.numel() + c.val.numel()) < 0.15
    assert "pydoc_data" in c.description
    f = tmp_path / "t.txt"
    f.write_text("hello world, " * 5000)
    c2 = make_corpus(str(f))
    assert c2.train.numel() + c2.val.numel() == 13 * 5000
    b1, b2 = Batches(c, 4, 16, seed=3), Batches(c, 4, 16, seed=3)
    x1, y1 = b1.next()
    x2, y2 = b2.next()
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (4, 16)
    v = b1.val_batches(2)
    assert len(v) == 2 and torch.equal(v[0][0], b2.val_batches(2)[0][0])


# ----------------------------------------------------------------------------- model / NormFormer

NF_PARAMS = {  # the parameters each NormFormer switch adds to every block (name suffix -> shape)
    "head_scale": {"attn.head_scale": lambda c: (c.n_head,)},
    "res_scale": {"res_scale": lambda c: (c.n_embd,)},
    "post_attn_ln": {"attn_ln.weight": lambda c: (c.n_embd,), "attn_ln.bias": lambda c: (c.n_embd,)},
    "ffn_ln": {"mlp.ffn_ln.weight": lambda c: (4 * c.n_embd,), "mlp.ffn_ln.bias": lambda c: (4 * c.n_embd,)},
}


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("switch", list(NF_PARAMS) + ["all"])
def test_normformer_switches_add_only_their_parameters(switch):
    base_kw = dict(n_layer=3, n_head=4, n_embd=32, block_size=16)
    cfg0 = GPTConfig(**base_kw)
    cfg = GPTConfig(normformer=True, **base_kw) if switch == "all" else GPTConfig(**{switch: True}, **base_kw)
    base, nf = _shapes(GPT(cfg0)), _shapes(GPT(cfg))
    # every Pre-LN parameter is still there with the same shape; only the switch's parameters are new
    assert all(nf[n] == s for n, s in base.items())
    added = {n: s for n, s in nf.items() if n not in base}
    switches = list(NF_PARAMS) if switch == "all" else [switch]
    expected = {f"h.{i}.{suf}": f(cfg) for i in range(cfg.n_layer) for sw in switches for suf, f in NF_PARAMS[sw].items()}
    assert added == expected
    n_added = sum(math.prod(s) for s in added.values())
    assert n_added == normformer_extra_params(cfg) == GPT(cfg).num_params() - GPT(cfg0).num_params()
    if switch == "all":
        assert n_added == cfg.n_layer * (cfg.n_head + 11 * cfg.n_embd)


def test_gpt2_124m_shape_and_normformer_overhead():
    """GPT-2 small (BPE vocab, tied) has 124,439,808 parameters; NormFormer adds 101,520 (~0.1M)."""
    kw = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_weights=True)
    with torch.device("meta"):
        pre, nf = GPT(GPTConfig(**kw)), GPT(GPTConfig(normformer=True, **kw))
    assert pre.num_params() == 124_439_808
    assert nf.num_params() - pre.num_params() == 101_520 == normformer_extra_params(nf.config)
    assert train.SIZES["gpt2"]["n_layer"] == 12 and train.SIZES["gpt2"]["n_embd"] == 768


def test_normformer_forward_matches_prenorm_at_init_when_only_scales_are_on():
    """HeadScale and ResScale start at 1, so with only those switches the function is unchanged."""
    kw = dict(n_layer=2, n_head=2, n_embd=16, block_size=8)
    torch.manual_seed(0)
    a = GPT(GPTConfig(**kw))
    b = GPT(GPTConfig(head_scale=True, res_scale=True, **kw))
    b.load_state_dict(a.state_dict(), strict=False)
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(a(x)[0], b(x)[0])
    b.h[0].attn.head_scale.data[0] = 0.0  # HeadScale really gates a head
    assert not torch.allclose(a(x)[0], b(x)[0])


# ----------------------------------------------------------------------------- mango labels it all

def _expected_role(name):
    if name in ("wte.weight", "wpe.weight"):
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if name.endswith("c_attn.weight"):
        return "qkv_weight"
    if name.endswith("c_attn.bias"):
        return "qkv_bias"
    if name.endswith(("head_scale", "res_scale")) or ("ln" in name.split(".")[-2] and name.endswith(".weight")):
        return "vector_weight"
    if name.endswith(".bias"):
        return "vector_bias"
    return "matrix"


@pytest.mark.parametrize("normformer", [False, True])
def test_param_groups_labels_every_parameter(normformer):
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, normformer=normformer)
    model = GPT(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ambiguous in the untied model
        groups = mango.param_groups(model, qkv_heads=model.qkv_heads)
    labels = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for n, p in zip(g["param_names"], g["params"]):
            assert n not in labels
            labels[n] = (g["role"], g.get("head_dim"))
    assert set(labels) == {n for n, _ in model.named_parameters()}
    for n, (role, hd) in labels.items():
        assert role == _expected_role(n), (n, role)
        assert hd == (cfg.head_dim if role.startswith("qkv") else None), (n, hd)
    if normformer:
        assert labels["h.1.attn.head_scale"][0] == labels["h.1.res_scale"][0] == "vector_weight"
        assert labels["h.0.attn_ln.bias"][0] == labels["h.0.mlp.ffn_ln.bias"][0] == "vector_bias"
        assert labels["h.0.mlp.ffn_ln.weight"][0] == "vector_weight"
    text = mango.describe(groups)
    assert "h.1.attn.c_attn.weight" in text and "qkv_weight" in text


def test_param_groups_tied_weights_label_once():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, tie_weights=True)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = mango.param_groups(model, qkv_heads=model.qkv_heads)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    (role,) = [g["role"] for g in groups for p in g["params"] if p is model.wte.weight]
    assert role in ("embedding", "head")


# ----------------------------------------------------------------------------- output location

def test_demo_writes_where_git_ignores_unless_asked_to_update_committed_results():
    """`bash ci/demo.sh` must leave a fresh checkout clean; committed figures change only on purpose."""
    import subprocess

    parse = train.build_parser().parse_args
    assert train.results_dir(parse([])) == train.LOCAL_RESULTS
    assert train.results_dir(parse(["--update-results"])) == train.COMMITTED_RESULTS
    assert train.results_dir(parse(["--out", "/tmp/x"])) == "/tmp/x"
    with pytest.raises(SystemExit, match="exclusive"):
        train.results_dir(parse(["--out", "/tmp/x", "--update-results"]))
    root = os.path.dirname(train.COMMITTED_RESULTS)
    probe = os.path.join(train.LOCAL_RESULTS, "train_tiny.json")
    assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=root).returncode == 0
    committed = os.path.join(train.COMMITTED_RESULTS, "train_tiny.json")
    assert subprocess.run(["git", "check-ignore", "-q", committed], cwd=root).returncode == 1
