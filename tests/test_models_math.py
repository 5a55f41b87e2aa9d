"""What mango does to every parameter of real architectures, against the math written out here.

The roles (docs/guide.md) say every matrix norm acts on the (out, in) operator, whatever the storage: GPT-2's Conv1D
stores (in, out), so its heads are column blocks; separate q/k/v projections are split head-wise
(GQA: k_proj and v_proj have n_kv blocks; an explicit head_dim wins); MoE experts [E, out, in] (GPT-OSS:
[E, in, out]) are E matrices, each orthogonalized on its own; conv kernels are (out, in·kh·kw). A wrong
axis still "trains" (the loss falls), so these tests check the update itself.

1. One step from seeded gradients with `mango.presets.mango(model)` (no hints), float64, on the
   torch backend (also sweeping in ~50 chunks), and on the reference, equals the update computed here
   from the hand-written labels of tests/test_roles_hf.py (EXPECTED: role, head_dim, orientation,
   experts per parameter) with plain float64 tensor code: the closed form of a first step (below),
   operators built by transposing / reshaping / indexing, Muon's quintic written out, head blocks and
   experts in Python loops; the same with l2_col / l2 / ns overriding some norms. Then named facts
   about real layouts, on mango's update: GPT-2's query head 0 is a column block of c_attn.weight and comes
   out orthogonalized; mlp.c_fc gets the shape factor of its (out, in) operator; Mixtral expert 0's
   update is NS of its own direction (the flattened alternative is measurably different); ...
2. Ten steps with float32 parameters on the torch and the triton backend (fp32 NS operands) stay
   within the correctness contract of the float64 reference, per parameter, on smaller configs of the
   same models.

The first step from zero state (mango preset: LaProp β2 = 0.95, momentum β1 = 0.95 with Nesterov,
offset momentum β_off = 0.99, lr = 0.01, ε = 1e-8, no weight decay), straight from the update (docs/design.md):

    v = β2·0 + (1−β2)·g²          u = g / (√v + ε)
    m = β1·0 + u = u              d = β1·m + u = (1 + β1)·u           (Nesterov, report form)
    s = lr·k·Δ(d)                 O = β_off·0 + (1−β_off)·s
    W ← W − (s + O) = W − (2 − β_off)·lr·k·Δ(d)
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import transformers
from torch import nn

import mango
from mango import newton_schulz as mango_ns
from third_party import torchvision

from test_roles_hf import BUILDERS, EXPECTED, TOKENS  # tiny configs and the hand-written labels

MODELS = (
    "gpt2", "neox", "llama_gqa", "qwen3", "bert", "mixtral", "qwen3_moe", "gpt_oss", "phi3", "distilbert", "t5",
    "deepseek_v3", "deepseek_v2", "qwen3_next", "jetmoe", "small_resnet", "vit",
)  # fmt: skip

# mango.presets.mango's settings, and the defaults it keeps (the update and the presets)
LR, BETA1, BETA2, EPS, BETA_OFF = 0.01, 0.95, 0.95, 1e-8, 0.99
QUINTIC, NS_STEPS = (3.4445, -4.7750, 2.0315), 5
# the report's norm for every role (the roles)
ROLE_NORM = {
    "matrix": "ns", "qkv_weight": "ns_split", "qkv_bias": "l2_split", "embedding": "none",
    "head": "ns", "vector_weight": "none", "vector_bias": "l2",
}  # fmt: skip
APPLIED = (2 - BETA_OFF) * LR  # what a unit of lr·k·Δ moves W by on the first step (s plus the offset O)


# --------------------------------------------------------------------------- the math, written out


def first_direction(g: torch.Tensor) -> torch.Tensor:
    """d of a first step from zero state: v = (1−β2)g², u = g/(√v+ε), m = u, d = β1·m + u."""
    v = (1 - BETA2) * g * g
    u = g / (v.sqrt() + EPS)
    m = u
    return BETA1 * m + u


def newton_schulz(X: torch.Tensor) -> torch.Tensor:
    """Muon's quintic on one (r, c) matrix: X/‖X‖_F, on the wide orientation (Xᵀ when r > c),
    NS_STEPS times A = X·Xᵀ, X ← a·X + (b·A + c·A²)·X (the float64 polynomial, which
    tests/test_newton_schulz.py holds to that formula written out)."""
    return mango_ns.newton_schulz(X, [QUINTIC] * NS_STEPS)


def quintic(s: torch.Tensor) -> torch.Tensor:
    """What NS_STEPS steps do to each singular value σ/‖X‖_F of a pre-scaled matrix."""
    a, b, c = QUINTIC
    for _ in range(NS_STEPS):
        s = a * s + b * s**3 + c * s**5
    return s


def band(lowest: float) -> tuple[float, float]:
    """The range the quintic maps [lowest, 1] into (singular values of an orthogonalized block), on a
    grid: within ~1e-3 of the exact range."""
    s = quintic(torch.linspace(lowest, 1.0, 20001, dtype=torch.float64))
    return float(s.min()), float(s.max())


def operators(t: torch.Tensor, orientation: str, experts: bool) -> torch.Tensor:
    """The (out, in) matrices a stored tensor holds, as an (E, out, in) stack (E = 1 without experts):
    dim 0 indexes experts; a tensor stored (in, out) is transposed; a conv kernel (out, in, kh, kw)
    is flattened to (out, in·kh·kw)."""
    stack = t if experts else t.unsqueeze(0)
    if orientation == "in_out":
        return stack.transpose(1, 2)
    return stack.reshape(stack.shape[0], stack.shape[1], -1)


def stored(ops: torch.Tensor, shape, orientation: str) -> torch.Tensor:
    """The inverse of `operators`: the (E, out, in) stack back in the tensor's storage layout."""
    if orientation == "in_out":
        ops = ops.transpose(1, 2)
    return ops.reshape(shape)


