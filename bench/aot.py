"""`python -m bench.aot`: compile every Triton kernel a GPT-2 124M step launches, for a GPU, on a CPU.

Why: the kernels are tested under TRITON_INTERPRET=1, which never runs Triton's compiler, and GPU
time is rare. This check needs no GPU: for each configuration below it builds the GPT-2 124M
parameter set (bench/params.py) on CPU tensors, takes one `backend="triton"` step as a launch
*capture* (a dry run: nothing executes, see `mango_kernels._launch`) with the NS engines and tile
sizes `mango.ns_engine` picks for the target architecture (the backend's `ns_target`), and
compiles each distinct specialization it captured with Triton's compiler for that target
(default `GPUTarget("cuda", 90, 32)`: H100/H200) through `mango_kernels.aot`. Nothing here names a
kernel or a signature: whatever the backend launches is what gets compiled, so kernels added or
changed later are covered automatically.

Configurations: every dtype the tables hold (fp32/bf16/fp16 params with same-dtype grads, fp64
params, bf16/fp16/fp32 NS operands; see `configurations`), both alignments of the tiled NS path
(ns_engine="triton" forces it; the tied 50257-row head makes it unaligned, labelled as an
embedding it is aligned), unaligned parameter addresses, the non-finite check, and the other
presets (muon, lamb, laprop, novograd).

`--tiles` checks the tiled NS kernels alone, on each architecture given: for every operand dtype
and form, the tile sizes `mango.ns_engine` picks there are compiled, and the shared memory the
compiler reports must equal what `mango_kernels.resources` (the model those tile sizes were
picked by) says, and fit the architecture.

    python -m bench.aot                      # all configurations, sm_90; exit 1 if any fails
    python -m bench.aot --arch 80 --json r.json --only mango-fp32-bf16
    python -m bench.aot --tiles --arch 80,86,89,90

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
    ns_method: str = "auto"  # "gram": the Gram-form kernels
    ns_engine: str = "auto"  # "triton": the tiled kernels for the large matrices (the table gives them to cuBLAS)

    @property
    def name(self) -> str:
        parts = [self.preset, _SHORT[self.param_dtype], _SHORT[self.ns_dtype]]
        if self.tied_role != "head":
            parts.append("tied-" + self.tied_role)
        if self.unaligned:
            parts.append("unaligned")
        if self.ns_method != "auto":
            parts.append(self.ns_method)
        if self.ns_engine != "auto":
            parts.append(self.ns_engine)
        return "-".join(parts)


def configurations(core: bool = False) -> list[Config]:
    """All configurations, or (core=True) the subset that yields every distinct specialization
    of the full list: the bf16/fp16-param runs and the lamb/laprop/muon presets differ from the
    fp32 ones only in run-time table values (dtype codes, flags), not in what gets compiled, and
    with ns_engine "auto" the large matrices run in cuBLAS (no kernel), so the forced-"triton"
    runs compile all the auto ones do and the tiled kernels besides.
    fp64 params with ns_dtype "auto" are left out: their NS is torch's float64 path (no kernel;
    a capture would run it on the CPU) and their elementwise kernels are the fp64 ones above."""
    dtypes = (BF16, F16, F32)
    out = [Config("mango", F32, "auto")]  # what a GPU step runs by default (the Gram form where it pays)
    out += [Config("mango", p, n, ns_engine="triton") for p in (F32, F64) for n in dtypes]
    out += [Config("mango", F32, n, tied_role="embedding", ns_engine="triton") for n in dtypes]
    out += [Config("mango", F32, BF16, unaligned=True, ns_engine="triton"), Config("novograd", F32, BF16)]
    out += [Config("mango", F32, n, ns_method="gram", ns_engine="triton") for n in ("auto", F32)]  # fp16 / fp32 Gram-form kernels
    out += [Config("mango", F32, n, ns_method="textbook", ns_engine="triton") for n in (F16, F32)]  # on a GPU "auto" gives these heads the Gram form
    if not core:
        out += [Config("mango", p, n) for p in (F32, F64) for n in dtypes]
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


def capture(config: Config, set_name: str = "gpt2-124m", arch: int = 90) -> list:
    """The launches of one `backend="triton"` step of `config`, with the NS engines and tiles
    chosen as on sm_`arch` (a capture: nothing runs)."""
    import mango
    import mango_kernels as mk
    from bench.params import mango_groups, resolve_set

    pset = resolve_set(set_name, tied_role=config.tied_role)
    params = _tensors(pset, config.param_dtype, config.unaligned)
    preset = getattr(mango.presets, config.preset)
    opt = preset(mango_groups(pset, params), backend="triton", nonfinite="skip", ns_dtype=config.ns_dtype,
                 ns_method=config.ns_method, ns_engine=config.ns_engine)  # fmt: skip
    with mk.count_launches(capture=True) as log:  # a CPU tensor takes the triton backend only in a dry run
        opt._backend_for(torch.device("cpu")).ns_target = f"sm_{arch}"
        opt.step()
    return log.launches


def _refuse_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.aot: unset TRITON_INTERPRET (under the interpreter nothing is compiled)")


def run(configs, arch: int = 90, set_name: str = "gpt2-124m", log=print) -> dict:
    """Capture every configuration, compile the distinct specializations, return a report."""
    import triton

    from mango_kernels import aot

    _refuse_the_interpreter()
    started = time.perf_counter()
    launches, per_config = [], []
    for c in configs:
        t0 = time.perf_counter()
        got = capture(c, set_name, arch)
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


def tile_launches(arch: int) -> list:
    """(launch, tiles) of the tiled NS kernels at the tile sizes `mango.ns_engine` picks on sm_`arch`,
    for every NS operand dtype and form (ns_engine="triton"), one per distinct (kernel, tiles,
    operand size): shared memory depends on the operand's size, not on which 16-bit dtype it is."""
    import mango_kernels as mk
    from mango import config, ns_engine
    from mango_kernels import resources
    from mango_kernels.ns_tiled import ns_poly

    seen, out = set(), []
    for method, dtype in (("textbook", BF16), ("textbook", F32), ("gram", F16), ("gram", F32)):
        settings = dict(config.DEFAULTS, ns_engine="triton", ns_method=method, ns_dtype=dtype)
        choice = ns_engine.choose(settings, 768, 3072, F32, "cpu", "triton", arch=f"sm_{arch}")
        size = torch.finfo(dtype).bits // 8
        kernels = [k for k in resources.TILED_KERNELS[method] if (k, choice.tiles, size) not in seen]
        if not kernels:
            continue
        seen.update((k, choice.tiles, size) for k in kernels)
        bm, bn, bk = choice.tiles
        cfg = mk.NSConfig(small_max_rows=0, gram_small_max_rows=0, block_m=bm, block_n=bn, block_k=bk)
        batch = mk.NSBatch([mk.NSSpec.row_major(256, 512)], dtype, "cpu", cfg)  # its textbook tables serve both forms
        batch.set_schedule([1], [[config.MUON_COEFFICIENTS]], [1e-7])
        with mk.count_launches(capture=True) as log:
            batch.launch_xxt(0)
            ns_poly(batch.large_items, batch.large_coef, batch.sums, batch.tri_tiles, batch.workspace_a, batch.workspace_b, 0,
                    dtype=dtype, block_m=bm, block_k=bk, aligned=batch.large_aligned)  # fmt: skip
            batch.launch_update(0, 1)
        out += [(la, choice.tiles) for la in log.launches if la.name in kernels]
    return out


