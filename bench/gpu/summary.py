"""summary.md of a GPU run: one page with every stage's status and the figures the performance contract
(docs/design.md) asks for."""

from __future__ import annotations

from ..fsdp_one_gpu import NS_BOUND
from ..fsdp_one_gpu import markdown as fsdp_markdown
from ..targets import GPU as TARGETS
from ..targets import HOST_US, met

PEER_KEYS = ("muon_adamw", "kj_muon", "emerging_muon", "heavyball_muon", "gram_ns")  # mango's step must beat each


def _largest_ns_bucket_bf16(set_name: str, tied_role: str) -> int | None:
    try:
        from bench.params import resolve_set
        from bench.roofline import ns_buckets

        return max(b.batch * b.block[0] * b.block[1] for b in ns_buckets(resolve_set(set_name, tied_role=tied_role))) * 2
    except Exception:
        return None


def _figures(me: dict, by: dict, floor_ms: float, budget_bytes) -> dict:
    """The performance contract's figures of one mango contender `me` against the others of its set."""
    h = dict(step_ms=me["median_s"] * 1e3, x_floor=me.get("x_floor"), launches=me.get("launches"), floor_ms=floor_ms,
             state_bytes=me.get("state_bytes"), peak_extra_bytes=me.get("peak_extra_bytes"))  # fmt: skip
    for other, name in (("muon_adamw", "vs_muon_adamw"), ("reference", "vs_reference"), ("compile", "vs_compile"), ("torch", "vs_torch"), ("adamw", "vs_adamw")):
        o = by.get(other, {})
        h[name] = o["median_s"] / me["median_s"] if o.get("status") == "ok" and o.get("median_s") and other != me["key"] else None
        if o.get("status") not in (None, "ok"):
            h[name + "_why"] = f"{o['status']}: {o.get('reason', '')}"[:120]
    h["vs_peers"] = {}
    for key in PEER_KEYS:  # speed-up over every peer: > 1 is faster
        o = by.get(key)
        if o is None:
            continue
        ratio = o["median_s"] / me["median_s"] if o.get("status") == "ok" and o.get("median_s") else None
        h["vs_peers"][key] = {"label": o.get("label", key), "ratio": ratio, "ms": o["median_s"] * 1e3 if ratio else None,
                              "why": None if ratio else f"{o.get('status')}: {o.get('reason', '')}"[:160]}  # fmt: skip
    if budget_bytes and me.get("peak_extra_bytes") and me.get("state_bytes"):
        h["memory_budget_bytes"] = me["state_bytes"] + budget_bytes
        h["memory_x_budget"] = me["peak_extra_bytes"] / h["memory_budget_bytes"]
    return h


