"""Test configuration shared by the whole suite.

Triton kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1), which
must be set before triton is imported. On a GPU machine, `MANGO_TEST_DEVICE=cuda` runs the
same tests compiled for real on CUDA tensors.
"""

import os

DEVICE = os.environ.get("MANGO_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# NS "auto" on a CPU decides by the ISA seed, not by timing this loaded machine: a test's outcome
# must not depend on timings (tests/test_ns_engine.py injects them to test the measured choice)
os.environ.setdefault("MANGO_NS_MEASURE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: CPU (interpreter) by default, CUDA when asked."""
    return torch.device(DEVICE)


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("MANGO_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
