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

import itertools
import operator

import torch
from torch.optim import Optimizer

from . import betas as _betas
from . import compiled_step, config, distributed, plain
from . import ddp as _ddp
from . import groups as _groups
from .backends import make_backend
from . import ns_engine
from .groups import check_param
from .plan import STRUCTURAL_KEYS, Slot, build_plan, structural_key
from .reference import init_state, state_keys


_LR_KEYS = ("lr", "initial_lr")  # initial_lr: what an LR scheduler copies from lr
# per-tensor reads done in C (map over a group's tensors), not a Python loop per tensor
_GRAD = operator.attrgetter("grad")
_LAYOUT, _DTYPE = operator.attrgetter("layout"), operator.attrgetter("dtype")
_STRIDED = frozenset((torch.strided,))
_REAL = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))
_STRUCTURE = operator.itemgetter(*STRUCTURAL_KEYS)


def _device_lr(lr, device) -> torch.Tensor:
    """A capturable group's lr: a 0-d float64 tensor on its params' device (float64: a scheduler's
    value is kept exactly, as a float lr is)."""
    if isinstance(lr, torch.Tensor):
        return lr if (lr.dtype == torch.float64 and lr.device == device) else lr.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


class Mango(Optimizer):
    r"""MANGO (Zhang & Cutkosky): LaProp moments, per-tensor dual-norm normalization, Nesterov
    and offset momentum. For every tensor W with gradient g, at step t::

        v ← β2·v + (1−β2)·g²                  u ← g / (√v + ε)           (LaProp preconditioner)
        m ← β1·m + u                           d ← β1·m + u (Nesterov) or m
        Δ ← N_role(d)                          the unit-norm direction of d in the role's norm:
                                               Newton–Schulz for matrices (per head block for a
                                               fused QKV, per expert for MoE), l2 for biases, none
                                               for embeddings and gains
        s ← lr·k·Δ                             k = √max(1, rows/cols) for Newton–Schulz norms;
                                               × LAMB's trust ratio min(‖W‖, trust_clamp) if asked
        O ← β_off·O + (1−β_off)·s              offset momentum
        W ← W − (s + O) − lr·λ·W               decoupled weight decay λ

    `preconditioner=None` gives plain momentum (Muon), "adam" Adam's bias-corrected moments,
    "novograd" NovoGrad's layer-wise scalar v. Every keyword before `backend` is a per-group
    setting; see `mango.config.DEFAULTS` and docs/guide.md ("Settings") for their meaning.

    params:    the model (`Mango(model)` = `Mango(mango.param_groups(model))`: every tensor gets
               its role from the module tree), param groups, or tensors / `named_parameters()`
               (a 1-D `bias` is then a bias; a tensor of 2+ dims gets role `matrix` from its shape,
               with a warning naming `Mango(model)`).

    betas:     torch's spelling of (beta1, beta2), kept equal to them (see `mango.betas`); it is
               what lets `OneCycleLR` / `CyclicLR` cycle β1.
    trust_clamp: with trust_ratio, the trust ratio is min(‖W‖, trust_clamp) (None: no clamp).
    backend:   "auto" (triton on CUDA, torch elsewhere), "torch", "triton" or "reference".
    nonfinite: what a NaN/Inf gradient does. "propagate" (default, like torch.optim: no check,
               no host sync), "skip" (the whole step is skipped; params and state stay
               bit-identical; `skipped_steps` counts them), "raise" (ValueError naming the
               parameters; nothing is modified).
    process_group: under DDP, a ProcessGroup or 1-D DeviceMesh over which the Newton–Schulz work
               is split (each rank orthogonalizes its share, then one all-gather; see mango.ddp).
               None: every rank runs the whole step.
    capturable: the step can be captured in a CUDA graph and replayed (as in torch.optim): each
               group's lr becomes a 0-d float64 tensor on its params' device (schedulers write the
               new value into it), step counters live on that device, and the step makes no host
               sync and allocates nothing (triton backend). Checkpoints keep lr a float.
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
        ns_method: str = config.DEFAULTS["ns_method"],
        ns_prescale: str = config.DEFAULTS["ns_prescale"],
        ns_eps: float = config.DEFAULTS["ns_eps"],
        ns_dtype="auto",
        ns_engine: str = config.DEFAULTS["ns_engine"],
        shape_scale=config.DEFAULTS["shape_scale"],
        orientation: str = config.DEFAULTS["orientation"],
        experts: bool = config.DEFAULTS["experts"],
        trust_ratio: bool = False,
        beta_offset=config.DEFAULTS["beta_offset"],
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        betas=None,
        trust_clamp=config.DEFAULTS["trust_clamp"],
        backend: str = "auto",
        nonfinite: str = "propagate",
        process_group=None,
        capturable: bool = False,
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
            ns_method=ns_method, ns_prescale=ns_prescale, ns_eps=ns_eps, ns_dtype=ns_dtype, ns_engine=ns_engine, shape_scale=shape_scale,
            orientation=orientation, experts=experts,
            trust_ratio=trust_ratio, trust_clamp=trust_clamp, beta_offset=beta_offset,
            weight_decay=weight_decay, maximize=maximize,
        )  # fmt: skip
        if betas is not None:  # betas wins over beta1/beta2 left at their defaults
            b1, b2 = _betas.as_pair(betas)
            for name, value, default in (("beta1", beta1, b1), ("beta2", beta2, b2)):
                if value != config.DEFAULTS[name] and value != default:
                    raise config._err("betas", betas, f"disagrees with {name}={value!r}; set one spelling")
            defaults.update(beta1=b1, beta2=b2)
        defaults["betas"] = (defaults["beta1"], defaults["beta2"])
        config.validate_group(defaults)
        params = plain.groups_from(params)  # a module is labelled; named biases are biases
        plain.warn_shape_only(plain.shape_only_names(params, role, norm), "mango.Mango")
        self._betas_sync = _betas.BetasSync()
        if not isinstance(capturable, bool):
            raise ValueError(f"mango: invalid capturable={capturable!r}: must be True or False")
        self.capturable = capturable
        self.backend_name = backend
        self.nonfinite = nonfinite
        self.process_group = _ddp.resolve_process_group(process_group)
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
        merged = _betas.merge_group(self.defaults, param_group)
        config.validate_group(merged)
        config.warn_misspelt_keys(merged)
        params = list(param_group["params"])
        names = param_group.get("param_names")
        if params and isinstance(params[0], tuple):  # named parameters, as torch.optim accepts them
            names = [n for n, _ in params]
            params = [p for _, p in params]
        names = list(names) if names is not None else [f"param_groups[{len(self.param_groups)}].params[{i}]" for i in range(len(params))]
        for name, p in zip(names, params):
            check_param(name, p, merged)
        param_group = dict(merged, params=params, param_names=names)
        if self.capturable and params:
            param_group["lr"] = _device_lr(param_group["lr"], params[0].device)
        super().add_param_group(param_group)
        self._betas_sync.record(self.param_groups)
        self._plan = None

    def __getstate__(self):
        """Pickle/deepcopy keep the frontend settings; the plan and backends are rebuilt lazily."""
        state = super().__getstate__()
        state.update(backend_name=self.backend_name, nonfinite=self.nonfinite, skipped_steps=self.skipped_steps, capturable=self.capturable)
        for key in ("_ns_kept", "_ns_checkpoint_profile"):  # the NS choices made so far stay fixed
            if self.__dict__.get(key):
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("capturable", False)
        for group in [self.defaults, *self.param_groups]:  # pickles of older versions: new settings
            _groups.upgrade_group(group)
        self._betas_sync = _betas.BetasSync()
        self._betas_sync.record(self.param_groups)
        self._plan = None
        self._backends = {}
        # load_state_dict comes through here too and keeps the group; an unpickled copy has none (a
        # process group does not pickle): pass it again to split the NS
        self.process_group = getattr(self, "process_group", None)

    def state_dict(self) -> dict:
        """torch.optim's state dict, with `betas` and `beta1`/`beta2` synced first (see mango.betas),
        and each NS bucket's engine, form and dtype (`ns_choices`, see mango.ns_engine), so a resumed
        run keeps them."""
        self._betas_sync.sync(self.param_groups)
        sd = super().state_dict()
        for g in sd["param_groups"]:  # one checkpoint layout, capturable or not: lr as a float
            for key in _LR_KEYS:
                if isinstance(g.get(key), torch.Tensor):
                    g[key] = g[key].item()
        choices = self._ns_choices_made()
        if choices:
            sd["ns_choices"] = ns_engine.choices_to_state(choices)
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Check the saved groups and state shapes against these parameters before anything is
        replaced (a clear ValueError naming the parameter), then load; floating state keeps
        mango's layout (fp32 state for bf16 params) so a round trip is bit-exact."""
        saved_groups = _groups.check_loadable(self, state_dict)
        lrs = [g["lr"] for g in self.param_groups]
        choices, profiles = state_dict.get("ns_choices"), state_dict.get("ns_profiles")
        state_dict = {k: v for k, v in state_dict.items() if k not in ("ns_choices", "ns_profiles")}
        super().load_state_dict(dict(state_dict, param_groups=saved_groups))
        self._load_ns_choices(choices, profiles)
        _groups.restore_state_dtypes(self, saved_groups, state_dict["state"])
        for g, old in zip(self.param_groups, lrs):
            if self.capturable and isinstance(old, torch.Tensor):  # the same lr tensor a captured graph reads
                g["lr"] = old.fill_(float(g["lr"]))
            elif not self.capturable and isinstance(g["lr"], torch.Tensor):
                g["lr"] = g["lr"].item()
        self._plan = None

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    def _backend_for(self, device: torch.device, sharded: bool = False):
        key = (self.backend_name, device.type, sharded)
        if key not in self._backends:
            self._backends[key] = make_backend(self.backend_name, device, sharded=sharded, process_group=self.process_group)
        return self._backends[key]

    def _collect(self):
        """Params with gradients per group, their grads, and the cache key of the plan. Each group's
        tensors are read by C-level passes (`map`); only a group with a param lacking a gradient
        filters in Python."""
        active, grads, key = [], [], []
        held = self.__dict__.setdefault("_structures", [])  # per group: (group, its plain structure)
        del held[len(self.param_groups) :]
        for i, group in enumerate(self.param_groups):
            ps = group["params"]
            gs = list(map(_GRAD, ps))
            if any(map(operator.is_, gs, itertools.repeat(None))):
                ps = [p for p, g in zip(ps, gs) if g is not None]
                gs = [g for g in gs if g is not None]
            active.append(ps)
            grads.append(gs)
            values = _STRUCTURE(group)
            if i < len(held) and held[i][0] is group and held[i][1] == values:  # as last step: no type walk
                structure = held[i][1]
            else:
                structure = _structure(group, values)
                entry = (group, structure) if structure is values else (None, None)
                if i < len(held):
                    held[i] = entry
                else:
                    held.append(entry)
            key.append((tuple(map(id, ps)), structure))
        return active, grads, tuple(key)

    @staticmethod
    def _grads_by_bucket(plan, active, grads) -> list:
        """The step's grads in each bucket's slot order (the order is the plan's: one pick per bucket)."""
        pickers = plan.cache.get("grad_pickers")
        if pickers is None:
            where = {id(p): n for n, p in enumerate(p for ps in active for p in ps)}
            pickers = plan.cache["grad_pickers"] = [[where[id(s.param)] for s in b.slots] for b in plan.buckets]
            pickers[:] = [operator.itemgetter(*idx) if len(idx) > 1 else (lambda flat, i=idx: tuple(flat[k] for k in i)) for idx in pickers]
        flat = list(itertools.chain.from_iterable(grads))
        return [list(pick(flat)) for pick in pickers]

    def _check_grads(self, active, grads) -> None:
        """Sparse or complex gradients: a ValueError naming the parameter (C-level scans of the
        layouts and dtypes; the names are looked up only where one is not dense and real)."""
        flat = list(itertools.chain.from_iterable(grads))
        if _STRIDED.issuperset(map(_LAYOUT, flat)) and _REAL.issuperset(map(_DTYPE, flat)):
            return
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
                if not state_keys(group) <= state.keys():  # new params, or keys a changed setting now needs
                    fresh = distributed.init_state(p, group) if distributed.is_dtensor(p) else init_state(p, group)
                    for k, v in fresh.items():
                        state.setdefault(k, v)
                if not group["beta_offset"]:
                    state.pop("offset", None)
                slots.append(Slot(p, self._name(group, p), gi, role, norm, state))
            slots_by_group.append(slots)
        plan = build_plan(key, self.param_groups, slots_by_group)
        self._choose_ns(plan)
        return plan

    def _choose_ns(self, plan) -> None:
        """Every NS bucket's engine, form and dtype, decided once per plan (mango.ns_engine) under
        the backend that runs it. A bucket decided before in this optimizer's life, or stored in the
        checkpoint it loaded, keeps its choice (`_ns_kept`)."""
        kept = self.__dict__.setdefault("_ns_kept", {})
        for bucket in plan.buckets:
            group = self.param_groups[bucket.group_index]
            backend = self._backend_for(bucket.device, plan.sharded)
            if backend.name == "reference":  # the oracle evaluates the form and dtype it is handed
                continue
            for nb in bucket.norm_buckets:
                if nb.norm in config.NS_NORMS:
                    r, c = nb.block_shape
                    key = _ns_key(bucket, nb)
                    profile = self._ns_profile(bucket.device) if backend.name == "torch" else None
                    nb.ns_choice = kept[key] = ns_engine.choose(
                        group, r, c, bucket.dtype, bucket.device, backend.name, count=nb.blocks_per_tensor * len(nb.slots),
                        profile=profile, arch=getattr(backend, "ns_target", None), stored=kept.get(key),
                        where=f"{bucket.slots[nb.slots[0]].name} ({r}x{c} blocks)")  # fmt: skip

    def _ns_profile(self, device):
        """The rates NS "auto" decides by on `device`: on a CPU, measured (mango.ns_engine), or the
        rates a checkpoint of an older version stored."""
        if device.type != "cpu":
            return None
        return self.__dict__.get("_ns_checkpoint_profile") or ns_engine.cpu_profile()

    def _ns_choices_made(self) -> dict:
        """{bucket key: NSChoice} of every NS bucket decided in this optimizer's life (as its backend
        runs it now), and those of a loaded checkpoint not planned yet."""
        kept = self.__dict__.setdefault("_ns_kept", {})
        for bucket in (self._plan.buckets if self._plan else []):
            for nb in bucket.norm_buckets:
                if nb.ns_choice is not None:
                    kept[_ns_key(bucket, nb)] = nb.ns_choice
        return kept

    def _load_ns_choices(self, choices, profiles) -> None:
        """The loaded run's NS choices replace this optimizer's. A checkpoint of an older version holds
        the measured CPU rates instead (`ns_profiles`): its buckets are decided by those."""
        self._ns_kept = ns_engine.choices_from_state(choices)
        old = (profiles or {}).get("cpu") if not choices else None
        self._ns_checkpoint_profile = ns_engine.DeviceProfile.from_state(old, f"from checkpoint ({old['source']} rates)") if old else None

    def ns_choices(self) -> list:
        """[(parameter names, block shape, NSChoice)] for every NS bucket of the current plan."""
        out = []
        for bucket in (self._plan.buckets if self._plan else []):
            for nb in bucket.norm_buckets:
                if nb.ns_choice is not None:
                    out.append(([bucket.slots[i].name for i in nb.slots], nb.block_shape, nb.ns_choice))
        return out

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
        """One optimizer step. Under `torch.compile` the bookkeeping (plan, checks, workspace) runs
        eagerly behind a graph break; the torch backend's math is traced and compiled, the triton and
        reference backends' step is one custom operator in the graph (mango.compiled_step), and the
        sharded and DDP-split backends run eagerly behind a graph break."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()
        # traced: the bookkeeping and untraceable backends behind graph breaks; eager: called directly
        # (a graph-break wrapper costs microseconds a step for nothing)
        for backend, plan, grads_by_bucket, prepared in (self._prepare_step_traced if compiling else self._prepare_step)(compiling):
            if prepared is not None:
                backend.run(self, plan, grads_by_bucket, prepared)
            elif compiling:
                _run_eagerly(backend.step, self, plan, grads_by_bucket)
            else:
                backend.step(self, plan, grads_by_bucket)
        return loss

    def _prepare_step(self, compiling: bool) -> list:
        """Everything of a step that is not tensor math: betas sync, the plan, gradient checks, the
        non-finite policy, each backend's per-step setup. Returns (backend, plan, grads by bucket,
        what the backend's traceable `run` needs, or None where its whole `step` runs eagerly)."""
        self._betas_sync.sync(self.param_groups)
        active, grads, key = self._collect()
        self._check_grads(active, grads)
        if self._plan is None or self._plan.key != key:
            self._plan = self._build_plan(active, key)
        plan = self._plan
        grads_by_bucket = self._grads_by_bucket(plan, active, grads)
        if not plan.buckets:
            return []
        if self.nonfinite != "propagate":
            bad = self._nonfinite_params(plan, grads_by_bucket)
            if bad:
                if self.nonfinite == "raise":
                    raise ValueError(f"mango: non-finite gradient in parameter(s) {bad}; nothing was updated")
                self.skipped_steps += 1
                return []
        by_backend = plan.cache.get("by_backend")
        if by_backend is None:
            by_backend = plan.cache["by_backend"] = {}
            for i, bucket in enumerate(plan.buckets):
                by_backend.setdefault(bucket.device.type, []).append(i)
        work = []
        for dev, idx in by_backend.items():
            backend = self._backend_for(plan.buckets[idx[0]].device, plan.sharded)
            sub, sub_grads = plan, grads_by_bucket
            if len(by_backend) > 1:  # one sub-plan per device type, kept with the plan (compiled code guards on it)
                sub = plan.cache.get(("sub-plan", dev))
                if sub is None:
                    sub = plan.cache[("sub-plan", dev)] = type(plan)(key=plan.key, buckets=[plan.buckets[i] for i in idx],
                                                                     cache=plan.cache.setdefault(dev, {}), sharded=plan.sharded)  # fmt: skip
                sub_grads = [grads_by_bucket[i] for i in idx]
            traceable = getattr(backend, "traceable", False) and not plan.sharded
            prepared = backend.prepare(self, sub, compiling) if traceable else None
            if compiling and not traceable and compiled_step.supports(self, backend, sub):  # one opaque operator in the graph
                backend, prepared = compiled_step.OPAQUE_STEP, compiled_step.prepare(self, backend, sub, sub_grads)
            work.append((backend, sub, sub_grads, prepared))
        return work

    _prepare_step_traced = torch._disable_dynamo(_prepare_step)  # behind a graph break when traced


_PLAIN = frozenset((str, int, float, bool, type(None), torch.dtype))


def _structure(group, values: tuple) -> tuple:
    """The group's settings that shape the plan (mango.plan.STRUCTURAL_KEYS; `values` as read): the
    values where all are plain (compared as such), else their reprs (a list compares by what it
    says now)."""
    return values if _PLAIN.issuperset(map(type, values)) else structural_key(group)


def _ns_key(bucket, nb) -> tuple:
    """What identifies an NS bucket across a checkpoint: its param group, norm, parameter shape and
    block shape (the plan buckets a group's tensors by norm and shape)."""
    return bucket.group_index, nb.norm, tuple(nb.shape), tuple(nb.block_shape)


@torch._disable_dynamo
def _run_eagerly(fn, *args):
    """fn(*args) outside any graph (a clean graph break under torch.compile)."""
    return fn(*args)
