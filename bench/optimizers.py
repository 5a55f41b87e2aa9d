"""The optimizers the step benchmark compares, each built on a fresh copy of a parameter set.

    triton      mango.presets.mango(..., backend="triton")        the fused kernels (CUDA only)
    torch       mango.presets.mango(..., backend="torch")         batched torch backend
    torch_bf16  the same with ns_dtype=torch.bfloat16: what bf16 NS would give where the torch
                backend's "auto" NS dtype is float32 (CPU); run by default only there
    reference   mango.presets.mango(..., backend="reference")     the eager per-tensor oracle
    compile     torch.compile of a loop of mango.reference.update over all parameters
    muon_adamw  torch.optim.Muon (hidden matrices and QKV, 2-D) + torch.optim.AdamW (the rest):
                Keller Jordan's recipe, doing less work than MANGO (no second moment, no
                offset, whole-matrix NS for QKV); AdamW fused where the device supports it
    adamw       torch.optim.AdamW on everything: an elementwise-only yardstick

Other packages' Muon (bench/peers.py: heavyball_muon, kj_muon, emerging_muon, gram_ns) run by
default on CUDA and when --optimizers names them elsewhere; a missing package is "n/a".

Variants of the torch backend, run only when --optimizers names them (the NS-method comparison;
`VARIANTS` says what each sets):

    torch_textbook       ns_method="textbook" (the auto dtype)
    torch_fp32           ns_dtype=float32, ns_method="auto": the regime of CPUs without bf16, where
                         "auto" picks the Gram form for wide blocks
    torch_fp32_textbook  ns_dtype=float32, ns_method="textbook"
    torch_fp32_gram      ns_dtype=float32, ns_method="gram"
    torch_fp16_gram      ns_dtype=float16, ns_method="gram" (the Gram form's 16-bit candidate)
    torch_pe4            ns_coefficients="polar_express_4" (4 steps instead of 5)
    torch_fp32_pe4       the same in fp32 (Gram form where auto picks it)

`NS_FORMS` are the forced NS dtype/form pairs that hold the correctness contract (bf16 or fp32
textbook, fp16 or fp32 Gram): run beside mango "auto" they show what "auto" picked against what it
could have picked.

And of the triton backend (CUDA only; on in the GPU run):

    triton_one_round     the whole step in one round (memory_budget=inf): the fewest launches, NS
                         buffers for every tensor at once, beyond the memory budget
    triton_graph         capturable=True, the step captured in a CUDA graph and timed as one
                         replay (bench/graphs.py)

And compiled, run only when --optimizers names it:

    torch_compiled       torch.compile(opt.step) of the torch backend (inductor by default): the
                         bookkeeping eager behind a graph break, the step's math one graph

All MANGO contenders use the preset's defaults (LaProp, Nesterov, offset momentum, NS norms per role).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import torch

import mango
from mango import config, reference

from . import peers
from .params import ParamSet, mango_groups

__all__ = ["CONTENDERS", "PEERS", "CAPTURED", "VARIANTS", "NS_FORMS", "TRITON_VARIANTS", "ALL_CONTENDERS", "MANGO_KEYS", "LABELS", "Runner", "Unavailable", "build", "kernel_launch_counter", "state_nbytes"]

CONTENDERS = ("triton", "torch", "torch_bf16", "reference", "compile", "muon_adamw", "adamw")
LABELS = {
    "triton": "mango triton",
    "torch": "mango torch",
    "torch_bf16": "mango torch (bf16 NS)",
    "reference": "mango reference (eager)",
    "compile": "torch.compile(reference)",
    "muon_adamw": "torch Muon + AdamW",
    "adamw": "torch AdamW",
}
# torch-backend variants: key -> (label, mango group settings)
VARIANTS = {
    "torch_textbook": ("mango torch (textbook NS)", {"ns_method": "textbook"}),
    "torch_fp32": ("mango torch (fp32 NS, auto)", {"ns_dtype": torch.float32}),
    "torch_fp32_textbook": ("mango torch (fp32 NS, textbook)", {"ns_dtype": torch.float32, "ns_method": "textbook"}),
    "torch_fp32_gram": ("mango torch (fp32 NS, Gram)", {"ns_dtype": torch.float32, "ns_method": "gram"}),
    "torch_fp16_gram": ("mango torch (fp16 NS, Gram)", {"ns_dtype": torch.float16, "ns_method": "gram"}),
    "torch_pe4": ("mango torch (polar_express_4)", {"ns_coefficients": "polar_express_4"}),
    "torch_fp32_pe4": ("mango torch (fp32 NS, polar_express_4)", {"ns_dtype": torch.float32, "ns_coefficients": "polar_express_4"}),
}
# triton-backend variants: key -> (label, backend attributes)
TRITON_VARIANTS = {
    "triton_one_round": ("mango triton (one round)", {"memory_budget": float("inf")}),
}
# the forced NS (dtype, form) pairs of the correctness contract, beside "auto"
NS_FORMS = ("torch_bf16", "torch_fp32_textbook", "torch_fp16_gram", "torch_fp32_gram")
LABELS.update({k: v[0] for k, v in {**VARIANTS, **TRITON_VARIANTS}.items()})
LABELS.update(peers.LABELS)
LABELS["torch_compiled"] = "torch.compile(mango torch)"
LABELS["triton_graph"] = "mango triton (CUDA graph replay)"
PEERS = peers.PEERS  # other packages' Muon (bench/peers.py): by default on CUDA, named on CPU
CAPTURED = ("triton_graph",)  # contenders whose step is a CUDA graph captured at build
ALL_CONTENDERS = CONTENDERS + tuple(VARIANTS) + tuple(TRITON_VARIANTS) + ("triton_graph", "torch_compiled") + PEERS
# contenders that run mango's math (the memory budget applies to them)
MANGO_KEYS = (("triton", "torch", "torch_bf16", "reference", "compile") + tuple(VARIANTS) + tuple(TRITON_VARIANTS)
              + ("triton_graph", "torch_compiled"))  # fmt: skip
MUON_ROLES = ("matrix", "qkv_weight")


class Unavailable(Exception):
    """This contender cannot run here (reason in the message, shown as "n/a (<reason>)")."""


@dataclass
class Runner:
    key: str
    label: str
    step: callable
    state: callable  # () -> iterable of state tensors
    optimizer: object = None  # the torch.optim.Optimizer, when there is one
    info: dict = field(default_factory=dict)
    launch_counter: callable = None  # () -> kernel launches so far (mango_kernels' counter)


def state_nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _opt_state(*opts):
    def tensors():
        for opt in opts:
            for st in opt.state.values():
                yield from (v for v in st.values() if isinstance(v, torch.Tensor))

    return tensors


def kernel_launch_counter():
    """A () -> int reading mango_kernels' launch counter, or None when there is none to read."""
    try:
        import mango_kernels
    except Exception:
        return None
    for name in ("launch_count", "launches", "get_launch_count"):
        fn = getattr(mango_kernels, name, None)
        if callable(fn):
            return lambda: int(fn())
    counter = getattr(mango_kernels, "LAUNCHES", None) or getattr(mango_kernels, "launch_counter", None)
    if counter is not None:
        for attr in ("count", "value", "total"):
            if hasattr(counter, attr):
                return lambda: int(getattr(counter, attr))
    return None


