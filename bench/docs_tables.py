"""`python -m bench.docs_tables [--check]`: the results tables of README.md and docs/ rendered from the committed JSON.

A table that comes from a result file sits between two HTML comments, which render invisibly:

    <!-- table: KIND SOURCE[,SOURCE...] [key=value ...] -->
    | ... |
    <!-- end table -->

KIND names one of the renderers in RENDERERS, SOURCE a file under bench/results/. Without --check
the text between the markers is rewritten in place; with --check nothing is written and every
region whose text differs from its JSON is listed (exit status 1), so a page and its data cannot
drift apart (tests/test_docs_tables.py runs the check). Tables that do not come from a JSON stay
hand-written and say beside them where their numbers come from.

    python -m bench.docs_tables           # rewrite every marked table
    python -m bench.docs_tables --check   # list the tables that differ from their JSON

Pure file reading: no torch, no benchmark run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from . import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
REGION = re.compile(r"^<!-- table: (?P<spec>[^\n]*?) -->\n(?P<body>.*?)^<!-- end table -->$", re.S | re.M)


def pages() -> list:
    """README.md and every page of docs/, relative to the repository root."""
    return ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


# ----------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------


def table(header: list, align: str, rows: list) -> list:
    """A markdown table; `align` has one letter per column: l (text) or r (numbers) or c."""
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule[a] for a in align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]  # fmt: skip


def ms(seconds, digits=None) -> str:
    """Milliseconds: `digits` decimals, else 0 from 100 ms, 1 from 1 ms, 2 below."""
    if seconds is None:
        return "-"
    v = seconds * 1e3
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def times(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}×"


def mb(nbytes) -> str:
    v = nbytes / 1e6
    return f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def short_dtype(name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(name.replace("torch.", ""), name)


def lr(x: float) -> str:
    """1e-3, 3e-4, 0.01: the way the docs write learning rates."""
    if x >= 0.01:
        return f"{x:g}"
    mant, exp = f"{x:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def verdict(value, op: str, target) -> str:
    return "-" if value is None else ("met" if targets.met(value, op, target) else "**not met**")


def bound(op: str, target) -> str:
    return f"{'≤' if op == '<=' else '≥'} {target:g}"


# contenders in the docs' words; mango's torch-backend variants are named by their settings instead
LABELS = {
    "triton": "mango triton",
    "triton_graph": "mango triton, CUDA-graph replay",
    "triton_one_round": "mango triton, one round (`memory_budget=inf`)",
    "torch": "mango torch",
    "reference": "mango reference (eager)",
    "compile": "`torch.compile(reference)`",
    "muon_adamw": "`torch.optim.Muon` + `AdamW(fused)`",
    "adamw": "`AdamW(fused)` alone (no NS)",
    "kj_muon": "muon-optimizer (Keller Jordan)",
    "heavyball_muon": "heavyball Muon (compiled) + `AdamW(fused)`",
    "emerging_muon": "emerging-optimizers' Muon",
    "gram_ns": "gram-newton-schulz's NS alone",
}
PEER_NS = {"muon_adamw": "its own bf16 NS", "kj_muon": "its own bf16 NS", "heavyball_muon": "its own NS",
           "emerging_muon": "its own NS"}  # fmt: skip


def contender(rec: dict) -> str:
    """A contender's name: a torch-backend variant by the settings it forces."""
    settings = (rec.get("info") or {}).get("ns_settings") or {}
    if rec["key"].startswith("torch_") and settings:
        forced = ", ".join(f"`{k}={_setting(v)}`" for k, v in settings.items())
        return f"mango torch, {forced}"
    return LABELS.get(rec["key"], rec.get("label", rec["key"]))


def _setting(v: str) -> str:
    return v if v.startswith("torch.") else f'"{v}"'


def not_run(rec: dict) -> str:
    """"n/a: why" (the reason's first clause: the rest is advice for the one who runs it)."""
    return f"{rec['status']}: {rec.get('reason', '').split(';')[0]}".rstrip(": ")