def headline(step_result: dict) -> list:
    """Per parameter set: the primary mango contender (triton on CUDA) against its peers, the bare
    NS yardstick, the captured step (`graph`) and the capture + replay check."""
    out = []
    tied = (step_result.get("settings") or {}).get("tied_role", "head")
    for s in step_result.get("sets", []):
        by = {o["key"]: o for o in s.get("optimizers", [])}
        key = next((k for k in ("triton", "torch") if by.get(k, {}).get("status") == "ok"), None)
        h = {"set": s["set"]["name"], "title": s["set"].get("title"), "mango": key, "triton_status": by.get("triton", {}).get("status"),
             "triton_reason": by.get("triton", {}).get("reason"),
             "not_run": [{"key": o["key"], "label": o.get("label", o["key"]), "status": o.get("status"), "reason": o.get("reason", "")}
                         for o in s.get("optimizers", []) if o.get("status") != "ok"]}  # fmt: skip
        bare = next((b for b in (s.get("bare_ns") or {}).values() if b.get("median_s")), None)
        if bare:
            h["bare_ns_ms"] = bare["median_s"] * 1e3
        if s.get("graph_check"):
            h["graph_check"] = s["graph_check"]
        floor_ms = s["floor"]["floor_s"] * 1e3
        if key:
            me = by[key]
            budget = ((me.get("memory") or {}).get("budget") or {}).get("budget_bytes")
            if budget is None:  # a result without the memory record: 2 × the largest NS bucket in bf16
                bucket = _largest_ns_bucket_bf16(s["set"]["name"], tied)
                budget = 2 * bucket if bucket else None
            h.update(_figures(me, by, floor_ms, budget))
            if bare:
                h["x_bare_ns"] = me["median_s"] * 1e3 / h["bare_ns_ms"]
            if "compile" in by and by["compile"].get("info", {}).get("compile_s"):
                h["compile_s"] = by["compile"]["info"]["compile_s"]
            g = by.get("triton_graph", {})
            if g.get("status") == "ok" and g.get("median_s"):
                gb = ((g.get("memory") or {}).get("budget") or {}).get("budget_bytes") or budget
                h["graph"] = _figures(g, by, floor_ms, gb)
                h["graph"]["vs_triton"] = me["median_s"] / g["median_s"] if key == "triton" else None
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
    return "met" if met(v, op, t) else "**missed**"


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
    if name == "host":
        rows = [x for x in r.get("rows") or [] if x.get("median_us") is not None]
        return "; ".join(f"{x.get('set')}{_choice(x)}{' capturable' if x.get('capturable') else ''} {x['median_us']:.0f} µs" for x in rows) or r.get("error", "")[-150:]
    if name == "sweep":
        return (f"ARCH_TABLE entry {r['entry']}" + (" (partial)" if r.get("partial") else "")) if r.get("entry") else f"no result: {r.get('error', '')[-150:]}"
    if name == "fsdp":
        x = r.get("result")
        if not x:
            return f"no result: {r.get('error', '')[-150:]}"
        within = "within" if x["within_ns_bound"] else "**outside**"
        return (f"{x['sharded_backend']} vs the plain triton step: max relative difference {max(x['max_rel_diff']):.1e} "
                f"({within} the NS bound {NS_BOUND:g}); step {x['fsdp2_median_ms']:.2f} ms sharded, {x['plain_median_ms']:.2f} ms plain")  # fmt: skip
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
    lines += _host_md(st.get("host"))
    lines += _sweep_md(st.get("sweep"))
    lines += _fsdp_md(st.get("fsdp"))
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
        for name, f in ((h["mango"], h), ("graph replay", h.get("graph"))):
            if f:
                cells = [_fmt(f.get(k), k) + ("" if dry or f.get(k) is None else f" ({_verdict(k, f.get(k))})") for k in TARGETS]
                out.append(f"| {h['set']} | {name} | {f['step_ms']:.2f} | {f['floor_ms']:.2f} | " + " | ".join(cells) + " |")
    out += _peers_md(s["headline"], dry)
    notes, grouped = [], {}
    for h in s["headline"]:
        for o in h.get("not_run", []):  # every contender that did not run says why (time, failure, left out), once per reason
            if o["key"] != "triton":
                grouped.setdefault((o["label"], o["status"], o["reason"]), []).append(h["set"])
        if h.get("mango") != "triton":
            notes.append(f"{h['set']}: mango triton {h.get('triton_status')}: {h.get('triton_reason')}")
        if h.get("compile_s"):
            notes.append(f"{h['set']}: torch.compile took {h['compile_s']:.0f} s")
    notes = [f"{label} on {', '.join(sets)}: {status}: {reason}"[:300] for (label, status, reason), sets in grouped.items()] + notes
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return out + ["", "Targets: the performance contract, docs/design.md (the floor target is for an H100; "
                  "the floor is measured on this device; launches: <= 64 or one graph replay); peak mem / budget: peak "
                  "extra memory over state + 2 × the largest NS bucket in its NS dtype. Full tables: `step.md`.", ""]


