"""Where and how each Newton–Schulz bucket runs: decided once, at plan time, in this module.

For every NS bucket (one block shape of one param group) `choose` returns an `NSChoice`:

    engine   "triton_small"  the Triton on-chip kernels (one launch for all steps; small blocks)
             "triton_tiled"  the Triton tiled kernels, with the tile sizes in `tiles`
             "cublas"        torch batched GEMMs on the same NS stack buffers (the triton backend)
             "torch"         torch batched GEMMs in the torch backend (and float64 NS anywhere)
    method   "textbook" or "gram" (mango.newton_schulz)
    dtype    the operand dtype
    why      what decided them: "measured on <cpu> at <class>", "tensor cores; table sm_90",
             "ns_dtype forced", "from checkpoint (...)", ...

Backends read the choice from the bucket (`NormBucket.ns_choice`); none decides again. The
float64 reference evaluates whatever it is handed and asks nothing here.

How "auto" is decided:
* **dtype and form**: the candidates are those that hold the correctness contract's accuracy for
  the form (textbook in bf16 or fp32; Gram in fp16 or fp32, where it has fewer FLOPs than the
  textbook form: bf16 cannot hold the Gram iterates). Each costs its m×n products' FLOPs over the
  rate of an m×n product plus its m×m products' FLOPs over the rate of an m×m product; the
  cheapest wins, but a less precise dtype must beat a more precise one by more than the
  profile's noise (10% where measured), else the more precise wins.
* **rates** come from a profile. On a CPU running the torch backend, measured per size class (the
  bucket's block scaled down to at most 256×512 and its batch to ~32 MFLOP; `size_class`): the
  first time a class is asked for, its X·Xᵀ and m×m products are timed in the candidate dtypes,
  a few ms, cached per process and, when MANGO_NS_CACHE names a file, on disk per CPU model,
  thread count and torch version. On CUDA, the tensor-core rates (bf16 = fp16, fp32 far slower);
  the Triton kernels run their design point (bf16 textbook) under the interpreter.
* **engine** (triton backend): from the per-architecture table `ARCH_TABLE` (measured on a GPU)
  or, for an architecture not in it, from `model_engine` (a FLOP/launch model); the setting
  `ns_engine` ("triton" / "cublas") forces it. Tile sizes always fit the target's shared memory
  (`mango_kernels.resources`: what each tiled kernel takes, held to Triton's compiler by the
  ahead-of-time check); the on-chip limits are the kernels' own (`resources.ON_CHIP_MAX_ROWS`).

A choice is fixed for the optimizer's life and stored per bucket in its state dict; `choose` with
`stored=` honours it on a resumed run (see `_resume`: form and dtype kept where the device runs
them, the engine kept on the same device kind and re-chosen on another).
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from dataclasses import dataclass

import torch

from mango_kernels.resources import ON_CHIP_MAX_ROWS, fit_tiles

from . import newton_schulz as _ns
from .config import DEFAULTS, ns_schedule

__all__ = [
    "NSChoice",
    "DeviceProfile",
    "MeasuredProfile",
    "ENGINES",
    "ARCH_TABLE",
    "choose",
    "choose_for_bucket",
    "auto_dtype",
    "auto_method",
    "describe_choices",
    "choices_to_state",
    "choices_from_state",
    "cpu_profile",
    "clear_measurements",
    "size_class",
    "model_engine",
]

ENGINES = ("auto", "triton", "cublas")  # the ns_engine setting
# candidate operand dtypes per form: what holds the correctness contract's accuracy for that form
_CANDIDATES = {"textbook": (torch.bfloat16, torch.float32), "gram": (torch.float16, torch.float32)}
_PRECISION = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}  # mantissa bits, ranked
NOISE = 0.10  # best-of-3 timings on a shared CPU differ by about this much between runs: closer is a tie

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
    """How one NS bucket runs (see the module docstring). `form_why` says what decided the form and
    dtype, `engine_why` the engine; `device` is the device kind it was decided for."""

    engine: str
    method: str
    dtype: torch.dtype
    form_why: str
    tiles: tuple = None
    engine_why: str = ""
    device: str = "cpu"

    @property
    def why(self) -> str:
        return "; ".join(w for w in (self.form_why, self.engine_why) if w)

    def label(self) -> str:
        tiles = f" {self.tiles[0]}x{self.tiles[1]}x{self.tiles[2]}" if self.tiles else ""
        return f"{self.engine}{tiles} {self.method} {_name(self.dtype)} ({self.why})"

    def to_state(self) -> dict:
        return {"engine": self.engine, "method": self.method, "dtype": _name(self.dtype), "why": self.form_why,
                "tiles": list(self.tiles) if self.tiles else None, "engine_why": self.engine_why, "device": self.device}  # fmt: skip

    @classmethod
    def from_checkpoint(cls, s: dict) -> "NSChoice":
        """A stored choice, its form and dtype marked as coming from the checkpoint."""
        why = s["why"] if s["why"].startswith("from checkpoint") else f"from checkpoint ({s['why']})"
        dtype = getattr(torch, s["dtype"])
        if not isinstance(dtype, torch.dtype) or s["method"] not in _CANDIDATES:
            raise ValueError(f"not an NS choice: {s!r}")
        tiles = tuple(s["tiles"]) if s.get("tiles") else None
        return cls(s["engine"], s["method"], dtype, why, tiles, s.get("engine_why", ""), s.get("device", "cpu"))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------
# profiles: the matmul rates "auto" weighs the candidates by
# ----------------------------------------------------------------------------------------


@dataclass
class DeviceProfile:
    """One relative rate per operand dtype, for every shape: the tensor cores of a GPU, the ISA seed,
    or the measured rates a checkpoint of an older version stored. Nothing to measure; no noise."""

    rates: dict  # dtype -> rate (any unit; only ratios matter)
    source: str  # what the reason of a choice says: "tensor cores", "seed AMX", ...
    noise = 0.0

    def measure(self, cls, wants) -> None:
        pass

    def rate(self, product: str, dtype: torch.dtype, cls) -> float:
        return self.rates.get(dtype, 1.0)

    def why(self, cls) -> str:
        return self.source

    @classmethod
    def from_state(cls, s: dict, source: str = None) -> "DeviceProfile":
        """The profile an older version stored in its state dict (`ns_profiles`)."""
        return cls({getattr(torch, d): float(r) for d, r in s["rates"].items()}, source or s["source"])


_TENSOR_CORES = DeviceProfile({torch.bfloat16: 16.0, torch.float16: 16.0, torch.float32: 1.0, torch.float64: 0.25}, "tensor cores")
_FLOPS = DeviceProfile({}, "float64: fewer FLOPs")  # float64 NS is for checking: its form by FLOPs alone, nothing timed
_KERNELS = DeviceProfile({torch.bfloat16: 1.0, torch.float16: 1.0, torch.float32: 1.0 / 16, torch.float64: 1.0 / 64},
                         "interpreter: the kernels' textbook bf16")  # fmt: skip


class MeasuredProfile:
    """This CPU's GFLOP/s per size class, product ("mxn": X·Xᵀ of the block; "mxm": an m×m
    product) and dtype, each measured the first time a choice asks for it (`measure`).
    `timer(dtype, product, cls) -> seconds` replaces the timing (tests)."""

    noise = NOISE

    def __init__(self, key: str, where: str, rates: dict = None, timer=None, path: str = None):
        self.key, self.where, self.timer, self.path = key, where, timer, path
        self.rates = {} if rates is None else rates  # (cls, product, dtype) -> GFLOP/s

    def measure(self, cls, wants) -> None:
        """Time the (product, dtype) pairs of `wants` not yet measured at `cls`."""
        missing = {(p, dt) for p, dt in (_product_of(p, cls, dt) for p, dt in wants) if (cls, p, dt) not in self.rates}
        if not missing:
            return
        for (product, dt), seconds in time_products(cls, sorted(missing, key=str), self.timer).items():
            self.rates[(cls, product, dt)] = _product_flops(product, cls) / max(seconds, 1e-9) / 1e9
        if self.path and self.timer is None:
            _save(self.path, self.key, self.rates)

    def rate(self, product: str, dtype: torch.dtype, cls) -> float:
        return self.rates[(cls, *_product_of(product, cls, dtype))]

    def why(self, cls) -> str:
        return f"measured on {self.where} at {_class_label(cls)}"


# ----------------------------------------------------------------------------------------
# CPU: the rates measured per size class
# ----------------------------------------------------------------------------------------

PROBE_BLOCK = (256, 512)  # a larger block is timed at this size (m scaled with its aspect, n capped): near peak rate by then
PROBE_FLOPS = 32e6  # the most one probe's X·Xᵀ product does (~0.3 ms in fp32 on one core): the batch stops there

_measured: dict = {}  # cpu key -> MeasuredProfile, for this process


def size_class(rows: int, cols: int, count: int) -> tuple:
    """(batch, m, n) at which NS blocks of (rows, cols), `count` of them, are timed: the block in its
    wide orientation (m ≤ n), scaled down with its aspect to m ≤ 256 and cut to n ≤ 512 (PROBE_BLOCK),
    and as many of them as the bucket has, up to PROBE_FLOPS (the per-call cost of a small batch is
    part of its rate)."""
    m, n = sorted((max(rows, 1), max(cols, 1)))
    scale = min(1.0, PROBE_BLOCK[0] / m)
    m, n = max(1, round(m * scale)), min(PROBE_BLOCK[1], max(1, round(n * scale)))
    return max(1, min(count, int(PROBE_FLOPS // (2 * m * m * n)))), m, n


def _class_label(cls) -> str:
    return "x".join(map(str, cls))


def _product_of(product: str, cls, dtype):
    """The product actually timed: a square class's m×m product is its X·Xᵀ."""
    return ("mxn" if cls[1] == cls[2] else product), dtype