def _mango(backend, pset, params, device) -> Runner:
    key = backend
    backend_attrs = {}
    if backend in TRITON_VARIANTS:
        backend, backend_attrs = "triton", TRITON_VARIANTS[key][1]
    if backend == "triton":
        if torch.device(device).type != "cuda":
            raise Unavailable("no CUDA")
        try:
            from mango.backends import make_backend

            make_backend("triton", torch.device(device))
        except Exception as e:  # no triton, or the backend is not there yet
            raise Unavailable(f"triton backend: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    kw = {}
    if backend == "torch_bf16":
        backend, kw = "torch", {"ns_dtype": torch.bfloat16}
    elif backend in VARIANTS:
        backend, kw = "torch", dict(VARIANTS[key][1])
    opt = mango.presets.mango(mango_groups(pset, params), backend=backend, **kw)
    for name, value in backend_attrs.items():
        setattr(opt._backend_for(torch.device(device)), name, value)
    counter = kernel_launch_counter() if backend == "triton" else None
    return Runner(key, LABELS[key], opt.step, _opt_state(opt), opt, info={"ns_settings": kw}, launch_counter=counter)


class _Timeout(Exception):
    pass


def _compiled_reference(pset, params, device, compile_backend="inductor", timeout_s=None) -> Runner:
    """torch.compile of `for each param: mango.reference.update(p, g, state, settings)`."""
    import torch._dynamo

    opt = mango.presets.mango(mango_groups(pset, params), backend="reference")
    ps, gs, states, settings = [], [], [], []
    for group in opt.param_groups:
        for p in group["params"]:
            role = config.resolve_role(group, p)
            # per-tensor settings exactly as mango/backends/reference_backend.py builds them
            s = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            s.update(role=role, norm=config.resolve_norm(group, role))
            ps.append(p)
            gs.append(p.grad)
            states.append(reference.init_state(p, group))
            settings.append(s)

    def reference_step(ps, gs, states, settings):
        for p, g, st, s in zip(ps, gs, states, settings):
            reference.update(p, g, st, s)

    # float(state["step"]) is traced instead of breaking the graph; one graph, no silent fallback
    patch = torch._dynamo.config.patch(
        capture_scalar_outputs=True, recompile_limit=1024, accumulated_recompile_limit=100000
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = None

    def step():
        with patch:
            compiled(ps, gs, states, settings)

    info = {"compile_backend": compile_backend}
    # compile now (first call), under a time limit where the platform allows one
    use_alarm = timeout_s and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    timed_out = []
    if use_alarm:

        def on_alarm(signum, frame):
            timed_out.append(True)
            raise _Timeout()

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(timeout_s))
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(reference_step, backend=compile_backend)
        step()  # this is one real step; state advances like any warm-up step
    except Exception as e:  # (the timeout may arrive wrapped, e.g. in an InductorError)
        torch._dynamo.reset()
        if timed_out:
            raise Unavailable(f"compile failed: no result within --compile-timeout {int(timeout_s)} s") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Unavailable(f"compile failed: {type(e).__name__}: {msg[:200]}") from e
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    info["compile_s"] = time.perf_counter() - t0
    counters = torch._dynamo.utils.counters
    info["graph_breaks"] = sum(counters["graph_break"].values())
    info["graphs"] = counters["stats"].get("unique_graphs", None)
    return Runner("compile", LABELS["compile"], step, lambda: (t for st in states for t in st.values()), None, info)


def _compiled_torch(pset, params, device, compile_backend="inductor", timeout_s=None) -> Runner:
    """torch.compile(opt.step) of mango's torch backend; compiled at build (one real step, like a
    warm-up step), under --compile-timeout where the platform has SIGALRM."""
    import torch._dynamo

    opt = mango.presets.mango(mango_groups(pset, params), backend="torch")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = None
    use_alarm = timeout_s and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if use_alarm:
        old = signal.signal(signal.SIGALRM, lambda signum, frame: (_ for _ in ()).throw(_Timeout()))
        signal.alarm(int(timeout_s))
    t0 = time.perf_counter()
    try:
        step = torch.compile(opt.step, backend=compile_backend)
        step()
    except _Timeout:
        torch._dynamo.reset()
        raise Unavailable(f"compile failed: no result within --compile-timeout {int(timeout_s)} s") from None
    except Exception as e:
        torch._dynamo.reset()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Unavailable(f"compile failed: {type(e).__name__}: {msg[:200]}") from e
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    counters = torch._dynamo.utils.counters
    info = {"compile_backend": compile_backend, "compile_s": time.perf_counter() - t0,
            "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"].get("unique_graphs", None)}  # fmt: skip
    return Runner("torch_compiled", LABELS["torch_compiled"], step, _opt_state(opt), opt, info)