def unit_update(d: torch.Tensor, label, norm: str | None = None) -> tuple[torch.Tensor, float]:
    """(Δ, k) for one tensor: its direction normalized as its label says (or by `norm`), in storage
    layout, and the shape factor √max(1, rows/cols) of the blocks NS sees (1 for the other norms)."""
    role, head_dim, orientation, experts = label
    norm = norm or ROLE_NORM[role]
    if norm == "none":
        return d, 1.0
    if norm == "l2":  # a unit vector per tensor (per expert for an expert stack)
        rows = d.reshape(d.shape[0] if experts else 1, -1)
        return (rows / rows.norm(dim=1, keepdim=True)).reshape(d.shape), 1.0
    if norm == "l2_split":  # a unit vector per head block of a q/k/v bias
        blocks = d.reshape(-1, head_dim)
        return (blocks / blocks.norm(dim=1, keepdim=True)).reshape(d.shape), 1.0
    ops = operators(d, orientation, experts)
    if norm == "l2_col":  # a unit vector per operator row (output neuron)
        return stored(ops / ops.norm(dim=2, keepdim=True), d.shape, orientation), 1.0
    rows = ops.shape[1] if norm == "ns" else head_dim  # ns_split: blocks of head_dim operator rows
    cols = ops.shape[2]
    out = torch.stack([torch.cat([newton_schulz(M[r : r + rows]) for r in range(0, M.shape[0], rows)]) for M in ops])
    return stored(out, d.shape, orientation), math.sqrt(max(1.0, rows / cols))


def expected_update(g: torch.Tensor, label, norm: str | None = None) -> torch.Tensor:
    """W_1 − W_0 of the first mango step: −(2 − β_off)·lr·k·Δ(d)."""
    delta, k = unit_update(first_direction(g), label, norm)
    return -APPLIED * k * delta


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- models and one step


def small_resnet(widths=(8, 16)) -> nn.Module:
    """torchvision's resnet18 cut down to its own BasicBlocks at two small widths (the whole one is 11M
    parameters: a minute of float64 NS per step here): conv1 (a 7×7 kernel on 3 channels), layer1.0,
    layer2.0 with its 1×1 stride-2 downsample, fc. Parameter names and labels are resnet18's."""
    tv = torchvision().models.resnet
    a, b = widths
    net = tv.resnet18(num_classes=10)
    net.conv1, net.bn1 = nn.Conv2d(3, a, 7, 2, 3, bias=False), nn.BatchNorm2d(a)
    net.layer1 = nn.Sequential(tv.BasicBlock(a, a))
    down = nn.Sequential(tv.conv1x1(a, b, 2), nn.BatchNorm2d(b))
    net.layer2 = nn.Sequential(tv.BasicBlock(a, b, stride=2, downsample=down))
    net.layer3 = net.layer4 = nn.Identity()
    net.fc = nn.Linear(b, 10)
    return net


