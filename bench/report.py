"""Output of bench.step: one JSON file per run, a markdown report, and a PNG bar chart.

    python -m bench.report bench/results/step_cpu_<time>.json    # redraw .md/.png, print the report

    step_<device>_<UTC time>.json   every figure of the run (device, versions, rates, per set and
                                    optimizer: step times, floor multiples, launches, memory, NS
                                    buckets, stages, targets)
    step_<device>_<UTC time>.md     the markdown tables printed at the end of the run
    step_<device>_<UTC time>.png    step time per optimizer and set, with the roofline floor
"""

from __future__ import annotations

import json
import os

__all__ = ["write", "markdown", "plot", "REQUIRED_FIELDS", "OPTIMIZER_FIELDS"]

# What every JSON result has (tests/test_bench.py checks these).
REQUIRED_FIELDS = ("schema", "created", "command", "quick", "device", "versions", "rates", "timing", "settings", "sets", "targets")
SET_FIELDS = ("set", "floor", "optimizers", "primary", "ns_buckets", "targets")
OPTIMIZER_FIELDS = ("key", "label", "status")
OK_FIELDS = ("median_s", "min_s", "steps", "times_s", "x_floor", "launches", "launches_source", "profiler",
             "state_bytes", "peak_extra_bytes", "memory_source")  # fmt: skip


def _stem(result) -> str:
    t = result["created"].replace("-", "").replace(":", "").replace("+0000", "").replace("+00:00", "")
    dev = result["device"]["type"]
    return f"step_{dev}{'_quick' if result.get('quick') else ''}_{t}"


def write(result: dict, out_dir: str, png: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, _stem(result))
    paths = {"json": stem + ".json", "md": stem + ".md"}
    if png:
        paths["png"] = stem + ".png"
    result = dict(result, files={k: os.path.basename(v) for k, v in paths.items()})
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result) + "\n")
    if png:
        plot(result, paths["png"])
    return paths


# ----------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------


def _ms(s) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _x(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}×"


def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:.1f}"


def _rate(v, unit=1e12, suffix=" TFLOP/s") -> str:
    return "-" if not v else f"{v / unit:.3g}{suffix}"


def _device_line(result) -> str:
    d, v = result["device"], result["versions"]
    th = d.get("threads", {})
    extra = f", {th.get('threads')} threads" if d["type"] == "cpu" else ""
    if th.get("reason"):
        extra += f" ({th['reason']})"
    if d["type"] == "cpu" and th.get("loadavg_1min") is not None:
        end = th.get("loadavg_end")
        extra += f"; load average {th['loadavg_1min']:.1f} at start" + (f", {end[0]:.1f} at end" if end else "")
    return (f"**Device:** {d.get('name')} ({d['type']}{extra}) · torch {v.get('torch')} · triton {v.get('triton')} · "
            f"python {v.get('python')} · {result['created']}")  # fmt: skip


def markdown(result: dict) -> str:
    r = result["rates"]
    lines = []
    title = "mango optimizer step benchmark" + (" (--quick: code-path check, no timing claims)" if result.get("quick") else "")
    lines += [f"## {title}", "", _device_line(result), ""]
    if result.get("partial"):
        lines += [f"**Partial result:** {result['partial']} (written after each set; the run did not finish).", ""]
    mm = ", ".join(f"{k} {_rate(v)}" for k, v in r["matmul_flops"].items() if isinstance(v, float))
    lines += [f"Measured here: matmul {mm}; copy {r['copy_bytes_per_s'] / 1e9:.1f} GB/s. "
              f"Floor = NS FLOPs (symmetric) / {r['peak_matmul_dtype']} matmul rate + state bytes / copy bandwidth. "
              f"Command: `{result['command'].strip()}`", ""]  # fmt: skip
    for s in result["sets"]:
        lines += _set_markdown(result, s)
    if result.get("targets"):
        lines += ["### CPU targets of the performance contract (ns_gram: the bench's own NS-method yardstick)", "",
                  "| set | figure | value | target | met | with bf16 NS (torch_bf16) | dominant stage of mango torch step |",
                  "| --- | --- | ---: | ---: | :---: | ---: | --- |"]  # fmt: skip
        for t in result["targets"]:
            op = ">=" if t["better"] == "higher" else "<="
            val = "-" if t["value"] is None else f"{t['value']:.2f}×"
            met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
            dom = ""
            if t.get("stage_fractions"):
                dom = ", ".join(f"{k} {v:.0%}" for k, v in sorted(t["stage_fractions"].items(), key=lambda kv: -kv[1]))
            bf = "-" if t.get("value_bf16_ns") is None else f"{t['value_bf16_ns']:.2f}×"
            lines.append(f"| {t['set']} | {t['name']} | {val} | {op} {t['target']}× | {met} | {bf} | {dom} |")
        lines.append("")
    lines += [
        "Step: median over timed steps after warm-up; gradients refreshed with random data before each step, outside "
        "the timed span. × floor: step time / roofline floor of the set on this device. vs mango: step time / the mango "
        "step (triton on CUDA, else torch) measured in the same run. Launches: mango_kernels' counter (triton), profiler "
        "CUDA kernels (GPU), or top-level aten ops dispatched (CPU). Memory: state bytes; peak extra (CUDA only) = "
        "max_memory_allocated minus the memory before the optimizer existed; the memory table counts every allocation "
        "through PyTorch's allocators (CPU and CUDA) with torch.profiler.",
        "",
    ]
    return "\n".join(lines)


