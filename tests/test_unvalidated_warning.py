"""Until a committed GPU run validates the kernels on an architecture, backend="triton" (or "auto")
on such a device warns once, naming backend="torch". sm_90 is validated by the committed H200 run;
an architecture no run has seen (here a B200's sm_100) still warns. No GPU here: the CUDA queries
are stubbed and the backend is only constructed, never stepped."""

from __future__ import annotations

import warnings

import pytest
import torch

import mango.backends as backends
from mango_kernels import validated


def stub_gpu(monkeypatch, capability, name):
    """A CUDA device of this compute capability and name, as far as these queries go."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(backends, "_warned_architectures", set())
    monkeypatch.setattr(backends, "triton_usable", lambda device: True)
    return torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """An architecture no committed run has validated: a B200 (sm_100)."""
    return stub_gpu(monkeypatch, (10, 0), "NVIDIA B200")


@pytest.mark.parametrize("name", ["triton", "auto"])
def test_warns_once_per_process_naming_the_torch_backend(fake_gpu, name):
    with pytest.warns(UserWarning, match=r"not been validated on this GPU architecture \(NVIDIA B200, sm_100\).*backend='torch'"):
        backend = backends.make_backend(name, fake_gpu)
    assert backend.name == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.make_backend(name, fake_gpu)  # second optimizer / step: silent


def test_sm90_is_validated_by_the_committed_h200_run(monkeypatch):
    """The H200 run's folder is committed: an sm_90 device constructs the triton backend silently."""
    assert validated.is_validated((9, 0)) and "gpu_nvidia-h200_" in validated.VALIDATED[(9, 0)]
    h200 = stub_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.make_backend("triton", h200)
        backends.make_backend("auto", h200)


def test_no_warning_on_a_validated_architecture_or_off_cuda(fake_gpu, monkeypatch):
    monkeypatch.setitem(validated.VALIDATED, (10, 0), "NVIDIA B200, 2026-12-01, bench/results/gpu_nvidia-b200_x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.make_backend("triton", fake_gpu)
        backends.make_backend("torch", fake_gpu)
        backends.make_backend("auto", torch.device("cpu"))


def test_no_architecture_is_claimed_validated_without_a_run():
    """Entries come only with a committed results folder (docs/benchmarks.md: 'GPU run')."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cap, evidence in validated.VALIDATED.items():
        folder = evidence.rsplit(",", 1)[-1].strip()
        assert os.path.exists(os.path.join(root, folder, "summary.md")), (cap, evidence)