def build(name: str) -> nn.Module:
    """The tiny model of tests/test_roles_hf.py (or the small ResNet)."""
    return small_resnet() if name == "small_resnet" else BUILDERS[name]()


@functools.cache
def labels_of(name: str) -> dict:
    """The hand-written labels of tests/test_roles_hf.py: {parameter: (role, head_dim, orientation, experts)}."""
    if name == "small_resnet":
        names = [n for n, _ in small_resnet().named_parameters()]
        return {n: EXPECTED["resnet18"][0][n] for n in names}
    return EXPECTED[name][0]


_nets: dict = {}
_steps: dict = {}
_expected: dict = {}


def net64(name: str) -> nn.Module:
    """The tiny model in float64, built once per test process."""
    if name not in _nets:
        torch.manual_seed(0)
        _nets[name] = build(name).double()
    return _nets[name]


def seeded_grads(net: nn.Module, seed: int = 7) -> dict:
    """A float64 gradient for every (distinct) parameter, from one seeded generator, in model order."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in net.named_parameters()}


def mango_on(net: nn.Module, backend: str, **kw) -> mango.Mango:
    """mango.presets.mango(net) on `backend`; "torch-chunked" is the torch backend sweeping each norm
    bucket in ~50 chunks of the model's size (CHUNK_ELEMENTS is 4M: real models take that path,
    these tiny ones would not), which cuts tensors at rows, experts, head blocks and Conv1D columns."""
    opt = mango.presets.mango(net, backend="torch" if backend == "torch-chunked" else backend, **kw)
    if backend == "torch-chunked":
        numel = sum(p.numel() for p in net.parameters())
        opt._backend_for(next(net.parameters()).device).chunk_elements = max(64, numel // 50)
    return opt


def one_step(name: str, backend: str, overrides=None) -> dict:
    """{parameter name: (W_0, g, W_1 − W_0)} after one step of mango.presets.mango(model) from fresh state."""
    key = (name, backend, repr(overrides))
    if key not in _steps:
        net = copy.deepcopy(net64(name))
        grads = seeded_grads(net)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = mango_on(net, backend, **({"overrides": overrides} if overrides else {}))
        for n, p in net.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        _steps[key] = {n: (before[n], grads[n], p.detach() - before[n]) for n, p in net.named_parameters()}
    return _steps[key]


def expected_step(name: str, norms=None) -> dict:
    """{parameter name: expected W_1 − W_0}, from the hand-written labels, with `norms` {name: norm}
    where overridden (cached: the same for every backend)."""
    key = (name, repr(norms))
    if key not in _expected:
        labels = labels_of(name)
        grads = seeded_grads(net64(name))
        assert set(grads) == set(labels), f"{name}: parameters and hand-written labels disagree"
        _expected[key] = {n: expected_update(g, labels[n], (norms or {}).get(n)) for n, g in grads.items()}
    return _expected[key]


def assert_step_is_the_math(name: str, backend: str, norms=None) -> None:
    got, want = one_step(name, backend, {n: {"norm": v} for n, v in (norms or {}).items()}), expected_step(name, norms)
    errors = {n: rel(got[n][2], want[n]) for n in want}
    bad = {n: e for n, e in errors.items() if not e <= 1e-10}
    assert not bad, f"{name} on {backend}: updates off the math: {bad}"


ALL_BACKENDS = pytest.mark.parametrize("backend", ["torch", "torch-chunked", "reference"])
BACKENDS = pytest.mark.parametrize("backend", ["torch", "reference"])


@ALL_BACKENDS
@pytest.mark.parametrize("name", MODELS)
def test_one_step_is_the_math_on_every_parameter(name, backend):
    """mango's first step on every parameter equals the float64 math above (1e-10: same operations,
    in another order and, on the torch backend, maybe the Gram form of the same polynomial)."""
    assert_step_is_the_math(name, backend)


# the other matrix norms on the layouts that change what they mean: l2_col normalizes operator rows
# (storage columns of a Conv1D, per expert of a stack), l2 one vector per expert, ns whole matrices
OTHER_NORMS = {
    "gpt2": {
        "transformer.h.0.mlp.c_fc.weight": "l2_col", "transformer.h.0.mlp.c_proj.weight": "l2",
        "transformer.h.0.attn.c_attn.weight": "ns", "transformer.h.0.attn.c_attn.bias": "l2",
        "transformer.wte.weight": "l2_col",
    },
    "mixtral": {"model.layers.0.mlp.experts.gate_up_proj": "l2_col", "model.layers.0.mlp.experts.down_proj": "l2"},
    "gpt_oss": {  # experts stored (E, in, out)
        "model.layers.0.mlp.experts.gate_up_proj": "l2_col", "model.layers.0.mlp.experts.down_proj": "l2",
        "model.layers.0.self_attn.q_proj.weight": "l2_col",
    },
    "small_resnet": {"layer1.0.conv1.weight": "l2_col", "fc.weight": "l2_col"},
}  # fmt: skip


@ALL_BACKENDS
@pytest.mark.parametrize("name", list(OTHER_NORMS))
def test_one_step_with_other_norms_is_the_math(name, backend):
    assert_step_is_the_math(name, backend, OTHER_NORMS[name])


# --------------------------------------------------------------------------- named facts about real layouts


def operator_update(name, backend, param):
    """(update in units of lr·(2−β_off), direction d), both as (E, out, in) operators of `param`."""
    _, g, update = one_step(name, backend)[param]
    _, _, orientation, experts = labels_of(name)[param]
    return operators(update / -APPLIED, orientation, experts), operators(first_direction(g), orientation, experts)


def assert_orthogonalized(block: torch.Tensor, direction: torch.Tensor, k: float = 1.0, what: str = ""):
    """block = k·NS(direction): its singular values are k·p(σ/‖direction‖_F) for the quintic p, in the band."""
    s_in = torch.linalg.svdvals(direction) / torch.linalg.matrix_norm(direction)
    s_out = torch.linalg.svdvals(block) / k
    torch.testing.assert_close(s_out, quintic(s_in).sort(descending=True).values, rtol=1e-9, atol=1e-12, msg=what)
    lo, hi = band(float(s_in.min()))
    assert lo - 1e-3 <= float(s_out.min()) and float(s_out.max()) <= hi + 1e-3, f"{what}: σ outside [{lo:.3f}, {hi:.3f}]"
    assert lo > 0.6 and hi < 1.25, f"{what}: σ/‖d‖ down to {float(s_in.min()):.3g}: not a well-conditioned block"


def fitted_factor(update_ops: torch.Tensor, unit_ops: torch.Tensor) -> float:
    """The scalar k with update = k·unit (least squares)."""
    return float((update_ops * unit_ops).sum() / (unit_ops * unit_ops).sum())


@BACKENDS
def test_gpt2_query_head_0_is_a_column_block_of_c_attn_and_comes_out_orthogonal(backend):
    """c_attn.weight is stored (in, out) = (32, 96): the 12 head blocks (4 q, 4 k, 4 v of head_dim 8)
    are blocks of 8 columns, each orthogonalized on its own as an (8, 32) operator."""
    param = "transformer.h.0.attn.c_attn.weight"
    W0, g, update = one_step("gpt2", backend)[param]
    assert W0.shape == (32, 96)
    d = first_direction(g)
    for h in range(12):  # operator block of head h = storage columns [8h, 8h+8), transposed
        cols = slice(8 * h, 8 * h + 8)
        assert_orthogonalized(update[:, cols].T / -APPLIED, d[:, cols].T, what=f"head {h}")
    q0 = update[:, :8].T / -APPLIED
    torch.testing.assert_close(q0, newton_schulz(d[:, :8].T), rtol=1e-10, atol=1e-12)
    # what would be measurably different: NS of the whole (96, 32) operator, and splitting the
    # stored rows (the input features) into blocks of 8 as a (out, in) reading of the storage does
    whole = newton_schulz(d.T)[:8]
    rows_split = torch.cat([newton_schulz(d[r : r + 8]) for r in range(0, 32, 8)])[:, :8].T
    assert rel(whole, q0) > 0.1 and rel(rows_split, q0) > 0.1


@BACKENDS
def test_gpt2_c_attn_bias_is_split_into_the_same_heads(backend):
    """c_attn.bias (96,): one unit vector per head block of 8 outputs, the same heads as the weight's columns."""
    _, g, update = one_step("gpt2", backend)["transformer.h.0.attn.c_attn.bias"]
    norms = (update / -APPLIED).view(12, 8).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(12, dtype=torch.float64), rtol=1e-12, atol=0)