def run_tiles(archs, log=print) -> dict:
    """Compile `tile_launches` for each architecture; a specialization fails where it does not
    compile, does not fit, or takes other shared memory than `mango_kernels.resources` says."""
    import triton

    from mango_kernels import aot, resources

    _refuse_the_interpreter()
    started = time.perf_counter()
    results, captured = [], 0
    for arch in archs:
        launches = tile_launches(arch)
        captured += len(launches)
        for (_, tiles), r in zip(launches, aot.compile_launches([la for la, _ in launches], aot.target(arch))):
            c = r.constexprs
            size = {"bf16": 2, "fp16": 2, "fp32": 4}[str(c["DTYPE"])]
            model = resources.tiled_shared_memory(r.name, tiles, size, f"sm_{arch}")
            if r.ok and r.shared_bytes != model:
                r.error = f"the compiler reports {r.shared_bytes} B of shared memory; mango_kernels.resources says {model} B"
            results.append(dict(r.to_dict(), arch=arch, tiles=list(tiles), model_bytes=model))
            log(f"  sm_{arch} {r.name} {c['DTYPE']} tiles {tiles}: {r.shared_bytes} B (model {model} B)"
                + (f" FAILED: {r.error}" if r.error else ""))  # fmt: skip
    return {
        "kind": "bench.aot --tiles",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "archs": list(archs),
        "captured_launches": captured,
        "specializations": len(results),
        "failed": sum(r["error"] is not None for r in results),
        "wall_s": round(time.perf_counter() - started, 2),
        "results": results,
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
    p.add_argument("--arch", default="90", help="CUDA compute capability x10 (default 90: H100/H200); with --tiles a comma-separated list")
    p.add_argument("--tiles", action="store_true", help="compile the tiled NS kernels at the tile sizes picked for each --arch, against the shared-memory model")
    p.add_argument("--set", default="gpt2-124m", help="parameter set of bench/params.py (default gpt2-124m)")
    p.add_argument("--only", help="comma-separated configuration names (default: all)")
    p.add_argument("--core", action="store_true", help="only the configurations that add specializations (what the test suite runs)")
    p.add_argument("--list", action="store_true", help="print the configuration names and exit")
    p.add_argument("--json", help="write the full report here")
    args = p.parse_args(argv)
    if args.tiles:
        report = run_tiles([int(a) for a in args.arch.split(",")])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(f"tiled NS kernels on sm_{', sm_'.join(args.arch.split(','))}: {report['specializations']} specializations, "
              f"**{report['failed']} failed**; {report['wall_s']:.0f} s")  # fmt: skip
        return 1 if report["failed"] or not report["specializations"] else 0
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
    report = run(configs, int(args.arch), args.set)
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
