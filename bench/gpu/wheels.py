"""Wheels carried to the GPU machine (it has no network): `.whl/*.whl` in the checkout, installed
into the run's scratch folder and put first on every stage's PYTHONPATH.

The peers bench.step times beside mango (heavyball, muon-optimizer, emerging-optimizers,
gram-newton-schulz; the machine's image has their other needs: numpy, opt-einsum, absl-py) travel
this way; fetch them on a
machine with network with `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
NAME==VERSION` (one version of each). Nothing there: nothing installed, and the peers that are
missing are reported "n/a" with the reason.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from . import proc

WHEELS = os.path.join(proc.ROOT, ".whl")


def install(work: str, log: proc.Log) -> dict:
    """Install the carried wheels (no index, no dependencies) into WORK/site; returns the record."""
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    if not wheels:
        return {"wheels": [], "installed": False, "reason": "no .whl/ folder in the checkout"}
    site = os.path.join(work, "site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", site, *wheels]  # fmt: skip
    names = [os.path.basename(w) for w in wheels]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        log.write(f"[env] carried wheels NOT installed (pip rc {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        return {"wheels": names, "installed": False, "reason": (r.stderr or r.stdout).strip()[-400:]}
    os.environ["PYTHONPATH"] = site + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    sys.path.insert(0, site)
    log.write(f"[env] carried wheels installed into {site}: {', '.join(names)}")
    return {"wheels": names, "installed": True, "site": site}
