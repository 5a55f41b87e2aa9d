"""summary.md of a GPU run: one page with every stage's status and the figures the performance contract
(docs/design.md) asks for."""

from __future__ import annotations

# the performance contract's targets (the floor target is stated for an H100), with their column labels
TARGETS = {
    "x_floor": ("× floor", "<=", 1.5),  # step time / roofline floor measured on this device
    "vs_muon_adamw": ("vs Muon+AdamW", ">=", 3.0),  # speed-up vs torch.optim.Muon + AdamW(fused)
    "vs_torch": ("vs mango torch", ">=", 1.0),  # never slower than mango's own torch backend
    "vs_reference": ("vs eager ref.", ">=", 5.0),
    "launches": ("launches", "<=", 64),  # per step, the kernel design's budget
    "memory_x_budget": ("peak mem / budget", "<=", 1.0),  # peak extra / (state + 2 × largest bf16 NS bucket)
}


def _largest_ns_bucket_bf16(set_name: str, tied_role: str) -> int | None:
    try:
        from bench.params import resolve_set
        from bench.roofline import ns_buckets

        return max(b.batch * b.block[0] * b.block[1] for b in ns_buckets(resolve_set(set_name, tied_role=tied_role))) * 2
    except Exception:
        return None


def headline(step_result: dict) -> list:
    """Per parameter set: the primary mango contender (triton on CUDA) against its peers."""
    out = []
    tied = (step_result.get("settings") or {}).get("tied_role", "head")
    for s in step_result.get("sets", []):
        by = {o["key"]: o for o in s.get("optimizers", [])}
        key = next((k for k in ("triton", "torch") if by.get(k, {}).get("status") == "ok"), None)
        h = {"set": s["set"]["name"], "title": s["set"].get("title"), "mango": key, "triton_status": by.get("triton", {}).get("status"),
             "triton_reason": by.get("triton", {}).get("reason"),
             "not_run": [{"key": o["key"], "label": o.get("label", o["key"]), "status": o.get("status"), "reason": o.get("reason", "")}
                         for o in s.get("optimizers", []) if o.get("status") != "ok"]}  # fmt: skip
        if key:
            me = by[key]
            h.update(step_ms=me["median_s"] * 1e3, x_floor=me.get("x_floor"), launches=me.get("launches"),
                     floor_ms=s["floor"]["floor_s"] * 1e3, state_bytes=me.get("state_bytes"), peak_extra_bytes=me.get("peak_extra_bytes"))  # fmt: skip
            for other, name in (("muon_adamw", "vs_muon_adamw"), ("reference", "vs_reference"), ("compile", "vs_compile"), ("torch", "vs_torch"), ("adamw", "vs_adamw")):
                o = by.get(other, {})
                h[name] = o["median_s"] / me["median_s"] if o.get("status") == "ok" and other != key else None
                if o.get("status") not in (None, "ok"):
                    h[name + "_why"] = f"{o['status']}: {o.get('reason', '')}"[:120]
            if "compile" in by and by["compile"].get("info", {}).get("compile_s"):
                h["compile_s"] = by["compile"]["info"]["compile_s"]
            bucket = _largest_ns_bucket_bf16(s["set"]["name"], tied)
            if bucket and me.get("peak_extra_bytes") and me.get("state_bytes"):
                h["memory_budget_bytes"] = me["state_bytes"] + 2 * bucket
                h["memory_x_budget"] = me["peak_extra_bytes"] / h["memory_budget_bytes"]
        out.append(h)
    return out


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "launches":
        return f"{v:.0f}"
    return f"{v:.2f}×"


def _verdict(key: str, v) -> str:
    if v is None:
        return "-"
    _, op, t = TARGETS[key]
    return "met" if (v <= t if op == "<=" else v >= t) else "**missed**"


def _stage_note(name: str, r: dict, dev: dict) -> str:
    if r.get("reason"):
        return r["reason"]
    if name == "env":
        return f"kernels validated on this architecture: {'yes' if dev.get('validated') else 'no'}"
    if name == "tests":
        return _tests_line(r)
    if name == "step":
        runs = "; ".join(f"rc {a['rc']}" + (f" ({a['killed']})" if a.get("killed") else "") for a in r.get("attempts", []))
        return f"{runs}; " + ("results in step.json/md" if r.get("files") else f"no result: {r.get('error', '')[-150:]}")
    if name == "train":
        a = r.get("agreement", {})
        failed = [x["spec"] for x in r.get("runs", []) if "error" in x]
        return (f"runs failed: {', '.join(failed)}; " if failed else "") + f"triton-vs-torch agreement {'passed' if a.get('passed') else '**failed**'}"
    return ""


def _tests_line(t: dict) -> str:
    if t.get("status") == "skipped":
        return t.get("reason", "skipped")
    c = t.get("counts", {})
    s = ", ".join(f"{v} {k}" for k, v in c.items()) or "none ran"
    return f"{s} (of {t.get('selected', 0)} selected)"