# ----------------------------------------------------------------------------------------
# bench.step results (step_*.json, a GPU run's step.json)
# ----------------------------------------------------------------------------------------


def _sets(result: dict, opts: dict) -> list:
    wanted = opts.get("sets")
    sets = result["sets"]
    if wanted:
        by = {s["set"]["name"]: s for s in sets}
        missing = [n for n in wanted if n not in by]
        if missing:
            raise ValueError(f"sets={','.join(wanted)}: {missing} not in the result (it has {sorted(by)})")
        sets = [by[n] for n in wanted]
    return sets


def _by_key(s: dict) -> dict:
    return {o["key"]: o for o in s["optimizers"]}


def set_title(s: dict) -> str:
    """The set's title and what it carries: tensors, and where the vocabulary matrix goes."""
    cfg, roles = s["set"].get("config") or {}, s["set"].get("roles") or {}
    head = ""
    if cfg.get("vocab_size", 0) > 10_000:
        if "head" in roles:
            head = f", its {cfg['vocab_size']}×{cfg['n_embd']} vocabulary matrix under NS (role `head`)"
        else:
            head = ", tied embedding (no NS on the vocabulary matrix)"
    return f"{s['set']['title']}, {s['set']['tensors']} tensors{head}"


def render_step(results: list, opts: dict) -> list:
    """Per set, each contender's median step, × the roofline floor and the ratio to the set's primary
    contender (mango torch on a CPU, mango triton on a GPU); `bare=yes` adds the bare bf16 NS matmuls."""
    [r] = results
    digits = int(opts["digits"][0]) if "digits" in opts else None
    launches = opts.get("launches") == ["yes"]
    rows, primary_label = [], None
    for s in _sets(r, opts):
        by = _by_key(s)
        prim = by[s["primary"]]
        primary_label = primary_label or contender(prim)
        floor_s = s["floor"]["floor_s"]
        keys = opts.get("rows") or [o["key"] for o in s["optimizers"]]
        first = True
        for key in keys:
            o = by.get(key)
            if o is None:
                continue
            cells = [set_title(s) if first else "", contender(o)]
            if o.get("status") == "ok":
                cells += [ms(o["median_s"], digits), times(o["median_s"] / floor_s, 1)]
                cells += [str(o.get("launches", "-"))] if launches else []
                cells += [times(o["median_s"] / prim["median_s"])]
            else:
                cells += [not_run(o), "-"] + (["-"] if launches else []) + ["-"]
            rows.append(cells)
            first = False
        bare = (s.get("bare_ns") or {}).get("bfloat16")
        if opts.get("bare") == ["yes"] and bare:
            rows.append(["", "*bare bf16 NS matmuls alone*", ms(bare["median_s"], digits), times(bare["median_s"] / floor_s, 1)]
                        + (["-"] if launches else []) + [times(bare["median_s"] / prim["median_s"])])  # fmt: skip
    header = ["set", "optimizer", "step ms", "× floor"] + (["launches"] if launches else []) + [f"time ÷ {primary_label}"]
    return table(header, "ll" + "r" * (len(header) - 2), rows)


def render_cpu_targets(results: list, opts: dict) -> list:
    """The CPU targets a run carried, against the figure that run was held to and the performance contract's."""
    [r] = results
    ids = opts.get("ids") or ["overhead", "ns"]
    titles = {s["set"]["name"]: s["set"]["title"] for s in r["sets"]}
    rows = []
    for t in r["targets"]:
        if t["id"] not in ids:
            continue
        op = "<=" if t["better"] == "lower" else ">="
        now = targets.CPU[t["id"]]
        value = t.get("value")
        rows.append([titles.get(t["set"], t["set"]), t["name"], "-" if value is None else f"**{value:.2f}×**",
                     f"{bound(op, t['target'])}× ({verdict(value, op, t['target'])})",
                     f"{bound(op, now['target'])}× ({verdict(value, op, now['target'])})"])  # fmt: skip
    return table(["set", "figure", "measured", "held to in this run", "performance contract"], "llrrr", rows)


