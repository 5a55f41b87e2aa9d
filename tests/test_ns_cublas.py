"""The triton backend's cuBLAS engine (ns_engine="cublas": torch batched GEMMs on the NS stack the
moments kernel writes) against the float64 reference, alone (every layout, form, schedule, sharing
a scratch and in place) and in the optimizer, and its launch accounting: every device op it issues
is recorded, in a real step and in a launch dry run alike."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mango
import mango_kernels as mk
from helpers import all_params, make_groups, rel_err
from mango import newton_schulz as ns64
from mango.backends.ns_cublas import CublasNSBatch, moves
from mango.layout import block_shape, norm_blocks
from mango.plan import NormBucket
from test_triton_backend import displacement_err, pair

MUON = (3.4445, -4.7750, 2.0315)

# (norm, storage shape, tensors, layout): contiguous wide and tall batches, one tall matrix (in place
# by rows), one wide matrix (no in-place form), Conv1D storage, experts, row head blocks, and the
# column head blocks of a Conv1D-stored fused QKV (strided: copied in and out)
LAYOUTS = {
    "wide": ("ns", (24, 96), 4, {}),
    "tall-odd": ("ns", (96, 20), 3, {}),
    "one-tall": ("ns", (300, 24), 1, {}),
    "one-wide": ("ns", (24, 300), 1, {}),
    "conv1d": ("ns", (24, 120), 2, dict(orientation="in_out")),
    "experts": ("ns", (3, 16, 64), 2, dict(experts=True)),
    "row-heads": ("ns_split", (48, 80), 2, dict(head_dim=16)),
    "column-heads": ("ns_split", (40, 48), 2, dict(head_dim=16, orientation="in_out")),
}


def _bucket(norm, shape, count, layout):
    head_dim = layout.get("head_dim")
    kw = dict(orientation=layout.get("orientation", "out_in"), experts=layout.get("experts", False))
    n, r, c = block_shape(shape, norm, head_dim, **kw)
    nb = NormBucket(norm=norm, slots=list(range(count)), shape=shape, block_shape=(r, c), head_dim=head_dim, blocks_per_tensor=n, **kw)
    return nb


def _run_alone(name, method, steps, in_place, dtype=torch.float32, seed=0):
    """One batch bound to fresh buffers, fed random tensors: (its results, the float64 NS of them)."""
    norm, shape, count, layout = LAYOUTS[name]
    nb = _bucket(norm, shape, count, layout)
    batch = CublasNSBatch(nb, count, dtype, "cpu", method, in_place=in_place)
    batch.bind()
    if not in_place:
        batch.bind_scratch(torch.full((batch.scratch_numel * 4,), 255, dtype=torch.uint8))  # stale bytes, not zeros
    coefficients = [MUON] * steps
    batch.set_schedule([steps] * count, [coefficients] * count, [1e-7] * count)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]
    for i, x in enumerate(xs):
        batch.input_view(i).copy_(x.reshape(-1))
    with mk.count_launches() as log, _DeviceOps() as ops:
        batch.run()
    assert log.count == ops.count == len(batch.names) > 0  # every op it issues is counted
    kw = dict(orientation=nb.orientation, experts=nb.experts)
    out = [norm_blocks(batch.output_view(i).view(shape).double(), shape, norm, nb.head_dim, **kw) for i in range(count)]
    ref = [ns64.newton_schulz(norm_blocks(x.to(dtype).double(), shape, norm, nb.head_dim, **kw), coefficients, method=method)
           for x in xs]  # fmt: skip
    return batch, out, ref


@pytest.mark.parametrize("method", ["textbook", "gram"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_engine_alone_against_float64(name, method):
    """Every layout, both forms, schedules with 0 to 3 moves (the Gram form restarts before steps
    2 and 5), sharing a scratch and in place where the blocks allow: fp32 within 1e-4 of float64."""
    for steps in (0, 1, 2, 5, 6):
        for in_place in (False, True):
            _, _, _, layout = LAYOUTS[name]
            if in_place and CublasNSBatch.sizes(_bucket(*LAYOUTS[name][:3], layout), LAYOUTS[name][2], torch.float32, method)[2] is None:
                assert name in ("one-wide", "column-heads"), name  # the only layouts without an in-place form
                continue
            batch, out, ref = _run_alone(name, method, steps, in_place, seed=steps)
            assert rel_err(out, ref) <= 1e-4, (steps, in_place)
            if in_place:
                assert batch.buffer_sizes["stack"][0] == 2 * batch.geometry.total and batch.scratch_numel == 0


@pytest.mark.parametrize("method, dtype", [("textbook", torch.bfloat16), ("gram", torch.float16)])
def test_engine_alone_16_bit(method, dtype):
    """The 16-bit forms (bf16 textbook, fp16 Gram) over a batch: within 2e-2 of float64."""
    for name in ("wide", "one-tall", "column-heads"):
        for in_place in (False, True) if name != "column-heads" else (False,):
            _, out, ref = _run_alone(name, method, 5, in_place, dtype=dtype)
            assert rel_err(out, ref) <= 2e-2, (name, in_place)


def test_in_place_needs_exactly_twice_the_stack_and_one_more_product_per_move():
    """In place a move is two products (a textbook move's baddbmm copies its input first: two
    launches each): the same program otherwise, in 2X instead of X + scratch."""
    for method, steps in (("textbook", 5), ("gram", 5), ("gram", 6)):
        shared, _, _ = _run_alone("wide", method, steps, False)
        alone, _, _ = _run_alone("wide", method, steps, True)
        assert len(alone.names) == len(shared.names) + moves(method, steps) * (2 if method == "textbook" else 1)
        stack, scratch, whole = CublasNSBatch.sizes(shared.nb, shared.count, torch.float32, method)
        assert whole == 2 * stack < stack + scratch

def _fed(name, method, steps, in_place, xs, share=None):
    """A batch of LAYOUTS[name] bound to fresh buffers (a scratch of stale bytes), fed `xs`."""
    norm, shape, count, layout = LAYOUTS[name]
    batch = CublasNSBatch(_bucket(norm, shape, count, layout), count, torch.float32, "cpu", method, in_place=in_place)
    batch.bind()
    if not in_place:
        batch.bind_scratch(torch.full((batch.scratch_numel * 4,), 255, dtype=torch.uint8))
    batch.set_schedule([steps] * count, [[MUON] * steps] * count, [1e-7] * count)
    batch.share = share
    for i, x in enumerate(xs):
        batch.input_view(i).copy_(x.reshape(-1))
    return batch


@pytest.mark.parametrize("method", ["textbook", "gram"])
@pytest.mark.parametrize("name", ["wide", "tall-odd", "one-tall", "experts", "row-heads", "column-heads"])
def test_a_share_runs_only_its_members_and_leaves_them_where_the_whole_run_does(name, method):
    """DDP's NS split gives a rank a share of a bucket's members: it runs their NS only (FLOPs in
    proportion), in the bucket's buffers (in place: the same 2X), each result bit for bit the whole
    run's at the same `output_view`; a share of none runs nothing and leaves every d where the
    moments kernel wrote it. Writing the others' results to their views, as the all-gather does,
    leaves every member's result in place (the views do not overlap)."""
    from torch.utils.flop_counter import FlopCounterMode

    norm, shape, count, layout = LAYOUTS[name]
    gen = torch.Generator().manual_seed(count)
    xs = [torch.randn(shape, generator=gen) for _ in range(count)]
    shares = sorted({(0, 0), (0, 1), (1, count), (count // 2, count // 2 + 1), (0, count)} & {(a, b) for b in range(count + 1) for a in range(b + 1)})
    for steps in (5, 6):  # odd and even moves in the textbook form; the Gram form restarts before step 5
        for in_place in (False, True):
            if in_place and CublasNSBatch.sizes(_bucket(norm, shape, count, layout), count, torch.float32, method)[2] is None:
                continue
            whole = _fed(name, method, steps, in_place, xs)
            with FlopCounterMode(display=False) as fc:
                whole.run()
            total, expected = fc.get_total_flops(), [whole.output_view(i).clone() for i in range(count)]
            where = [whole.output_view(i).data_ptr() - whole.stack.data_ptr() for i in range(count)]
            for first, stop in shares:
                batch = _fed(name, method, steps, in_place, xs, share=(first, stop))
                assert (batch.buffer_sizes, batch.scratch_numel) == (whole.buffer_sizes, whole.scratch_numel)
                assert [batch.output_view(i).data_ptr() - batch.stack.data_ptr() for i in range(count)] == where
                with FlopCounterMode(display=False) as fc, mk.count_launches() as log, _DeviceOps() as ops:
                    batch.run()
                assert fc.get_total_flops() * count == total * (stop - first), (first, stop)
                assert log.count == ops.count == len(batch.names)
                for i in range(first, stop):
                    assert torch.equal(batch.output_view(i), expected[i]), (steps, in_place, first, stop, i)
                if first == stop:
                    assert log.count == 0 and all(torch.equal(batch.input_view(i), xs[i].reshape(-1)) for i in range(count))
                for i in [*range(first), *range(stop, count)]:
                    batch.output_view(i).copy_(expected[i])
                assert all(torch.equal(batch.output_view(i), expected[i]) for i in range(count)), (steps, in_place, first, stop)


def test_a_share_outside_the_bucket_is_refused():
    batch = CublasNSBatch(_bucket(*LAYOUTS["wide"]), 4, torch.float32, "cpu")
    for share in ((2, 1), (0, 5), (-1, 2)):
        with pytest.raises(ValueError, match="share"):
            batch.share = share


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
    """Counts the kernels the aten ops would launch on a device (not views, not allocations): one
    per op, two for a baddbmm whose `out` is not its input (it copies the input there first)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not (func.is_view or name.startswith("aten::empty") or name in ("aten::detach", "aten::lift_fresh", "aten::alias")):
            self.count += 1
            if name == "aten::baddbmm.out" and kwargs["out"].data_ptr() != args[0].data_ptr():
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
    assert "cublas_gemm" in names and {"ns_small", "ns_small_gram"} & names.keys()
    assert not {"ns_xxt", "ns_poly", "ns_update"} & names.keys()  # no tiled kernels: the table's choice


def _cublas_batches_of(opt):
    (lg,) = opt._plan.cache["triton"][1]
    return lg, [b for r in lg.rounds for b, _ in r.ns_batches if getattr(b, "engine", None) == "cublas"]


@pytest.mark.parametrize("method", ["textbook", "gram"])
def test_cublas_engine_in_place_and_shared_in_the_optimizer(method, device):
    """In the optimizer, within the memory budget: the largest bucket (a stack of wide matrices) in
    place, a single tall matrix in place by rows under a smaller budget, the others sharing their
    round's scratch; 4 fp32 steps within 1e-4 of the float64 reference, arena within the budget."""
    gen = torch.Generator().manual_seed(3)
    mats = [torch.nn.Parameter(torch.randn(16, 64, generator=gen).to(device)) for _ in range(4)]
    tall = torch.nn.Parameter(torch.randn(72, 12, generator=gen).to(device))
    conv = [torch.nn.Parameter(torch.randn(20, 12, generator=gen).to(device)) for _ in range(2)]
    groups = [dict(params=mats + [tall], role="matrix", norm="ns"), dict(params=conv, role="matrix", norm="ns", orientation="in_out")]
    out, ref, before = pair(groups, 3, triton_kw=dict(ns_engine="cublas", ns_dtype=torch.float32, ns_method=method))
    assert displacement_err(out, ref, before) <= 1e-4
    opt = mango.Mango([dict(g, params=[torch.nn.Parameter(p.detach().clone()) for p in g["params"]]) for g in groups],
                      backend="triton", ns_engine="cublas", ns_dtype=torch.float32, ns_method=method)  # fmt: skip
    for p in all_params(opt):
        p.grad = torch.randn_like(p)
    opt.step()
    lg, batches = _cublas_batches_of(opt)
    modes = {b.nb.shape: b.in_place for b in batches}
    assert modes == {(16, 64): True, (72, 12): False, (20, 12): False}
    mem = lg.memory()
    assert mem["arena"] <= mem["budget"]


def test_single_tall_matrix_in_place_by_rows_in_the_optimizer(device):
    """A vocabulary head alone (the largest bucket, one tall matrix): in place by rows, 2× its stack."""
    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Parameter(torch.randn(160, 16, generator=gen).to(device))
    small = torch.nn.Parameter(torch.randn(16, 24, generator=gen).to(device))
    groups = [dict(params=[head], role="head", norm="ns"), dict(params=[small], role="matrix", norm="ns")]
    out, ref, before = pair(groups, 3, triton_kw=dict(ns_engine="cublas", ns_dtype=torch.float32, ns_method="gram"))
    assert displacement_err(out, ref, before) <= 1e-4
    opt = mango.Mango(groups, backend="triton", ns_engine="cublas", ns_dtype=torch.float32, ns_method="gram")
    for p in all_params(opt):
        p.grad = torch.randn_like(p)
    opt.step()
    lg, batches = _cublas_batches_of(opt)
    (alone,) = [b for b in batches if b.nb.shape == (160, 16)]
    assert alone.in_place and alone.geometry.rows_are_units
    assert lg.memory()["arena"] <= lg.memory()["budget"] == 2 * 160 * 16 * 4


# ----------------------------------------------------------------------------------------
# a GPT-2-structured step on the GPU's choice, counted in a dry run
# ----------------------------------------------------------------------------------------


def hf_gpt2_sm90(n_layer, tied, n_embd=256, vocab=8192):
    """HF GPT-2 with 64-row heads and matrices over 128 rows (GPT-2 124M's structure at width 256), its
    NS chosen as on an H200: head blocks on chip, every larger matrix on cuBLAS. Returns
    `count(memory_budget)`: the launch log and launch group of a dry step under that budget."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, vocab_size=vocab, n_positions=64,
                                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a dry run reads addresses, not values
    opt = mango.Mango(mango.param_groups(model), backend="triton")
    backend = opt._backend_for(torch.device("cpu"))
    backend.ns_target = "sm_90"

    def count(memory_budget=None):
        backend.memory_budget = memory_budget
        with mk.count_launches(dry_run=True):
            opt.step()  # the plan and tables for this budget
        with mk.count_launches(dry_run=True) as log:
            opt.step()
        (lg,) = opt._plan.cache["triton"][1]
        return log, lg

    return count


def cublas_ops(batch) -> int:
    """The launches of one cuBLAS bucket with Muon's 5 steps: norm, clamp, divide; 5 a textbook step
    (X·Xᵀ, and two baddbmm that each copy their input first), the Gram form's 23 (R; P in two, Q·P
    and P·R·P each step where needed; the restart before step 2 and the final Q·X); in place, a
    second product per move (a baddbmm with its copy in the textbook form)."""
    per_move = 2 if batch.method == "textbook" else 1
    return 3 + (25 if batch.method == "textbook" else 23) + batch.in_place * moves(batch.method, 5) * per_move


def sm90_launches(lg) -> dict:
    out: dict = {}
    for r in lg.rounds:
        names = ["moments", "apply"] + ["segment_sums"] * bool(r.layout.n_post_segments)
        for batch, _ in r.ns_batches:
            if getattr(batch, "engine", None) == "cublas":
                assert len(batch.names) == cublas_ops(batch)
                names += list(batch.names)
            else:
                names += ["ns_small_gram" if batch.method == "gram" else "ns_small"] * bool(batch.small)
                assert not batch.large  # no tiled kernels on the sm_90 choice
        for n in names:
            out[n] = out.get(n, 0) + 1
    return out


def test_gpt2_step_on_the_sm90_choice_in_a_dry_run():
    """The launches of a GPT-2-structured step with the NS chosen as on an H200, counted in a dry
    run: per round moments, segment sums, apply; one on-chip launch for every head block; every
    cuBLAS bucket once, whole (28 launches textbook, 26 Gram; +10/+2 where it runs in place). Tied:
    92 at any depth, the arena exactly the budget (the two MLP buckets in place, each filling it).
    Untied: the vocabulary head in place; its fixed size against growing buckets moves a bucket
    between rounds with depth, so 114-118 launches, never more than one round per NS bucket. The
    same counts as GPT-2 124M (bench.rounds). One round (no budget): 84 tied, 110 untied, the same
    at any depth."""
    for tied, counts in ((True, {2: 92, 4: 92}), (False, {2: 114, 6: 118})):
        one_round = []
        for n_layer, want in counts.items():
            count = hf_gpt2_sm90(n_layer, tied)
            log, lg = count()
            kinds = {e.ns_choice.engine for e in lg.entries if e.ns_kernel}
            assert kinds == {"triton_small", "cublas"}
            assert log.by_name() == sm90_launches(lg) and log.count == want
            buckets = {id(e.nb) for e in lg.entries if e.ns_kernel and e.ns_choice.engine == "cublas"}
            batches = [b for r in lg.rounds for b, _ in r.ns_batches if getattr(b, "engine", None) == "cublas"]
            assert len(batches) == len(buckets) == 4 - tied  # each bucket whole, once per step
            assert len(lg.rounds) <= len(buckets) + 1
            mem = lg.memory()
            assert mem["arena"] <= mem["budget"] and (not tied or mem["arena"] == mem["budget"])
            log, lg = count(float("inf"))
            assert len(lg.rounds) == 1 and log.by_name() == sm90_launches(lg)
            one_round.append(log.by_name())
        assert one_round[0] == one_round[1] and sum(one_round[0].values()) == (84 if tied else 110)
