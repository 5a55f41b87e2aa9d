"""Import torchvision beside the CPU build of torch, for the labelling tests of its models.

PyPI's torchvision wheel is built for CUDA: its compiled ops (`torchvision._C`) fail to load
beside the CPU torch, and its import then dies registering fake kernels for `torchvision::nms`
("operator torchvision::nms does not exist"). The role tests only build models and read their
parameters, which needs none of the compiled ops, so torchvision is installed privately, without
its dependencies, next to the tests:

    pip install --no-deps --target build/third_party torchvision==0.28.0

(torchvision's minor version is torch's + 15: torch 2.13 -> torchvision 0.28). When `_C` cannot
load, the two op schemas that the import registers kernels for are defined first; no kernel is
given, so calling `nms` would still fail loudly rather than compute anything.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

THIRD_PARTY = Path(__file__).resolve().parents[1] / "build" / "third_party"

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # a torch.library.Library unregisters its ops when collected: keep it alive


def torchvision():
    """The torchvision module, importable on CPU torch; ImportError says how to install it."""
    if THIRD_PARTY.is_dir() and str(THIRD_PARTY) not in sys.path:
        sys.path.insert(0, str(THIRD_PARTY))
    if "torchvision" not in sys.modules:
        if importlib.util.find_spec("torchvision") is None:
            raise ImportError(
                f"torchvision is not installed; run: pip install --no-deps --target {THIRD_PARTY} torchvision==0.28.0"
            )
        if not _compiled_ops_load():
            _define_op_schemas()
    import torchvision

    return torchvision


def _compiled_ops_load() -> bool:
    """Whether torchvision's compiled ops load beside this torch (they do on a matching build).

    Tried before importing torchvision, whose import cannot be retried once it failed halfway.
    """
    package = Path(importlib.util.find_spec("torchvision").origin).parent
    for library in sorted(package.glob("_C.*")):
        try:
            torch.ops.load_library(str(library))
        except (OSError, ImportError, RuntimeError):
            return False
        return True
    return False


def _define_op_schemas() -> None:
    """Declare the op schemas torchvision's import registers fake kernels for, with no kernels."""
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _libraries.append(lib)
