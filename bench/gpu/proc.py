"""Run one stage's subprocess under a time budget, its output teed into the run log.

Why a budget per process and not per stage function: a stage on a GPU can hang where Python
cannot interrupt it (a kernel that never returns, a blocked synchronize). Only the parent can
end that reliably: it kills the whole process group, after asking the child for a traceback
(SIGUSR1: `faulthandler`, registered by the pytest plugin, dumps every thread's stack).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Result:
    cmd: list
    rc: int | None  # None: killed (see `killed`)
    seconds: float
    killed: str | None = None  # why the parent ended it: the budget, or the watch callback's reason
    tail: list = field(default_factory=list)  # last lines of output
    over_budget: bool = False  # ended because budget_s was spent

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.killed is None

    def to_dict(self) -> dict:
        return {"cmd": " ".join(map(str, self.cmd)), "rc": self.rc, "seconds": round(self.seconds, 1), "killed": self.killed}


class Log:
    """The run log: one file, written by every stage and subprocess, flushed per line."""

    def __init__(self, path: str, echo: bool = True):
        self.path = path
        self.echo = echo
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8", errors="replace")

    def write(self, line: str) -> None:
        with self._lock:
            self._f.write(line if line.endswith("\n") else line + "\n")
            self._f.flush()
            if self.echo:
                sys.stdout.write(line if line.endswith("\n") else line + "\n")
                sys.stdout.flush()

    def close(self) -> None:
        self._f.close()


def python_env(**overrides) -> dict:
    """The environment for a child: this checkout first on PYTHONPATH; a value None removes a variable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def run(cmd, log: Log, budget_s: float, env=None, prefix: str = "", watch=None, poll_s: float = 0.5) -> Result:
    """Run `cmd` from the repo root; every output line goes to `log` (with `prefix`). Killed when
    `budget_s` is spent or when `watch()` returns a reason (checked every `poll_s`)."""
    t0 = time.perf_counter()
    log.write(f"{prefix}$ {' '.join(map(str, cmd))}   (budget {budget_s:.0f} s)")
    proc = subprocess.Popen(
        [str(c) for c in cmd], cwd=ROOT, env=env or python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1, start_new_session=True,
    )  # fmt: skip
    tail: collections.deque = collections.deque(maxlen=60)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            log.write(prefix + line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed, over_budget = None, False
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            if time.perf_counter() - t0 > budget_s:
                killed, over_budget = f"stage budget of {budget_s:.0f} s spent", True
            elif watch is not None:
                killed = watch()
            if killed:
                _kill(proc, log, prefix, killed)
                break
    except BaseException:  # the run itself is being stopped: take the child down with it
        _kill(proc, log, prefix, "the run was stopped")
        raise
    proc.wait()
    reader.join(timeout=5)
    rc = None if killed else proc.returncode
    res = Result(list(cmd), rc, time.perf_counter() - t0, killed, list(tail), over_budget)
    log.write(f"{prefix}-> rc {rc}{' (killed: ' + killed + ')' if killed else ''} after {res.seconds:.1f} s")
    return res


def _kill(proc, log: Log, prefix: str, why: str) -> None:
    """SIGUSR1 (traceback, when the child registered faulthandler), then SIGTERM, then SIGKILL, to the group."""
    log.write(f"{prefix}!! ending the process group: {why}")
    for sig, wait in ((signal.SIGUSR1, 2.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            if sig != signal.SIGUSR1:
                return
        except subprocess.TimeoutExpired:
            continue
