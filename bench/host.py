"""`python -m bench.host`: the Python time of one triton-backend step, without a GPU.

A step's host work (the frontend's bookkeeping, the tensor table, addresses, launch arguments)
is paid before every kernel launch; on a GPU it adds to the step whenever the kernels are shorter.
It does not depend on the device, so this builds Hugging Face GPT-2 124M from its config (tied
head, and untied with `tie_word_embeddings=False`) on CPU tensors and times `opt.step()` as a
launch dry run (`mango_kernels.count_launches(dry_run=True)`: every launch is decided and
recorded, none executes). The median over `--steps` steps after warm-up is reported, with the
launch count, for the default step and for `capturable=True`.

    python -m bench.host                       # both heads (~1 min)
    python -m bench.host --profile             # plus a cProfile of the untied step

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

SETS = {"hf-gpt2-124m-tied": True, "hf-gpt2-124m-untied": False}  # name -> tie_word_embeddings


def build(tied: bool):
    """HF GPT-2 124M from its config, on the CPU, with gradients set (zeros: a dry run reads only addresses)."""
    import transformers

    config = transformers.GPT2Config(tie_word_embeddings=tied)
    model = transformers.GPT2LMHeadModel(config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def optimizer(model, capturable: bool = False):
    return mango.Mango(mango.param_groups(model), backend="triton", capturable=capturable)


def time_steps(opt, steps: int) -> tuple[list, int]:
    """Host seconds of each dry-run step, and the launches of one."""
    with mk.count_launches(dry_run=True):
        for _ in range(3):  # plan, launch groups, first-step caches
            opt.step()
    times = []
    with mk.count_launches(dry_run=True) as log:
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    return times, log.count // steps


def profile(opt, steps: int = 50, top: int = 25) -> str:
    with mk.count_launches(dry_run=True):
        opt.step()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            opt.step()
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
    return s.getvalue()


def table(rows: list) -> str:
    out = ["| set | capturable | tensors | launches | host µs / step (median) | min |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['set']} | {r['capturable']} | {r['tensors']} | {r['launches']} | {r['median_us']:.0f} | {r['min_us']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="bench/results/local")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.sets.split(","):
        model = build(SETS[name])
        for capturable in (False, True):
            opt = optimizer(model, capturable)
            times, launches = time_steps(opt, args.steps)
            rows.append(dict(set=name, capturable=capturable, tensors=sum(1 for _ in model.parameters()), launches=launches,
                             median_us=statistics.median(times) * 1e6, min_us=min(times) * 1e6))  # fmt: skip
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.profile and not SETS[name] and not capturable:
                print(profile(opt))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"host_{stamp}.json").write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=1))
    (out / f"host_{stamp}.md").write_text(
        f"# triton backend: host time per step (launch dry run, CPU; torch {torch.__version__})\n\n" + table(rows)
    )
    print(f"wrote {out}/host_{stamp}.{{json,md}}")
    return rows


if __name__ == "__main__":
    main()
