"""`python -m bench.sweep`: every Newton–Schulz engine timed on the NS buckets of parameter sets, and
the per-architecture entry of `mango.ns_engine.ARCH_TABLE` those timings give.

The engines of `mango.ns_engine`, each on every NS bucket (the same-shape blocks of one role, batched
as a step runs them), in both forms (textbook in bf16, Gram in fp16, the triton backend's dtypes):

    triton_small   the on-chip Triton kernels (one launch for every step), where the blocks fit
                   on chip (rows of the wide orientation <= 128 textbook, <= 64 Gram)
    triton_tiled   the tiled Triton kernels, at each of --tiles (block_m, block_n, block_k) that
                   fits the target's shared memory (`mango_kernels.resources.tiles_shared_memory`), where not
    cublas         torch batched GEMMs: the torch backend's `batched_newton_schulz`, the code the
                   triton backend's cuBLAS engine runs on its NS stack
    bare           the batched textbook matmuls alone (bench.kernels.bare_ns), a yardstick

The entry, from the timings in the form "auto" picks for each bucket on this architecture:
``small`` is the engine of least total time over the buckets that fit on chip, ``large`` the same
over the others (the tiled kernels at their best tile size), ``tiles`` the tile size of least total
time over the large buckets. It is printed and saved as JSON, so `ARCH_TABLE` is regenerated from a
run. The cheap timings come first (cuBLAS and on-chip for every bucket), then the tile sizes bucket
by bucket, until --time-budget: what it leaves unmeasured is listed, and the entry says it is partial.

    python -m bench.sweep                                    # on a GPU: the GPU run's sets
    python -m bench.sweep --quick --out /tmp/s               # tiny shapes under TRITON_INTERPRET=1 (CI)

Writes sweep_<arch>_<UTC time>.json under --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time

import torch

from . import kernels as K
from .params import gpt_set, resolve_set
from .roofline import ns_buckets

__all__ = ["GPU_SETS", "GPU_TILES", "FORMS", "sweep", "derive_entry", "main"]

GPU_SETS = ("gpt2-124m", "hf-gpt2-124m", "hf-gpt2-350m", "llama-1b")
GPU_TILES = ((64, 128, 64), (128, 128, 64), (128, 256, 64))
FORMS = {"textbook": torch.bfloat16, "gram": torch.float16}  # the triton backend's design point per form
# --quick: one small GPT's shapes, tiles the interpreter runs in seconds, and an on-chip limit lowered so
# that the tiled kernels get buckets too (a code-path check; no timing claims)
QUICK_TILES = ((16, 32, 16),)
QUICK_SET = lambda: gpt_set("sweep-tiny", n_layer=1, d=32, n_head=2, vocab=64, block=8, tied_role="embedding")  # noqa: E731
QUICK_ON_CHIP = {"textbook": 16, "gram": 16}


def _arch(device) -> str:
    from mango.ns_engine import cuda_arch

    return cuda_arch(device) if device.type == "cuda" else "cpu"


def _auto_form(bucket, arch: str) -> str:
    """The form ns_method="auto" gives this bucket on `arch` (as the triton backend decides it)."""
    from mango.config import DEFAULTS
    from mango.ns_engine import choose

    r, c = bucket.block
    target = arch if arch.startswith("sm_") else "sm_90"
    return choose(dict(DEFAULTS), r, c, torch.float32, "cuda", backend="triton", count=bucket.batch, arch=target).method


def _on_chip(bucket, method: str, on_chip: dict) -> bool:
    return min(bucket.block) <= on_chip[method]


def _fits(tiles, arch: str) -> bool:
    """Whether every tiled kernel of both forms fits `arch`'s shared memory at `tiles` (in its form's dtype)."""
    from mango_kernels.resources import SHARED_MEMORY, tiles_shared_memory

    if arch not in SHARED_MEMORY:
        return True
    return all(tiles_shared_memory(tiles, dt.itemsize, arch, method=m) <= SHARED_MEMORY[arch] for m, dt in FORMS.items())


def _time(fn, device, setup=None, quick=False) -> dict:
    try:
        if quick:
            return {"s": K.time_call(fn, device, min_reps=1, max_reps=1, budget_s=0.0, setup=setup)}
        return {"s": K.time_call(fn, device, min_reps=2, max_reps=10, budget_s=0.05, setup=setup)}
    except Exception as e:  # a tile size the device cannot launch, a missing kernel: recorded, the sweep goes on
        return {"s": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}


def _config(tiles, on_chip: dict):
    import mango_kernels as mk

    kw = {"small_max_rows": on_chip["textbook"], "gram_small_max_rows": on_chip["gram"]}
    if tiles:
        kw.update(block_m=tiles[0], block_n=tiles[1], block_k=tiles[2])
    return mk.NSConfig(**kw)


def _triton(bucket, device, method, tiles, on_chip, quick) -> dict:
    try:
        t = K.TritonNS([bucket], device, dtype=FORMS[method], method=method, config=_config(tiles, on_chip))
    except Exception as e:
        return {"s": None, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    return _time(t.run, device, setup=t.setup, quick=quick)


def _cublas(bucket, device, method, quick) -> dict:
    from mango.backends.torch_backend import batched_newton_schulz

    X = K._stack(bucket, device, FORMS[method], oriented=False)
    return _time(lambda: batched_newton_schulz(X, K.COEFFS, "frobenius", 1e-7, method=method), device, quick=quick)


def _bare(bucket, device, quick) -> dict:
    X = K._stack(bucket, device, torch.bfloat16, oriented=True)
    return _time(lambda: K.bare_ns(X), device, quick=quick)


def sweep(sets, device, tiles, time_budget_s=None, quick=False, on_chip=None) -> dict:
    """Time every engine on every distinct NS bucket of `sets` (ParamSets); see the module docstring."""
    from mango_kernels.resources import ON_CHIP_MAX_ROWS

    device = torch.device(device)
    on_chip = dict(on_chip or ON_CHIP_MAX_ROWS)
    arch = _arch(device)
    t0 = time.perf_counter()
    out_of_time = lambda: time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s  # noqa: E731
    rows, seen = [], {}
    for ps in sets:
        for b in ns_buckets(ps):
            key = (tuple(b.block), b.batch)
            if key in seen:
                seen[key]["sets"].append(ps.name)
                continue
            row = {"bucket": b.label, "block": list(b.block), "batch": b.batch, "sets": [ps.name],
                   "auto_form": _auto_form(b, arch), "times": {}, "not_measured": []}  # fmt: skip
            row["on_chip"] = {m: _on_chip(b, m, on_chip) for m in FORMS}
            seen[key] = row
            rows.append((b, row))
    usable = [t for t in tiles if _fits(t, arch)]
    skipped_tiles = [list(t) for t in tiles if t not in usable]
    # the cheap timings first: cuBLAS in both forms, the on-chip kernels where they fit, the bare NS
    for b, row in rows:
        for method in FORMS:
            if out_of_time():
                row["not_measured"] += [f"cublas {method}"] + ([f"triton_small {method}"] if row["on_chip"][method] else [])
                continue
            row["times"][f"cublas {method}"] = _cublas(b, device, method, quick)
            if row["on_chip"][method]:
                row["times"][f"triton_small {method}"] = _triton(b, device, method, None, on_chip, quick)
        if out_of_time():
            row["not_measured"].append("bare")
        else:
            row["times"]["bare"] = _bare(b, device, quick)
    # then the tile sizes, one at a time over every bucket (a budget that runs out leaves whole sizes unmeasured)
    for t in usable:
        for method in FORMS:
            for b, row in rows:
                if row["on_chip"][method]:
                    continue
                name = f"triton_tiled {'x'.join(map(str, t))} {method}"
                if out_of_time():
                    row["not_measured"].append(name)
                    continue
                row["times"][name] = _triton(b, device, method, t, on_chip, quick)
    result = {"arch": arch, "on_chip_max_rows": on_chip, "tiles": [list(t) for t in usable], "tiles_over_shared_memory": skipped_tiles,
              "forms": {m: str(d).replace("torch.", "") for m, d in FORMS.items()}, "buckets": [row for _, row in rows],
              "seconds": time.perf_counter() - t0}  # fmt: skip
    result["entry"] = derive_entry(result["buckets"], usable)
    return result


def _seconds(row: dict, name: str):
    return (row["times"].get(name) or {}).get("s")


def _total(rows, name_of) -> float | None:
    """Sum over `rows` of the time of engine `name_of(row)`; None where any is missing."""
    vals = [_seconds(r, name_of(r)) for r in rows]
    return sum(vals) if rows and all(v is not None for v in vals) else None


def derive_entry(rows: list, tiles) -> dict:
    """The ARCH_TABLE entry (small, large, tiles) the timings give, each bucket in its auto form;
    `per_class` keeps the totals it was chosen from, and `partial` says where timings were missing."""
    small = [r for r in rows if r["on_chip"][r["auto_form"]]]
    large = [r for r in rows if not r["on_chip"][r["auto_form"]]]
    tile_name = lambda t: lambda r: f"triton_tiled {'x'.join(map(str, t))} {r['auto_form']}"  # noqa: E731
    tile_totals = {"x".join(map(str, t)): _total(large, tile_name(t)) for t in tiles}
    measured_tiles = {k: v for k, v in tile_totals.items() if v is not None}
    best_tiles = min(measured_tiles, key=measured_tiles.get) if measured_tiles else None
    totals = {
        "small": {"triton_small": _total(small, lambda r: f"triton_small {r['auto_form']}"),
                  "cublas": _total(small, lambda r: f"cublas {r['auto_form']}")},
        "large": {"triton_tiled": measured_tiles.get(best_tiles), "cublas": _total(large, lambda r: f"cublas {r['auto_form']}")},
    }  # fmt: skip
    entry, partial = {}, []
    for cls in ("small", "large"):
        got = {k: v for k, v in totals[cls].items() if v is not None}
        entry[cls] = min(got, key=got.get) if got else None
        if len(got) < len(totals[cls]) and (small if cls == "small" else large):
            partial.append(f"{cls}: no total for {', '.join(k for k in totals[cls] if k not in got)}")
    entry["tiles"] = tuple(int(x) for x in best_tiles.split("x")) if best_tiles else None
    if len(measured_tiles) < len(tiles) and large:
        partial.append(f"tiles: {len(measured_tiles)} of {len(tiles)} sizes measured on every large bucket")
    return {"entry": entry, "per_class": totals, "tile_totals": tile_totals, "partial": partial,
            "buckets": {"small": [r["bucket"] for r in small], "large": [r["bucket"] for r in large]}}  # fmt: skip


def entry_line(result: dict) -> str:
    """The line to put into mango/ns_engine.py's ARCH_TABLE."""
    e = result["entry"]["entry"]
    tiles = tuple(e["tiles"]) if e.get("tiles") else None
    return f'"{result["arch"]}": {{"small": "{e["small"]}", "large": "{e["large"]}", "tiles": {tiles}}},'