@BACKENDS
@pytest.mark.parametrize(
    "param, k",
    [("transformer.h.0.mlp.c_fc.weight", 2.0), ("transformer.h.0.mlp.c_proj.weight", 1.0), ("transformer.h.0.attn.c_proj.weight", 1.0)],
    ids=["c_fc", "mlp.c_proj", "attn.c_proj"],
)
def test_gpt2_conv1d_shape_factor_is_the_operators(backend, param, k):
    """mlp.c_fc is stored (32, 128) but maps 32 → 128: its operator is (128, 32), so k = √(128/32) = 2;
    mlp.c_proj stored (128, 32) is a (32, 128) operator: k = 1 (reading the storage swaps them)."""
    ops, d = operator_update("gpt2", backend, param)
    rows, cols = ops.shape[1:]
    assert math.sqrt(max(1.0, rows / cols)) == k
    unit = newton_schulz(d[0])
    assert fitted_factor(ops[0], unit) == pytest.approx(k, rel=1e-12)
    assert_orthogonalized(ops[0], d[0], k=k, what=param)


EXPERT_PARAMS = [
    ("mixtral", "model.layers.0.mlp.experts.gate_up_proj", (4, 96, 32), math.sqrt(3.0)),
    ("mixtral", "model.layers.0.mlp.experts.down_proj", (4, 32, 48), 1.0),
    ("qwen3_moe", "model.layers.0.mlp.experts.gate_up_proj", (4, 48, 32), math.sqrt(1.5)),
    ("qwen3_moe", "model.layers.0.mlp.experts.down_proj", (4, 32, 24), math.sqrt(32 / 24)),
]