def _ns_floor_ms(buckets: list, method: str, rates: dict, state_s: float) -> tuple:
    """Floor of a method over the set's NS buckets: FLOPs at the rate of the dtype each runs in + state traffic."""
    ns_s, dtypes = 0.0, []
    for b in buckets:
        form = b["auto"] if method == "auto" else method
        dtype = b[f"{form}_dtype"]
        ns_s += b[f"{form}_flops"] / rates["matmul_flops"][dtype]
        dtypes.append(dtype)
    return ns_s + state_s, sorted(set(dtypes))


def render_ns_flops(results: list, opts: dict) -> list:
    """NS FLOPs per method (textbook, Gram, what "auto" picks) and their floors, per NS dtype setting;
    `rates=FILE` takes the matmul rates and copy bandwidth of another run of the same machine."""
    r = results[0]
    rates = load(opts["rates"][0])["rates"] if "rates" in opts else r["rates"]
    [s] = _sets(r, opts)
    state_s = s["floor"]["state_bytes"] / rates["copy_bytes_per_s"]
    rows = []
    for m in s["ns_methods"].values():
        f = m["flops"]
        cells = [f"`ns_dtype={_setting(m['settings']['ns_dtype'])}`" if m["settings"]["ns_dtype"] != "auto" else '`ns_dtype="auto"`']
        cells += [f"{f[k] / 1e9:.1f}" for k in ("textbook", "gram", "auto")] + [f"{f['auto'] / f['textbook']:.3f}"]
        for method in ("textbook", "gram", "auto"):
            floor_s, dtypes = _ns_floor_ms(m["buckets"], method, rates, state_s)
            cells.append(f"{ms(floor_s)} ({'/'.join(short_dtype(d) for d in dtypes)})")
        rows.append(cells)
    return table(["NS dtype", "textbook GFLOP", "Gram GFLOP", "auto GFLOP", "auto ÷ textbook", "textbook floor ms",
                  "Gram floor ms", "auto floor ms"], "lrrrrrrr", rows)  # fmt: skip


def render_ns_yardstick(results: list, opts: dict) -> list:
    """Every torch-backend variant's step against the bare batched textbook NS in its own NS dtype
    (the bench's NS-method yardstick); `also=KEYS` adds contenders with their step time only."""
    [r] = results
    [s] = _sets(r, opts)
    by = _by_key(s)
    t = next(t for t in s["targets"] if t["id"] == "ns_gram")
    goal = t["target"]
    rows = []
    for key in opts.get("rows") or list(t["variants"]):
        v = t["variants"][key]
        rows.append([contender(by[key]), ms(v["step_s"]), f"{ms(v['bare_ns_s'])} ({short_dtype(v['bare_ns_dtype'])})",
                     times(v["value"]), "yes" if v["value"] <= goal else "no"])  # fmt: skip
    for key in opts.get("also", []):
        o = by[key]
        rows.append([contender(o), ms(o["median_s"]) if o.get("status") == "ok" else not_run(o), "", "", ""])
    return table(["contender", "step ms", "bare textbook NS ms", "step ÷ bare NS", f"≤ {goal:g}×"], "lrrrc", rows)


def render_memory(results: list, opts: dict) -> list:
    """Optimizer-owned memory per contender (MB, and × the fp32 parameter bytes) against the memory budget."""
    [r] = results
    [s] = _sets(r, opts)
    by = _by_key(s)
    rows = []
    for key in opts.get("rows") or list(by):
        o = by[key]
        m = o["memory"]
        x = m["x_params"]

        def cell(field, share):
            return f"{mb(m[field])} ({x[share]:.2f}×)" if m[field] else "0"

        budget = m.get("budget")
        rows.append([contender(o), cell("state_bytes", "state"), cell("persistent_bytes", "persistent"),
                     cell("peak_transient_bytes", "peak_transient"), cell("extra_beyond_state_bytes", "extra_beyond_state"),
                     f"{mb(budget['budget_bytes'])} ({short_dtype(budget['dtype'])})" if budget else "-",
                     times(m.get("extra_vs_budget")) if budget else "-"])  # fmt: skip
    return table(["contender", "state", "persistent (workspace)", "peak transient", "extra beyond state", "memory budget",
                  "extra ÷ budget"], "lrrrrrr", rows)  # fmt: skip


