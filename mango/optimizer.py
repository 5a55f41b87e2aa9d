"""`mango.Mango`: the torch.optim frontend.

It validates settings, owns the per-parameter state, builds and caches the step plan, applies
the non-finite-gradient policy, and hands the step to a backend ("torch", "triton" or
"reference"). All backends share one state layout, so a checkpoint saved under one loads
under another:

    state["step"]        0-d float32 tensor, steps taken by this tensor
    state["exp_avg"]     m (momentum of the preconditioned gradient; Adam's m for "adam")
    state["exp_avg_sq"]  v (same shape as the param; 0-d for "novograd"; absent without a preconditioner)
    state["offset"]      O, the offset momentum (absent when beta_offset is None or 0)

State is float32 for float32/bfloat16/float16 params and float64 for float64 params.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from . import config, distributed
from .backends import make_backend
from .plan import Slot, build_plan, structural_key
from .reference import compute_dtype, init_state


class Mango(Optimizer):
    """MANGO (Zhang & Cutkosky): LaProp moments, per-tensor dual-norm normalization, Nesterov
    and offset momentum. Every keyword before `backend` is a per-group setting; see
    `mango.config.DEFAULTS` and the README for their meaning.

    backend:   "auto" (triton on CUDA, torch elsewhere), "torch", "triton" or "reference".
    nonfinite: what a NaN/Inf gradient does. "propagate" (default, like torch.optim: no check,
               no host sync), "skip" (the whole step is skipped; params and state stay
               bit-identical; `skipped_steps` counts them), "raise" (ValueError naming the
               parameters; nothing is modified).
    """

    def __init__(
        self,
        params,
        lr: float = config.DEFAULTS["lr"],
        beta1: float = config.DEFAULTS["beta1"],
        beta2: float = config.DEFAULTS["beta2"],
        eps: float = config.DEFAULTS["eps"],
        preconditioner=config.DEFAULTS["preconditioner"],
        second_moment: str = config.DEFAULTS["second_moment"],
        nesterov: bool = config.DEFAULTS["nesterov"],
        ema_momentum: bool = config.DEFAULTS["ema_momentum"],
        bias_correction: bool = False,
        role=None,
        norm=None,
        head_dim=None,
        ns_steps: int = config.DEFAULTS["ns_steps"],
        ns_coefficients=config.DEFAULTS["ns_coefficients"],
        ns_prescale: str = config.DEFAULTS["ns_prescale"],
        ns_eps: float = config.DEFAULTS["ns_eps"],
        ns_dtype="auto",
        shape_scale=config.DEFAULTS["shape_scale"],
        trust_ratio: bool = False,
        beta_offset=config.DEFAULTS["beta_offset"],
        weight_decay: float = 0.0,
        maximize: bool = False,
        orientation: str = config.DEFAULTS["orientation"],
        experts: bool = config.DEFAULTS["experts"],
        *,
        backend: str = "auto",
        nonfinite: str = "propagate",
    ):
        if backend not in config.BACKENDS:
            raise ValueError(f"mango: invalid backend={backend!r}: must be one of {config.BACKENDS}")
        if nonfinite not in config.NONFINITE_POLICIES:
            raise ValueError(f"mango: invalid nonfinite={nonfinite!r}: must be one of {config.NONFINITE_POLICIES}")
        defaults = dict(
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, preconditioner=preconditioner,
            second_moment=second_moment, nesterov=nesterov, ema_momentum=ema_momentum,
            bias_correction=bias_correction, role=role,
            norm=norm, head_dim=head_dim, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
            ns_prescale=ns_prescale, ns_eps=ns_eps, ns_dtype=ns_dtype, shape_scale=shape_scale,
            trust_ratio=trust_ratio, beta_offset=beta_offset, weight_decay=weight_decay, maximize=maximize,
            orientation=orientation, experts=experts,
        )  # fmt: skip
        config.validate_group(defaults)
        self.backend_name = backend
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._backends: dict = {}
        self._plan = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------
    # groups and validation
    # ------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Validate the group fully before torch registers it, so a bad group leaves nothing behind."""
        if isinstance(param_group.get("params"), torch.Tensor):
            param_group = dict(param_group, params=[param_group["params"]])
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        config.validate_group(merged)
        params = list(param_group["params"])
        names = param_group.get("param_names")
        if params and isinstance(params[0], tuple):  # named parameters, as torch.optim accepts them
            names = [n for n, _ in params]
            params = [p for _, p in params]
        names = list(names) if names is not None else [f"param_groups[{len(self.param_groups)}].params[{i}]" for i in range(len(params))]
        for name, p in zip(names, params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"mango: parameter {name} is a {type(p).__name__}, not a tensor")
            if p.is_complex():
                raise ValueError(f"mango: parameter {name} is complex ({p.dtype}); complex parameters are not supported")
            if not p.is_floating_point():
                raise ValueError(f"mango: parameter {name} has dtype {p.dtype}; only floating-point parameters can be optimized")
            role = config.resolve_role(merged, p)
            norm = config.resolve_norm(merged, role)
            if merged["norm"] is not None and norm not in config.ROLE_NORMS[role]:
                raise ValueError(f"mango: parameter {name}: norm={norm!r} is not available for role {role!r}")
            config.check_param_for_norm(name, p, role, norm, merged["head_dim"], merged["orientation"], merged["experts"])
            distributed.check_param(name, p)  # DTensor placements mango cannot handle
        param_group = dict(param_group, params=params, param_names=names)
        super().add_param_group(param_group)
        self._plan = None

    def __getstate__(self):
        """Pickle/deepcopy keep the frontend settings; the plan and backends are rebuilt lazily."""
        state = super().__getstate__()
        state.update(backend_name=self.backend_name, nonfinite=self.nonfinite, skipped_steps=self.skipped_steps)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = None
        self._backends = {}

    def load_state_dict(self, state_dict) -> None:
        """torch casts floating state to the param dtype; restore mango's layout (fp32 state for
        bf16 params) from the saved tensors so a round trip is bit-exact."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            config.validate_group(group)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if index in saved:
                    st = self.state[p]
                    for key, value in saved[index].items():
                        if isinstance(value, torch.Tensor):
                            if key == "step":  # host-side counter, as in torch.optim
                                st[key] = value.to(device="cpu", dtype=torch.float32, copy=True)
                            else:
                                st[key] = value.to(device=p.device, dtype=compute_dtype(p), copy=True)
                index += 1
        self._plan = None

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    def _backend_for(self, device: torch.device, sharded: bool = False):
        key = (self.backend_name, device.type, sharded)
        if key not in self._backends:
            self._backends[key] = make_backend(self.backend_name, device, sharded=sharded)
        return self._backends[key]

    def _collect(self):
        """Params with gradients per group, their grads, and the cache key of the plan."""
        active, grads, key = [], [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            active.append(ps)
            gs = [p.grad for p in ps]
            grads.append(gs)
            key.append((tuple(map(id, ps)), structural_key(group)))
        return active, grads, tuple(key)

    def _check_grads(self, active, grads) -> None:
        for group, ps, gs in zip(self.param_groups, active, grads):
            for p, g in zip(ps, gs):
                if g.is_sparse:
                    raise ValueError(f"mango: parameter {self._name(group, p)} has a sparse gradient; mango needs dense gradients")
                if g.is_complex():
                    raise ValueError(f"mango: parameter {self._name(group, p)} has a complex gradient; not supported")

    @staticmethod
    def _name(group, p) -> str:
        for name, q in zip(group["param_names"], group["params"]):
            if q is p:
                return name
        return "<unnamed>"

    def _build_plan(self, active, key):
        slots_by_group = []
        for gi, (group, ps) in enumerate(zip(self.param_groups, active)):
            slots = []
            for p in ps:
                role = config.resolve_role(group, p)
                norm = config.resolve_norm(group, role)
                state = self.state[p]
                fresh = distributed.init_state(p, group) if distributed.is_dtensor(p) else init_state(p, group)
                for k, v in fresh.items():  # new params, or keys a changed setting now needs
                    state.setdefault(k, v)
                if not group["beta_offset"]:
                    state.pop("offset", None)
                slots.append(Slot(p, self._name(group, p), gi, role, norm, state))
            slots_by_group.append(slots)
        return build_plan(key, self.param_groups, slots_by_group)

    @staticmethod
    def _nonfinite_flags(grads) -> torch.Tensor:
        """One bool per gradient: any NaN/Inf. The max-abs norm cannot overflow (unlike the l2 norm)
        and propagates NaN; empty gradients (which _foreach_norm(inf) rejects) are finite."""
        flags = torch.zeros(len(grads), dtype=torch.bool)
        nonempty = [i for i, g in enumerate(grads) if g.numel()]
        if nonempty:
            norms = torch.stack(torch._foreach_norm([grads[i] for i in nonempty], float("inf")))
            flags[nonempty] = ~torch.isfinite(norms).cpu()
        return flags

    def _nonfinite_params(self, plan, grads_by_bucket) -> list[str]:
        """Names of params whose gradient has a NaN or Inf (one batched check, one host sync)."""
        flags = []
        for bucket, grads in zip(plan.buckets, grads_by_bucket):
            backend = self._backend_for(bucket.device, plan.sharded)
            if hasattr(backend, "nonfinite_flags"):
                flags.append(backend.nonfinite_flags(bucket, grads))
            else:
                flags.append(self._nonfinite_flags(grads))
        if not flags:
            return []
        bad = torch.cat([f.reshape(-1).cpu() for f in flags])
        if not bool(bad.any()):
            return []
        names = [s.name for b in plan.buckets for s in b.slots]
        return [n for n, f in zip(names, bad.tolist()) if f]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active, grads, key = self._collect()
        self._check_grads(active, grads)
        if self._plan is None or self._plan.key != key:
            self._plan = self._build_plan(active, key)
        plan = self._plan
        grad_of = {id(p): g for ps, gs in zip(active, grads) for p, g in zip(ps, gs)}
        grads_by_bucket = [[grad_of[id(s.param)] for s in b.slots] for b in plan.buckets]
        if not plan.buckets:
            return loss
        if self.nonfinite != "propagate":
            bad = self._nonfinite_params(plan, grads_by_bucket)
            if bad:
                if self.nonfinite == "raise":
                    raise ValueError(f"mango: non-finite gradient in parameter(s) {bad}; nothing was updated")
                self.skipped_steps += 1
                return loss
        by_backend: dict = {}
        for i, bucket in enumerate(plan.buckets):
            by_backend.setdefault(bucket.device.type, []).append(i)
        for dev, idx in by_backend.items():
            backend = self._backend_for(plan.buckets[idx[0]].device, plan.sharded)
            if len(by_backend) == 1:
                backend.step(self, plan, grads_by_bucket)
            else:
                sub = type(plan)(key=plan.key, buckets=[plan.buckets[i] for i in idx], cache=plan.cache.setdefault(dev, {}), sharded=plan.sharded)
                backend.step(self, sub, [grads_by_bucket[i] for i in idx])
        return loss
