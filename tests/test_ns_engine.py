"""The NS engine choice (mango.ns_engine): one decision per NS bucket at plan time, from measured
rates on CPUs (injected here: no timed asserts) and the per-architecture table on GPUs; settings
force; the verdict is kept for the optimizer's life and in its state dict."""

import pytest
import torch

import mango
from mango import config, ns_engine
from mango.ns_engine import DeviceProfile, choose
from mango_kernels import resources

CPU = torch.device("cpu")
S = dict(config.DEFAULTS)


def profile(**gflops) -> DeviceProfile:
    """A measured profile from injected timings (seconds per product of a fixed size)."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    times = {names[k]: 1.0 / v for k, v in gflops.items()}
    return ns_engine.cpu_profile(timer=lambda dt: times[dt])


def test_measured_rates_pick_the_fastest_dtype_per_form():
    amx = profile(fp32=100, bf16=400, fp16=50)  # bf16 4x fp32: textbook in bf16
    no_amx = profile(fp32=264, bf16=164, fp16=40)  # AVX512-BF16 without AMX: fp32 wins
    assert choose(S, 768, 768, torch.float32, CPU, "torch", profile=amx).dtype == torch.bfloat16
    square_fp32 = choose(S, 768, 768, torch.float32, CPU, "torch", profile=no_amx)
    assert (square_fp32.method, square_fp32.dtype) == ("textbook", torch.float32)
    wide = choose(S, 64, 3072, torch.float32, CPU, "torch", profile=no_amx)  # Gram saves FLOPs on a wide block
    assert (wide.method, wide.dtype) == ("gram", torch.float32)
    fast_fp16 = profile(fp32=100, bf16=110, fp16=400)
    assert (choose(S, 64, 3072, torch.float32, CPU, "torch", profile=fast_fp16).dtype) == torch.float16
    assert "measured" in wide.why


def test_bf16_never_runs_the_gram_form():
    fast_bf16 = profile(fp32=10, bf16=1000, fp16=1)
    for shape in ((64, 3072), (768, 768), (1, 50)):
        c = choose(S, *shape, torch.float32, CPU, "torch", profile=fast_bf16)
        assert not (c.method == "gram" and c.dtype == torch.bfloat16)
    forced = choose(dict(S, ns_dtype=torch.bfloat16), 64, 3072, torch.float32, CPU, "torch", profile=fast_bf16)
    assert (forced.method, forced.dtype) == ("textbook", torch.bfloat16)


def test_a_forced_setting_is_never_overridden():
    fast_bf16 = profile(fp32=10, bf16=1000, fp16=500)
    for dt in (torch.float32, torch.float16, torch.float64):
        for method in ("textbook", "gram"):
            c = choose(dict(S, ns_dtype=dt, ns_method=method), 64, 3072, torch.float32, CPU, "torch", profile=fast_bf16)
            assert (c.method, c.dtype, c.why) == (method, dt, "ns_dtype set, ns_method set")
    c = choose(dict(S, ns_dtype=torch.float32), 64, 3072, torch.float32, CPU, "triton", profile=fast_bf16)
    assert c.dtype == torch.float32


def test_float64_state_runs_float64_ns():
    c = choose(S, 64, 3072, torch.float64, CPU, "torch", profile=profile(fp32=1, bf16=100, fp16=100))
    assert c.dtype == torch.float64
    assert choose(S, 64, 64, torch.float64, CPU, "triton").engine == "torch"


def test_gpu_table_and_model():
    """sm_90 (measured): head blocks on chip, large blocks in cuBLAS; an unmeasured architecture
    gets the model; ns_engine forces; tiles fit every target's shared memory."""
    head = choose(S, 64, 768, torch.float32, CPU, "triton", arch="sm_90")
    assert head.engine == "triton_small" and "table sm_90" in head.why
    for shape in ((50257, 768), (768, 3072), (768, 768), (2048, 8192)):
        c = choose(S, *shape, torch.float32, CPU, "triton", arch="sm_90")
        assert c.engine == "cublas" and c.dtype in (torch.bfloat16, torch.float16)
    other = choose(S, 768, 3072, torch.float32, CPU, "triton", arch="sm_100")
    assert other.engine == "cublas" and "model" in other.why
    assert choose(S, 64, 768, torch.float32, CPU, "triton", arch="sm_100", count=432).engine == "triton_small"
    tiled = choose(dict(S, ns_engine="triton"), 768, 3072, torch.float32, CPU, "triton", arch="sm_86")
    assert tiled.engine == "triton_tiled"
    for arch, smem in resources.SHARED_MEMORY.items():
        for dt, method in ((torch.bfloat16, "textbook"), (torch.float32, "textbook"), (torch.float16, "gram")):
            settings = dict(S, ns_engine="triton", ns_dtype=dt, ns_method=method)
            t = choose(settings, 768, 3072, torch.float32, CPU, "triton", arch=arch).tiles
            assert resources.tiles_shared_memory(t, torch.finfo(dt).bits // 8, arch, method) <= smem
    assert choose(dict(S, ns_engine="cublas"), 64, 768, torch.float32, CPU, "triton", arch="sm_90").engine == "cublas"


def test_tile_sizes_are_cut_to_what_the_kernels_take():
    """The shared-memory model holds the compiler's numbers (tests/test_aot.py checks it compiled):
    ns_poly takes 81,920 B at (64, 128, 64) and 163,840 B at (128, 128, 64), more than sm_86 has; the
    mirrored X·Xᵀ tile takes 262,144 B at (256, 128, 64) on sm_90, more than it has. Tiles that do
    not fit are halved where it helps until every kernel of the form fits."""
    assert resources.tiled_shared_memory("ns_poly", (64, 128, 64), 2, "sm_90") == 81920
    assert resources.tiled_shared_memory("ns_poly", (128, 128, 64), 2, "sm_86") == 163840
    assert resources.tiled_shared_memory("ns_xxt", (256, 128, 64), 2, "sm_90") == 262144
    assert resources.fit_tiles((128, 128, 64), "sm_86", 2) == (64, 128, 64)
    for arch, smem in resources.SHARED_MEMORY.items():
        for size, method in ((2, "textbook"), (4, "textbook"), (2, "gram")):
            tiles = resources.fit_tiles((256, 256, 64), arch, size, method)
            assert resources.tiles_shared_memory(tiles, size, arch, method) <= smem and min(tiles) >= 16
    with pytest.raises(ValueError, match="kernel"):
        resources.tiled_shared_memory("ns_syrk", (64, 64, 64), 2, "sm_90")


def test_ns_engine_setting_is_validated():
    with pytest.raises(ValueError, match="ns_engine"):
        mango.Mango([torch.nn.Parameter(torch.randn(4, 4))], ns_engine="cuda")


def _opt(**kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16, 48)), torch.nn.Parameter(torch.randn(32, 32))]
    opt = mango.Mango(ps, backend="torch", **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    return opt, ps


def test_choice_is_made_once_and_kept_in_the_state_dict(monkeypatch):
    """The measured profile is taken once per optimizer, shown by ns_choices(), saved in the state
    dict; a resumed optimizer keeps its dtypes even where this machine measures otherwise."""
    bf16_fast = profile(fp32=10, bf16=1000, fp16=1)
    fp32_fast = profile(fp32=1000, bf16=10, fp16=1)
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: bf16_fast)
    opt, _ = _opt()
    opt.step()
    dtypes = [c.dtype for _, _, c in opt.ns_choices()]
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    sd = opt.state_dict()
    assert "ns_profiles" in sd
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: fp32_fast)
    opt._plan = None
    opt.step()  # a plan rebuild asks again: the same verdict
    assert [c.dtype for _, _, c in opt.ns_choices()] == dtypes
    fresh, _ = _opt()
    fresh.step()
    assert [c.dtype for _, _, c in fresh.ns_choices()] == [torch.float32, torch.float32]
    resumed, _ = _opt()
    resumed.load_state_dict(sd)
    resumed.step()
    assert [c.dtype for _, _, c in resumed.ns_choices()] == dtypes


def test_disk_cache_and_clear(tmp_path, monkeypatch):
    path = tmp_path / "ns.json"
    monkeypatch.setenv("MANGO_NS_CACHE", str(path))
    ns_engine.clear_measurements()
    first = ns_engine.cpu_profile()
    assert path.exists()
    ns_engine._measured.clear()
    again = ns_engine.cpu_profile()  # read back from disk, not measured
    assert again.rates == pytest.approx(first.rates)
    ns_engine.clear_measurements()
    assert not path.exists()


def test_describe_shows_each_bucket_choice():
    opt, _ = _opt(ns_dtype=torch.float32)
    opt.step()
    text = mango.describe(opt)
    assert "float32" in text and "torch" in text and "ns_dtype set" in text
