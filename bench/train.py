"""End-to-end training demo: GPT-2 (Pre-LN or NormFormer) with AdamW vs Muon vs MANGO.

    python -m bench.train                                   # adamw muon mango, tiny model, CPU, ~minutes
    python -m bench.train --ablations                       # + mango:beta2=none mango:offset=none mango:nosplit
    python -m bench.train mango mango:nosplit --normformer  # any list of runs, NormFormer model
    python -m bench.train --size gpt2                       # GPT-2 124M shape on a GPU (bf16 autocast)
    python -m bench.train --quick                           # a few steps of a micro model (tests)

Every run uses the same model initialisation (seed), the same batches in the same order and the
same schedule (linear warm-up, then linear decay to 0, as in the MANGO report); only the optimizer
differs. A run is named by a spec ``NAME[:key=value[,key=value...]]``:

    adamw                      torch.optim.AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
                               >=2-D tensors (matrices and embeddings), 0 on biases, gains, HeadScale,
                               ResScale. keys: lr, wd, beta1, beta2
    muon                       mango.presets.muon: Nesterov momentum + Newton-Schulz on matrices and
                               QKV, AdamW on embeddings/head/vectors. keys: lr, adamw_lr
    mango                      mango.presets.mango (report defaults). keys: lr, beta1,
                               beta2=none (no preconditioning, i.e. preconditioner=None) | beta2=FLOAT,
                               offset=none (no offset momentum, i.e. beta_offset=None) | offset=FLOAT,
                               nosplit (QKV weight "ns", bias "l2" instead of the head-wise norms),
                               wd, and any other mango.Mango group setting (e.g. nesterov=false)
    muon, mango                ns=NAME picks a Newton-Schulz coefficient schedule by name (mango.config
                               .NS_SCHEDULES: muon, mango_jax, polar_express, polar_express_4,
                               polar_express_5; = ns_coefficients=NAME), ns_steps=INT its length
    muon, mango                lr_ROLE=FLOAT sets one role's peak lr (ROLE: matrix, qkv_weight,
                               qkv_bias, embedding, head, vector_weight, vector_bias), lr_ns=FLOAT
                               every Newton-Schulz-normalized group (for tuning sweeps)
    any spec                   normformer / prenorm: switch the model for that run only

Default peak learning rates are the report's grid-searched values: adamw 1e-3, muon 0.01 with
3e-4 for its AdamW part, mango 0.01. ``--lr NAME=VALUE`` overrides them (NAME: adamw, muon,
muon_adamw, mango, or a full spec such as ``mango:nosplit``); ``lr=`` inside a spec wins.

Results: a table on stdout, ``OUT/train_TAG.json`` (config, per-step training loss, validation
curve, timings, optimizer labelling) and ``OUT/train_TAG.png`` (loss curves). OUT is
``bench/results/local/`` (ignored by git, so the demo leaves a checkout clean) unless ``--out`` says
otherwise; ``--update-results`` writes to ``bench/results/`` to regenerate the committed figures.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .data import Batches, make_corpus
from .gpt import GPT, GPTConfig

DEFAULT_SPECS = ["adamw", "muon", "mango"]
COMMITTED_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the figures of docs/report.md
LOCAL_RESULTS = os.path.join(COMMITTED_RESULTS, "local")  # default output, listed in .gitignore
ABLATION_SPECS = ["mango:beta2=none", "mango:offset=none", "mango:nosplit"]
OPTIMIZERS = ("adamw", "muon", "mango")
DEFAULT_LR = {"adamw": 1e-3, "muon": 0.01, "muon_adamw": 3e-4, "mango": 0.01}
ADAMW_BETAS = (0.9, 0.95)
ADAMW_WD = 0.1
# mango:nosplit -- the same labelling, but the QKV role normalized as one matrix / one vector
NOSPLIT_OVERRIDES = {"*c_attn.weight": {"norm": "ns"}, "*c_attn.bias": {"norm": "l2"}}

# Model shape + training length per scale. Times are for the default 3-optimizer comparison.
SIZES = {
    # a handful of steps on a micro model: for tests (a few seconds per optimizer on CPU)
    "quick": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch=8, steps=30, warmup=3,
                  eval_every=10, eval_batches=2),
    # CPU default
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch=16, steps=200, warmup=20,
                 eval_every=25, eval_batches=8),
    # a bigger CPU run (tens of minutes) or a quick GPU run
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=32, steps=1000, warmup=100,
                  eval_every=100, eval_batches=16),
    # GPT-2 124M shape (byte-level vocabulary), the report's batch 128 x 2000 steps, warm-up 200
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=128, micro_batch=32,
                 steps=2000, warmup=200, eval_every=100, eval_batches=16, stdlib=True),
}


# ----------------------------------------------------------------------------- run specs

def _parse_value(s: str):
    low = s.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


@dataclass
class RunSpec:
    spec: str  # as written, used as the run's name
    optimizer: str  # adamw | muon | mango
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "RunSpec":
        name, _, rest = spec.partition(":")
        name = name.strip().lower()
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r} in run spec {spec!r}; choose from {OPTIMIZERS}")
        options = {}
        for item in filter(None, (t.strip() for t in re.split(r"[:,]", rest))):
            key, eq, val = item.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not eq:  # a flag
                if key in ("nosplit", "no_split"):
                    options["nosplit"] = True
                elif key in ("normformer", "nf"):
                    options["normformer"] = True
                elif key in ("prenorm", "preln", "pre_ln"):
                    options["normformer"] = False
                else:
                    raise ValueError(f"unknown flag {key!r} in run spec {spec!r}")
                continue
            options[key] = _parse_value(val.strip())
        if "nosplit" in options and name != "mango":
            raise ValueError(f"'nosplit' applies to mango only (run spec {spec!r})")
        return cls(spec=spec, optimizer=name, options=options)


def resolve_lr(run: RunSpec, lr_overrides: dict) -> dict:
    """Peak learning rate(s) of a run: spec lr= > --lr SPEC=... > --lr NAME=... > report default."""
    out = {}
    keys = [("lr", run.optimizer)] + ([("adamw_lr", "muon_adamw")] if run.optimizer == "muon" else [])
    for opt_key, family in keys:
        if opt_key in run.options:
            out[opt_key] = float(run.options[opt_key])
        elif opt_key == "lr" and run.spec in lr_overrides:
            out[opt_key] = lr_overrides[run.spec]
        elif family in lr_overrides:
            out[opt_key] = lr_overrides[family]
        else:
            out[opt_key] = DEFAULT_LR[family]
    return out


# ----------------------------------------------------------------------------- optimizers

def _import_mango():
    try:
        import mango

        mango.presets.mango, mango.presets.muon, mango.param_groups, mango.Mango  # noqa: B018
    except (ImportError, AttributeError) as e:  # pragma: no cover - only while mango is unfinished
        raise RuntimeError(f"the mango package is not usable yet ({e}); run with 'adamw' only") from e
    return mango


def build_optimizer(run: RunSpec, model: GPT, lrs: dict):
    """Return (optimizer, settings dict recorded in the log)."""
    o = dict(run.options)
    o.pop("lr", None)
    o.pop("normformer", None)
    if run.optimizer == "adamw":
        wd = float(o.pop("wd", o.pop("weight_decay", ADAMW_WD)))
        betas = (float(o.pop("beta1", ADAMW_BETAS[0])), float(o.pop("beta2", ADAMW_BETAS[1])))
        if o:
            raise ValueError(f"unknown adamw option(s) {sorted(o)} in {run.spec!r}")
        decay = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
        groups = [
            {"params": [p for _, p in decay], "weight_decay": wd},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ]
        cuda = next(model.parameters()).is_cuda
        opt = torch.optim.AdamW(groups, lr=lrs["lr"], betas=betas, eps=1e-8, **({"fused": True} if cuda else {}))
        settings = dict(lr=lrs["lr"], betas=betas, eps=1e-8, weight_decay=wd,
                        decayed=[n for n, _ in decay], not_decayed=[n for n, _ in no_decay])
        return opt, settings

    mango = _import_mango()
    qkv = model.qkv_heads
    role_lrs = {k: float(o.pop(k)) for k in list(o) if k.startswith("lr_")}
    if "ns" in o:  # a named NS coefficient schedule (mango validates the name)
        o["ns_coefficients"] = o.pop("ns")
    if run.optimizer == "muon":
        o.pop("adamw_lr", None)
        opt = mango.presets.muon(model, qkv_heads=qkv, lr=lrs["lr"], adamw_lr=lrs["adamw_lr"], **o)
        _set_role_lrs(opt, role_lrs, mango)
        return opt, dict(lr=lrs["lr"], adamw_lr=lrs["adamw_lr"], **role_lrs, **o)

    # mango and its ablations
    kw = {}
    nosplit = bool(o.pop("nosplit", False))
    if "beta2" in o:
        b2 = o.pop("beta2")
        if b2 is None:
            kw["preconditioner"] = None
        else:
            kw["beta2"] = float(b2)
    if "offset" in o:
        kw["beta_offset"] = o.pop("offset")
    if "wd" in o:
        kw["weight_decay"] = float(o.pop("wd"))
    kw.update(o)  # any other Mango group setting, validated by mango itself
    if nosplit:  # whole-matrix NS / plain l2 for the fused QKV instead of the head-wise norms
        kw["overrides"] = dict(NOSPLIT_OVERRIDES)
    opt = mango.presets.mango(model, qkv_heads=qkv, lr=lrs["lr"], **kw)
    _set_role_lrs(opt, role_lrs, mango)
    return opt, dict(lr=lrs["lr"], nosplit=nosplit, **role_lrs, **kw)


def _set_role_lrs(opt, role_lrs: dict, mango) -> None:
    """Per-role peak lrs for tuning: ``lr_<role>`` (matrix, qkv_weight, qkv_bias, embedding, head,
    vector_weight, vector_bias) or ``lr_ns`` for every group normalized by Newton-Schulz."""
    known = {f"lr_{r}" for r in mango.config.ROLES} | {"lr_ns"}
    bad = set(role_lrs) - known
    if bad:
        raise ValueError(f"unknown per-role lr option(s) {sorted(bad)}; known: {sorted(known)}")
    for g in opt.param_groups:
        role = g.get("role")
        norm = g.get("norm") or mango.config.ROLE_DEFAULT_NORM.get(role)
        if f"lr_{role}" in role_lrs:
            g["lr"] = role_lrs[f"lr_{role}"]
        elif "lr_ns" in role_lrs and norm in ("ns", "ns_split"):
            g["lr"] = role_lrs["lr_ns"]


def describe_optimizer(opt) -> str | None:
    if isinstance(opt, torch.optim.AdamW):
        return None
    try:
        import mango

        return mango.describe(opt)
    except Exception as e:  # describe is a nicety; never fail a training run on it
        return f"(mango.describe failed: {e})"


# ----------------------------------------------------------------------------- progress

class Progress:
    """One-line progress printer: \\r-updated on a terminal, a few plain lines otherwise."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.stream, self.enabled = total, label, stream or sys.stderr, enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.next_line = 0
        self.width = 0

    def update(self, step: int, text: str):
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step >= self.total
        if self.tty:
            if not done and now - self.last < 0.1:
                return
            self.last = now
            frac = step / max(1, self.total)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            el = now - self.t0
            eta = el / max(step, 1) * (self.total - step)
            line = f"{self.label} [{bar}] {step}/{self.total} {text} {el:.0f}s<{eta:.0f}s"
            pad = max(0, self.width - len(line))
            self.width = len(line)
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
        elif step >= self.next_line or done:
            self.next_line = step + max(1, self.total // 4)
            self.stream.write(f"{self.label} {step}/{self.total} {text} {now - self.t0:.0f}s\n")
            self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- training

def lr_multiplier(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps`` (the report's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, val_batches, amp_ctx) -> float:
    was = model.training
    model.eval()
    tot = 0.0
    for x, y in val_batches:
        with amp_ctx():
            _, loss = model(x, y)
        tot += loss.item()
    model.train(was)
    return tot / len(val_batches)


def train_one(run: RunSpec, cfg: GPTConfig, corpus, args, device, lr_overrides, show_progress=True) -> dict:
    lrs = resolve_lr(run, lr_overrides)
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    fwd = torch.compile(model) if args.compile else model
    opt, settings = build_optimizer(run, model, lrs)
    base_lrs = [g["lr"] for g in opt.param_groups]
    labels = describe_optimizer(opt)  # before the schedule touches the group lrs

    batches = Batches(corpus, args.micro_batch, cfg.block_size, seed=args.seed, device=device)
    val = batches.val_batches(args.eval_batches)
    use_amp = device.type == "cuda" and not args.no_amp
    amp_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    accum = args.batch // args.micro_batch

    train_loss, val_curve, lr_curve = [], [], []
    val_curve.append((0, evaluate(fwd, val, amp_ctx)))
    # throughput and the optimizer's share exclude the first step (lazy set-up, compilation)
    step_time = opt_time = timed_time = timed_opt = 0.0
    diverged = False
    prog = Progress(args.steps, f"{run.spec:>20s}", enabled=show_progress and not args.no_progress)
    ema = None
    stopped, run_start = None, time.perf_counter()
    for step in range(args.steps):
        if args.stop_after is not None and step >= args.stop_after:
            stopped = f"--stop-after {args.stop_after}"
            break
        if args.time_budget is not None and time.perf_counter() - run_start >= args.time_budget:
            stopped = f"--time-budget {args.time_budget:g} s reached after {step} steps"
            break
        mult = lr_multiplier(step, args.steps, args.warmup)
        for g, b in zip(opt.param_groups, base_lrs):
            g["lr"] = b * mult
        lr_curve.append(mult)
        _sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = batches.next()
            with amp_ctx():
                _, loss = fwd(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_time += t2 - t0
        opt_time += t2 - t1
        if step > 0 or args.steps == 1:
            timed_time += t2 - t0
            timed_opt += t2 - t1
        lv = loss_sum.item() / accum
        train_loss.append(lv)
        if not math.isfinite(lv):
            diverged = True
            prog.update(step + 1, f"loss {lv} -- diverged, stopping")
            break
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, evaluate(fwd, val, amp_ctx)))
        tps = (step + 1) * args.batch * cfg.block_size / step_time
        prog.update(step + 1, f"loss {ema:.3f} val {val_curve[-1][1]:.3f} {tps:,.0f} tok/s")
    prog.close()

    n_tail = max(1, len(train_loss) // 20)
    tokens = len(train_loss) * args.batch * cfg.block_size
    timed_tokens = (len(train_loss) - (1 if args.steps > 1 else 0)) * args.batch * cfg.block_size
    return dict(
        name=run.spec,
        optimizer=run.optimizer,
        options={k: v for k, v in run.options.items()},
        normformer=cfg.normformer,
        model=cfg.to_dict(),
        n_params=model.num_params(),
        settings=settings,
        labels=labels,
        steps=len(train_loss),
        tokens=tokens,
        train_loss=train_loss,
        lr_multiplier=lr_curve,
        val_loss=val_curve,
        initial_val_loss=val_curve[0][1],
        final_train_loss=sum(train_loss[-n_tail:]) / n_tail if train_loss else float("nan"),
        final_train_loss_window=n_tail,
        final_val_loss=float("nan") if diverged else val_curve[-1][1],
        best_val_loss=min(v for _, v in val_curve),
        diverged=diverged,
        stopped=stopped,  # None, or why the run ended before --steps (the schedule is still --steps long)
        train_time_s=step_time,
        opt_time_s=opt_time,
        opt_time_share=timed_opt / timed_time if timed_time > 0 else float("nan"),
        tokens_per_s=timed_tokens / timed_time if timed_time > 0 else float("nan"),
    )


# ----------------------------------------------------------------------------- output

def format_table(runs: list[dict]) -> str:
    head = ["run", "model", "peak lr", "train loss", "val loss", "tok/s", "opt time", "time s"]
    rows = []
    for r in runs:
        s = r["settings"]
        lr = f"{s['lr']:g}" + (f" / {s['adamw_lr']:g}" if "adamw_lr" in s else "")
        roles = [f"{k[3:]} {v:g}" for k, v in s.items() if k.startswith("lr_")]
        lr += f" ({', '.join(roles)})" if roles else ""
        rows.append([
            r["name"], "NormFormer" if r["normformer"] else "Pre-LN", lr,
            f"{r['final_train_loss']:.4f}" + (" (div)" if r["diverged"] else ""),
            f"{r['final_val_loss']:.4f}", f"{r['tokens_per_s']:,.0f}",
            f"{100 * r['opt_time_share']:.1f}%", f"{r['train_time_s']:.1f}",
        ])
    w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(cells)) + " |"
    sep = "|" + "|".join("-" * (x + 2) if i < 3 else "-" * (x + 1) + ":" for i, x in enumerate(w)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def _smooth(xs, alpha=0.1):
    out, m = [], None
    for i, x in enumerate(xs):
        if not math.isfinite(x):
            break
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def plot(log: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = log["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    lo, hi = float("inf"), float("-inf")
    for r in runs:
        sm = _smooth(r["train_loss"])
        (ln,) = ax1.plot(range(1, len(sm) + 1), sm, lw=1.4, label=r["name"])
        vs, vv = zip(*r["val_loss"])
        ax2.plot(vs, vv, "o-", ms=3, lw=1.4, color=ln.get_color(), label=r["name"])
        if sm:
            lo = min(lo, min(sm), min(vv))
            hi = max(hi, sm[min(len(sm) - 1, max(1, len(sm) // 8))], vv[min(len(vv) - 1, 1)])
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        pad = 0.05 * (hi - lo)
        for ax in (ax1, ax2):
            ax.set_ylim(lo - pad, hi + pad)
    c = log["config"]
    ax1.set_title("training loss (EMA 0.9)")
    ax2.set_title("validation loss")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = c["model"]
    fig.suptitle(
        f"{'NormFormer' if m['normformer'] else 'Pre-LN'} GPT, {m['n_layer']}L d={m['n_embd']} "
        f"h={m['n_head']} ctx={m['block_size']}, batch {c['batch']}, {c['steps']} steps "
        f"(warm-up {c['warmup']}) -- {c['corpus']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_tag(size: str, normformer: bool, specs: list[str]) -> str:
    tag = size + ("_normformer" if normformer else "")
    if specs == DEFAULT_SPECS:
        return tag
    if specs == DEFAULT_SPECS + ABLATION_SPECS:
        return tag + "_ablations"
    slug = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-") for s in specs)
    if len(slug) > 60:
        slug = slug[:40] + "-" + hashlib.sha1(" ".join(specs).encode()).hexdigest()[:8]
    return f"{tag}_{slug}"


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("specs", nargs="*", help=f"runs to compare (default: {' '.join(DEFAULT_SPECS)})")
    p.add_argument("--ablations", action="store_true",
                   help=f"also run the MANGO ablations: {' '.join(ABLATION_SPECS)}")
    p.add_argument("--size", choices=[s for s in SIZES if s != "quick"], default="tiny")
    p.add_argument("--quick", action="store_true", help="a handful of steps on a micro model (tests)")
    p.add_argument("--normformer", action="store_true", help="NormFormer model (default: Pre-LN GPT-2)")
    p.add_argument("--tie", action="store_true", help="tie lm_head.weight to wte.weight")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                   help="peak learning rate per optimizer: adamw, muon, muon_adamw, mango or a full spec")
    p.add_argument("--data", metavar="PATH", help="train on this text file instead of Python's docs")
    p.add_argument("--stdlib", action="store_true", default=None, help="add the standard library's sources")
    p.add_argument("--no-stdlib", dest="stdlib", action="store_false")
    p.add_argument("--max-bytes", type=int, help="truncate the corpus")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--batch", type=int, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward (gradient accumulation)")
    p.add_argument("--ctx", type=int, help="context length")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--stop-after", type=int, help="run only the first N steps of the --steps schedule (agreement checks)")
    p.add_argument("--time-budget", type=float, help="stop each run after this many seconds (recorded as 'stopped')")
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping for every run (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--out", help=f"results folder (default {LOCAL_RESULTS}, ignored by git)")
    p.add_argument("--update-results", action="store_true",
                   help=f"write to {COMMITTED_RESULTS}, regenerating the committed reference results")
    p.add_argument("--tag", help="results go to OUT/train_TAG.{json,png} (default from size/model/specs)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def results_dir(args) -> str:
    """Where the json/png go: a git-ignored folder unless the committed results are asked for, so
    running the demo leaves a checkout clean."""
    if args.update_results and args.out:
        raise SystemExit("--out and --update-results are exclusive")
    return COMMITTED_RESULTS if args.update_results else (args.out or LOCAL_RESULTS)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.out = results_dir(args)
    size = "quick" if args.quick else args.size
    preset = dict(SIZES[size])
    for k in ("steps", "warmup", "batch", "micro_batch", "eval_every", "eval_batches"):
        if getattr(args, k) is None:
            setattr(args, k, preset.get(k))
    if args.micro_batch is None or args.micro_batch > args.batch:
        args.micro_batch = args.batch
    if args.batch % args.micro_batch:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.stdlib is None:
        args.stdlib = bool(preset.get("stdlib", False)) and args.data is None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    specs = args.specs or list(DEFAULT_SPECS)
    if args.ablations:
        specs += [s for s in ABLATION_SPECS if s not in specs]
    runs = [RunSpec.parse(s) for s in specs]
    lr_overrides = {}
    for item in args.lr:
        name, eq, val = item.partition("=")
        if not eq:
            raise SystemExit(f"--lr expects NAME=VALUE, got {item!r}")
        name = name.strip()
        if name not in DEFAULT_LR and name not in specs:
            raise SystemExit(f"--lr {item!r}: NAME must be one of {sorted(DEFAULT_LR)} or one of the run specs")
        lr_overrides[name] = float(val)

    corpus = make_corpus(args.data, stdlib=args.stdlib, max_bytes=args.max_bytes)
    base_cfg = dict(
        n_layer=args.n_layer or preset["n_layer"], n_head=args.n_head or preset["n_head"],
        n_embd=args.n_embd or preset["n_embd"], block_size=args.ctx or preset["block_size"],
        vocab_size=corpus.vocab_size, tie_weights=args.tie,
    )
    cfg_main = GPTConfig(normformer=args.normformer, **base_cfg)
    n_tok = args.batch * cfg_main.block_size
    with torch.device("meta"):
        n_params = GPT(cfg_main).num_params()
    print(f"corpus: {corpus.description}", flush=True)
    print(f"model: {'NormFormer' if args.normformer else 'Pre-LN'} GPT {cfg_main.n_layer}L d={cfg_main.n_embd} "
          f"heads={cfg_main.n_head} ctx={cfg_main.block_size} ({n_params:,} params) | "
          f"batch {args.batch}x{cfg_main.block_size} = {n_tok:,} tokens/step, {args.steps} steps, warm-up "
          f"{args.warmup} | device {device}{' bf16 autocast' if device.type == 'cuda' and not args.no_amp else ''}"
          f" | {torch.get_num_threads()} threads", flush=True)

    results = []
    for run in runs:
        nf = run.options.get("normformer", args.normformer)
        cfg = GPTConfig(normformer=bool(nf), **base_cfg)
        results.append(train_one(run, cfg, corpus, args, device, lr_overrides))

    log = dict(
        config=dict(
            argv=sys.argv[1:] if argv is None else list(argv), size=size, specs=specs,
            model=cfg_main.to_dict(), corpus=corpus.description, steps=args.steps, warmup=args.warmup,
            batch=args.batch, micro_batch=args.micro_batch, tokens_per_step=n_tok, seed=args.seed,
            clip=args.clip, eval_every=args.eval_every, eval_batches=args.eval_batches,
            schedule="linear warm-up to the peak lr, then linear decay to 0",
            device=str(device), amp="bf16" if device.type == "cuda" and not args.no_amp else None,
            threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
            machine=platform.machine(), lr_overrides=lr_overrides,
        ),
        runs=results,
    )
    print()
    print(format_table(results))
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or default_tag(size, args.normformer, specs)
    jpath = os.path.join(args.out, f"train_{tag}.json")
    with open(jpath, "w") as fh:
        json.dump(log, fh, indent=1)
    print(f"\nlog: {jpath}")
    if not args.no_plot:
        ppath = os.path.join(args.out, f"train_{tag}.png")
        plot(log, ppath)
        print(f"plot: {ppath}")
    return log


if __name__ == "__main__":
    main()