WHY = {"ns_dtype set, measured": "dtype forced, form measured", "ns_dtype set, ns_method set": "forced"}
FORMS = {"textbook": "textbook", "gram": "Gram"}


def _why(why: str, rates: dict) -> str:
    """mango.ns_engine's reason for a bucket's choice, in words; "measured" with the rates it measured."""
    if why == "measured":
        f = {k: v / 1e12 for k, v in rates["matmul_flops"].items()}
        return f"measured: bf16 {f['bfloat16']:.{1 if f['bfloat16'] >= 1 else 2}f} TFLOP/s vs fp32 {f['float32']:.2f} here"
    return WHY.get(why, why)


def _reasons(choices: list, rates: dict) -> list:
    """The distinct reasons behind a contender's buckets, in words: forced settings once each, and the
    size classes measured on this CPU as one "measured at ..." (a reason may join several by "; ")."""
    classes, others = [], []
    for c in choices:
        for part in c["why"].split("; "):
            m = re.match(r"measured on .* at (\S+)$", part)
            if m:
                classes.append(m.group(1).replace("x", "×"))
            else:
                others.append(_why(part, rates))
    whys = sorted(dict.fromkeys(others))
    if classes:
        whys.append("measured at " + ", ".join(dict.fromkeys(sorted(classes))))
    return whys


def ns_choice_summary(choices: list, rates: dict) -> str:
    """Each NS bucket's form and dtype, grouped: "bf16 textbook on every bucket (measured ...)"."""
    groups = {}
    for c in choices:
        groups.setdefault((short_dtype(c["dtype"]), FORMS.get(c["method"], c["method"])), []).append("×".join(map(str, c["block"])))
    if len(groups) == 1:
        [(dtype, method)] = groups
        text = f"{dtype} {method} on every bucket"
    else:
        text = "; ".join(f"{dtype} {method} on {', '.join(dict.fromkeys(blocks))}" for (dtype, method), blocks in groups.items())
    return f"{text} ({'; '.join(_reasons(choices, rates))})"


def render_ns_choices(results: list, opts: dict) -> list:
    """Each contender's NS per bucket (engine form and dtype, and what decided it), its step, and the
    bare textbook NS in its NS dtype from the same rounds."""
    [r] = results
    [s] = _sets(r, opts)
    by = _by_key(s)
    variants = next((t.get("variants") or {} for t in s["targets"] if t["id"] == "ns_gram"), {})
    rows = []
    for key in opts.get("rows") or list(by):
        o = by[key]
        if o.get("status") != "ok":
            rows.append([contender(o), not_run(o), "-", "", ""])
            continue
        choices = (o.get("info") or {}).get("ns_choices")
        what = ns_choice_summary(choices, r["rates"]) if choices else PEER_NS.get(key, "")
        v = variants.get(key) if key != "muon_adamw" else None
        rows.append([contender(o), what, ms(o["median_s"]), f"{ms(v['bare_ns_s'])} ({short_dtype(v['bare_ns_dtype'])})" if v else "",
                     times(v["value"]) if v else ""])  # fmt: skip
    return table(["contender", "NS per bucket (what decided it)", "step ms", "bare textbook NS in its dtype, ms",
                  "step ÷ bare NS"], "llrrr", rows)  # fmt: skip


def _gpu_figures(s: dict, key: str) -> dict:
    """The performance contract's figures of one mango contender on a GPU set, from its step.json."""
    by = _by_key(s)
    me = by[key]
    t = me["median_s"]
    out = {"x_floor": me.get("x_floor"), "launches": me.get("launches"),
           "memory_x_budget": (me.get("memory") or {}).get("extra_vs_budget")}  # fmt: skip
    for other, name in (("muon_adamw", "vs_muon_adamw"), ("torch", "vs_torch"), ("reference", "vs_reference")):
        o = by.get(other) or {}
        out[name] = o["median_s"] / t if o.get("status") == "ok" else (o.get("status") or "not run")
    return out


