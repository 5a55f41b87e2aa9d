"""The wheel a user installs: named torch-mango, holding the library (mango, mango_kernels) and
nothing else, with the version from its one definition in mango/__init__.py."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mango

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("mango", "mango_kernels")


def _setuptools_major() -> int:
    try:
        import setuptools
    except ImportError:
        return 0
    return int(setuptools.__version__.split(".")[0])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (so the checkout gets no build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "results"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)]
    if _setuptools_major() >= 77:  # the build backend pyproject.toml names is here: build offline with it
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl


def test_wheel_is_named_torch_mango_at_the_library_version(wheel):
    assert wheel.name == f"torch_mango-{mango.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(f"torch_mango-{mango.__version__}.dist-info/METADATA"))
    assert meta["Name"] == "torch-mango"
    assert meta["Version"] == mango.__version__
    assert meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=3.10"
    assert any(r.startswith("torch") for r in meta.get_all("Requires-Dist"))


def test_wheel_holds_the_library_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    outside = [n for n in names if n.split("/")[0] not in LIBRARY and ".dist-info/" not in n]
    assert outside == [], f"files outside the library in the wheel: {outside}"
    sources = {str(p.relative_to(ROOT)) for pkg in LIBRARY for p in (ROOT / pkg).rglob("*.py")}
    assert sources - set(names) == set(), "library modules missing from the wheel"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