def _product_flops(product: str, cls) -> int:
    b, m, n = cls
    return 2 * b * m * m * (n if product == "mxn" else m)


def time_products(cls, wants, timer=None, repeats: int = 3) -> dict:
    """Seconds of one batched product per (product, dtype) of `wants` at `cls` = (batch, m, n):
    "mxn" is NS's X·Xᵀ, "mxm" its m×m product with an addend (`baddbmm`, as the backends run
    them). The pairs are timed in turn (so a load spike hits them alike), best of `repeats` after
    a warm-up call each (the first call of a shape pays oneDNN's set-up); one 2× slower than the
    fastest of its product in the first round is not timed again (no tie to break there)."""
    if timer is not None:
        return {(p, dt): timer(dt, p, cls) for p, dt in wants}
    b, m, n = cls
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(b, m, n, generator=gen) / n**0.5
    A = X @ X.mT
    ops = {}
    for product, dt in wants:
        out = torch.empty(b, m, m, dtype=dt)
        if product == "mxn":
            x = X.to(dt)
            ops[(product, dt)] = lambda x=x, out=out: torch.bmm(x, x.mT, out=out)
        else:
            a = A.to(dt)
            ops[(product, dt)] = lambda a=a, out=out: torch.baddbmm(a, a, a, beta=-4.775, alpha=2.0315, out=out)
    for op in ops.values():
        op()
    best = {w: float("inf") for w in ops}
    live = list(ops)
    for r in range(repeats):
        for w in live:
            t0 = time.perf_counter()
            ops[w]()
            best[w] = min(best[w], time.perf_counter() - t0)
        if r == 0:
            live = [w for w in live if best[w] <= 2 * min(t for v, t in best.items() if v[0] == w[0])]
    return best