def render_gpu_contract(results: list, opts: dict) -> list:
    """mango triton's step on each set of a GPU run against the performance contract's GPU targets."""
    [r] = results
    rows = []
    for s in _sets(r, opts):
        by = _by_key(s)
        if by.get("triton", {}).get("status") != "ok":
            rows.append([s["set"]["name"], not_run(by.get("triton", {"status": "not run"}))] + ["-"] * (len(targets.GPU) + 1))
            continue
        f = _gpu_figures(s, "triton")
        cells = [f"`{s['set']['name']}`", ms(by["triton"]["median_s"], 2), ms(s["floor"]["floor_s"], 2)]
        for k, (_, op, goal) in targets.GPU.items():
            v = f[k]
            if isinstance(v, str):
                cells.append(v)
            elif v is None:
                cells.append("-")
            else:
                cells.append(f"{v:.0f} ({verdict(v, op, goal)})" if k == "launches" else f"{v:.2f}× ({verdict(v, op, goal)})")
        rows.append(cells)
    labels = dict(targets.GPU, memory_x_budget=("extra memory ÷ budget",) + targets.GPU["memory_x_budget"][1:])
    header = ["set", "mango triton ms", "floor ms"] + [f"{label} ({bound(op, goal)})" for label, op, goal in labels.values()]
    return table(header, "l" + "r" * (len(header) - 1), rows)


def render_gpu_step(results: list, opts: dict) -> list:
    """A GPU run's own step stage, one row per set: each named contender's median step (ms) and the floor."""
    [r] = results
    keys = opts.get("cols") or ["triton", "torch", "muon_adamw", "reference"]
    rows = []
    for s in _sets(r, opts):
        by = _by_key(s)
        cells = [set_title(s)]
        for key in keys:
            o = by.get(key) or {"status": "not run"}
            cells.append(f"{ms(o['median_s'], 2)} ms" if o.get("status") == "ok" else _short_reason(o))
        rows.append(cells + [f"{ms(s['floor']['floor_s'], 2)} ms"])
    return table(["set (bench's own, as `bench.step` builds it)", *(LABELS[k] for k in keys), "roofline floor"],
                 "l" + "r" * (len(keys) + 1), rows)  # fmt: skip


def _short_reason(o: dict) -> str:
    reason = o.get("reason", "")
    if "time-budget" in reason:
        return f"{o['status']} (the step stage's time budget)"
    if "compile" in reason and "timeout" in reason:
        return f"{o['status']} (did not compile in time)"
    return o["status"]


# ----------------------------------------------------------------------------------------
# a GPU run's results.json
# ----------------------------------------------------------------------------------------

TRAIN_NAMES = {"adamw": "AdamW", "muon": "Muon (+ AdamW on the rest)", "mango:backend=triton": "MANGO (triton backend)"}


def render_gpu_train(results: list, opts: dict) -> list:
    """The GPU run's training comparison: final validation loss per optimizer, the best in bold."""
    [r] = results
    runs = [x for x in r["stages"]["train"]["runs"] if "final_val_loss" in x]
    best = min(x["final_val_loss"] for x in runs)
    rows = [[bold(TRAIN_NAMES.get(x["spec"], x["spec"]), x["final_val_loss"] == best), str(x["steps"]),
             bold(f"{x['final_val_loss']:.3f}", x["final_val_loss"] == best), f"{x['tokens_per_s']:,.0f}"] for x in runs]  # fmt: skip
    return table(["optimizer", "steps", "validation loss", "tokens/s"], "lrrr", rows)


# ----------------------------------------------------------------------------------------
# bench.train results (train_*.json)
# ----------------------------------------------------------------------------------------

OPTION_WORDS = {"beta2": {None: "no preconditioning"}, "offset": {None: "no offset momentum"}, "nosplit": {True: "no head split"}}


