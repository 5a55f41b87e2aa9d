"""Ahead-of-time compilation of captured launches for a GPU target, on a machine without a GPU.

Why: the kernels are developed under TRITON_INTERPRET=1, which never runs Triton's compiler,
and GPU time is rare. Compiling every specialization a real step launches (same constexprs,
same argument types, same alignment/value specializations) to sm_90 code catches what the
interpreter cannot: Triton API drift between versions, code the compiler rejects (type
mismatches across branches, unsupported ops), and kernels that need more shared memory than
the device has.

How: `count_launches(capture=True)` records each launch's kernel, grid and arguments (see
`mango_kernels._launch`); `compile_launches` hands them to Triton's own `JITFunction.warmup`,
which computes the specialization exactly as a launch would and compiles without running. It
needs an "active driver" only to name the device and the target, so a stand-in that answers
with a fixed `GPUTarget` is installed for the duration. Needs a process without
TRITON_INTERPRET (there `@triton.jit` gives interpreter objects).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field

from .resources import SHARED_MEMORY


@dataclass
class Compiled:
    """One distinct specialization of a kernel, compiled (or the error that stopped it)."""

    name: str
    kernel: str
    signature: dict
    constexprs: dict
    options: dict
    launches: int = 1  # captured launches that share this specialization
    seconds: float = 0.0
    shared_bytes: int | None = None
    error: str | None = None
    asm: list = field(default_factory=list)  # what the compiler produced (ttir, ..., ptx, cubin)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


class _TargetDriver:
    """The three answers `JITFunction.run` asks the active driver for; nothing is ever launched.
    The "device" is the target's architecture: a kernel keeps its compiled specializations per
    device with the target it saw first there, so one process can compile for several targets."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def target(arch: int = 90, backend: str = "cuda", warp_size: int = 32):
    """A `triton.backends.compiler.GPUTarget` (default: sm_90, i.e. H100/H200)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget(backend, arch, warp_size)


@contextlib.contextmanager
def _driver_for(gpu_target):
    """Make `gpu_target` the active driver's answer inside the block (Triton keeps the active
    driver in `driver._active`, created lazily; restoring None keeps it lazy)."""
    from triton.runtime.driver import driver

    previous = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(gpu_target))
    try:
        yield
    finally:
        driver._active = previous


def _describe(value):
    """A JSON-able description of a constexpr / signature entry."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _key(launch) -> str:
    """A stand-in for Triton's specialization key, used only to avoid recompiling a
    specialization that already failed (a successful one is deduplicated by Triton's own cache)."""
    import torch

    parts = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{a.dtype}:{a.data_ptr() % 16 == 0}")
        elif isinstance(a, int) and not isinstance(a, bool):
            parts.append(f"int:{a == 1}:{a % 16 == 0}")
        else:
            parts.append(repr(a))
    parts += [f"{k}={v!r}" for k, v in sorted(launch.kwargs.items())]
    return f"{launch.name}|" + "|".join(parts)


def compile_launches(launches, gpu_target=None) -> list[Compiled]:
    """Compile every distinct specialization among `launches` (`LaunchLog.launches`) for
    `gpu_target` (default sm_90). Returns one `Compiled` per specialization; errors are kept
    per specialization rather than raised, so one report shows everything that fails."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "mango_kernels.aot: TRITON_INTERPRET=1 is set, so the kernels are interpreter objects; "
            "run the compile check in a process without it"
        )
    gpu_target = gpu_target or target()
    limit = SHARED_MEMORY.get(f"sm_{gpu_target.arch}")
    by_kernel: dict = {}  # id(CompiledKernel) -> record: Triton's cache returns the same object
    failed: dict = {}  # _key -> record of a specialization that did not compile
    out: list[Compiled] = []
    with _driver_for(gpu_target):
        for launch in launches:
            key = _key(launch)
            if key in failed:
                failed[key].launches += 1
                continue
            kernel_name = getattr(getattr(launch.kernel, "fn", None), "__name__", None) or str(launch.kernel)
            t0 = time.perf_counter()
            try:
                compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
            except Exception as e:  # keep going: report every failing specialization
                msg = " | ".join(str(e).strip().splitlines()[:8])[:1000]
                rec = Compiled(launch.name, kernel_name, {}, _constexprs(launch.kwargs), {}, error=f"{type(e).__name__}: {msg}")
                rec.seconds = time.perf_counter() - t0
                failed[key] = rec
                out.append(rec)
                continue
            if id(compiled) in by_kernel:
                by_kernel[id(compiled)].launches += 1
                continue
            meta = compiled.metadata
            rec = Compiled(
                launch.name,
                kernel_name,
                {k: _describe(v) for k, v in getattr(compiled.src, "signature", {}).items()},
                _constexprs(launch.kwargs),
                {k: _describe(getattr(meta, k)) for k in ("num_warps", "num_stages") if hasattr(meta, k)},
                seconds=time.perf_counter() - t0,
                shared_bytes=int(getattr(meta, "shared", 0) or 0),
                asm=sorted(compiled.asm.keys()),
            )
            if limit is not None and rec.shared_bytes > limit:
                rec.error = f"needs {rec.shared_bytes} B of shared memory; sm_{gpu_target.arch} allows {limit} B per block"
            elif gpu_target.backend == "cuda" and "cubin" not in compiled.asm:
                rec.error = f"no cubin produced (stages: {rec.asm})"
            by_kernel[id(compiled)] = rec
            out.append(rec)
    return out


def _constexprs(kwargs: dict) -> dict:
    return {k: _describe(v) for k, v in kwargs.items()}
