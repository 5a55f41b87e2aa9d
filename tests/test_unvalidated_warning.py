"""Until a committed GPU run validates the kernels on an architecture, backend="triton" (or "auto")
on such a device warns once, naming backend="torch" (issue 11, item 5). No GPU here: the CUDA
queries are stubbed and the backend is only constructed, never stepped."""

from __future__ import annotations

import warnings

import pytest
import torch

import mango.backends as backends
from mango_kernels import validated


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 named like an H200, as far as these queries go."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(backends, "_warned_architectures", set())
    monkeypatch.setattr(backends, "triton_usable", lambda device: True)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["triton", "auto"])
def test_warns_once_per_process_naming_the_torch_backend(fake_gpu, name):
    with pytest.warns(UserWarning, match=r"not been validated on this GPU architecture \(NVIDIA H200, sm_90\).*backend='torch'"):
        backend = backends.make_backend(name, fake_gpu)
    assert backend.name == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.make_backend(name, fake_gpu)  # second optimizer / step: silent


def test_no_warning_on_a_validated_architecture_or_off_cuda(fake_gpu, monkeypatch):
    monkeypatch.setitem(validated.VALIDATED, (9, 0), "NVIDIA H200, 2026-12-01, bench/results/gpu_nvidia-h200_x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.make_backend("triton", fake_gpu)
        backends.make_backend("torch", fake_gpu)
        backends.make_backend("auto", torch.device("cpu"))


def test_no_architecture_is_claimed_validated_without_a_run():
    """Entries come only with a committed results folder (README: 'GPU run')."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cap, evidence in validated.VALIDATED.items():
        folder = evidence.rsplit(",", 1)[-1].strip()
        assert os.path.exists(os.path.join(root, folder, "summary.md")), (cap, evidence)