def run_label(run: dict) -> str:
    """"adamw (1e-3)", "muon (0.01 / 3e-4)", "mango, no offset momentum": a run by its optimizer and what it changes."""
    if run["options"]:
        words = [OPTION_WORDS.get(k, {}).get(v, f"{k}={v}") for k, v in run["options"].items()]
        return f"{run['optimizer']}, {', '.join(words)}"
    st = run["settings"]
    rates = [lr(st["lr"])] + ([lr(st["adamw_lr"])] if "adamw_lr" in st else [])
    return f"{run['optimizer']} ({' / '.join(rates)})"


def render_train_final(results: list, opts: dict) -> list:
    """One bench.train run: final train and validation loss per run; `bold=NAME` marks one run."""
    [r] = results
    marked = opts.get("bold", [])
    rows = [[bold(x, run["name"] in marked) for x in (run_label(run), f"{run['final_train_loss']:.3f}", f"{run['final_val_loss']:.3f}")]
            for run in r["runs"]]  # fmt: skip
    return table(["run", "final train", "final val"], "lrr", rows)


def render_train_seeds(results: list, opts: dict) -> list:
    """Several bench.train runs of the same specs with different seeds: final validation loss per seed,
    the best of each seed in bold; runs missing from a seed show "-"."""
    names = list(dict.fromkeys(run["name"] for r in results for run in r["runs"]))
    by = [{run["name"]: run for run in r["runs"]} for r in results]
    best = [min(run["final_val_loss"] for run in b.values()) for b in by]
    rows = []
    for name in names:
        run = next(b[name] for b in by if name in b)
        schedule = run["settings"].get("ns_coefficients")
        cells = [run["optimizer"], f"`{schedule}`" if schedule else "Muon's triple, 5 steps (default)"]
        for b, low in zip(by, best):
            v = b[name]["final_val_loss"] if name in b else None
            cells.append("-" if v is None else bold(f"{v:.4f}", v == low))
        rows.append(cells)
    return table(["run", "NS schedule", *(f"seed {r['config']['seed']}" for r in results)], "ll" + "r" * len(results), rows)


# ----------------------------------------------------------------------------------------
# bench.schedules results (schedules_*.json)
# ----------------------------------------------------------------------------------------


def render_schedules(results: list, opts: dict) -> list:
    """σ range of each schedule's output at its length, per input, form and dtype, and its time; the
    best schedule (the result's own criterion) in bold."""
    [r] = results
    inputs = {(i["shape"], i["kind"]): i for i in r["inputs"]}
    timing = {t["schedule"]: t for t in r["timing"]}
    best = r["best"]["schedule"]
    cols = [(("mlp", "gaussian"), "textbook/float64"), (("mlp", "gaussian"), "textbook/bfloat16"),
            (("mlp", "gaussian"), "gram/float32"), (("mlp", "gaussian"), "gram/float16"),
            (("mlp", "gradient"), "textbook/float64"), (("head block", "gaussian"), "textbook/float64")]  # fmt: skip
    rows = []
    for name in opts.get("schedules") or list(r["schedules"]):
        steps = r["schedules"][name]["default_steps"]
        cells = [bold(f"`{name}`", name == best), str(steps)]
        for n, (inp, variant) in enumerate(cols):
            sigma = inputs[inp]["rows_by_schedule"][name][variant][steps - 1]
            cells.append(bold(f"[{sigma['min']:.3f}, {sigma['max']:.3f}]", name == best and n == 0))
        t = timing[name]
        cells += [f"{ms(t[f'{v}_s'])} ms" for v in ("textbook/bfloat16", "textbook/float32", "gram/float32")]
        rows.append(cells)
    mlp, head = (f"{inputs[(k, 'gaussian')]['rows']}×{inputs[(k, 'gaussian')]['cols']}" for k in ("mlp", "head block"))
    shape = r["timing"][0]["shape"].replace("x", "×")
    header = ["schedule", "steps", f"Gaussian {mlp}, fp64", "bf16 textbook", "fp32 Gram", "fp16 Gram",
              f"gradient-like {mlp}, fp64", f"Gaussian {head}, fp64", f"time: bf16 textbook, {shape}", "fp32 textbook",
              "fp32 Gram"]  # fmt: skip
    return table(header, "lr" + "l" * 6 + "rrr", rows)