def cpu_model() -> str:
    """The CPU's model name, with the instruction-set cap oneDNN is held to where one is set
    (ONEDNN_MAX_CPU_ISA): below AVX512_CORE_AMX, bf16 matmuls run without AMX, as on a CPU that
    lacks it, so a measurement made under a cap holds only under it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model} (oneDNN ISA capped at {cap})" if cap else model


def _amx() -> bool:
    """Whether bf16 matmuls run on AMX tiles: the CPU has them and oneDNN is not capped below them."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap != "ALL" and "AMX" not in cap:
        return False
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_key() -> str:
    """What a CPU measurement is valid for: the CPU model, threads and torch version."""
    return f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _where() -> str:
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'s' if threads > 1 else ''})"


def _isa_seed(why: str = "") -> DeviceProfile:
    """A guess from ISA features, where nothing is measured: AMX runs bf16 far faster than fp32 (on
    all but small batches of small blocks); AVX512-BF16 alone does not (measured 164 vs 264 GFLOP/s)."""
    if _amx():
        return DeviceProfile({torch.bfloat16: 4.0, torch.float16: 1.0, torch.float32: 1.0, torch.float64: 0.5}, "seed AMX" + why)
    return DeviceProfile({torch.bfloat16: 0.6, torch.float16: 0.3, torch.float32: 1.0, torch.float64: 0.5}, "seed no-AMX" + why)