def _fused_adamw(params, device, **kw):
    """AdamW(fused=True) where the device supports it, else foreach; says which in `impl`."""
    probe = torch.nn.Parameter(torch.zeros(2, device=device))
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
        return torch.optim.AdamW(params, fused=True, **kw), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw), "foreach"


def muon_split(pset: ParamSet, params) -> tuple:
    """(hidden matrices and QKV, 2-D: Muon's share; everything else: AdamW's), as Keller Jordan splits."""
    mats = [p for spec, p in zip(pset.tensors, params) if spec.role in MUON_ROLES and p.dim() == 2]
    ids = {id(p) for p in mats}
    return mats, [p for p in params if id(p) not in ids]


def _muon_adamw(pset: ParamSet, params, device) -> Runner:
    mats, rest = muon_split(pset, params)
    muon = torch.optim.Muon(mats, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="original")
    adamw, impl = _fused_adamw(rest, device, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        muon.step()
        adamw.step()

    info = {"adamw_impl": impl, "muon_tensors": len(mats), "adamw_tensors": len(rest)}
    return Runner("muon_adamw", f"torch Muon + AdamW({impl})", step, _opt_state(muon, adamw), None, info)


def _adamw(pset, params, device) -> Runner:
    opt, impl = _fused_adamw(params, device, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    return Runner("adamw", f"torch AdamW({impl})", opt.step, _opt_state(opt), opt, {"adamw_impl": impl})


def _graph_runner(key, label, step, opt, info) -> Runner:
    return Runner(key, label, step, _opt_state(opt), opt, info)


def _peer_runner(key, label, step, opts, info) -> Runner:
    return Runner(key, label, step, _opt_state(*opts), opts[0] if opts else None, info)


def build(key: str, pset: ParamSet, params: list, device, compile_backend="inductor", compile_timeout_s=None, quick=False) -> Runner:
    """The Runner for contender `key` on `params` (a fresh ParamSet.build); raises Unavailable."""
    if key in PEERS:
        return peers.build(key, pset, params, device, split=muon_split, fused_adamw=_fused_adamw, runner=_peer_runner,
                           unavailable=Unavailable, quick=quick)  # fmt: skip
    if key in ("triton", "torch", "torch_bf16", "reference") or key in VARIANTS or key in TRITON_VARIANTS:
        return _mango(key, pset, params, device)
    if key == "triton_graph":
        from . import graphs

        return graphs.graph_runner(pset, params, device, Unavailable, _graph_runner)
    if key == "compile":
        return _compiled_reference(pset, params, device, compile_backend, compile_timeout_s)
    if key == "torch_compiled":
        return _compiled_torch(pset, params, device, compile_backend, compile_timeout_s)
    if key == "muon_adamw":
        return _muon_adamw(pset, params, device)
    if key == "adamw":
        return _adamw(pset, params, device)
    raise ValueError(f"unknown optimizer {key!r}; known: {', '.join(ALL_CONTENDERS)}")