@BACKENDS
@pytest.mark.parametrize("name, param, shape, k", EXPERT_PARAMS, ids=[f"{m}-{p.rsplit('.', 1)[1]}" for m, p, _, _ in EXPERT_PARAMS])
def test_each_expert_is_orthogonalized_on_its_own(backend, name, param, shape, k):
    """Expert e's update is k·NS(d[e]) with k from ITS (out, in); NS of the flattened (E, out·in)
    matrix (what labelling it a plain matrix did) gives per-expert singular values far below 1."""
    ops, d = operator_update(name, backend, param)
    assert tuple(ops.shape) == shape
    for e in range(shape[0]):
        assert_orthogonalized(ops[e], d[e], k=k, what=f"expert {e}")
    torch.testing.assert_close(ops[0], k * newton_schulz(d[0]), rtol=1e-10, atol=1e-12)
    flattened = newton_schulz(d.reshape(shape[0], -1)).reshape(shape)  # 4 rows: one per expert
    k_flat = math.sqrt(max(1.0, shape[0] / (shape[1] * shape[2])))
    assert float(torch.linalg.svdvals(k_flat * flattened[0]).max()) < 0.5
    assert rel(k_flat * flattened[0], ops[0]) > 0.5


@BACKENDS
@pytest.mark.parametrize(
    "name, head_dim, blocks",
    [("llama_gqa", 8, {"q_proj": 4, "k_proj": 2, "v_proj": 2}), ("qwen3", 16, {"q_proj": 4, "k_proj": 2, "v_proj": 2})],
    ids=["llama_gqa", "qwen3-head_dim16"],
)
def test_separate_q_k_v_are_split_head_wise_with_gqa(backend, name, head_dim, blocks):
    """q_proj has n_q = 4 head blocks, k_proj and v_proj n_kv = 2 (GQA), each orthogonalized alone;
    Qwen3's config says head_dim = 16 (not hidden/heads = 8), and the blocks are of 16 rows."""
    for proj, n in blocks.items():
        param = f"model.layers.0.self_attn.{proj}.weight"
        ops, d = operator_update(name, backend, param)
        assert ops.shape[1] == n * head_dim
        for h in range(n):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            assert_orthogonalized(ops[0, rows], d[0, rows], what=f"{proj} head {h}")
        assert rel(newton_schulz(d[0]), ops[0]) > 0.1  # whole-matrix NS: measurably different
        half = torch.cat([newton_schulz(d[0, r : r + head_dim // 2]) for r in range(0, n * head_dim, head_dim // 2)])
        assert rel(half, ops[0]) > 0.1  # blocks of another head_dim: measurably different


@BACKENDS
def test_neox_fused_query_key_value_rows_are_head_blocks(backend):
    """GPT-NeoX's query_key_value (96, 32) is nn.Linear: its 12 head blocks are blocks of 8 rows."""
    ops, d = operator_update("neox", backend, "gpt_neox.layers.0.attention.query_key_value.weight")
    for h in range(12):
        assert_orthogonalized(ops[0, 8 * h : 8 * h + 8], d[0, 8 * h : 8 * h + 8], what=f"block {h}")


@BACKENDS
def test_bert_query_key_value_biases_are_unit_per_head(backend):
    """BERT's separate query/key/value biases (32,): one unit vector per head block of 8, each
    moving W by exactly (2−β_off)·lr; one l2 over the whole bias would move each block by half that."""
    for proj in ("query", "key", "value"):
        _, g, update = one_step("bert", backend)[f"bert.encoder.layer.0.attention.self.{proj}.bias"]
        norms = update.view(4, 8).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((4,), APPLIED, dtype=torch.float64), rtol=1e-12, atol=0)
        d = first_direction(g).view(4, 8)
        torch.testing.assert_close(update.view(4, 8), -APPLIED * d / d.norm(dim=1, keepdim=True), rtol=1e-12, atol=0)


@BACKENDS
def test_vit_learned_tokens_are_embeddings_and_not_orthogonalized(backend):
    """class_token (1, 1, 16) and pos_embedding (1, 5, 16) move by (2−β_off)·lr·d exactly (norm none),
    while the attention's in_proj_weight (48, 16) is 6 orthogonalized head blocks of (8, 16)."""
    step = one_step("vit", backend)
    for param in ("class_token", "encoder.pos_embedding"):
        _, g, update = step[param]
        torch.testing.assert_close(update, -APPLIED * first_direction(g), rtol=1e-14, atol=0)
    ops, d = operator_update("vit", backend, "encoder.layers.encoder_layer_0.self_attention.in_proj_weight")
    for h in range(6):
        assert_orthogonalized(ops[0, 8 * h : 8 * h + 8], d[0, 8 * h : 8 * h + 8], what=f"in_proj block {h}")


@BACKENDS
def test_phi3_fused_qkv_proj_rows_are_q_k_v_head_blocks(backend):
    """Phi-3's qkv_proj (64, 32) is [4 q heads | 2 k heads | 2 v heads] of 8 rows (GQA), each
    orthogonalized on its own; one NS over the whole fused matrix (what it got before) is not that."""
    ops, d = operator_update("phi3", backend, "model.layers.0.self_attn.qkv_proj.weight")
    assert ops.shape[1:] == (64, 32)
    for h in range(8):
        assert_orthogonalized(ops[0, 8 * h : 8 * h + 8], d[0, 8 * h : 8 * h + 8], what=f"block {h}")
    assert rel(newton_schulz(d[0]), ops[0]) > 0.1


@BACKENDS
def test_distilbert_q_lin_k_lin_v_lin_are_split_head_wise(backend):
    for proj in ("q_lin", "k_lin", "v_lin"):
        param = f"distilbert.transformer.layer.0.attention.{proj}"
        ops, d = operator_update("distilbert", backend, param + ".weight")
        for h in range(4):
            assert_orthogonalized(ops[0, 8 * h : 8 * h + 8], d[0, 8 * h : 8 * h + 8], what=f"{proj} head {h}")
        _, _, update = one_step("distilbert", backend)[param + ".bias"]
        torch.testing.assert_close(update.view(4, 8).norm(dim=1), torch.full((4,), APPLIED, dtype=torch.float64))


@BACKENDS
def test_t5_q_k_v_heads_are_d_kv_rows(backend):
    """T5's q, k, v are (4·16, 32): heads of d_kv = 16 rows (not d_model / heads = 8), in the encoder's
    self-attention and the decoder's cross-attention alike; o is one whole matrix."""
    for param in ("encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.v.weight"):
        ops, d = operator_update("t5", backend, param)
        assert ops.shape[1:] == (64, 32)
        for h in range(4):
            rows = slice(16 * h, 16 * h + 16)
            torch.testing.assert_close(ops[0, rows], newton_schulz(d[0, rows]), rtol=1e-10, atol=1e-12)
        half = torch.cat([newton_schulz(d[0, r : r + 8]) for r in range(0, 64, 8)])
        assert rel(half, ops[0]) > 0.1  # heads of 8 rows: measurably different
    ops, d = operator_update("t5", backend, "encoder.block.0.layer.0.SelfAttention.o.weight")
    torch.testing.assert_close(ops[0], newton_schulz(d[0]), rtol=1e-10, atol=1e-12)  # (32, 64): k = 1


@BACKENDS
@pytest.mark.parametrize("name, kv_block", [("deepseek_v3", 14), ("deepseek_v2", 8)])
def test_mla_per_head_projections_have_their_own_blocks(backend, name, kv_block):
    """Multi-head latent attention. The query up-projection (q_b_proj; q_proj without the bottleneck)
    has one block per head of qk_nope + qk_rope = 12 rows. kv_b_proj (from the kv_lora_rank 8 latent)
    has per head 8 key rows then v_head_dim value rows: one [key; value] block of 14 per head when
    v_head_dim = 6, a key block and a value block of 8 when v_head_dim = 8. A block never spans two
    heads; the shared q_a_proj and kv_a_proj_with_mqa are whole matrices."""
    attn = "model.layers.0.self_attn."
    query = attn + ("q_b_proj.weight" if name == "deepseek_v3" else "q_proj.weight")
    ops, d = operator_update(name, backend, query)
    assert ops.shape[1] == 4 * 12
    k = math.sqrt(max(1.0, 12 / ops.shape[2]))
    for h in range(4):
        rows = slice(12 * h, 12 * h + 12)
        torch.testing.assert_close(ops[0, rows], k * newton_schulz(d[0, rows]), rtol=1e-10, atol=1e-12)

    ops, d = operator_update(name, backend, attn + "kv_b_proj.weight")
    assert ops.shape[1:] == (4 * (8 + (6 if name == "deepseek_v3" else 8)), 8)
    k = math.sqrt(max(1.0, kv_block / 8))
    blocks = [k * newton_schulz(d[0, r : r + kv_block]) for r in range(0, ops.shape[1], kv_block)]
    torch.testing.assert_close(ops[0], torch.cat(blocks), rtol=1e-10, atol=1e-12)
    whole = math.sqrt(ops.shape[1] / 8) * newton_schulz(d[0])
    assert rel(whole, ops[0]) > 0.1  # one NS over every head: measurably different

    shared = [attn + "kv_a_proj_with_mqa.weight"] + ([attn + "q_a_proj.weight"] if name == "deepseek_v3" else [])
    for param in shared:
        ops, d = operator_update(name, backend, param)
        torch.testing.assert_close(ops[0], newton_schulz(d[0]), rtol=1e-10, atol=1e-12)  # wide: k = 1


@BACKENDS
@pytest.mark.parametrize(
    "param, operator, k",
    [
        ("conv1.weight", (8, 3 * 7 * 7), 1.0),
        ("layer1.0.conv1.weight", (8, 8 * 3 * 3), 1.0),
        ("layer2.0.downsample.0.weight", (16, 8), math.sqrt(2.0)),  # a tall 1×1 conv
        ("fc.weight", (10, 16), 1.0),
    ],
    ids=["conv1", "layer1.0.conv1", "downsample", "fc"],
)
def test_resnet_conv_kernels_are_out_by_in_kk(backend, param, operator, k):
    """A conv kernel (out, in, kh, kw) is orthogonalized as the (out, in·kh·kw) matrix it applies."""
    ops, d = operator_update("small_resnet", backend, param)
    assert tuple(ops.shape[1:]) == operator
    assert fitted_factor(ops[0], newton_schulz(d[0])) == pytest.approx(k, rel=1e-12)
    assert_orthogonalized(ops[0], d[0], k=k, what=param)


# --------------------------------------------------------------------------- 10-step trajectories


# The trajectory models: the architectures above at about a quarter of their size (the Triton
# interpreter runs one Python program per 128 elements per kernel), same structure: head blocks
# (GQA, Qwen3's explicit head_dim 8 != 16/4), Conv1D, experts, conv kernels, learned tokens.
MICRO = dict(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24, **TOKENS)
MICRO_MOE = dict(MICRO, num_key_value_heads=2, num_experts_per_tok=2)
TRAJECTORY_BUILDERS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2, n_inner=24, **TOKENS)
    ),
    "neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**MICRO)),
    "llama_gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**MICRO, num_key_value_heads=2)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**MICRO, num_key_value_heads=2, head_dim=8)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**MICRO, max_position_embeddings=8)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**MICRO_MOE, num_local_experts=3)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**MICRO_MOE, head_dim=8, num_experts=3, moe_intermediate_size=12)
    ),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(**{**MICRO_MOE, "intermediate_size": 12}, head_dim=8, num_local_experts=3)
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**MICRO, num_key_value_heads=2)),
    "distilbert": lambda: transformers.DistilBertForMaskedLM(
        transformers.DistilBertConfig(vocab_size=16, dim=16, n_layers=1, n_heads=4, hidden_dim=24,
                                      max_position_embeddings=8, pad_token_id=2)  # fmt: skip
    ),
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=16, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                              relative_attention_num_buckets=8, decoder_start_token_id=0, **TOKENS)  # fmt: skip
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **{**MICRO, "num_hidden_layers": 2, "num_attention_heads": 2}, num_key_value_heads=2, q_lora_rank=8,
            kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3, moe_intermediate_size=8,
            first_k_dense_replace=1, n_routed_experts=3, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        )  # fmt: skip
    ),
    "small_resnet": lambda: small_resnet((4, 8)),
    "vit": lambda: torchvision().models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=10
    ),
}
TRAJECTORY_MODELS = tuple(TRAJECTORY_BUILDERS)
NS_NORMS = ("ns", "ns_split")