def _ranks() -> int:
    """The world size of an initialized torch.distributed job (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _disk_cache():
    return os.environ.get("MANGO_NS_CACHE") or None


def cpu_profile(timer=None):
    """This CPU's profile: its classes measured so far in this process, those in the disk cache
    (MANGO_NS_CACHE), the others measured when first asked for. MANGO_NS_MEASURE=0 gives the ISA
    seed instead, and so does a torch.distributed job of several ranks: their timings differ, and
    ranks that chose different NS dtypes would exchange buffers of different sizes (or, under DDP,
    drift apart), so every rank decides by the same guess. `timer` (tests): a fresh profile timed
    by it, cached nowhere."""
    if timer is not None:
        return MeasuredProfile(cpu_key(), _where(), timer=timer)
    if os.environ.get("MANGO_NS_MEASURE") == "0":
        return _isa_seed()
    if _ranks() > 1:
        return _isa_seed(f" ({_ranks()} ranks decide alike)")
    key = cpu_key()
    if key not in _measured:
        path = _disk_cache()
        _measured[key] = MeasuredProfile(key, _where(), _load(path, key) if path else {}, path=path)
    return _measured[key]


def _load(path: str, key: str) -> dict:
    """The rates saved for this CPU key ({} where there are none, or the file is unreadable or older)."""
    try:
        with open(path) as f:
            saved = json.load(f).get(key, {}).get("classes", {})
        return {(tuple(int(v) for v in c.split("x")), p, getattr(torch, d)): float(r)
                for c, per in saved.items() for p, rates in per.items() for d, r in rates.items()}  # fmt: skip
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _save(path: str, key: str, rates: dict) -> None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    classes: dict = {}
    for (cls, product, dt), r in rates.items():
        classes.setdefault(_class_label(cls), {}).setdefault(product, {})[_name(dt)] = r
    data[key] = {"classes": classes}
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError:
        pass


def clear_measurements(disk: bool = True) -> None:
    """Forget measured CPU rates (this process's, and the MANGO_NS_CACHE file with disk=True)."""
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


def _allowed(settings, state_dtype) -> list:
    """The (form, dtype) pairs these settings allow: the forced ones, else those holding the
    correctness contract's accuracy (float64 state: float64 NS). Never the Gram form in bf16."""
    forced_m, forced_d = settings.get("ns_method", "auto"), settings.get("ns_dtype", "auto")
    pairs = []
    for method in ("textbook", "gram") if forced_m == "auto" else (forced_m,):
        if forced_d != "auto":
            dtypes = (forced_d,)
        elif state_dtype == torch.float64:
            dtypes = (torch.float64,)
        else:
            dtypes = _CANDIDATES[method]
        pairs += [(method, dt) for dt in dtypes if (method, dt) != ("gram", torch.bfloat16)]
    return pairs or [("textbook", torch.bfloat16)]


def _split_flops(method: str, rows: int, cols: int, steps: int) -> tuple:
    """FLOPs of the form's m×n products (X·Xᵀ, B·X, Q·X) and of its m×m products on one block:
    the m×n products are what doubling the long side doubles."""
    m, n = sorted((rows, cols))
    total = _ns.flops(method, m, n, steps)
    mxn = _ns.flops(method, m, 2 * n, steps) - total
    return mxn, total - mxn


def _form_and_dtype(settings, rows, cols, count, state_dtype, profile, forms) -> tuple:
    """(method, dtype, why): the cheapest candidate by the profile's rates at this bucket's size
    class, the more precise of two within the profile's noise. Forced settings measure nothing."""
    steps = len(ns_schedule(settings))
    auto_form = settings.get("ns_method", "auto") == "auto"
    textbook = _ns.flops("textbook", rows, cols, steps)
    gram_pays = _ns.flops("gram", rows, cols, steps) < textbook
    pairs = [(m, d) for m, d in _allowed(settings, state_dtype) if not auto_form or (m in forms and (m == "textbook" or gram_pays))]
    forced = [k for k in ("ns_dtype", "ns_method") if settings.get(k, "auto") != "auto"]
    if len(pairs) == 1:
        if len(forced) == 2:
            return (*pairs[0], "ns_dtype, ns_method forced")
        reasons = [f"{k} forced" for k in forced]
        if state_dtype == torch.float64 and "ns_dtype" not in forced:
            reasons.append("float64 state")
        if auto_form and not gram_pays:
            reasons.append("textbook: the Gram form saves no FLOPs here")
        elif auto_form and "gram" not in forms:  # the backend runs only the textbook form here
            reasons.append(profile.why(size_class(rows, cols, count)))
        return (*pairs[0], "; ".join(reasons))
    if all(dt == torch.float64 for _, dt in pairs):
        profile = _FLOPS
    cls = size_class(rows, cols, count)
    profile.measure(cls, {(p, dt) for _, dt in pairs for p in ("mxn", "mxm")})
    cost = {}
    for method, dt in pairs:
        mxn, mxm = _split_flops(method, rows, cols, steps)
        cost[(method, dt)] = mxn / profile.rate("mxn", dt, cls) + mxm / profile.rate("mxm", dt, cls)
    best = min(cost.values())
    near = [p for p in pairs if cost[p] <= best * (1 + profile.noise)]
    method, dtype = max(near, key=lambda p: (_PRECISION[p[1]], -cost[p]))
    return method, dtype, "; ".join([f"{k} forced" for k in forced] + [profile.why(cls)])


class _Target:
    """A CUDA device of a given architecture, for deciding without one."""

    type = "cuda"

    def __init__(self, arch: str):
        self.arch = arch


def _arch(device):
    if device.type != "cuda":
        return None
    return device.arch if isinstance(device, _Target) else cuda_arch(device)


def choose(settings: dict, rows: int, cols: int, state_dtype: torch.dtype, device, backend: str = "torch",
           count: int = 1, profile=None, arch: str = None, stored: NSChoice = None, where: str = "") -> NSChoice:  # fmt: skip
    """How NS blocks of (rows, cols) of one param group run on `device` under `backend` ("torch"
    or "triton"); `count` blocks in the bucket; `profile` overrides the device's rates; `arch`
    (e.g. "sm_90"): decide as on that GPU (a launch dry run on a CPU counting a CUDA step).
    `stored`: this bucket's earlier choice (a resumed run), honoured where it can be (`_resume`);
    `where` names the bucket in the warning when it cannot."""
    device = torch.device(device) if not isinstance(device, _Target) else device
    if arch is not None:
        device = _Target(arch)
    if stored is not None:
        kept = _resume(stored, settings, rows, cols, state_dtype, device, backend, count, where)
        if kept is not None:
            return kept
    if backend == "triton":
        prof = profile or (_TENSOR_CORES if device.type == "cuda" else _KERNELS)
        forms = ("textbook", "gram") if device.type == "cuda" or profile is not None else ("textbook",)
    else:
        prof = profile or (cpu_profile() if device.type == "cpu" else _TENSOR_CORES)
        forms = ("textbook", "gram")
    method, dtype, why = _form_and_dtype(settings, rows, cols, count, state_dtype, prof, forms)
    return _with_engine(settings, rows, cols, method, dtype, why, device, backend, count)


def _with_engine(settings, rows, cols, method, dtype, why, device, backend, count, keep: NSChoice = None) -> NSChoice:
    """The choice of `method` and `dtype` with its engine: "torch" on the torch backend and for
    float64; on the triton backend `keep`'s engine where given and runnable, else `_engine`'s."""
    if backend != "triton":
        return NSChoice("torch", method, dtype, why, device=device.type)
    if dtype == torch.float64:
        return NSChoice("torch", method, dtype, why, engine_why="float64: torch", device=device.type)
    engine, tiles, engine_why = _engine(settings, rows, cols, method, dtype, device, count, keep)
    return NSChoice(engine, method, dtype, why, tiles, engine_why, device.type)


def _engine(settings, rows, cols, method, dtype, device, count, keep: NSChoice = None) -> tuple:
    """(engine, tiles, why) of the triton backend for this form and dtype."""
    setting = settings.get("ns_engine", "auto")
    small = min(rows, cols) <= ON_CHIP_MAX_ROWS[method]
    arch = _arch(device)
    entry = ARCH_TABLE.get(arch)
    size = torch.finfo(dtype).bits // 8
    tiles = fit_tiles((entry or {}).get("tiles", DEFAULT_TILES), arch, size, method) if arch else None
    if setting == "cublas":
        return "cublas", None, "ns_engine=cublas"
    if setting == "triton" or device.type != "cuda":
        engine = "triton_small" if small else "triton_tiled"
        return engine, None if small else tiles, "ns_engine=triton" if setting == "triton" else "no GPU"
    if keep is not None and keep.engine in ("cublas", "triton_tiled") + (("triton_small",) if small else ()):
        kept_tiles = fit_tiles(keep.tiles, arch, size, method) if keep.engine == "triton_tiled" and keep.tiles else None
        return keep.engine, kept_tiles or (tiles if keep.engine == "triton_tiled" else None), keep.engine_why
    steps = len(ns_schedule(settings))
    if entry is not None:
        engine = entry["small"] if small else entry["large"]
        source = f"table {arch}"
    else:
        engine = model_engine(rows, cols, method, steps, count)
        source = f"model ({arch} not measured)"
    return engine, tiles if engine == "triton_tiled" else None, source


def _resume(stored: NSChoice, settings, rows, cols, state_dtype, device, backend, count, where) -> NSChoice | None:
    """`stored` as this device runs it: its form and dtype where the settings and the state dtype
    allow them (every device runs every NS form and dtype: CPUs, and CUDA through cuBLAS or the
    kernels); its engine on the same device kind (re-chosen on another kind, or where ns_engine
    forces one). None: decide afresh — silently where a forced ns_dtype / ns_method excludes it
    (the setting wins), with a warning where the state dtype does (float64 state runs float64 NS)."""
    if (stored.method, stored.dtype) not in _allowed(settings, state_dtype):
        if all(settings.get(k, "auto") == "auto" for k in ("ns_dtype", "ns_method")):
            warnings.warn(f"mango: the stored NS choice for {where or f'{rows}x{cols} blocks'} ({stored.method} "
                          f"{_name(stored.dtype)}) is not a candidate for {_name(state_dtype)} state; choosing afresh")  # fmt: skip
        return None
    keep = stored if stored.device == device.type and settings.get("ns_engine", "auto") == "auto" else None
    return _with_engine(settings, rows, cols, stored.method, stored.dtype, stored.form_why, device, backend, count, keep)


def auto_dtype(settings: dict, method: str, device, state_dtype: torch.dtype = torch.float32, backend: str = "torch",
               rows: int = 128, cols: int = 1024, count: int = 2) -> torch.dtype:  # fmt: skip
    """The operand dtype "auto" gives the `method` form on `device` for `count` blocks of (rows,
    cols) (default: a typical block width) — its settings' ns_dtype when set."""
    full = {**DEFAULTS, **settings, "ns_method": method}
    return choose(full, rows, cols, state_dtype, device, backend, count).dtype


def auto_method(settings: dict, rows: int, cols: int, device, state_dtype: torch.dtype = torch.float32, backend: str = "torch",
                count: int = 1) -> str:  # fmt: skip
    """The form "auto" gives `count` blocks of (rows, cols) on `device` under these settings."""
    return choose({**DEFAULTS, **settings}, rows, cols, state_dtype, device, backend, count).method


def describe_choices(choices) -> list:
    """Lines for `mango.describe`: per NS bucket, its blocks, engine, form, dtype and why."""
    if not choices:
        return []
    lines = ["Newton–Schulz per bucket (engine, form, dtype, and what decided them):"]
    for names, (r, c), choice in choices:
        first = names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        lines.append(f"  ({r},{c}) x{len(names)} [{first}]: {choice.label()}")
    return lines


def choices_to_state(choices: dict) -> list:
    """The state dict's `ns_choices`: one entry per NS bucket, {(group, norm, shape, block): NSChoice} as plain data."""
    return [{"group": g, "norm": norm, "shape": list(shape), "block": list(block), **c.to_state()}
            for (g, norm, shape, block), c in choices.items()]  # fmt: skip


def choices_from_state(entries) -> dict:
    """{(group, norm, shape, block): NSChoice} from a state dict's `ns_choices` (entries that do not
    parse are left out with a warning: their buckets are decided afresh)."""
    out = {}
    for e in entries or []:
        try:
            out[(int(e["group"]), e["norm"], tuple(e["shape"]), tuple(e["block"]))] = NSChoice.from_checkpoint(e)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            warnings.warn(f"mango: a stored NS choice does not parse ({err}); its bucket is decided afresh", stacklevel=3)
    return out


def choose_for_bucket(nb, bucket, group, backend: str, profile=None) -> NSChoice:
    """The NS bucket's choice: the one the optimizer stored on it at plan time (`nb.ns_choice`),
    else decided now for `backend` and stored (a backend driven without the optimizer)."""
    if nb.ns_choice is None:
        r, c = nb.block_shape
        count = nb.blocks_per_tensor * len(nb.slots)
        nb.ns_choice = choose(group, r, c, bucket.dtype, bucket.device, backend, count, profile)
    return nb.ns_choice
