"""The NS engine choice (mango.ns_engine): one decision per NS bucket at plan time, from rates
measured per size class on CPUs (injected here: no timed asserts) and the per-architecture table on
GPUs; settings force; each bucket's choice is kept for the optimizer's life and in its state dict."""

import warnings

import pytest
import torch

import mango
import mango_kernels as mk
from helpers import choose_ns_as_on
from mango import config, ns_engine
from mango.ns_engine import DeviceProfile, choose
from mango_kernels import resources

CPU = torch.device("cpu")
S = dict(config.DEFAULTS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def profile(rates=None, **gflops) -> ns_engine.MeasuredProfile:
    """A measured CPU profile timed by injected timings: GFLOP/s per dtype for every class and
    product (`fp32=100, ...`), or `rates(dtype name, product, (batch, m, n)) -> GFLOP/s`."""
    names = {dt: k for k, dt in DTYPES.items()}

    def timer(dt, product, cls):
        rate = rates(names[dt], product, cls) if rates else gflops[names[dt]]
        return ns_engine._product_flops(product, cls) / (rate * 1e9)

    return ns_engine.MeasuredProfile("test", ns_engine._where(), timer=timer)


def no_timing(dt, product, cls):
    raise AssertionError(f"measured {product} {dt} at {cls}: nothing should be timed here")


def form_dtype(c):
    return c.method, c.dtype


def test_measured_rates_pick_the_fastest_dtype_per_form():
    amx = profile(fp32=100, bf16=400, fp16=50)  # bf16 4x fp32: textbook in bf16
    no_amx = profile(fp32=264, bf16=164, fp16=40)  # AVX512-BF16 without AMX: fp32 wins
    assert choose(S, 768, 768, torch.float32, CPU, "torch", profile=amx).dtype == torch.bfloat16
    assert form_dtype(choose(S, 768, 768, torch.float32, CPU, "torch", profile=no_amx)) == ("textbook", torch.float32)
    wide = choose(S, 64, 3072, torch.float32, CPU, "torch", profile=no_amx)  # Gram saves FLOPs on a wide block
    assert form_dtype(wide) == ("gram", torch.float32)
    fast_fp16 = profile(fp32=100, bf16=110, fp16=400)
    assert choose(S, 64, 3072, torch.float32, CPU, "torch", profile=fast_fp16).dtype == torch.float16
    assert wide.why == f"measured on {ns_engine._where()} at 1x64x512"


def test_size_classes():
    """The block in its wide orientation, scaled to m <= 256 with its aspect and cut to n <= 512,
    as many as the bucket has up to ~32 MFLOP of X·Xᵀ."""
    assert ns_engine.size_class(64, 64, 6) == (6, 64, 64)
    assert ns_engine.size_class(256, 64, 2) == (2, 64, 256)
    assert ns_engine.size_class(64, 256, 144) == (15, 64, 256)
    assert ns_engine.size_class(1024, 256, 12) == ns_engine.size_class(768, 3072, 12) == (1, 256, 512)
    assert ns_engine.size_class(50257, 768, 1) == (1, 256, 512)
    assert ns_engine.size_class(1, 7, 3) == (3, 1, 7)


def test_verdicts_differ_by_size_class():
    """As measured on an AMX CPU with one thread: bf16 no faster than fp32 on small batches of
    64x64 blocks, 3-6x faster on 256-wide ones. Each bucket takes its class's verdict."""

    def amx(dt, product, cls):
        big = cls[1] >= 128
        return {"fp32": 120, "bf16": 480 if big else 125, "fp16": 110}[dt]

    prof = profile(amx)
    small = choose(S, 64, 64, torch.float32, CPU, "torch", count=6, profile=prof)
    large = choose(S, 256, 256, torch.float32, CPU, "torch", count=12, profile=prof)
    assert form_dtype(small) == ("textbook", torch.float32) and small.why.endswith("at 6x64x64")
    assert form_dtype(large) == ("textbook", torch.bfloat16) and large.why.endswith("at 1x256x256")


def test_the_m_by_m_rate_decides_the_gram_form():
    """The Gram form moves work from m×n products to m×m ones: it wins where those run as fast,
    and loses where small m×m products run slowly (the FLOP count alone would always pick it)."""
    fast_mxm = profile(lambda dt, product, cls: {"fp32": 100, "bf16": 10, "fp16": 10}[dt])
    slow_mxm = profile(lambda dt, product, cls: {"fp32": 100 if product == "mxn" else 20, "bf16": 10, "fp16": 10}[dt])
    assert form_dtype(choose(S, 64, 256, torch.float32, CPU, "torch", profile=fast_mxm)) == ("gram", torch.float32)
    assert form_dtype(choose(S, 64, 256, torch.float32, CPU, "torch", profile=slow_mxm)) == ("textbook", torch.float32)


def test_within_noise_the_more_precise_dtype_wins():
    """bf16 5% faster than fp32 is a tie: fp32. 20% faster: bf16. The same between fp16 and fp32
    in the Gram form."""
    assert choose(S, 256, 256, torch.float32, CPU, "torch", profile=profile(fp32=100, bf16=105, fp16=1)).dtype == torch.float32
    assert choose(S, 256, 256, torch.float32, CPU, "torch", profile=profile(fp32=100, bf16=120, fp16=1)).dtype == torch.bfloat16
    gram = dict(S, ns_method="gram")
    assert choose(gram, 64, 256, torch.float32, CPU, "torch", profile=profile(fp32=100, bf16=1, fp16=105)).dtype == torch.float32
    assert choose(gram, 64, 256, torch.float32, CPU, "torch", profile=profile(fp32=100, bf16=1, fp16=120)).dtype == torch.float16


def test_bf16_never_runs_the_gram_form():
    fast_bf16 = profile(fp32=10, bf16=1000, fp16=1)
    for shape in ((64, 3072), (768, 768), (1, 50)):
        c = choose(S, *shape, torch.float32, CPU, "torch", profile=fast_bf16)
        assert not (c.method == "gram" and c.dtype == torch.bfloat16)
    forced = choose(dict(S, ns_dtype=torch.bfloat16), 64, 3072, torch.float32, CPU, "torch", profile=fast_bf16)
    assert form_dtype(forced) == ("textbook", torch.bfloat16)


def test_a_forced_setting_is_never_overridden_and_measures_nothing():
    nothing = ns_engine.MeasuredProfile("test", "", timer=no_timing)
    for dt in (torch.float32, torch.float16, torch.float64):
        for method in ("textbook", "gram"):
            c = choose(dict(S, ns_dtype=dt, ns_method=method), 64, 3072, torch.float32, CPU, "torch", profile=nothing)
            assert (c.method, c.dtype, c.why) == (method, dt, "ns_dtype, ns_method forced")
    c = choose(dict(S, ns_dtype=torch.float32), 64, 3072, torch.float32, CPU, "triton", profile=profile(fp32=10, bf16=1000, fp16=500))
    assert c.dtype == torch.float32
    square = choose(dict(S, ns_dtype=torch.float32), 64, 64, torch.float32, CPU, "torch", profile=nothing)
    assert form_dtype(square) == ("textbook", torch.float32) and square.why.startswith("ns_dtype forced")


def test_float64_state_runs_float64_ns_by_flops():
    c = choose(S, 64, 3072, torch.float64, CPU, "torch", profile=ns_engine.MeasuredProfile("test", "", timer=no_timing))
    assert form_dtype(c) == ("gram", torch.float64)
    assert choose(S, 64, 64, torch.float64, CPU, "triton").engine == "torch"


def test_gpu_table_and_model():
    """sm_90 (measured): head blocks on chip, large blocks in cuBLAS; an unmeasured architecture
    gets the model; ns_engine forces; tiles fit every target's shared memory."""
    head = choose(S, 64, 768, torch.float32, CPU, "triton", arch="sm_90")
    assert head.engine == "triton_small" and head.why == "tensor cores; table sm_90" and head.device == "cuda"
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


def test_a_stored_choice_is_kept_where_the_device_runs_it():
    """Form and dtype kept; the engine kept on the same device kind even where the table now says
    otherwise, re-chosen on another kind; a forced setting still wins (silently); a choice the
    device cannot run is replaced, with a warning."""
    on_h200 = choose(S, 768, 3072, torch.float32, CPU, "triton", arch="sm_90")
    assert on_h200.engine == "cublas"
    table = dict(ns_engine.ARCH_TABLE["sm_90"], large="triton_tiled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ns_engine.ARCH_TABLE, "sm_90", table)
        assert choose(S, 768, 3072, torch.float32, CPU, "triton", arch="sm_90").engine == "triton_tiled"
        assert choose(S, 768, 3072, torch.float32, CPU, "triton", arch="sm_90", stored=on_h200) == on_h200
    fp32_fast = profile(fp32=1000, bf16=10, fp16=10)
    on_cpu = choose(S, 768, 3072, torch.float32, CPU, "torch", profile=fp32_fast, stored=on_h200)
    assert (on_cpu.engine, *form_dtype(on_cpu), on_cpu.why) == ("torch", *form_dtype(on_h200), "tensor cores")
    forced = choose(dict(S, ns_dtype=torch.float32), 768, 3072, torch.float32, CPU, "torch", profile=fp32_fast, stored=on_h200)
    assert forced.dtype == torch.float32
    bf16 = choose(S, 256, 256, torch.float32, CPU, "triton", arch="sm_90")
    assert bf16.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match=r"stored NS choice for wte \(textbook bfloat16\) is not a candidate for float64 state"):
        assert choose(S, 256, 256, torch.float64, CPU, "torch", stored=bf16, where="wte").dtype == torch.float64


def _opt(**kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16, 48)), torch.nn.Parameter(torch.randn(32, 32))]
    opt = mango.Mango([dict(params=ps, role="matrix")], backend="torch", **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    return opt, ps


def _choices(opt):
    return [(c.engine, c.method, c.dtype) for _, _, c in opt.ns_choices()]


def test_each_bucket_keeps_its_choice_through_a_checkpoint(monkeypatch):
    """Decided once per bucket, kept when the plan is rebuilt, saved per bucket in the state dict:
    a resumed optimizer keeps each bucket's form and dtype though the rates measured here changed."""
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: profile(fp32=10, bf16=1000, fp16=1))
    opt, _ = _opt()
    opt.step()
    first = _choices(opt)
    assert first == [("torch", "textbook", torch.bfloat16), ("torch", "textbook", torch.bfloat16)]
    sd = opt.state_dict()
    assert [(e["group"], e["norm"], e["shape"], e["dtype"]) for e in sd["ns_choices"]] == [(0, "ns", [16, 48], "bfloat16"), (0, "ns", [32, 32], "bfloat16")]
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: profile(fp32=1000, bf16=10, fp16=1))
    opt._plan = None
    opt.step()  # a plan rebuild: the same choices
    assert _choices(opt) == first
    fresh, _ = _opt()
    fresh.step()
    assert _choices(fresh) == [("torch", "gram", torch.float32), ("torch", "textbook", torch.float32)]
    resumed, _ = _opt()
    resumed.load_state_dict(sd)
    resumed.step()
    assert _choices(resumed) == first
    assert all(c.why.startswith("from checkpoint (measured on ") for _, _, c in resumed.ns_choices())
    again, _ = _opt()
    again.load_state_dict(resumed.state_dict())  # a resumed run's checkpoint: still the first choices
    again.step()
    assert _choices(again) == first and "from checkpoint (from checkpoint" not in mango.describe(again)