def _mbx(b, unit) -> str:
    """MB and the multiple of the fp32 parameter bytes."""
    if b is None:
        return "-"
    return f"{b / 1e6:.2f} ({b / unit:.2f}×)" if unit else f"{b / 1e6:.2f}"


def _memory_markdown(s) -> list:
    rows = [o for o in s["optimizers"] if o["status"] == "ok" and o.get("memory")]
    if not rows:
        return []
    unit = rows[0]["memory"]["param_bytes_fp32"]
    cuda = any("cuda_max_allocated_extra_bytes" in o["memory"] for o in rows)
    out = [f"Optimizer-owned memory, MB (× the fp32 parameter bytes, {unit / 1e6:.2f} MB): state; persistent work buffers "
           "(kept between steps beyond the state: mango torch's workspace, ...); peak transient (the most a step "
           "allocates at once above that); extra = persistent + peak transient, against the memory budget of 2× the "
           "largest NS bucket in its NS dtype. From torch.profiler's allocation events (bench/memory.py)"
           + ("; CUDA: max_memory_allocated above the memory before the optimizer existed." if cuda else "."), "",
           "| optimizer | state | persistent | of which workspace | peak transient | extra beyond state | budget (2× largest NS bucket) | extra / budget |"
           + (" CUDA max_allocated extra |" if cuda else ""),
           "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |" + (" ---: |" if cuda else "")]  # fmt: skip
    for o in rows:
        m = o["memory"]
        b = m.get("budget") or {}
        bud = f"{b['budget_bytes'] / 1e6:.2f} ({b['bucket']}, {b['dtype']})" if b.get("budget_bytes") else "-"
        ratio = m.get("extra_vs_budget")
        rc = "-" if ratio is None else (f"{ratio:.2f}×" if m.get("within_budget") else f"**{ratio:.2f}×**")
        row = (f"| {o['label']} | {_mbx(m['state_bytes'], unit)} | {_mbx(m['persistent_bytes'], unit)} | "
               f"{_mbx(m.get('workspace_bytes'), unit)} | {_mbx(m['peak_transient_bytes'], unit)} | "
               f"{_mbx(m['extra_beyond_state_bytes'], unit)} | {bud} | {rc} |")  # fmt: skip
        if cuda:
            row += f" {_mbx(m.get('cuda_max_allocated_extra_bytes'), unit)} |"
        out.append(row)
    out.append("")
    return out


