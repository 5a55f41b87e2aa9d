"""`python -m bench.aot`: compile every Triton kernel a GPT-2 124M step launches, for sm_90, on a CPU.

Why: the kernels are tested under TRITON_INTERPRET=1, which never runs Triton's compiler, and GPU
time is rare. This check needs no GPU: for each configuration below it builds the GPT-2 124M
parameter set (bench/params.py) on CPU tensors, takes one `backend="triton"` step as a launch
*capture* (a dry run: nothing executes, see `mango_kernels._launch`), and compiles each distinct
specialization it captured with Triton's compiler for `GPUTarget("cuda", 90, 32)` (H100/H200)
through `mango_kernels.aot`. Nothing here names a kernel or a signature: whatever the backend
launches is what gets compiled, so kernels added or changed later are covered automatically.

Configurations: every dtype the tables hold (fp32/bf16/fp16 params with same-dtype grads, fp64
params, bf16/fp16/fp32 NS operands; see `configurations`), both alignments of the tiled NS path (the tied 50257-row
head makes it unaligned; labelled as an embedding it is aligned), unaligned parameter addresses,
the non-finite check, and the other presets (muon, lamb, laprop, novograd).

    python -m bench.aot                      # all configurations, sm_90; exit 1 if any fails
    python -m bench.aot --arch 80 --json r.json --only mango-fp32-bf16

Run it in a process without TRITON_INTERPRET (the test suite starts one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
_SHORT = {F32: "fp32", BF16: "bf16", F16: "fp16", F64: "fp64", "auto": "auto"}


@dataclass(frozen=True)
class Config:
    """One optimizer configuration on the GPT-2 124M set whose step is captured and compiled."""

    preset: str = "mango"
    param_dtype: torch.dtype = F32
    ns_dtype: object = BF16  # a torch dtype or "auto"
    tied_role: str = "head"  # "embedding": no NS on the 50257-row tensor, aligned tiled NS
    unaligned: bool = False  # params and grads at odd element offsets of one buffer
    ns_method: str = "auto"  # "gram": the Gram-form kernels (on CPU "auto" picks textbook: bf16 is fast here)

    @property
    def name(self) -> str:
        parts = [self.preset, _SHORT[self.param_dtype], _SHORT[self.ns_dtype]]
        if self.tied_role != "head":
            parts.append("tied-" + self.tied_role)
        if self.unaligned:
            parts.append("unaligned")
        if self.ns_method != "auto":
            parts.append(self.ns_method)
        return "-".join(parts)


def configurations(core: bool = False) -> list[Config]:
    """All configurations, or (core=True) the subset that yields every distinct specialization
    of the full list: the bf16/fp16-param runs and the lamb/laprop/muon presets differ from the
    fp32 ones only in run-time table values (dtype codes, flags), not in what gets compiled.
    fp64 params with ns_dtype "auto" are left out: their NS is torch's float64 path (no kernel;
    a capture would run it on the CPU) and their elementwise kernels are the fp64 ones above."""
    dtypes = (BF16, F16, F32)
    out = [Config("mango", p, n) for p in (F32, F64) for n in dtypes]
    out += [Config("mango", p, n, tied_role="embedding") for p in (F32, F64) for n in dtypes]
    out += [Config("mango", F32, BF16, unaligned=True), Config("novograd", F32, BF16)]
    out += [Config("mango", F32, n, ns_method="gram") for n in ("auto", F32)]  # fp16 / fp32 Gram-form kernels
    if not core:
        out += [Config("mango", p, n) for p in (BF16, F16) for n in dtypes]
        out += [Config(p, F32, BF16) for p in ("muon", "lamb", "laprop")]
    return out


def _tensors(pset, dtype, unaligned: bool):
    """Uninitialized params with grads (values are never read: the step is a capture)."""
    if not unaligned:
        params = [torch.nn.Parameter(torch.empty(t.shape, dtype=dtype)) for t in pset.tensors]
        for p in params:
            p.grad = torch.empty_like(p)
        return params
    total = sum(t.numel + 1 for t in pset.tensors)
    flat_p, flat_g = torch.empty(total + 1, dtype=dtype), torch.empty(total + 1, dtype=dtype)
    params, off = [], 1
    for t in pset.tensors:
        p = torch.nn.Parameter(flat_p[off : off + t.numel].view(t.shape))
        p.grad = flat_g[off : off + t.numel].view(t.shape)
        params.append(p)
        off += t.numel + 1
    return params


def capture(config: Config, set_name: str = "gpt2-124m") -> list:
    """The launches of one `backend="triton"` step of `config` (a capture: nothing runs)."""
    import mango
    import mango_kernels as mk
    from bench.params import mango_groups, resolve_set

    pset = resolve_set(set_name, tied_role=config.tied_role)
    params = _tensors(pset, config.param_dtype, config.unaligned)
    preset = getattr(mango.presets, config.preset)
    opt = preset(mango_groups(pset, params), backend="triton", nonfinite="skip", ns_dtype=config.ns_dtype, ns_method=config.ns_method)
    with mk.count_launches(capture=True) as log:
        opt.step()
    return log.launches


def run(configs, arch: int = 90, set_name: str = "gpt2-124m", log=print) -> dict:
    """Capture every configuration, compile the distinct specializations, return a report."""
    import triton

    from mango_kernels import aot

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.aot: unset TRITON_INTERPRET (under the interpreter nothing is compiled)")
    started = time.perf_counter()
    launches, per_config = [], []
    for c in configs:
        t0 = time.perf_counter()
        got = capture(c, set_name)
        per_config.append({"name": c.name, "launches": len(got), "kernels": sorted({x.name for x in got}),
                           "capture_s": round(time.perf_counter() - t0, 2)})  # fmt: skip
        launches.extend(got)
        log(f"  captured {c.name}: {len(got)} launches ({', '.join(per_config[-1]['kernels'])})")
    target = aot.target(arch)
    t0 = time.perf_counter()
    compiled = aot.compile_launches(launches, target)
    failed = [r for r in compiled if not r.ok]
    return {
        "kind": "bench.aot",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "target": {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size},
        "set": set_name,
        "configs": per_config,
        "captured_launches": len(launches),
        "specializations": len(compiled),
        "kernels": sorted({r.kernel for r in compiled}),
        "failed": len(failed),
        "compile_s": round(time.perf_counter() - t0, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "results": [r.to_dict() for r in compiled],
    }


def markdown(report: dict) -> str:
    """Per-kernel table: specializations compiled, failures, largest shared memory, compile time."""
    by: dict = {}
    for r in report["results"]:
        k = by.setdefault(r["name"], {"n": 0, "failed": 0, "shared": 0, "s": 0.0, "launches": 0})
        k["n"] += 1
        k["failed"] += r["error"] is not None
        k["shared"] = max(k["shared"], r["shared_bytes"] or 0)
        k["s"] += r["seconds"]
        k["launches"] += r["launches"]
    t = report["target"]
    lines = [
        f"AOT compile for {t['backend']} sm_{t['arch']} with triton {report['triton']} (torch {report['torch']}): "
        f"{report['specializations']} specializations from {report['captured_launches']} captured launches of "
        f"{len(report['configs'])} configurations on {report['set']}; **{report['failed']} failed**; {report['wall_s']:.0f} s",
        "",
        "| kernel | specializations | failed | max shared KB | compile s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, k in by.items():
        lines.append(f"| {name} | {k['n']} | {k['failed']} | {k['shared'] / 1024:.0f} | {k['s']:.1f} |")
    for r in report["results"]:
        if r["error"]:
            lines.append(f"\n- FAILED `{r['name']}` {r['constexprs']}: {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    p.add_argument("--set", default="gpt2-124m", help="parameter set of bench/params.py (default gpt2-124m)")
    p.add_argument("--only", help="comma-separated configuration names (default: all)")
    p.add_argument("--core", action="store_true", help="only the configurations that add specializations (what the test suite runs)")
    p.add_argument("--list", action="store_true", help="print the configuration names and exit")
    p.add_argument("--json", help="write the full report here")
    args = p.parse_args(argv)
    configs = configurations(core=args.core)
    if args.list:
        print("\n".join(c.name for c in configs))
        return 0
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; see --list")
        configs = [c for c in configs if c.name in wanted]
    report = run(configs, args.arch, args.set)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report))
    if not report["specializations"]:
        print("bench.aot: nothing was captured", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