def test_old_checkpoints_load(monkeypatch):
    """Without `ns_choices`: the measured rates an older version stored decide (its choices again),
    and a checkpoint with neither is decided by this machine's rates."""
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: profile(fp32=1000, bf16=10, fp16=1))
    opt, _ = _opt()
    opt.step()
    sd = opt.state_dict()
    del sd["ns_choices"]
    plain, _ = _opt()
    plain.load_state_dict(sd)
    plain.step()
    assert _choices(plain) == [("torch", "gram", torch.float32), ("torch", "textbook", torch.float32)]
    sd["ns_profiles"] = {"cpu": {"rates": {"float32": 10.0, "bfloat16": 1000.0, "float16": 1.0}, "source": "measured", "key": "x"}}
    old, _ = _opt()
    old.load_state_dict(sd)
    old.step()
    assert _choices(old) == [("torch", "textbook", torch.bfloat16), ("torch", "textbook", torch.bfloat16)]
    assert {c.why for _, _, c in old.ns_choices()} == {"from checkpoint (measured rates)"}


def test_a_cuda_checkpoint_loads_on_a_cpu(monkeypatch):
    """A plan decided as on an H200 (tensor cores: Gram in fp16 where it saves FLOPs, textbook bf16
    else; on-chip kernels) resumed by the torch backend on a CPU that measures fp32 fastest: each
    bucket keeps its form and dtype, the engine is the CPU's."""
    choose_ns_as_on(monkeypatch, "cuda")
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: profile(fp32=1000, bf16=10, fp16=10))
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16, 48)), torch.nn.Parameter(torch.randn(32, 32))]
    with mk.count_launches(dry_run=True):
        gpu = mango.Mango([dict(params=ps, role="matrix")], backend="triton")
        for p in ps:
            p.grad = torch.randn_like(p)
        gpu.step()
    on_gpu = _choices(gpu)
    assert on_gpu == [("triton_small", "gram", torch.float16), ("triton_small", "textbook", torch.bfloat16)]
    sd = gpu.state_dict()
    assert {e["device"] for e in sd["ns_choices"]} == {"cuda"}
    cpu, _ = _opt()
    cpu.load_state_dict(sd)
    cpu.step()
    assert _choices(cpu) == [("torch", m, dt) for _, m, dt in on_gpu]
    assert all(c.why == "from checkpoint (tensor cores)" for _, _, c in cpu.ns_choices())


