"""Launch plumbing shared by every kernel: interpreter detection and launch accounting.

Every kernel launch and every device-side torch op the Triton backend issues goes through
`record`, so tests and the benchmark can count what one optimizer step costs:

    with mango_kernels.count_launches() as log:
        opt.step()
    log.count            # device launches (Triton kernels + torch ops + table copies)
    log.by_name()        # {"moments": 1, "ns_xxt": 5, ...}
    with mango_kernels.count_launches(dry_run=True): ...   # count without running kernels
    with mango_kernels.count_launches(capture=True) as log: ...
    log.launches         # [Launch(name, kernel, grid, args, kwargs)]: what would have run
    mango_kernels.host_ops(names, fn)    # fn issues device ops that are not Triton launches (torch
                                         # ops on buffers that stay put): run it, count `names`

Capture (a dry run that keeps every launch's kernel, grid and arguments) is how
`mango_kernels.aot` compiles exactly the specializations a real step launches, for a GPU
target, on a machine without one: during a dry run the Triton backend also accepts CPU
tensors without TRITON_INTERPRET (nothing executes, only addresses and dtypes are read).

`launch_count()` is the running total since import (cheap to diff around a block of code).
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import NamedTuple

# Read once, at import: under TRITON_INTERPRET=1 the kernels run in the Triton interpreter on
# CPU tensors, whose tl.dot on bf16/fp16 operands multiplies bit patterns (the kernel design). Kernels
# get this as a constexpr and widen low-precision dot operands to fp32 (exact) when it is set.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    from ._compat import patch_interpreter

    patch_interpreter()  # Triton 3.6's interpreter with numpy >= 2.4 (see _compat)

_total = 0
_active_logs: list = []
_dry_runs = 0  # open blocks among _active_logs that suppress launches (read on every launch)


def device_function(fn):
    """Decorator for helpers called from kernels: `triton.jit` when compiled, the plain function
    under the interpreter. The interpreter re-patches `triton.language` on every nested jit call
    (~1.5 ms each); that was a third of the test suite's time. It patches the module globally,
    so a plain function called from a running kernel sees the same `tl` as the kernel."""
    if INTERPRET:
        return fn
    import triton

    return triton.jit(fn)


class Launch(NamedTuple):
    """One captured kernel launch: `kernel[grid](*args, **kwargs)` under the name `name`."""

    name: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class LaunchLog:
    """Names of the launches recorded while a `count_launches()` block was open
    (and, when capturing, the launches themselves)."""

    def __init__(self, dry_run: bool = False, capture: bool = False):
        self.events: list[str] = []
        self.dry_run = dry_run or capture
        self.capture = capture
        self.launches: list[Launch] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def by_name(self) -> dict:
        return dict(collections.Counter(self.events))

    def __repr__(self) -> str:
        return f"LaunchLog(count={self.count}, {self.by_name()})"


def _count(name: str, n: int = 1) -> None:
    global _total
    _total += n
    for log in _active_logs:
        if n == 1:
            log.events.append(name)
        else:
            log.events.extend([name] * n)


def _count_names(names) -> None:
    global _total
    _total += len(names)
    for log in _active_logs:
        log.events.extend(names)


def record(name: str, n: int = 1) -> None:
    """Count `n` device launches called `name` (a kernel, a torch fallback op, a table copy)."""
    _count(name, n)
    for program in _recording:  # a device op that is not a kernel launch: the block cannot be replayed
        program.replayable = False


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """Launch a Triton kernel and count it. Empty grids launch nothing and count nothing."""
    if 0 in grid:
        return
    _count(name)
    for program in _recording:
        program.add(Launch(name, kernel, tuple(grid), args, kwargs))
    if _active_logs:
        for log in _active_logs:
            if log.capture:
                log.launches.append(Launch(name, kernel, tuple(grid), args, kwargs))
        if dry_run_active():
            return
    kernel[grid](*args, **kwargs)


class HostOps(NamedTuple):
    """A recorded call that issues device ops other than Triton launches: `fn()` issues `names`."""

    names: tuple
    fn: object


def host_ops(names, fn) -> None:
    """Run `fn`, which issues the device ops `names` (torch ops on buffers that stay put, e.g. the
    cuBLAS NS engine's GEMMs; it issues them on stand-ins itself in a dry run), and count them; a
    recording `LaunchProgram` keeps the call, to make it again."""
    _count_names(names)
    for program in _recording:
        program.add(HostOps(tuple(names), fn))
    fn()


class LaunchProgram:
    """The kernel launches (and `host_ops` calls) a block of host code made, kept to be made again
    without that code (its Python: argument dicts, tables of kernel settings) while the arguments
    stay the same objects. Replayable only if the block issued nothing else (`record`)."""

    def __init__(self):
        self.steps: list = []  # Launch and HostOps, in order
        self.launches: list[Launch] = []  # the Triton launches among them
        self.replayable = True
        self._compiled = None

    def add(self, step) -> None:
        self.steps.append(step)
        if isinstance(step, Launch):
            self.launches.append(step)
        self._compiled = None

    def _compile(self):
        """(names, [(kernel launcher or None, fn, args, kwargs)]): what `replay` counts and calls."""
        names, calls = [], []
        for st in self.steps:
            if isinstance(st, Launch):
                names.append(st.name)
                calls.append((True, st.kernel[st.grid], st.args, st.kwargs))
            else:
                names.extend(st.names)
                calls.append((False, st.fn, (), {}))
        self._compiled = (names, calls)
        return self._compiled

    def replay(self) -> None:
        """The launches and host-op calls again, in order, counted and captured as `launch` and
        `host_ops` do (the checks made once). A dry run skips the launches; host-op calls run
        (they issue their ops on stand-ins)."""
        global _total
        names, calls = self._compiled or self._compile()
        for program in _recording:
            for st in self.steps:
                program.add(st)
        _total += len(names)
        dry = False
        if _active_logs:
            for log in _active_logs:
                log.events.extend(names)
                if log.capture:
                    log.launches.extend(self.launches)
            dry = dry_run_active()
        for is_kernel, fn, args, kwargs in calls:
            if not (dry and is_kernel):
                fn(*args, **kwargs)


_recording: list = []


@contextlib.contextmanager
def recording():
    """Context manager yielding a `LaunchProgram` of the launches made inside the block (they run as usual)."""
    program = LaunchProgram()
    _recording.append(program)
    try:
        yield program
    finally:
        _recording.remove(program)


def dry_run_active() -> bool:
    """Whether an open `count_launches(dry_run=True)` or `(capture=True)` block suppresses launches."""
    return _dry_runs > 0


def launch_count() -> int:
    """Total launches recorded since import."""
    return _total


@contextlib.contextmanager
def count_launches(dry_run: bool = False, capture: bool = False):
    """Context manager yielding a `LaunchLog` of the launches made inside the block.

    dry_run=True records the Triton launches without running them (the launch structure is
    decided on the host), e.g. to count a deep model's step under the slow interpreter. The
    step's results are then meaningless; torch fallback ops still run.
    capture=True is a dry run that also keeps each launch (`LaunchLog.launches`).
    """
    global _dry_runs
    log = LaunchLog(dry_run, capture)
    _active_logs.append(log)
    _dry_runs += log.dry_run
    try:
        yield log
    finally:
        _active_logs.remove(log)
        _dry_runs -= log.dry_run