def trajectory_net(name: str) -> tuple[nn.Module, dict]:
    """(float32 model, role of each parameter from the hand-written labels; the small ResNet's are resnet18's)."""
    labels = labels_of(name)  # before seeding: its first call builds a model (and draws from the RNG)
    torch.manual_seed(0)
    net = TRAJECTORY_BUILDERS[name]()
    roles = {n: labels[n][0] for n, _ in net.named_parameters()}
    with torch.no_grad():  # nonzero biases and norm gains, so every parameter starts from real data
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.float(), roles


def train(net: nn.Module, backend: str, steps: int = 10, **kw) -> dict:
    """`steps` mango steps from seeded gradients (rounded to the params' dtype first, so the float32
    and the float64 runs see the same values); returns {name: parameter}."""
    opt = mango.presets.mango(net, backend=backend, **kw)
    named = dict(net.named_parameters())
    for t in range(steps):
        gen = torch.Generator().manual_seed(1000 + t)
        for p in named.values():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).float().to(p.dtype)
        opt.step()
    return {n: p.detach() for n, p in named.items()}


_reference_runs: dict = {}


def reference_run(name: str) -> tuple[dict, dict]:
    """(initial values, parameters after the float64 reference trajectory), cached per model."""
    if name not in _reference_runs:
        net, _ = trajectory_net(name)
        start = {n: p.detach().double().clone() for n, p in net.named_parameters()}
        _reference_runs[name] = start, train(net.double(), "reference")
    return _reference_runs[name]


