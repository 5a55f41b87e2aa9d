"""Wheels carried to the GPU machine (it has no network): `.whl/*.whl` in the checkout, installed
into the run's scratch folder and put first on every stage's PYTHONPATH.

The peers bench.step times beside mango travel this way. `bench/gpu/wheels.txt` names them with
their versions (and says which cannot travel, and why); `bash ci/fetch_wheels.sh` downloads exactly
those on a machine with network, and the device call carries `.whl` (ignored by git). Nothing
there: nothing installed, and the peers that are missing are reported "n/a" with the reason. The
record says which wheels of the manifest were carried and which were not.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from . import proc

WHEELS = os.path.join(proc.ROOT, ".whl")
MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wheels.txt")


def manifest(path: str = MANIFEST) -> dict:
    """{distribution name (normalized): version} of the wheels the GPU run carries."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                out[_normalize(name)] = version
    return out


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_version(filename: str) -> tuple:
    """(normalized distribution name, version) of a wheel file name."""
    name, version = os.path.basename(filename).split("-")[:2]
    return _normalize(name), version


def check(wheels: list, wanted: dict) -> dict:
    """What was carried against the manifest: missing, other versions, extras."""
    have = dict(_wheel_version(w) for w in wheels)
    return {"missing": sorted(n for n in wanted if n not in have),
            "other_version": sorted(f"{n} {have[n]} (manifest {v})" for n, v in wanted.items() if n in have and have[n] != v),
            "not_in_manifest": sorted(n for n in have if n not in wanted)}  # fmt: skip


def install(work: str, log: proc.Log) -> dict:
    """Install the carried wheels (no index, no dependencies) into WORK/site; returns the record."""
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    rec = {"wheels": [os.path.basename(w) for w in wheels], "manifest": manifest(), **check(wheels, manifest())}
    if not wheels:
        return {**rec, "installed": False, "reason": "no .whl/ folder in the checkout (bash ci/fetch_wheels.sh, then carry .whl)"}
    if rec["missing"] or rec["other_version"]:
        log.write(f"[env] carried wheels differ from bench/gpu/wheels.txt: missing {rec['missing']}, other versions {rec['other_version']}")
    site = os.path.join(work, "site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", site, *wheels]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        log.write(f"[env] carried wheels NOT installed (pip rc {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        return {**rec, "installed": False, "reason": (r.stderr or r.stdout).strip()[-400:]}
    os.environ["PYTHONPATH"] = site + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    sys.path.insert(0, site)
    log.write(f"[env] carried wheels installed into {site}: {', '.join(rec['wheels'])}")
    return {**rec, "installed": True, "site": site}
