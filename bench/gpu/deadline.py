"""pytest plugin for the GPU run: per-test timeout, results as they happen, resumable runs.

Loaded with `-p bench.gpu.deadline` and switched on by `--gpu-results FILE`. Needs nothing
beyond pytest (pytest-timeout is not on the GPU machine):

* `--gpu-timeout S`: a test that runs longer than S seconds fails with `TestTimeout` (SIGALRM,
  raised in the test's own thread). A test stuck where Python cannot interrupt it (a kernel
  that never returns) is ended by the parent process, which watches FILE (see tests_stage).
* FILE gets one JSON line when a test starts and one when it ends, so whatever happens to the
  process, the parent knows what passed, what failed and which test was running. A run started
  again with the same FILE skips every test already recorded there: a crash costs one test.
* A failure that leaves the CUDA context unusable (illegal address, device-side assert) ends the
  process right after it is recorded, so the parent restarts in a fresh context instead of
  letting every later test fail for the same reason.
* `--gpu-cuda-mode`: keep only tests with a CUDA mode (they take the `device` fixture of
  tests/conftest.py, or their module reads MANGO_TEST_DEVICE into a module-level DEVICE);
  `--gpu-first a,b`: these test modules first (kernels and backends), in that order;
  `--gpu-shard K/N`: every N-th module from the K-th, for parallel processes on one GPU;
  `--gpu-sample N`: the first N selected tests of each module (the CPU dry run).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import pytest

from . import testlog
from .testlog import STICKY_EXIT

STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                      "illegal instruction", "CUDA error: an illegal")  # fmt: skip


class TestTimeout(Exception):
    """The test ran past --gpu-timeout."""

    __test__ = False  # not a test class


def pytest_addoption(parser):
    g = parser.getgroup("mango GPU run")
    g.addoption("--gpu-results", help="JSON-lines file of test starts/ends; tests already in it are skipped")
    g.addoption("--gpu-timeout", type=float, default=0.0, help="per-test timeout in seconds (0: none)")
    g.addoption("--gpu-cuda-mode", action="store_true", help="only tests that have a CUDA mode")
    g.addoption("--gpu-first", default="", help="comma-separated module names to run first, in order")
    g.addoption("--gpu-shard", default="0/1", help="K/N: this process runs every N-th module starting at the K-th")
    g.addoption("--gpu-sample", type=int, default=0, help="keep the first N selected tests per module (0: all)")


def _enabled(config) -> bool:
    return bool(config.getoption("--gpu-results"))


def _write(config, record: dict) -> None:
    testlog.append(config.getoption("--gpu-results"), record)


# The process's real stderr, taken when pytest imports this plugin (before its output capture
# redirects fd 2): a stack dump must reach the parent's log, not a capture buffer.
_STDERR = os.fdopen(os.dup(2), "w")


def pytest_configure(config):
    if _enabled(config) and hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=_STDERR, all_threads=True)  # the parent asks for stacks before a kill


def _has_cuda_mode(item) -> bool:
    return "device" in getattr(item, "fixturenames", ()) or getattr(getattr(item, "module", None), "DEVICE", None) is not None


def _module(item) -> str:
    return os.path.splitext(os.path.basename(str(item.fspath)))[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if not _enabled(config):
        return
    first = [m for m in config.getoption("--gpu-first").split(",") if m]
    selected = [it for it in items if _has_cuda_mode(it)] if config.getoption("--gpu-cuda-mode") else list(items)
    modules = sorted({_module(it) for it in selected}, key=lambda m: (first.index(m) if m in first else len(first), m))
    k, n = (int(x) for x in config.getoption("--gpu-shard").split("/"))
    mine = set(modules[k::n])
    selected = [it for it in selected if _module(it) in mine]
    selected.sort(key=lambda it: modules.index(_module(it)))  # stable: file order within a module
    sample = config.getoption("--gpu-sample")
    if sample:
        per: dict = {}
        selected = [it for it in selected if per.setdefault(_module(it), []).append(it) or len(per[_module(it)]) <= sample]
    done = testlog.recorded(config.getoption("--gpu-results"))
    keep = [it for it in selected if it.nodeid not in done]
    if not done:  # the first attempt records what this process is responsible for
        _write(config, {"event": "selected", "nodeids": [it.nodeid for it in selected], "modules": sorted(mine)})
    dropped = [it for it in items if it not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def _alarm(seconds):
    def handler(signum, frame):
        raise TestTimeout(f"test ran past --gpu-timeout {seconds:g} s")

    return handler


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    config = item.config
    if not _enabled(config):
        yield
        return
    item._gpu_outcome = {"outcome": "passed", "duration": 0.0, "message": ""}
    _write(config, {"event": "start", "nodeid": item.nodeid, "t": time.time()})
    timeout = config.getoption("--gpu-timeout")
    use_alarm = timeout > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm(timeout))
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    rec = item._gpu_outcome
    _write(config, {"event": "end", "nodeid": item.nodeid, "t": time.time(), **rec})
    if rec["outcome"] in ("failed", "error") and any(s in rec["message"] for s in STICKY_CUDA_ERRORS):
        sys.stderr.write(f"\n[deadline] {item.nodeid}: the CUDA context is unusable after this failure; ending the "
                         f"process so that the next attempt starts fresh\n")  # fmt: skip
        sys.stderr.flush()
        os._exit(STICKY_EXIT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fold each phase's report (setup, call, teardown) into the test's one outcome."""
    outcome = yield
    rec = getattr(item, "_gpu_outcome", None)
    if rec is None:
        return
    report = outcome.get_result()
    rec["duration"] += report.duration
    if report.failed:
        text = str(report.longrepr)
        rec["outcome"] = "timeout" if "TestTimeout" in text else ("failed" if report.when == "call" else "error")
        rec["message"] = text[-3000:]
    elif report.skipped and rec["outcome"] == "passed":
        rec["outcome"] = "skipped"
        rec["message"] = str(report.longrepr)[-300:]
