"""The triton backend's cuBLAS engine (ns_engine="cublas": torch batched GEMMs on the NS stack the
moments kernel writes) against the float64 reference, and its launch accounting: every device op
it issues is recorded, in a real step and in a launch dry run alike."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mango
import mango_kernels as mk
from helpers import all_params, make_groups
from test_triton_backend import displacement_err, pair

SHAPES = {"ns": ("matrix", None, [(8, 5), (5, 8), (8, 5), (1, 7), (7, 1), (3, 4, 2, 2), (13, 29)]),
          "ns_split": ("qkv_weight", 3, [(9, 5), (12, 4), (9, 5)])}  # fmt: skip


def cublas_groups(device, **settings):
    groups = make_groups(["ns", "ns_split"], dtype=torch.float32, device=device, **settings)
    gen = torch.Generator().manual_seed(5)
    extra = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in ((6, 11), (11, 6))]
    groups.append(dict(params=extra, role="matrix", norm="ns", orientation="in_out", **settings))  # Conv1D-stored
    experts = torch.nn.Parameter(torch.randn(3, 4, 7, generator=gen).to(device))
    groups.append(dict(params=[experts], role="matrix", norm="ns", experts=True, **settings))
    return groups


@pytest.mark.parametrize("method", ["textbook", "gram"])
def test_cublas_engine_fp32_trajectory(method, device):
    """fp32 operands, 10 steps: within the fp32 NS bound (1e-4) of the float64 reference."""
    groups = cublas_groups(device, beta_offset=0.9, ns_method=method)
    out, ref, before = pair(groups, 10, triton_kw=dict(ns_engine="cublas", ns_dtype=torch.float32))
    assert displacement_err(out, ref, before) <= 1e-4


@pytest.mark.parametrize("method", ["textbook", "gram"])
def test_cublas_engine_16_bit_update_within_spec(method, device):
    """The 16-bit defaults (bf16 textbook, fp16 Gram): one step's update within 2e-2."""
    groups = cublas_groups(device, beta_offset=None, ns_method=method)
    out, ref, before = pair(groups, 1, triton_kw=dict(ns_engine="cublas"))
    assert displacement_err(out, ref, before) <= 2e-2


def test_cublas_engine_spectral_prescale_and_zero_steps(device):
    for extra in (dict(ns_prescale="spectral", ns_steps=3), dict(ns_steps=0, beta_offset=0.5)):
        groups = cublas_groups(device, **extra)
        out, ref, before = pair(groups, 3, triton_kw=dict(ns_engine="cublas", ns_dtype=torch.float32))
        assert displacement_err(out, ref, before) <= 1e-4


class _DeviceOps(TorchDispatchMode):
    """Counts the aten ops that would launch work on a device (not views, not allocations)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not (func.is_view or name.startswith("aten::empty") or name in ("aten::detach", "aten::lift_fresh", "aten::alias")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _cublas_batches(opt):
    (lg,) = opt._plan.cache["triton"][1]
    return [b for r in lg.rounds for b, _ in r.ns_batches if getattr(b, "engine", None) == "cublas"]


@pytest.mark.parametrize("method", ["textbook", "gram"])
def test_recorded_ops_are_the_ops_that_run(method):
    """The count the engine records per batch equals the device ops torch dispatches for it."""
    groups = cublas_groups("cpu", ns_method=method)
    opt = mango.Mango(groups, backend="triton", ns_engine="cublas", ns_dtype=torch.float32)
    for p in all_params(opt):
        p.grad = torch.randn_like(p)
    opt.step()
    batches = _cublas_batches(opt)
    assert batches
    for batch in batches:
        with mk.count_launches() as log, _DeviceOps() as ops:
            batch.run()
        assert log.count == ops.count > 0


def test_dry_run_counts_what_the_step_runs_on_the_sm90_choice():
    """Deciding as on an H200 (ns_target="sm_90"): head blocks on chip, the larger matrices in
    cuBLAS; a dry run records the same launches as a real step, and runs no NS."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((192, 160), (160, 192), (24, 32))]
    groups = [dict(params=ps[:2], role="matrix", norm="ns"), dict(params=ps[2:], role="qkv_weight", norm="ns_split", head_dim=8)]
    opt = mango.Mango(groups, backend="triton")
    opt._backend_for(torch.device("cpu")).ns_target = "sm_90"
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    with mk.count_launches() as real:
        opt.step()
    engines = sorted({c.engine for _, _, c in opt.ns_choices()})
    assert engines == ["cublas", "triton_small"]
    with mk.count_launches(dry_run=True) as dry:
        opt.step()
    assert dry.by_name() == real.by_name()
    names = real.by_name()
    assert "cublas_ns" in names and {"ns_small", "ns_small_gram"} & names.keys()
    assert not {"ns_xxt", "ns_poly", "ns_update"} & names.keys()  # no tiled kernels: the table's choice