def _peers_md(heads: list, dry) -> list:
    """mango's step against every peer package (faster: > 1×), the bare cuBLAS NS, and the captured step."""
    peers = [k for k in PEER_KEYS if any(k in (h.get("vs_peers") or {}) for h in heads)]
    if not peers:
        return []
    label = {k: next(h["vs_peers"][k]["label"] for h in heads if k in (h.get("vs_peers") or {})) for k in peers}
    out = ["", "mango's step against every peer (peer time ÷ mango time: faster where > 1×), the bare batched textbook NS "
           "matmuls in bf16 (cuBLAS on a GPU) and the step captured in a CUDA graph:", "",
           "| set | " + " | ".join(label[k] for k in peers) + " | bare NS ms (mango ÷ bare) | graph replay ms (vs eager) | replay = eager |",
           "| --- | " + " | ".join("---:" for _ in peers) + " | ---: | ---: | --- |"]  # fmt: skip
    for h in heads:
        if not h.get("mango"):
            continue
        cells = []
        for k in peers:
            p = (h.get("vs_peers") or {}).get(k)
            if p is None or p["ratio"] is None:
                cells.append("-" if p is None else p["why"].split(":")[0])
            else:
                cells.append(f"{p['ratio']:.2f}×" + ("" if dry else (" (met)" if p["ratio"] > 1 else " (**missed**)")))
        bare = f"{h['bare_ns_ms']:.2f} ({h['x_bare_ns']:.2f}×)" if h.get("x_bare_ns") else "-"
        g = h.get("graph")
        graph = f"{g['step_ms']:.2f} ({g['vs_triton']:.2f}×)" if g and g.get("vs_triton") else (f"{g['step_ms']:.2f}" if g else "-")
        gc = h.get("graph_check") or {}
        same = ("bit-identical" if gc.get("identical") else f"**differs** (max {gc['eager']['max_abs_diff']:.1e})") if gc.get("status") == "ok" \
            else (gc.get("status") or "-")
        out.append(f"| {h['set']} | " + " | ".join(cells) + f" | {bare} | {graph} | {same} |")
    return out


def _host_md(t) -> list:
    if not t or not t.get("rows"):
        return []
    out = ["## Host time per triton step", "", "Python per step at HF GPT-2 124M, a launch dry run on this machine's CPU "
           f"(`python -m bench.host`); the target is <= {HOST_US} µs.", "",
           f"| set | NS choice | capturable | launches | host µs / step (median) | <= {HOST_US} µs |", "| --- | --- | --- | ---: | ---: | --- |"]  # fmt: skip
    for r in t["rows"]:  # rows as bench.host writes them; a field it no longer writes shows as "-"
        us = r.get("median_us")
        verdict = "-" if us is None else ("met" if us <= HOST_US else "**missed**")
        out.append(f"| {r.get('set')} | {r.get('choice', '-')} | {r.get('capturable')} | {r.get('launches', '-')} | "
                   f"{'-' if us is None else f'{us:.0f}'} | {verdict} |")  # fmt: skip
    return out + [""]


def _choice(row: dict) -> str:
    """bench.host's NS engine choice of a row ("sm_90": an H100/H200's; "cpu": the Triton kernels), where it says."""
    return f" {row['choice']}" if row.get("choice") else ""


def _sweep_md(t) -> list:
    if not t or not t.get("arch_table_line"):
        return []
    part = f" Partial: {'; '.join(t['partial'])}." if t.get("partial") else ""
    return ["## NS engine sweep", "", f"{t['buckets']} NS buckets, every engine in both forms (tiles "
            f"{', '.join('x'.join(map(str, x)) for x in t.get('tiles', []))}); {t.get('not_measured', 0)} timings left "
            f"unmeasured by the budget.{part} The `mango/ns_engine.py:ARCH_TABLE` entry they give (`sweep.json`):", "",
            f"    {t['arch_table_line']}", ""]  # fmt: skip


def _fsdp_md(t) -> list:
    """bench.fsdp_one_gpu's own table: the sharded step against the plain one."""
    if not t or not t.get("result"):
        return []
    return fsdp_markdown(t["result"]).splitlines() + [""]


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