def test_forced_settings_win_over_a_checkpoint(monkeypatch):
    monkeypatch.setattr(ns_engine, "cpu_profile", lambda timer=None: profile(fp32=10, bf16=1000, fp16=1))
    opt, _ = _opt()
    opt.step()
    sd = opt.state_dict()
    resumed, _ = _opt()
    resumed.load_state_dict(sd)
    resumed.param_groups[0]["ns_dtype"] = torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the setting wins without a warning
        resumed.step()
    assert [dt for _, _, dt in _choices(resumed)] == [torch.float32, torch.float32]
    assert all(c.why.startswith("ns_dtype forced") for _, _, c in resumed.ns_choices())


def test_disk_cache_and_clear(tmp_path, monkeypatch):
    path = tmp_path / "ns.json"
    monkeypatch.setenv("MANGO_NS_CACHE", str(path))
    monkeypatch.delenv("MANGO_NS_MEASURE", raising=False)  # the suite decides by the seed (conftest)
    ns_engine.clear_measurements()
    choose(S, 8, 24, torch.float32, CPU, "torch", count=2)  # measures the 2x8x24 class (tiny: microseconds)
    assert path.exists()
    first = dict(ns_engine.cpu_profile().rates)
    assert {cls for cls, _, _ in first} == {(2, 8, 24)}
    ns_engine._measured.clear()
    again = ns_engine.cpu_profile()
    assert again.rates == pytest.approx(first)  # read back from disk, and not measured again:
    monkeypatch.setattr(ns_engine, "time_products", lambda cls, wants, timer=None: no_timing(None, wants, cls))
    choose(S, 8, 24, torch.float32, CPU, "torch", count=2)
    ns_engine.clear_measurements()
    assert not path.exists() and not ns_engine._measured