def assert_trajectory_within_spec(name: str, backend: str) -> None:
    """Per parameter, the correctness contract: W_10 within 1e-6 of float64 for elementwise norms and within 1e-4 for NS
    norms (fp32 operands). The displacement W_10 − W_0 (the optimizer's own work) is held to 1e-5 and
    1e-4: on float32 parameters it carries the rounding of W itself, ~1e-7·‖W‖ per step, which where
    ‖W‖ ≫ ‖W_10 − W_0‖ (a bias of ±0.3 moved by 0.03) is already ~1e-6 of the displacement."""
    net, roles = trajectory_net(name)
    start = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    reference_start, want = reference_run(name)
    assert all(torch.equal(start[n], reference_start[n]) for n in start), "the reference started elsewhere"
    got = train(net, backend, ns_dtype=torch.float32)
    bad = {}
    for n, w in want.items():
        ns = ROLE_NORM[roles[n]] in NS_NORMS
        error_w, error_moved = rel(got[n].double(), w), rel(got[n].double() - start[n], w - start[n])
        if not (error_w <= (1e-4 if ns else 1e-6) and error_moved <= (1e-4 if ns else 1e-5)):
            bad[n] = (ROLE_NORM[roles[n]], f"{error_w:.2g}", f"{error_moved:.2g}")
    assert not bad, f"{name} on {backend}: (norm, error of W, error of W − W_0) over tolerance: {bad}"


@pytest.mark.parametrize("name", TRAJECTORY_MODELS)
def test_float32_trajectory_torch_backend_within_spec(name):
    assert_trajectory_within_spec(name, "torch")


@pytest.mark.parametrize("name", TRAJECTORY_MODELS)
def test_float32_trajectory_triton_backend_within_spec(name):
    """The Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py), same bounds."""
    assert_trajectory_within_spec(name, "triton")
