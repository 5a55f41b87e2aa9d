"""Where and how each Newton–Schulz bucket runs: decided once, at plan time, in this module.

For every NS bucket (one block shape of one param group) `choose` returns an `NSChoice`:

    engine   "triton_small"  the Triton on-chip kernels (one launch for all steps; small blocks)
             "triton_tiled"  the Triton tiled kernels, with the tile sizes in `tiles`
             "cublas"        torch batched GEMMs on the same NS stack buffers (the triton backend)
             "torch"         torch batched GEMMs in the torch backend (and float64 NS anywhere)
    method   "textbook" or "gram" (mango.newton_schulz)
    dtype    the operand dtype
    why      where the decision came from: "forced", "table sm_90", "model", "measured ...", ...

Backends read the choice from the bucket (`NormBucket.ns_choice`); none decides again. The
float64 reference evaluates whatever it is handed and asks nothing here.

How "auto" is decided:
* **dtype and form** minimise FLOPs / rate over the candidates that hold the correctness contract's accuracy for
  the form: textbook in bf16 or fp32, Gram in fp16 or fp32 (bf16 cannot hold the Gram iterates).
  The rates come from a `DeviceProfile`: on a CPU running the torch backend, *measured* the first
  time the CPU is used (a few ms of batched products; cached per process, and on disk when
  MANGO_NS_CACHE names a file); on CUDA, the tensor-core rates (bf16 = fp16, fp32 far slower).
  Triton kernels run their design point (bf16 textbook / fp16 Gram) on any device.
* **engine** (triton backend): from the per-architecture table `ARCH_TABLE` (measured on a GPU)
  or, for an architecture not in it, from `model_engine` (a FLOP/launch model); the setting
  `ns_engine` ("triton" / "cublas") forces it. Tile sizes always fit the target's shared memory
  (`mango_kernels.resources`: what each tiled kernel takes, held to Triton's compiler by the
  ahead-of-time check); the on-chip limits are the kernels' own (`resources.ON_CHIP_MAX_ROWS`).

The measured verdict is fixed for the optimizer's life: `Mango.state_dict()` stores it and a
loaded optimizer keeps it (also on another machine: the dtypes of a resumed run do not change).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from mango_kernels.resources import ON_CHIP_MAX_ROWS, fit_tiles

from . import newton_schulz as _ns
from .config import DEFAULTS, ns_schedule

__all__ = [
    "NSChoice",
    "DeviceProfile",
    "ENGINES",
    "ARCH_TABLE",
    "choose",
    "choose_for_bucket",
    "auto_dtype",
    "auto_method",
    "describe_choices",
    "cpu_profile",
    "clear_measurements",
    "measure_rates",
    "model_engine",
]

ENGINES = ("auto", "triton", "cublas")  # the ns_engine setting
_LOW = (torch.bfloat16, torch.float16)
# candidate operand dtypes per form, most precise last: what holds the correctness contract's accuracy for that form
_CANDIDATES = {"textbook": (torch.bfloat16, torch.float32), "gram": (torch.float16, torch.float32)}

# Per architecture, measured on a GPU (gpu-runs/2026-12-04-h200: sweep.log, step.md, profile.log):
#   sm_90: the on-chip kernels win for head blocks (64×768 ×432: 0.42× the bare cuBLAS NS); the
#   tiled kernels lose 2–8× to cuBLAS on every large shape measured (768² … 8192×2048, the
#   50257×768 head: 11.8 ms at block_m=64 against 5.3 ms), so large blocks run as cuBLAS GEMMs.
#   tiles: the best measured tile sizes, used where ns_engine="triton" forces the tiled kernels.
ARCH_TABLE = {
    "sm_90": {"small": "triton_small", "large": "cublas", "tiles": (64, 128, 64)},
}
DEFAULT_TILES = (64, 128, 64)  # where the table has no tile sizes: cut to fit by `fit_tiles`


@dataclass(frozen=True)
class NSChoice:
    """How one NS bucket runs (see the module docstring)."""

    engine: str
    method: str
    dtype: torch.dtype
    why: str
    tiles: tuple = None

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        tiles = f" {self.tiles[0]}x{self.tiles[1]}x{self.tiles[2]}" if self.tiles else ""
        return f"{self.engine}{tiles} {self.method} {dt} ({self.why})"


@dataclass
class DeviceProfile:
    """Relative matmul rates per operand dtype on a device, and where they came from."""

    rates: dict  # dtype -> rate (any unit; only ratios matter)
    source: str  # "measured on <cpu>", "table", "seed <isa>", "tensor cores"
    key: str = ""

    def to_state(self) -> dict:
        return {"rates": {str(d).replace("torch.", ""): r for d, r in self.rates.items()}, "source": self.source, "key": self.key}

    @classmethod
    def from_state(cls, s: dict) -> "DeviceProfile":
        return cls({getattr(torch, d): float(r) for d, r in s["rates"].items()}, s["source"], s.get("key", ""))


_TENSOR_CORES = DeviceProfile({torch.bfloat16: 16.0, torch.float16: 16.0, torch.float32: 1.0, torch.float64: 0.25}, "tensor cores")
_KERNELS = DeviceProfile({torch.bfloat16: 1.0, torch.float16: 1.0, torch.float32: 1.0 / 16, torch.float64: 1.0 / 64}, "kernel design point")


# ----------------------------------------------------------------------------------------
# CPU: measured rates
# ----------------------------------------------------------------------------------------

_measured: dict = {}  # cpu key -> DeviceProfile, for this process


def cpu_key() -> str:
    """What a CPU measurement is valid for: the CPU model, threads and torch version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _isa_seed() -> DeviceProfile:
    """A starting guess from ISA features (used only when measuring is switched off): AMX runs
    bf16 far faster than fp32; AVX512-BF16 alone does not (measured 164 vs 264 GFLOP/s)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if amx:
        return DeviceProfile({torch.bfloat16: 4.0, torch.float16: 1.0, torch.float32: 1.0, torch.float64: 0.5}, "seed AMX")
    return DeviceProfile({torch.bfloat16: 0.6, torch.float16: 0.3, torch.float32: 1.0, torch.float64: 0.5}, "seed no-AMX")


def measure_rates(shape=(2, 128, 1024), dtypes=(torch.float32, torch.bfloat16, torch.float16), timer=None, repeats: int = 5) -> dict:
    """GFLOP/s of a batched X·Xᵀ product (NS's own product, at a typical block width) per dtype on
    this CPU: the dtypes timed in turn (so a load spike hits them alike), best of `repeats` after
    two warm-up calls each (the first bf16 call pays oneDNN's set-up); a dtype 4× slower than the
    best after two rounds is dropped from further rounds. ~20–100 ms on a 2-core CPU.
    `timer(dtype) -> seconds` replaces the timing (tests)."""
    B, m, n = shape
    flops = 2 * B * m * m * n
    if timer is not None:
        return {dt: flops / timer(dt) / 1e9 for dt in dtypes}
    xs = {dt: torch.randn(B, m, n).to(dt) for dt in dtypes}
    for X in xs.values():
        torch.bmm(X, X.mT)
        torch.bmm(X, X.mT)
    best = {dt: float("inf") for dt in dtypes}
    live = list(dtypes)
    for r in range(repeats):
        for dt in live:
            t0 = time.perf_counter()
            torch.bmm(xs[dt], xs[dt].mT)
            best[dt] = min(best[dt], time.perf_counter() - t0)
        if r == 1:
            fastest = min(best.values())
            live = [dt for dt in live if best[dt] <= 4 * fastest]
    return {dt: flops / max(t, 1e-9) / 1e9 for dt, t in best.items()}


def _disk_cache():
    return os.environ.get("MANGO_NS_CACHE") or None


def cpu_profile(timer=None) -> DeviceProfile:
    """This CPU's measured profile: from this process's cache, the disk cache (MANGO_NS_CACHE), or
    measured now (a few ms). MANGO_NS_MEASURE=0 uses the ISA seed instead."""
    key = cpu_key()
    if timer is None and key in _measured:
        return _measured[key]
    path = _disk_cache()
    if timer is None and path and os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f).get(key)
            if saved:
                _measured[key] = DeviceProfile.from_state(saved)
                return _measured[key]
        except (OSError, ValueError):
            pass
    if timer is None and os.environ.get("MANGO_NS_MEASURE") == "0":
        return _isa_seed()
    rates = measure_rates(timer=timer)
    rates[torch.float64] = rates[torch.float32] / 2
    prof = DeviceProfile(rates, "measured", key)
    if timer is None:
        _measured[key] = prof
        if path:
            _save(path, key, prof)
    return prof


def _save(path: str, key: str, prof: DeviceProfile) -> None:
    try:
        data = json.load(open(path)) if os.path.exists(path) else {}
    except (OSError, ValueError):
        data = {}
    data[key] = prof.to_state()
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError:
        pass


def clear_measurements(disk: bool = True) -> None:
    """Forget measured CPU profiles (this process's, and the MANGO_NS_CACHE file with disk=True)."""
    _measured.clear()
    path = _disk_cache()
    if disk and path and os.path.exists(path):
        os.remove(path)


# ----------------------------------------------------------------------------------------
# GPU: the per-architecture table, and a model where the architecture is not in it
# ----------------------------------------------------------------------------------------


def cuda_arch(device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def model_engine(rows: int, cols: int, method: str, steps: int, count: int) -> str:
    """For a GPU not in `ARCH_TABLE`: blocks that fit on chip take the on-chip kernels (one
    launch for all steps, where cuBLAS pays ~3 GEMM launches per step on many tiny matrices);
    larger ones cuBLAS, whose GEMMs run near peak where the tiled kernels reached 15–50% of it
    on sm_90. Time ≈ FLOPs / (efficiency × peak) + launches × 5 µs, peak 1 (relative)."""
    m = min(rows, cols)
    if m > ON_CHIP_MAX_ROWS[method]:
        return "cublas"
    flops = count * _ns.flops(method, rows, cols, steps)
    peak = 400e12  # a relative scale: ~ a current tensor-core GPU
    on_chip = flops / (0.35 * peak) + 5e-6
    cublas = flops / (0.7 * peak) + (3 * steps + 3) * 5e-6
    return "triton_small" if on_chip <= cublas else "cublas"


# ----------------------------------------------------------------------------------------
# the decision
# ----------------------------------------------------------------------------------------


def _form_and_dtype(settings, rows, cols, state_dtype, profile: DeviceProfile, forms=("textbook", "gram")):
    """The (method, dtype) of least FLOPs / rate among the candidates the settings allow."""
    steps = len(ns_schedule(settings))
    forced_m, forced_d = settings.get("ns_method", "auto"), settings.get("ns_dtype", "auto")
    methods = forms if forced_m == "auto" else (forced_m,)
    if forced_d == torch.bfloat16:
        methods = tuple(m for m in methods if m == "textbook") or ("textbook",)
    best = None
    for method in methods:
        if forced_d != "auto":
            dtypes = (forced_d,)
        elif state_dtype == torch.float64:
            dtypes = (torch.float64,)
        else:
            dtypes = _CANDIDATES[method]
        for dt in dtypes:
            cost = _ns.flops(method, rows, cols, steps) / profile.rates.get(dt, 1.0)
            if best is None or cost < best[0]:
                best = (cost, method, dt)
    return best[1], best[2]


def choose(settings: dict, rows: int, cols: int, state_dtype: torch.dtype, device, backend: str = "torch",
           count: int = 1, profile: DeviceProfile = None, arch: str = None) -> NSChoice:  # fmt: skip
    """How NS blocks of (rows, cols) of one param group run on `device` under `backend` ("torch"
    or "triton"); `count` blocks in the bucket; `profile` overrides the device's rates; `arch`
    (e.g. "sm_90"): decide as on that GPU (a launch dry run on a CPU counting a CUDA step)."""
    device = torch.device(device) if not isinstance(device, _Target) else device
    if arch is not None:
        device = _Target(arch)
    engine_setting = settings.get("ns_engine", "auto")
    if backend == "triton":
        prof = profile or (_TENSOR_CORES if device.type == "cuda" else _KERNELS)
        forms = ("textbook", "gram") if device.type == "cuda" or profile is not None else ("textbook",)
        method, dtype = _form_and_dtype(settings, rows, cols, state_dtype, prof, forms)
        why = _why(settings, "tensor cores" if device.type == "cuda" else "interpreter: the kernels' textbook bf16")
        if dtype == torch.float64:
            return NSChoice("torch", method, dtype, "float64: torch")
        return _engine(settings, engine_setting, rows, cols, method, dtype, device, why, count)
    if device.type == "cpu":
        prof = profile or cpu_profile()
    else:
        prof = profile or _TENSOR_CORES
    method, dtype = _form_and_dtype(settings, rows, cols, state_dtype, prof)
    return NSChoice("torch", method, dtype, _why(settings, prof.source))


def _why(settings, source: str) -> str:
    """What decided the form and dtype: the settings that force them, else `source`."""
    forced = [f"{k} set" for k in ("ns_dtype", "ns_method") if settings.get(k, "auto") != "auto"]
    return ", ".join(forced) if len(forced) == 2 else ", ".join(forced + [source])


class _Target:
    """A CUDA device of a given architecture, for deciding without one."""

    type = "cuda"

    def __init__(self, arch: str):
        self.arch = arch


def _engine(settings, engine_setting, rows, cols, method, dtype, device, why, count) -> NSChoice:
    m = min(rows, cols)
    small = m <= ON_CHIP_MAX_ROWS[method]
    arch = (device.arch if isinstance(device, _Target) else cuda_arch(device)) if device.type == "cuda" else None
    entry = ARCH_TABLE.get(arch)
    tiles = fit_tiles((entry or {}).get("tiles", DEFAULT_TILES), arch, torch.finfo(dtype).bits // 8, method) if arch else None
    if engine_setting == "cublas":
        return NSChoice("cublas", method, dtype, f"{why}; ns_engine=cublas")
    if engine_setting == "triton" or device.type != "cuda":
        engine = "triton_small" if small else "triton_tiled"
        source = "ns_engine=triton" if engine_setting == "triton" else "no GPU"
        return NSChoice(engine, method, dtype, f"{why}; {source}", None if small else tiles)
    steps = len(ns_schedule(settings))
    if entry is not None:
        engine = entry["small"] if small else entry["large"]
        source = f"table {arch}"
    else:
        engine = model_engine(rows, cols, method, steps, count)
        source = f"model ({arch} not measured)"
    return NSChoice(engine, method, dtype, f"{why}; {source}", tiles if engine == "triton_tiled" else None)


def auto_dtype(settings: dict, method: str, device, state_dtype: torch.dtype = torch.float32, backend: str = "torch") -> torch.dtype:
    """The operand dtype "auto" gives the `method` form on `device` (its settings' ns_dtype when set)."""
    full = {**DEFAULTS, **settings, "ns_method": method}
    return choose(full, 64, 64, state_dtype, device, backend).dtype


def auto_method(settings: dict, rows: int, cols: int, device, state_dtype: torch.dtype = torch.float32, backend: str = "torch") -> str:
    """The form "auto" gives (rows, cols) blocks on `device` under these settings."""
    return choose({**DEFAULTS, **settings}, rows, cols, state_dtype, device, backend).method


def describe_choices(choices) -> list:
    """Lines for `mango.describe`: per NS bucket, its blocks, engine, form, dtype and why."""
    if not choices:
        return []
    lines = ["Newton–Schulz per bucket (engine, form, dtype, and what decided them):"]
    for names, (r, c), choice in choices:
        first = names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        lines.append(f"  ({r},{c}) x{len(names)} [{first}]: {choice.label()}")
    return lines


def choose_for_bucket(nb, bucket, group, backend: str, profile: DeviceProfile = None) -> NSChoice:
    """The NS bucket's choice: the one the optimizer stored on it at plan time (`nb.ns_choice`),
    else decided now for `backend` and stored (a backend driven without the optimizer)."""
    if nb.ns_choice is None:
        r, c = nb.block_shape
        count = nb.blocks_per_tensor * len(nb.slots)
        nb.ns_choice = choose(group, r, c, bucket.dtype, bucket.device, backend, count, profile)
    return nb.ns_choice
