"""`python -m bench.compile_cost`: what `torch.compile(opt.step)` costs the triton backend's host side.

Compiled, the triton backend's step is one custom operator in the graph (`mango.compiled_step`).
What compiling changes is host work: the compile itself, and per step dynamo's guards, inductor's
input checks and the operator's dispatch over every tensor the step reads or writes. The kernels are
the eager step's. So this builds each parameter set on CPU tensors and times `backend="triton"` steps
as dry runs (`mango_kernels.count_launches(dry_run=True)`: the host decides every launch, nothing
executes), three ways: eager, compiled (the operator), and compiled with the step behind a graph
break (how the sharded and DDP-split backends run, and how the triton backend ran before it had the
operator). Steps are timed in CPU time of the measuring process (one torch thread), which a machine loaded by
other processes disturbs less than wall time; compile times are cold (inductor's caches off), wall
and the measuring process's CPU (inductor's compile workers are other processes); every
measurement runs in a fresh process.

    python -m bench.compile_cost                          # tiny and gpt-24l-d64 (~2 min on 2 cores)
    python -m bench.compile_cost --sets tiny --compile-backend eager --in-process --out /tmp/c   # the tests

Writes `compile_cost_<time>.{json,md}` to --out (default bench/results/local/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors through the triton backend (dry runs only)

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import mango  # noqa: E402
import mango_kernels as mk  # noqa: E402
from mango import compiled_step  # noqa: E402

from . import params as P  # noqa: E402

MODES = ("eager", "operator", "graph_break")


def measure(set_name: str, mode: str, compile_backend: str, steps: int) -> dict:
    """First step (with the compile) and median step of dry-run triton steps in `mode`."""
    pset = P.resolve_set(set_name)
    params = pset.build("cpu")
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = mango.presets.mango(P.mango_groups(pset, params), backend="triton")
    torch._dynamo.reset()
    counters.clear()
    supports = compiled_step.supports
    if mode == "graph_break":
        compiled_step.supports = lambda *args: False
    try:
        step = opt.step if mode == "eager" else torch.compile(opt.step, backend=compile_backend)
        with torch._inductor.config.patch(force_disable_caches=True), mk.count_launches(dry_run=True) as log:
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            first_s, first_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            launches = log.count
            times = []
            for _ in range(steps):
                c0 = time.process_time()
                step()
                times.append(time.process_time() - c0)
    finally:
        compiled_step.supports = supports
    return dict(
        set=set_name, mode=mode, tensors=len(params), compile_backend=None if mode == "eager" else compile_backend,
        first_s=first_s, first_cpu_s=first_cpu_s, step_ms=statistics.median(times) * 1e3, launches=launches,
        graph_breaks=len(counters["graph_break"]), graphs=counters["stats"].get("unique_graphs", 0),
    )  # fmt: skip


def _measure_into(queue, threads: int, *args) -> None:
    torch.set_num_threads(threads)
    queue.put(measure(*args))


def _in_fresh_process(name: str, mode: str, compile_backend: str, steps: int, threads: int) -> dict:
    """`measure` in a new interpreter (not a daemon: inductor may start its compile workers)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_into, args=(queue, threads, name, mode, compile_backend, steps))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def table(rows: list) -> str:
    out = ["| set | tensors | step | first step (compile): wall s | CPU s | host CPU ms / step | graphs | graph breaks (distinct) | launches |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['set']} | {r['tensors']} | {r['mode']} | {r['first_s']:.2f} | {r['first_cpu_s']:.2f} | {r['step_ms']:.2f} | {r['graphs']} | "
                   f"{r['graph_breaks']} | {r['launches']} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="tiny,gpt-24l-d64")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--steps", type=int, default=30, help="timed steps after the first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-process", action="store_true", help="measure everything in this process (default: a fresh one each)")
    p.add_argument("--out", default="bench/results/local")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.sets.split(","):
        for mode in MODES:
            if args.in_process:
                rows.append(measure(name, mode, args.compile_backend, args.steps))
            else:  # a compile after others in one process ran up to ~3× slower here
                rows.append(_in_fresh_process(name, mode, args.compile_backend, args.steps, args.threads))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    header = (f"# triton backend under torch.compile: host cost per step (dry run; torch {torch.__version__}, "
              f"{args.compile_backend}, {args.threads} thread(s), load average {load} at the end)\n\n")  # fmt: skip
    (out / f"compile_cost_{stamp}.json").write_text(json.dumps(dict(torch=torch.__version__, load_average=load, rows=rows), indent=1))
    (out / f"compile_cost_{stamp}.md").write_text(header + table(rows))
    print(f"wrote {out}/compile_cost_{stamp}.{{json,md}}")
    return rows


if __name__ == "__main__":
    main()