def test_without_measuring_the_isa_seed_decides(monkeypatch):
    """MANGO_NS_MEASURE=0, and every rank of a distributed job (whose timings would differ, and whose
    NS dtypes must not): the ISA seed, the same verdict for every class."""
    monkeypatch.delenv("MANGO_NS_MEASURE", raising=False)
    monkeypatch.setattr(ns_engine, "time_products", lambda cls, wants, timer=None: no_timing(None, wants, cls))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    c = choose(S, 64, 64, torch.float32, CPU, "torch", count=6)
    assert c.why.startswith("seed ") and c.why.endswith("(4 ranks decide alike)")
    monkeypatch.setenv("MANGO_NS_MEASURE", "0")
    assert choose(S, 64, 64, torch.float32, CPU, "torch", count=6).why in ("seed AMX", "seed no-AMX")


def test_a_onednn_isa_cap_below_amx_is_a_cpu_without_amx(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AMX runs bf16 matmuls as a CPU without AMX does: the seed says so, and
    a measurement made under the cap is kept apart from one made without it (its key names the cap)."""
    monkeypatch.setenv("MANGO_NS_MEASURE", "0")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    uncapped = ns_engine.cpu_key()
    assert choose(S, 64, 64, torch.float32, CPU, "torch", count=6).why == "seed AMX"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert choose(S, 64, 64, torch.float32, CPU, "torch", count=6).why == "seed no-AMX"
    assert ns_engine.cpu_key() != uncapped and "AVX512_CORE_BF16" in ns_engine.cpu_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert choose(S, 64, 64, torch.float32, CPU, "torch", count=6).why == "seed AMX"


def test_describe_shows_each_bucket_choice():
    opt, _ = _opt(ns_dtype=torch.float32)
    opt.step()
    text = mango.describe(opt)
    assert "float32" in text and "torch" in text and "ns_dtype forced" in text
