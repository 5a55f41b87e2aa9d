"""`python -m bench.rounds`: the triton backend's work memory and launches per step, without a GPU.

The triton backend packs a step into rounds whose buffers fit the memory budget (2× the largest
bucket in its NS dtype; `mango.backends.triton_backend`). How many rounds, how big the arena, and
how many launches follow from the plan alone, so this builds each parameter set on CPU tensors,
takes `backend="triton"` steps as dry runs (`mango_kernels.count_launches(dry_run=True)`: the host
decides every launch, no kernel executes, the cuBLAS engine's ops run on one-element stand-ins and
are counted kernel by kernel) with the NS engines an H100/H200 chooses (`ns_target="sm_90"`: head
blocks on the Triton on-chip kernels, every larger matrix on the cuBLAS engine) and the GPU's tile
sizes, and reads the plan's `memory()`: budget, arena, bytes per round. Each set runs with the forms
CUDA's "auto" picks (the fp16 Gram form on wide matrices), with the bf16 textbook form everywhere,
and with every NS on the Triton kernels (a CPU's choice), each within the budget and in one round
(`memory_budget=inf`).

    python -m bench.rounds                          # GPT-2 124M and 350M (~1 min)
    python -m bench.rounds --sets tiny --out /tmp/r # what the tests run

Writes `rounds_<time>.{json,md}` to --out (default bench/results/local/).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors through the triton backend (dry runs only)

import torch  # noqa: E402

import mango  # noqa: E402
import mango_kernels as mk  # noqa: E402

from . import params as P  # noqa: E402

GPU_TILES = mk.NSConfig(small_block_c=64, block_m=128, block_n=128, block_k=64)
# label -> (the backend's ns_target, settings): "auto" as on an H100/H200, the bf16 textbook form
# there, and every NS on the Triton kernels (a CPU's choice: the on-chip and tiled kernels)
FORMS = {"cuda_auto": ("sm_90", {}), "bf16_textbook": ("sm_90", {"ns_method": "textbook"}), "triton_kernels": (None, {})}


def measure(set_name: str, form: str, budget) -> dict:
    """Dry-run steps of the set's mango optimizer; rounds, arena, budget and launches."""
    pset = P.resolve_set(set_name)
    params = pset.build("cpu")
    target, settings = FORMS[form]
    opt = mango.Mango(P.mango_groups(pset, params), backend="triton", **settings)
    backend = opt._backend_for(torch.device("cpu"))
    backend.ns_config, backend.memory_budget = GPU_TILES, budget
    backend.ns_target = target
    for p in params:
        p.grad = torch.zeros_like(p)
    with mk.count_launches(dry_run=True):
        opt.step()  # builds the plan
    with mk.count_launches(dry_run=True) as log:
        opt.step()
    (lg,) = opt._plan.cache["triton"][1]
    mem = lg.memory()
    forms = sorted({f"{e.ns_choice.engine} {str(e.ns_dtype).replace('torch.', '')} {e.ns_method}" for e in lg.entries if e.ns_kernel})
    by_name = dict(log.by_name())
    cublas = sum(n for k, n in by_name.items() if k.startswith("cublas_"))
    return dict(
        set=set_name, form=form, ns_forms=forms, one_round=budget is not None,
        rounds=mem["rounds"], arena_bytes=mem["arena"], budget_bytes=mem["spec_budget"], round_bytes=mem["round_bytes"],
        launches=log.count + 1,  # + the table copy of a step whose lr or addresses changed
        cublas_launches=cublas, kernel_launches=log.count - cublas,
        in_place=sorted(str(b.nb.shape) for r in lg.rounds for b, _ in r.ns_batches if getattr(b, "in_place", False)),
        by_name=by_name,
    )


def table(rows: list) -> str:
    out = ["| set | NS engines and forms | rounds | arena MB | budget MB | arena ÷ budget | launches: Triton + cuBLAS engine (+ table copy) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        label = f"{r['set']}{', one round' if r['one_round'] else ''}"
        out.append(f"| {label} | {', '.join(r['ns_forms'])} | {r['rounds']} | {r['arena_bytes'] / 1e6:.1f} | "
                   f"{r['budget_bytes'] / 1e6:.1f} | {r['arena_bytes'] / r['budget_bytes']:.2f}× | "
                   f"{r['kernel_launches']} + {r['cublas_launches']} (+1) |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="gpt2-124m,gpt2-350m")
    p.add_argument("--out", default="bench/results/local")
    args = p.parse_args(argv)
    rows = []
    for name in args.sets.split(","):
        for form in FORMS:
            for budget in (None, float("inf")):
                rows.append(measure(name, form, budget))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"rounds_{stamp}.json").write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=1))
    (out / f"rounds_{stamp}.md").write_text(
        f"# triton backend: rounds, arena and launches per step (dry run, GPU tile sizes; torch {torch.__version__})\n\n"
        "A step uploads its tensor table (+1) only where lr or an address changed since the last.\n\n" + table(rows)
    )
    print(f"wrote {out}/rounds_{stamp}.{{json,md}}")
    return rows


if __name__ == "__main__":
    main()