def markdown(result: dict) -> str:
    engines = sorted({k for r in result["buckets"] for k in r["times"]}, key=lambda k: (k.split()[0] != "bare", k))
    lines = [f"## NS engine sweep, {result['arch']}" + (" (--quick: code path only, no timing claims)" if result.get("quick") else ""), "",
             f"Device: {result.get('device')}. Times in ms, one NS (5 steps) of the whole bucket; the auto form marked *.", "",
             "| NS bucket | auto form | " + " | ".join(engines) + " |", "| --- | --- | " + " | ".join("---:" for _ in engines) + " |"]  # fmt: skip
    for r in result["buckets"]:
        cells = []
        for k in engines:
            t = r["times"].get(k)
            mark = "*" if k.endswith(r["auto_form"]) else ""
            cells.append("-" if t is None else ("err" if t.get("s") is None else f"{t['s'] * 1e3:.3g}{mark}"))
        lines.append(f"| {r['bucket']} | {r['auto_form']} | " + " | ".join(cells) + " |")
    d = result["entry"]
    lines += ["", f"ARCH_TABLE entry: `{entry_line(result)}`" + (f" (partial: {'; '.join(d['partial'])})" if d["partial"] else ""), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sets", help=f"comma-separated parameter sets (default: {','.join(GPU_SETS)})")
    p.add_argument("--tiles", help="tile sizes as BMxBNxBK,... (default: " + ",".join("x".join(map(str, t)) for t in GPU_TILES) + ")")
    p.add_argument("--device", help="cuda (default) or cpu (the kernels under TRITON_INTERPRET=1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and tiles, kernels under the interpreter on CPU (CI)")
    p.add_argument("--time-budget", type=float, help="seconds: what is not started by then is listed as not measured")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.quick:
        sets = [resolve_set(n) for n in args.sets.split(",")] if args.sets else [QUICK_SET()]
        tiles, on_chip = QUICK_TILES, QUICK_ON_CHIP
    else:
        sets = [resolve_set(n) for n in (args.sets.split(",") if args.sets else GPU_SETS)]
        tiles, on_chip = GPU_TILES, None
    if args.tiles:
        tiles = tuple(tuple(int(x) for x in t.split("x")) for t in args.tiles.split(","))
    print(f"bench.sweep on {device}: {len(sets)} set(s), tiles {', '.join('x'.join(map(str, t)) for t in tiles)}", flush=True)
    result = sweep(sets, device, tiles, time_budget_s=args.time_budget, quick=args.quick, on_chip=on_chip)
    result.update(kind="bench.sweep", quick=args.quick, sets=[ps.name for ps in sets],
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)",
                  created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                  command="python -m bench.sweep " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))  # fmt: skip
    result["arch_table_line"] = entry_line(result)
    os.makedirs(args.out, exist_ok=True)
    stamp = result["created"].replace("-", "").replace(":", "").replace("+0000", "").replace("+00:00", "")
    path = os.path.join(args.out, f"sweep_{result['arch']}{'_quick' if args.quick else ''}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    result["file"] = path
    print(markdown(result))
    print(f"ARCH_TABLE[{result['arch']!r}] <- {result['arch_table_line']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
