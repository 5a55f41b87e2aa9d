"""The repository is self-contained: nothing cites a design document that is not in it.

Contracts are cited by the name of the section of docs/ that holds them (the update, the roles,
the presets, the backends, the kernel design, the correctness / performance / reliability
contract, the memory budget), never by the section numbers of an outside document.
"""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("mango", "mango_kernels", "bench", "tests", "docs", "ci")
FILES = ("README.md",)
# A GPU run's results folder is kept byte for byte as the device produced it (it is the evidence an
# architecture is validated on), wording of the code of its day included.
AS_PRODUCED = re.compile(r"^bench/results/gpu_[^/]+/")

# built from pieces so that this file does not match itself
_NAME = "SP" + "EC"
_SECTION = "\u00a7"
PATTERN = re.compile(_NAME + " ?" + _SECTION + "|" + _NAME + "'s|" + _NAME + r" ?\\u00a7")


def _tracked() -> list:
    """Tracked files under FOLDERS, plus FILES (git ls-files; every file on disk without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *FOLDERS, *FILES], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        paths = [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
        if paths:
            return paths
    except (OSError, subprocess.SubprocessError):
        pass
    paths = [f for f in FILES if os.path.isfile(os.path.join(ROOT, f))]
    for folder in FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "local") and not d.startswith(".")]
            paths += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return paths


def test_no_citation_of_an_outside_design_document():
    offenders = []
    for rel in _tracked():
        if AS_PRODUCED.match(rel.replace(os.sep, "/")):
            continue
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary (plots)
            continue
        text = data.decode("utf-8", "replace")
        for no, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                offenders.append(f"{rel}:{no}: {line.strip()[:120]}")
    assert not offenders, "cite the docs/ section instead:\n" + "\n".join(offenders)