# ----------------------------------------------------------------------------------------
# bench.comm results (comm_*.json)
# ----------------------------------------------------------------------------------------

COLLECTIVES = {  # bench.comm's collective names, as the docs count them
    "all_reduce: sums of squares": ("all-reduce", "all-reduces", " (norms)"),
    "all_to_all: NS gather": ("`all_to_all` pair", "`all_to_all` pairs", ""),
    "all_reduce: NS Gram": ("Gram all-reduce", "Gram all-reduces", " (head)"),
    "all_gather: NS results": ("all-gather", "all-gathers", ""),
}


def collectives_text(calls: dict, notes: bool = True) -> str:
    """"1 all-reduce (norms) + 3 `all_to_all` pairs": the NS scatter is the gather's pair, so not counted twice."""
    parts = []
    for name, n in calls.items():
        if name == "all_to_all: NS scatter":
            continue
        one, many, note = COLLECTIVES.get(name, (name, name, ""))
        parts.append(f"{n} {one if n == 1 else many}{note if notes else ''}")
    return " + ".join(parts)


def render_comm_measured(results: list, opts: dict) -> list:
    """bench.comm's measured runs (one file per preset and setting): collectives, bytes and NS balance per step."""
    rows, previous = [], None
    for r in results:
        c = r["config"]
        calls = {k: v["calls"] for k, v in r["collectives_per_step"].items()}
        text = collectives_text(calls)
        if calls.keys() == {"all_reduce: sums of squares"}:  # no NS: say how small it is
            text = f"1 all-reduce ({r['collectives_per_step']['all_reduce: sums of squares']['sent_MB_total'] * 1e3:.0f} kB)"
        label = c["preset"] + (f", tied tensor labelled {c['tied_role']}" if c["tied_role"] != "head" else
                               " (head NS)" if "all_reduce: NS Gram" in calls else "")  # fmt: skip
        has_ns = r["ns_balance"]["total_GFLOP"] > 0
        sent = r["max_rank_sent_MB"]
        rows.append([label, short_dtype(c["ns_dtype"].split("(")[-1].rstrip(")")) if has_ns else "—",
                     "same" if text == previous else text, f"{sent:.1f}" if sent >= 0.05 else "≈0",
                     f"{r['total_sent_MB']:.1f}" if sent >= 0.05 else "≈0",
                     f"{r['ns_balance']['max_over_mean']:.3f}" if has_ns else "—"])  # fmt: skip
        previous = text
    return table(["preset (GPT-2 124M)", "NS operands", "collectives per step", "sent per rank (MB)", "sent, all ranks (MB)",
                  "NS FLOPs max/mean"], "lllrrr", rows)  # fmt: skip


MODELS = {"gpt2": "GPT-2 124M", "llama-1b": "Llama-3.2-1B shape (tied embedding)"}
GPT2_TIED = {"head": "tied tensor as head (with NS)", "embedding": "tied tensor as embedding"}


def render_comm_simulated(results: list, opts: dict) -> list:
    """bench.comm --simulate: per model and mode, collectives, the busiest rank's bytes against the
    minimum and its share of the NS work, at every simulated world size ("2 / 4 / 8"); `tied=ROLE,...`
    names the role each file gave GPT-2's tied tensor (its --tied-role)."""
    rows = []
    for r, tied in zip(results, opts.get("tied") or ["head"] * len(results)):
        for model, recs in r.items():
            first = True
            for mode in dict.fromkeys(x["mode"] for x in recs):
                xs = [x for x in recs if x["mode"] == mode]
                texts = list(dict.fromkeys(collectives_text(x["collectives"], notes=False) for x in xs))
                name = MODELS.get(model, model) + (f", {GPT2_TIED[tied]}" if model == "gpt2" else "")
                rows.append([name if first else "", "FSDP2" if mode == "fsdp2" else "DDP-split",
                             " / ".join(str(x["world"]) for x in xs), " / ".join(texts),
                             " / ".join(_mb_short(max(x["sent"])) for x in xs),
                             " / ".join(_mb_short(x["sent_min"][_busiest(x)]) for x in xs),
                             " / ".join(f"{max(x['ns_flops']) / x['ns_total']:.3f}" for x in xs)])  # fmt: skip
                first = False
    return table(["model", "mode", "ranks", "collectives per step", "sent (MB)", "minimum (MB)", "NS share of the busiest rank"],
                 "lllllll", rows)  # fmt: skip