def markdown(results: dict) -> str:
    env, st = results.get("env", {}), results.get("stages", {})
    dev = env.get("device", {})
    title = "mango GPU run" + (" — CPU dry run (tiny sizes, kernels under TRITON_INTERPRET=1; no timing claims)" if results.get("dry_run") else "")
    lines = [f"# {title}", "",
             f"**{dev.get('name')}**" + (f" (sm_{dev['capability'].replace('.', '')}, {dev.get('memory_bytes', 0) / 2**30:.0f} GiB)" if dev.get("capability") else "")
             + f" · python {env.get('python')} · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda_runtime')} · "
             f"{results.get('started')} · {results.get('wall_s', 0):.0f} s wall (budget {results.get('budget_s', 0):.0f} s)",
             "", f"Command: `{results.get('command')}`. Overall: **{results.get('status', 'incomplete')}**.", "",
             "| stage | status | s | result |", "| --- | --- | ---: | --- |"]  # fmt: skip
    for name in results.get("plan", []):
        r = st.get(name)
        if r is None:
            lines.append(f"| {name} | not run | - | the run ended before this stage |")
            continue
        note = f"stage raised {r['exception'][:200]}" if r.get("exception") else _stage_note(name, r, dev)
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', 0):.0f} | {note} |")
    lines.append("")
    lines += _tests_md(st.get("tests"))
    lines += _step_md(st.get("step"), results.get("dry_run"))
    lines += _train_md(st.get("train"))
    lines += ["Files: " + ", ".join(f"`{f}`" for f in results.get("files", [])), ""]
    return "\n".join(lines)


def _tests_md(t) -> list:
    if not t or not t.get("problems"):
        return []
    out = ["## Tests that did not pass", ""]
    for p in t["problems"][:12]:
        last = [x for x in p["message"].strip().splitlines() if x.strip()][-1:] or [""]
        out.append(f"- `{p['nodeid']}` **{p['outcome']}**: {last[0][:200]}")
    if len(t["problems"]) > 12:
        out.append(f"- ... {len(t['problems']) - 12} more in results.json")
    return out + [""]


def _step_md(s, dry) -> list:
    if not s or not s.get("headline"):
        return []
    out = ["## Optimizer step against the performance contract" + (" (dry run: code path only)" if dry else ""), "",
           "| set | mango | step ms | floor ms | " + " | ".join(f"{n} ({op} {t:g})" for n, op, t in TARGETS.values()) + " |",
           "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in TARGETS) + " |"]  # fmt: skip
    for h in s["headline"]:
        if not h.get("mango"):
            out.append(f"| {h['set']} | none ran | - | - | " + " | ".join("-" for _ in TARGETS) + " |")
            continue
        cells = [_fmt(h.get(k), k) + ("" if dry else f" ({_verdict(k, h.get(k))})") for k in TARGETS]
        out.append(f"| {h['set']} | {h['mango']} | {h['step_ms']:.2f} | {h['floor_ms']:.2f} | " + " | ".join(cells) + " |")
    notes = []
    for h in s["headline"]:
        for o in h.get("not_run", []):  # every contender that did not run says why (time, failure, left out)
            if o["key"] != "triton":
                notes.append(f"{h['set']} {o['label']}: {o['status']}: {o['reason']}"[:300])
        if h.get("mango") != "triton":
            notes.append(f"{h['set']}: mango triton {h.get('triton_status')}: {h.get('triton_reason')}")
        if h.get("compile_s"):
            notes.append(f"{h['set']}: torch.compile took {h['compile_s']:.0f} s")
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return out + ["", "Targets: the performance contract, docs/design.md (the floor target is for an H100; "
                  "the floor is measured on this device); peak mem / budget: peak extra memory over state + 2 × "
                  "the largest NS bucket in bf16. Full tables: `step.md`.", ""]


def _train_md(t) -> list:
    if not t:
        return []
    c = t.get("config", {})
    m = c.get("model", {})
    out = ["## Training comparison", "",
           f"{m.get('n_layer')}L d={m.get('n_embd')} heads={m.get('n_head')} ctx={m.get('block_size')}, batch {c.get('batch')}, "
           f"{c.get('steps')} steps (warm-up {c.get('warmup')}), {c.get('corpus')}, amp {c.get('amp')}, seed {c.get('seed')}", "",
           f"| run | steps | train loss at step {t.get('common_step', '-')} | final train | final val | tok/s | optimizer share | note |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in t.get("runs", []):
        if "error" in r:
            out.append(f"| {r['spec']} | - | - | - | - | - | - | failed: {r['error'][-150:]} |")
            continue
        note = "diverged" if r.get("diverged") else (r.get("stopped") or "")
        at = r.get("train_loss_at_common_step")
        out.append(f"| {r['spec']} | {r['steps']} | {'-' if at is None else f'{at:.4f}'} | {r['final_train_loss']:.4f} | "
                   f"{r['final_val_loss']:.4f} | {r['tokens_per_s']:,.0f} | {100 * r['opt_time_share']:.1f}% | {note} |")  # fmt: skip
    a = t.get("agreement", {})
    if a.get("max_abs_diff") is not None:
        out += ["", f"Triton vs torch backend, training loss over the first {a['steps_compared']} steps of the mango run: "
                f"max |Δ| {a['max_abs_diff']:.2e} (step {a['worst_step']}), mean {a['mean_abs_diff']:.2e}, step 0 {a['first_step_abs_diff']:.1e}; "
                f"tolerance {a['tolerance']:g}: **{'passed' if a['passed'] else 'failed'}**."]  # fmt: skip
    else:
        out += ["", f"Triton vs torch agreement: **failed** ({a.get('error', 'no data')})."]
    return out + [""]