def _methods_markdown(s) -> list:
    nm = s.get("ns_methods")
    if not nm:
        return []
    regimes = [(k, v) for k, v in nm.items() if v]
    out = ["NS FLOPs of one step per method (mango.newton_schulz counts: 2 per multiply-add, no symmetry; Gram form "
           "with its restarts) and each method's floor (its FLOPs / the measured matmul rate of the dtype it runs in "
           "here + state traffic / copy bandwidth):", "",
           "| ns_dtype | textbook GFLOP | Gram GFLOP | auto GFLOP | auto / textbook | textbook floor ms | Gram floor ms | auto floor ms |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in regimes:
        f, fl = r["flops"], r["floors"]
        dt = lambda m: "/".join(fl[m]["dtypes"])  # noqa: E731
        out.append(f"| {name} | {f['textbook'] / 1e9:.3g} | {f['gram'] / 1e9:.3g} | {f['auto'] / 1e9:.3g} | "
                   f"{f['auto'] / f['textbook']:.3f} | {_ms(fl['textbook']['floor_s'])} ({dt('textbook')}) | "
                   f"{_ms(fl['gram']['floor_s'])} ({dt('gram')}) | {_ms(fl['auto']['floor_s'])} ({dt('auto')}) |")  # fmt: skip
    out.append("")
    first = regimes[0][1]
    picks = {name: {b["bucket"]: b["auto"] for b in r["buckets"]} for name, r in regimes}
    out += ["| NS bucket | textbook GFLOP | Gram GFLOP | Gram / textbook | " + " | ".join(f"auto picks ({n})" for n, _ in regimes) + " |",
            "| --- | ---: | ---: | ---: | " + " | ".join("---" for _ in regimes) + " |"]  # fmt: skip
    for b in first["buckets"]:
        out.append(f"| {b['bucket']} | {b['textbook_flops'] / 1e9:.3g} | {b['gram_flops'] / 1e9:.3g} | "
                   f"{b['gram_vs_textbook_flops']:.3f} | " + " | ".join(picks[n][b["bucket"]] for n, _ in regimes) + " |")  # fmt: skip
    out.append("")
    return out


def _ns_method_target_markdown(s) -> list:
    t = next((t for t in s.get("targets", []) if t["id"] == "ns_gram" and t.get("variants")), None)
    if not t:
        return []
    out = [f"NS-method yardstick (the bench's own, not a target of the performance contract): step ≤ {t['target']}× the "
           "bare batched textbook NS matmuls in the contender's NS dtype, timed in the same rounds:", "",
           f"| contender | step ms | bare textbook NS ms (dtype) | step / bare NS | ≤ {t['target']}× |", "| --- | ---: | ---: | ---: | :---: |"]  # fmt: skip
    for key, v in t["variants"].items():
        met = "yes" if v["value"] <= t["target"] else "no"
        out.append(f"| {v['label']} | {_ms(v['step_s'])} | {_ms(v['bare_ns_s'])} ({v['bare_ns_dtype']}) | {v['value']:.2f}× | {met} |")
    out.append("")
    return out


def _ns_choices_markdown(s) -> list:
    """Per NS bucket, the engine, form and dtype each mango contender runs it in, and why."""
    rows = [o for o in s["optimizers"] if o["status"] == "ok" and (o.get("info") or {}).get("ns_choices")]
    if not rows:
        return []
    buckets: dict = {}
    for o in rows:
        for ch in o["info"]["ns_choices"]:
            key = (tuple(ch["block"]), ch["tensors"], ch["first"])
            buckets.setdefault(key, {})[o["key"]] = ch
    out = ["NS per bucket as each mango contender runs it (engine, form, operand dtype; mango decides once, at plan time):", "",
           "| NS bucket | " + " | ".join(o["label"] for o in rows) + " |", "| --- | " + " | ".join("---" for _ in rows) + " |"]  # fmt: skip
    for (block, n, first), per in buckets.items():
        cells = []
        for o in rows:
            ch = per.get(o["key"])
            tiles = f" {'x'.join(map(str, ch['tiles']))}" if ch and ch.get("tiles") else ""
            cells.append("-" if ch is None else f"{ch['engine']}{tiles} {ch['method']} {ch['dtype']}")
        out.append(f"| {block[0]}x{block[1]} x{n} (`{first}`{' ...' if n > 1 else ''}) | " + " | ".join(cells) + " |")
    out += ["", "What decided them (each contender's distinct reasons, in bucket order):", ""]
    out += [f"- {o['label']}: " + " | ".join(dict.fromkeys(ch["why"] for ch in o["info"]["ns_choices"])) for o in rows]
    return out + [""]


def _graph_check_markdown(s) -> list:
    g = s.get("graph_check")
    if not g:
        return []
    if g.get("status") != "ok":
        return [f"Capture + replay vs eager: {g.get('status')} ({g.get('reason')}).", ""]
    verdict = "bit-identical" if g["identical"] else "**not identical**"
    return [f"Capture + replay vs eager: after {g['warmup_steps']} warm-up and {g['steps']} replayed steps on the same gradients "
            f"the parameters are {verdict} to eager steps (max |Δ| {g['eager']['max_abs_diff']:.2e} against the default step, "
            f"{g['eager_capturable']['max_abs_diff']:.2e} against capturable=True run eagerly).", ""]  # fmt: skip


def not_run_note(o: dict) -> str:
    """What the table and the chart say of a contender without a time: why it has none."""
    reason = o.get("reason") or o["status"]
    return {"failed": reason, "skipped": f"skipped ({reason})"}.get(o["status"], f"n/a ({reason})")


def _set_markdown(result, s) -> list:
    ps, fl = s["set"], s["floor"]
    primary = s.get("primary")
    plabel = {"triton": "mango triton", "torch": "mango torch"}.get(primary, "mango")
    out = [f"### {ps['title']} — `{ps['name']}`", ""]
    out.append(f"{ps['numel']:,} parameters in {ps['tensors']} tensors. NS {fl['ns_flops'] / 1e9:.3g} GFLOP "
               f"({fl['ns_flops_symmetric'] / 1e9:.3g} with symmetry), state traffic {fl['state_bytes'] / 1e6:.1f} MB → "
               f"floor **{_ms(fl['floor_s'])} ms** (NS {_ms(fl['ns_s'])} + state {_ms(fl['state_s'])}).")  # fmt: skip
    if ps.get("note"):
        out.append(f"Size: {ps['note']}.")
    out += ["", f"| optimizer | step ms (median) | × floor | vs {plabel} | launches / step | state MB | peak extra MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for o in s["optimizers"]:
        if o["status"] != "ok":
            out.append(f"| {o['label']} | {not_run_note(o)} | - | - | - | - | - |")
            continue
        info = o.get("info") or {}
        label = o["label"]
        if "compile_s" in info:
            label += f" (compiled in {info['compile_s']:.0f} s, {info.get('compile_backend')})"
        out.append(f"| {label} | {_ms(o['median_s'])} | {_x(o['x_floor'], 1)} | {_x(o.get('vs_primary'))} | "
                   f"{o['launches']} | {_mb(o['state_bytes'])} | {_mb(o.get('peak_extra_bytes'))} |")  # fmt: skip
    tp = next((o["median_s"] for o in s["optimizers"] if o["key"] == primary and o.get("median_s")), None)
    for name, b in (s.get("bare_ns") or {}).items():  # yardstick: the NS matmuls alone, same rounds
        if b.get("median_s"):
            vs = b["median_s"] / tp if tp else None
            out.append(f"| *bare NS matmuls only ({name} bmm)* | {_ms(b['median_s'])} | {_x(b['median_s'] / fl['floor_s'], 1)} | "
                       f"{_x(vs)} | - | - | - |")  # fmt: skip
    out.append("")
    out += _graph_check_markdown(s)
    if (s.get("timing") or {}).get("reduced_for"):
        t = s["timing"]
        out += [f"Timed steps on this set: at least {t['min_steps']} after {t['warmup']} warm-up steps (a long step), "
                f"until {t['budget_s']:g} s per contender.", ""]  # fmt: skip
    out += _ns_choices_markdown(s)
    out += _memory_markdown(s)
    out += _methods_markdown(s)
    out += _ns_method_target_markdown(s)
    nb = s.get("ns_buckets")
    if nb and nb["buckets"]:
        same = nb["same_dtype"]
        cols = ["bfloat16"] + ([same] if same != "bfloat16" else [])
        head = "| NS bucket | GFLOP | ours ms | ours TFLOP/s | " + " | ".join(f"bare bmm {c} ms | ours / bare {c}" for c in cols) + " |"
        out += [f"NS per shape bucket — ours: {nb['ours']}; bare: torch.bmm/baddbmm NS only.", "", head,
                "| --- | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in cols) + " |"]  # fmt: skip
        forms = any("fp32_gram_s" in b for b in nb["buckets"])
        if forms:
            out[-2] = out[-2][:-1] + "| auto picks | fp32 textbook ms | fp32 Gram ms | Gram / textbook |"
            out[-1] = out[-1] + " --- | ---: | ---: | ---: |"
        triton_forms = any("triton_gram_s" in b for b in nb["buckets"])
        if triton_forms:
            out[-2] = out[-2][:-1] + "| Triton bf16 textbook ms | Triton fp16 Gram ms | Gram / textbook |"
            out[-1] = out[-1] + " ---: | ---: | ---: |"
        for b in nb["buckets"]:
            cells = []
            for c in cols:
                cells += [_ms(b.get(f"bare_{c}_s")), _x(b.get(f"ours_vs_bare_{c}"))]
            if forms:
                cells += [b.get("ours_method", "-"), _ms(b.get("fp32_textbook_s")), _ms(b.get("fp32_gram_s")), _x(b.get("fp32_gram_vs_textbook"))]
            if triton_forms:
                cells += [_ms(b.get("triton_textbook_s")), _ms(b.get("triton_gram_s")), _x(b.get("triton_gram_vs_textbook"))]
            out.append(f"| {b['bucket']} | {b['ns_flops'] / 1e9:.3g} | {_ms(b['ours_s'])} | {b['ours_tflops']:.3g} | " + " | ".join(cells) + " |")
        out.append("")
    torch_rec = next((o for o in s["optimizers"] if o["key"] == "torch" and o["status"] == "ok"), None)
    st = (torch_rec or {}).get("stages") or {}
    if st.get("step"):
        gbs = lambda v: "-" if v is None else f"{v:.1f} GB/s"  # noqa: E731
        out.append(f"mango torch stages (one step {_ms(st['step'])} ms): moments {_ms(st.get('moments'))} ms "
                   f"({gbs(st.get('moments_gbs'))}), NS {_ms(st.get('ns'))} ms, other norms {_ms(st.get('other_norms'))} ms, "
                   f"apply + rest {_ms(st.get('apply_and_rest'))} ms ({gbs(st.get('apply_gbs'))}); copy bandwidth "
                   f"{st.get('copy_gbs', 0):.1f} GB/s.")  # fmt: skip
        out.append("")
    for o in s["optimizers"]:
        ks = (o.get("kernels") or {}).get("kernels") or []
        if o["status"] == "ok" and ks:
            out += [f"{o['label']}: device time per kernel over one step (top {min(8, len(ks))} of {len(ks)}).", "",
                    "| kernel | calls | ms | GB/s | of copy bandwidth |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
            for k in ks[:8]:
                gb = "-" if k.get("gbs") is None else f"{k['gbs']:.0f}"
                fr = "-" if k.get("frac_of_copy") is None else f"{k['frac_of_copy']:.0%}"
                out.append(f"| `{k['kernel'][:60]}` | {k['calls']} | {_ms(k['s'])} | {gb} | {fr} |")
            out.append("")
    return out


# ----------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------


def plot(result: dict, path: str) -> None:
    """One panel per set: horizontal bars of median step time (log scale), floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["sets"]
    n = max(1, len(sets))
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 0.45 * 6 * n), squeeze=False)
    colors = {"triton": "#d62728", "torch": "#ff7f0e", "torch_bf16": "#ffbb78", "reference": "#9467bd", "compile": "#8c564b",
              "muon_adamw": "#1f77b4", "adamw": "#7f7f7f"}  # fmt: skip
    for ax, s in zip(axes[:, 0], sets):
        opts = s["optimizers"]
        labels = [o["label"] for o in opts]
        vals = [o["median_s"] * 1e3 if o.get("median_s") else 0.0 for o in opts]
        y = list(range(len(opts)))[::-1]
        ok_vals = [v for v in vals if v > 0]
        ax.barh(y, [v if v > 0 else float("nan") for v in vals], color=[colors.get(o["key"], "#fdd0a2" if o["key"].startswith("torch") else "#333") for o in opts])
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xscale("log")
        fl = s["floor"]["floor_s"] * 1e3
        lo = min(ok_vals + [fl]) / 2 if ok_vals else fl / 2
        hi = max(ok_vals + [fl]) * 4
        ax.set_xlim(lo, hi)
        ax.axvline(fl, color="k", linestyle="--", linewidth=1)
        ax.set_ylim(-1.0, len(opts) - 0.5)
        ax.text(fl, -0.75, f" roofline floor {fl:.3g} ms", fontsize=7, va="center")
        for yi, o, v in zip(y, opts, vals):
            if v > 0:
                txt = f" {v:.0f} ms" if v >= 100 else f" {v:.3g} ms"
                txt += f"  ({o['x_floor']:.1f}× floor)" if o.get("x_floor") else ""
                ax.text(v, yi, txt, va="center", fontsize=7)
            else:
                ax.text(lo * 1.05, yi, " " + not_run_note(o)[:90], va="center", fontsize=7, color="#555")
        ax.set_title(f"{s['set']['title']} — {s['set']['numel'] / 1e6:.2f}M params", fontsize=9)
        ax.set_xlabel("optimizer step time, ms (median, log scale)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    d = result["device"]
    fig.suptitle(f"mango step benchmark on {d.get('name')} ({d['type']})" + (" [--quick]" if result.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description="Redraw the markdown and PNG of a bench.step JSON result.")
    p.add_argument("json", help="a step_*.json written by python -m bench.step")
    args = p.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    stem = args.json[: -len(".json")] if args.json.endswith(".json") else args.json
    with open(stem + ".md", "w") as f:
        f.write(markdown(result) + "\n")
    plot(result, stem + ".png")
    print(markdown(result))


if __name__ == "__main__":
    main()
