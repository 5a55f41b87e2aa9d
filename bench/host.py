"""`python -m bench.host`: the Python time of one triton-backend step, without a GPU.

A step's host work (the frontend's bookkeeping, the tensor table, addresses, launch arguments, and
the Python of every torch op it issues) is paid before its launches reach the device; on a GPU it
adds to the step wherever the kernels are shorter. It does not depend on the device, so this builds
Hugging Face GPT-2 124M from its config (tied head, and untied with `tie_word_embeddings=False`) on
CPU tensors and times `opt.step()` as a launch dry run (`mango_kernels.count_launches(dry_run=True)`:
every launch is decided and recorded, no kernel executes; the cuBLAS engine's torch ops run on
one-element stand-ins, so their Python and dispatch are counted too). The time is the stepping
thread's CPU time (`time.thread_time`), so other load on a shared machine does not count; the wall
time's median is reported beside it.

Each set runs with the NS engines a GPU chooses (`--choices sm_90`, the default: head blocks on the
Triton on-chip kernels, every larger matrix on the cuBLAS engine, as on an H100/H200) and with a
CPU's (`cpu`: every NS on the Triton kernels), for the default step and `capturable=True`. The
median and the minimum over `--steps` steps after warm-up are reported (the four optimizers of a
set take turns in blocks of steps, so a shared machine's load falls on each alike), with the launches of one
step (Triton kernels, cuBLAS-engine ops, other torch ops) and the rounds.

    python -m bench.host                       # both heads, both choices (~2 min)
    python -m bench.host --profile             # plus a cProfile of the untied sm_90 step

Writes `host_<time>.{json,md}` to --out (default bench/results/local/).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors through the triton backend (dry runs only)

import torch  # noqa: E402

import mango  # noqa: E402
import mango_kernels as mk  # noqa: E402
from mango import ns_engine  # noqa: E402

SETS = {"hf-gpt2-124m-tied": True, "hf-gpt2-124m-untied": False}  # name -> tie_word_embeddings
CHOICES = {"sm_90": "sm_90", "cpu": None}  # label -> the triton backend's ns_target
KERNELS = ("moments", "apply", "segment_sums", "novograd_prepass", "ns_small", "ns_small_gram", "ns_xxt", "ns_poly", "ns_update")
CUBLAS = ("cublas_gemm", "cublas_op")


def build(tied: bool):
    """HF GPT-2 124M from its config, on the CPU, with gradients set (zeros: a dry run reads only addresses)."""
    import transformers

    config = transformers.GPT2Config(tie_word_embeddings=tied)
    model = transformers.GPT2LMHeadModel(config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def optimizer(model, choice: str, capturable: bool = False):
    opt = mango.Mango(mango.param_groups(model), backend="triton", capturable=capturable)
    opt._backend_for(torch.device("cpu")).ns_target = CHOICES[choice]
    return opt


def time_steps(opts: list, steps: int, blocks: int = 8) -> list:
    """For each optimizer: (CPU seconds and wall seconds of each dry-run step, the launches of one
    step by name). The optimizers take turns in `blocks` blocks of steps, so that a shared
    machine's slow and fast spells fall on all of them alike."""
    logs = []
    for opt in opts:
        with mk.count_launches(dry_run=True):
            for _ in range(3):  # plan, launch groups, first-step caches
                opt.step()
        with mk.count_launches(dry_run=True) as log:
            opt.step()
        logs.append(log.by_name())
    cpu, wall = [[] for _ in opts], [[] for _ in opts]
    per_block = -(-steps // blocks)
    with mk.count_launches(dry_run=True):
        for _ in range(blocks):
            for n, opt in enumerate(opts):
                for _ in range(per_block):
                    t0, w0 = time.thread_time(), time.perf_counter()
                    opt.step()
                    cpu[n].append(time.thread_time() - t0)
                    wall[n].append(time.perf_counter() - w0)
    return list(zip(cpu, wall, logs))


def profile(opt, steps: int = 50, top: int = 25) -> str:
    with mk.count_launches(dry_run=True):
        opt.step()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            opt.step()
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def launch_kinds(by_name: dict) -> dict:
    """Launches of one step: Triton kernels, the cuBLAS engine's ops, everything else (table copy,
    capturable columns, torch fallbacks)."""
    kernels = sum(n for k, n in by_name.items() if k in KERNELS)
    cublas = sum(n for k, n in by_name.items() if k in CUBLAS)
    return dict(launches=sum(by_name.values()), kernels=kernels, cublas_ops=cublas, other=sum(by_name.values()) - kernels - cublas)


def table(rows: list) -> str:
    out = ["| set | NS choice | capturable | tensors | rounds | launches (kernels + cuBLAS ops + other) | host CPU µs / step, median | min | wall µs, median |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['set']} | {r['choice']} | {r['capturable']} | {r['tensors']} | {r['rounds']} | "
                   f"{r['launches']} ({r['kernels']} + {r['cublas_ops']} + {r['other']}) | {r['median_us']:.0f} | {r['min_us']:.0f} | "
                   f"{r['wall_median_us']:.0f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--choices", default=",".join(CHOICES))
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="bench/results/local")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.sets.split(","):
        model = build(SETS[name])
        configs = [(choice, capturable) for choice in args.choices.split(",") for capturable in (False, True)]
        opts = [optimizer(model, choice, capturable) for choice, capturable in configs]
        for (choice, capturable), opt, (cpu, wall, by_name) in zip(configs, opts, time_steps(opts, args.steps)):
            (lg,) = opt._plan.cache["triton"][1]
            rows.append(dict(set=name, choice=choice, capturable=capturable, tensors=sum(1 for _ in model.parameters()),
                             rounds=len(lg.rounds), **launch_kinds(by_name), by_name=by_name,
                             median_us=statistics.median(cpu) * 1e6, min_us=min(cpu) * 1e6,
                             wall_median_us=statistics.median(wall) * 1e6))  # fmt: skip
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.profile and not SETS[name] and choice == "sm_90" and not capturable:
                print(profile(opt))
        del opts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    machine = f"{ns_engine.cpu_key().split(' | ')[0]}, {os.cpu_count()} CPUs, 1 torch thread, load average {os.getloadavg()[0]:.1f}"
    (out / f"host_{stamp}.json").write_text(json.dumps(dict(torch=torch.__version__, machine=machine, rows=rows), indent=1))
    (out / f"host_{stamp}.md").write_text(
        f"# triton backend: host time per step (launch dry run, CPU; torch {torch.__version__})\n\n"
        f"{machine}. `sm_90`: the NS engines an H100/H200 runs (head blocks on chip, larger matrices on cuBLAS); "
        "`cpu`: every NS on the Triton kernels. A dry run runs the cuBLAS engine's torch ops on one-element "
        "stand-ins, so their Python and dispatch are in the host time.\n\n" + table(rows)
    )
    print(f"wrote {out}/host_{stamp}.{{json,md}}")
    return rows


if __name__ == "__main__":
    main()
