"""Under `torch.compile`: a backend's whole step as one custom operator, `mango::backend_step`.

The triton and reference backends cannot be traced: the Triton kernels reach params, grads and
state through int64 address tables built on the host (`mango_kernels.tables`), and the step makes
host decisions (settings, step counts, lr). Instead of a graph break, the compiled code calls one
opaque operator that runs the backend's eager step and declares what it writes:

    torch.ops.mango.backend_step(handle, written, grads, lrs)

    handle   which optimizer and plan (an entry of this module's registry, filled by the eager
             bookkeeping just before)
    written  every tensor the step mutates: params and state (m, v, offset, step counters), as
             their base tensors (the triton backend's step counters are views of one counter)
    grads    the gradients, in the plan's order (read)
    lrs      the groups' lr tensors, where lr is a tensor (read; a float lr is read from the group)

Why one operator and not `torch.library.triton_op` / `wrap_triton` per kernel: the moments and
apply kernels read and write params, grads and state through addresses in a table argument, so the
compiler would see only the table as their operand and could reorder or functionalize around the
tensors they really mutate. The kernels whose written tensors are direct arguments (segment sums,
the NS kernels on the NS stacks) read what the table-addressed moments kernel wrote and feed the
table-addressed apply kernel, so wrapping them alone would be unsound too. One operator with the
mutated tensors as mutable arguments is sound: functionalization orders it after every producer of
its inputs, and inductor's re-inplacing turns `auto_functionalized` back into the in-place call
(no copy of the params or state; checked in tests/test_compile.py). Where a compiler does not
re-inplace (e.g. the aot_eager backend), the operator is handed copies: it then copies them into
the optimizer's tensors, steps, and copies the results back, so the result is the same.

The sharded (FSDP2) and DDP-split backends make collectives inside their step and stay behind a
graph break.
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from typing import NamedTuple

import torch

OPAQUE_BACKENDS = ("triton", "reference")  # steps that write only params and state, in place, with no collectives

_registry: dict = {}  # handle -> _Registration
_handles: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> {device type: handle}
_next_handle = itertools.count(1)

# copies made because a compiler handed the operator stand-ins for the optimizer's tensors
# (0 under inductor, which re-inplaces the operator)
stand_in_copies = 0


class _Registration:
    """What the operator needs to run a step: the optimizer (weakly), its backend, the step's plan
    and the tensors the step writes (the ones the traced code passed as `written`)."""

    def __init__(self, opt):
        self.opt = weakref.ref(opt)
        self.backend = self.plan = None
        self.written: list = []


class OpCall(NamedTuple):
    """The operator's arguments, built eagerly by `prepare` and passed by the traced code."""

    handle: int
    written: list
    grads: list
    lrs: list


def supports(opt, backend, plan) -> bool:
    """Whether a compiled step can run this backend's step as the one operator."""
    return backend.name in OPAQUE_BACKENDS and not plan.sharded and opt.process_group is None


def _written(plan) -> list:
    """The tensors a step of `plan` writes, as base tensors, each once, in plan order. Kept with the
    plan while the triton backend's program (which rebinds the step counters) stays the same: state
    tensors are replaced only with a new plan (`load_state_dict`, new params), as the backend's own
    address table assumes."""
    program = plan.cache.get("triton")
    cached = plan.cache.get("compiled_step.written")
    if cached is not None and cached[0] is program:
        return cached[1]
    out, seen = [], set()
    for bucket in plan.buckets:
        for slot in bucket.slots:
            for t in (slot.param, *(v for _, v in sorted(slot.state.items()) if isinstance(v, torch.Tensor))):
                base = t if t._base is None else t._base
                if id(base) not in seen:
                    seen.add(id(base))
                    out.append(base)
    plan.cache["compiled_step.written"] = (program, out)
    return out


def prepare(opt, backend, plan, grads_by_bucket) -> OpCall:
    """Eager, before the traced call: register this step's backend and plan under the optimizer's
    handle and list the operator's arguments."""
    _define_operator()
    if hasattr(backend, "_program"):  # the triton backend builds its launch groups, which rebind every
        backend._program(opt, plan)  # state["step"] to a view of one counter: `written` must hold that counter
    handles = _handles.setdefault(opt, {})
    device = plan.buckets[0].device.type
    handle = handles.get(device)
    if handle is None:
        handle = handles[device] = next(_next_handle)
        _registry[handle] = _Registration(opt)
        weakref.finalize(opt, _registry.pop, handle, None)
    reg = _registry[handle]
    reg.backend, reg.plan, reg.written = backend, plan, _written(plan)
    lrs = [lr for lr in (opt.param_groups[i]["lr"] for i in sorted({b.group_index for b in plan.buckets})) if isinstance(lr, torch.Tensor)]
    return OpCall(handle, reg.written, [g for gs in grads_by_bucket for g in gs], lrs)


class OpaqueStep:
    """Stands in for the backend in the optimizer's traced loop: `run` is the one operator call."""

    def run(self, opt, plan, grads_by_bucket, call: OpCall) -> None:
        torch.ops.mango.backend_step(call.handle, call.written, call.grads, call.lrs)


OPAQUE_STEP = OpaqueStep()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _backend_step(handle: int, written: list[torch.Tensor], grads: list[torch.Tensor], lrs: list[torch.Tensor]) -> None:
    """The operator's implementation: the backend's eager step on the registered plan."""
    global stand_in_copies
    reg = _registry[handle]
    opt = reg.opt()
    stand_ins = [] if all(map(operator.is_, written, reg.written)) else [(a, own) for a, own in zip(written, reg.written) if not _same_memory(a, own)]
    for arg, own in stand_ins:
        own.copy_(arg)
    sizes = list(itertools.accumulate([0] + [len(b.slots) for b in reg.plan.buckets]))
    reg.backend.step(opt, reg.plan, [grads[a:b] for a, b in zip(sizes, sizes[1:])])
    for arg, own in stand_ins:
        arg.copy_(own)
    stand_in_copies += 2 * len(stand_ins)


_library = []  # the torch.library.Library the operator lives in (the operator goes when it is collected)


@functools.cache
def _define_operator() -> None:
    """Register `mango::backend_step` (once, on the first compiled step). Defined through
    `torch.library.Library` rather than `custom_op`, whose Python wrapper bumps the version counter
    of every written tensor one by one (~2 µs each, a few ms a step for a few hundred params with
    their state; aot_autograd's runtime accounts for the graph's input mutations itself). Tagged
    unsafe for CUDA graphs where torch has the tag: the step's host work (tables, settings) would
    not replay."""
    tags = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
    lib = torch.library.Library("mango", "FRAGMENT")
    lib.define("backend_step(int handle, Tensor(a!)[] written, Tensor[] grads, Tensor[] lrs) -> ()", tags=tags)
    lib.impl("backend_step", _backend_step, "CompositeExplicitAutograd")
    torch.library.register_fake("mango::backend_step", lambda handle, written, grads, lrs: None, lib=lib)
    _library.append(lib)
