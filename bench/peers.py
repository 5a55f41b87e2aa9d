"""Other packages' Muon beside mango in bench.step, each on the same split as `muon_adamw`.

    heavyball_muon  heavyball's Muon (torch.compile'd, mode "default": heavyball's own
                    max-autotune would spend the run's minutes compiling) on the hidden matrices
                    and QKV + torch AdamW(fused) on the rest
    kj_muon         Keller Jordan's `muon-optimizer`: SingleDeviceMuonWithAuxAdam (its Muon on
                    the same matrices, its own Adam on the rest)
    emerging_muon   NVIDIA emerging-optimizers' Muon + torch AdamW(fused)
    gram_ns         gram-newton-schulz's GramNewtonSchulz on the same matrices (stacked by shape):
                    the NS alone, no optimizer around it; its CuTe-DSL kernels where quack-kernels
                    imports, else its torch path

A package that is not installed, or that fails to build here, makes its contender "n/a" with
the reason (bench.step goes on). The GPU run installs the wheels carried in `.whl/` first.
"""

from __future__ import annotations

import importlib

import torch

from .params import ParamSet

LABELS = {
    "heavyball_muon": "heavyball Muon + AdamW",
    "kj_muon": "muon-optimizer (Keller Jordan)",
    "emerging_muon": "emerging-optimizers Muon + AdamW",
    "gram_ns": "gram-newton-schulz NS only",
}
PEERS = tuple(LABELS)
DISTRIBUTIONS = {"heavyball_muon": "heavyball", "kj_muon": "muon-optimizer", "emerging_muon": "emerging-optimizers",
                 "gram_ns": "gram-newton-schulz"}  # fmt: skip
_MODULES = {"heavyball_muon": "heavyball", "kj_muon": "muon", "emerging_muon": "emerging_optimizers", "gram_ns": "gram_newton_schulz"}


def _import(key: str, unavailable):
    try:
        return importlib.import_module(_MODULES[key])
    except Exception as e:  # ImportError, or a dependency that fails at import
        raise unavailable(f"{DISTRIBUTIONS[key]} is not importable here ({type(e).__name__}: {str(e)[:120]}); "
                          f"`pip install {DISTRIBUTIONS[key]}`, or carry its wheel in .whl/ for the GPU run") from None  # fmt: skip


def _regrad(params, grads):
    """heavyball sets p.grad = None after its step: put the bench's gradient buffers back."""

    def again():
        for p, g in zip(params, grads):
            p.grad = g

    return again


def build(key, pset: ParamSet, params, device, *, split, fused_adamw, runner, unavailable, quick=False):
    """The Runner of peer `key`, after one step (a package that fails on this set fails here, as
    "n/a" with the reason); `split(pset, params)` gives (matrices, rest) as for muon_adamw."""
    r = _build(key, pset, params, device, split, fused_adamw, runner, unavailable, quick)
    try:
        r.step()
    except Exception as e:
        raise unavailable(f"{DISTRIBUTIONS[key]} failed its first step here: {type(e).__name__}: {str(e)[:160]}") from e
    return r


def _build(key, pset, params, device, split, fused_adamw, runner, unavailable, quick):
    mod = _import(key, unavailable)
    mats, rest = split(pset, params)
    grads = [p.grad for p in params]
    try:
        if key == "heavyball_muon":
            import heavyball.utils

            heavyball.utils.compile_mode = None if quick else "default"  # --quick: code path only
            muon = mod.Muon(mats, lr=0.02, weight_decay=0.0)
            adamw, impl = fused_adamw(rest, device, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
            regrad = _regrad(params, grads)

            def step():
                regrad()
                muon.step()
                adamw.step()

            info = {"version": getattr(mod, "__version__", None), "compile_mode": heavyball.utils.compile_mode, "adamw_impl": impl}
            return runner(key, f"heavyball Muon + AdamW({impl})", step, [muon, adamw], info)
        if key == "kj_muon":
            groups = [dict(params=mats, lr=0.02, momentum=0.95, weight_decay=0.0, use_muon=True),
                      dict(params=rest, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, use_muon=False)]  # fmt: skip
            opt = mod.SingleDeviceMuonWithAuxAdam(groups)
            return runner(key, LABELS[key], opt.step, [opt], {})
        if key == "emerging_muon":
            from emerging_optimizers.orthogonalized_optimizers import Muon

            muon = Muon(mats, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True)
            adamw, impl = fused_adamw(rest, device, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)

            def step():
                muon.step()
                adamw.step()

            return runner(key, f"emerging-optimizers Muon + AdamW({impl})", step, [muon, adamw], {"adamw_impl": impl})
        if key == "gram_ns":
            kernels = importlib.util.find_spec("quack") is not None and device.type == "cuda"
            ns = mod.GramNewtonSchulz(ns_use_kernels=kernels)
            stacks: dict = {}
            for p in mats:
                stacks.setdefault(tuple(p.shape), []).append(p.grad)

            def step():
                for gs in stacks.values():
                    ns(torch.stack(gs))

            engine = "CuTe-DSL kernels" if kernels else "torch path (quack-kernels not importable)"
            return runner(key, f"gram-newton-schulz NS only ({engine})", step, [], {"engine": engine, "version": getattr(mod, "__version__", None)})
    except unavailable:
        raise
    except Exception as e:
        raise unavailable(f"{DISTRIBUTIONS[key]} failed to build here: {type(e).__name__}: {str(e)[:160]}") from e
    raise ValueError(f"unknown peer {key!r}")