def _busiest(rec: dict) -> int:
    """The rank that sends most (the first of them), as bench.comm reports it."""
    return rec["sent"].index(max(rec["sent"]))


def _mb_short(nbytes: float) -> str:
    v = nbytes / 1e6
    return f"{v:.0f}" if v >= 400 else f"{v:.1f}"


# ----------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------

RENDERERS = {  # kind: (renderer, the options it takes)
    "step": (render_step, {"sets", "rows", "bare", "digits", "launches"}),
    "cpu-targets": (render_cpu_targets, {"ids"}),
    "ns-flops": (render_ns_flops, {"sets", "rates"}),
    "ns-yardstick": (render_ns_yardstick, {"sets", "rows", "also"}),
    "memory": (render_memory, {"sets", "rows"}),
    "ns-choices": (render_ns_choices, {"sets", "rows"}),
    "gpu-contract": (render_gpu_contract, {"sets"}),
    "gpu-step": (render_gpu_step, {"sets", "cols"}),
    "gpu-train": (render_gpu_train, set()),
    "train-final": (render_train_final, {"bold"}),
    "train-seeds": (render_train_seeds, set()),
    "schedules": (render_schedules, {"schedules"}),
    "comm-measured": (render_comm_measured, set()),
    "comm-simulated": (render_comm_simulated, {"tied"}),
}


def load(source: str) -> dict:
    path = os.path.join(RESULTS, source)
    if not os.path.isfile(path):
        raise ValueError(f"no result file bench/results/{source}")
    with open(path) as f:
        return json.load(f)


def parse_spec(spec: str) -> tuple:
    """"KIND SOURCE[,SOURCE] key=a,b ..." -> (kind, [sources], {key: [a, b]})."""
    kind, sources, *rest = spec.split()
    opts = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} is not key=value")
        opts[key] = value.split(",")
    if kind not in RENDERERS:
        raise ValueError(f"unknown table kind {kind!r} (known: {', '.join(RENDERERS)})")
    unknown = set(opts) - RENDERERS[kind][1]
    if unknown:
        raise ValueError(f"{kind} takes no option {', '.join(sorted(unknown))} (it takes: {', '.join(sorted(RENDERERS[kind][1])) or 'none'})")
    return kind, sources.split(","), opts


def render(spec: str) -> str:
    kind, sources, opts = parse_spec(spec)
    return "\n".join(RENDERERS[kind][0]([load(s) for s in sources], opts)) + "\n"


def regions(text: str) -> list:
    """(line number, spec, body) of every marked table of a page."""
    return [(text.count("\n", 0, m.start()) + 1, m.group("spec"), m.group("body")) for m in REGION.finditer(text)]


def refresh(text: str, page: str) -> tuple:
    """The page with every marked table re-rendered, and the regions that changed ("page:line spec")."""
    changed = []

    def one(m):
        line = text.count("\n", 0, m.start()) + 1
        try:
            body = render(m.group("spec"))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{page}:{line}: <!-- table: {m.group('spec')} -->: {type(e).__name__}: {e}") from e
        if body != m.group("body"):
            changed.append(f"{page}:{line}: {m.group('spec')}")
        return f"<!-- table: {m.group('spec')} -->\n{body}<!-- end table -->"

    return REGION.sub(one, text), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.docs_tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; list every table that differs from its JSON (exit 1)")
    args = p.parse_args(argv)
    stale, count = [], 0
    for page in pages():
        path = os.path.join(ROOT, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        count += len(regions(text))
        new, changed = refresh(text, page)
        stale += changed
        if changed and not args.check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    verb = "differ from their JSON" if args.check else "rewritten"
    print(f"{count} marked tables, {len(stale)} {verb}" + "".join(f"\n  {s}" for s in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
