"""Batched Newton–Schulz, the host side: items, buffers and launches for every NS matrix of a step at once.

The moments kernel writes each NS-bound tensor's direction d, in its natural storage order, into
one flat *stack* buffer of the NS dtype (`NSBatch.stack`). An *item* is one matrix to orthogonalize:
a whole operator (norm "ns"), one expert of a stacked MoE weight, or one head block of a fused-QKV
weight (norm "ns_split"). An `NSSpec` lists a tensor's items as (offset, rows, cols, row stride,
col stride) in its stretch of the stack, so operators stored transposed (HF Conv1D: head blocks are
*column* blocks), experts and heads are zero-copy strided matrices; a tall item is used transposed
(rows ≤ cols) by swapping strides, never by copying. NS is invariant under transposition, so an item
may be given in either orientation; only the host's shape factor cares which is the operator's.

Items of every shape are batched together ("ragged" batches: per-item shapes in a table), so the
launch count depends on the number of NS steps, not on depth or on how many shapes exist:

* **small items** (rows ≤ `NSConfig.small_max_rows`, or `gram_small_max_rows` in the Gram form):
  ONE launch of the on-chip kernel (`mango_kernels.ns_small`) runs the pre-scale and every step.
* **large items**, textbook form: per step `ns_xxt`, `ns_poly`, `ns_update` over a ragged tile grid
  (`mango_kernels.ns_tiled`), X ping-ponging between the stack and a second buffer.
* **large items**, Gram form: `ns_xxt` for R, the m×m iteration on the host between the launches
  (torch batched matmuls: the `large_gram` the caller hands in, mango.backends.ns_gram_host), and
  `ns_update` for Q·X at each restart and at the end.

Pre-scaling: X / max(‖X‖_F, ε) is computed from the data itself (‖X‖² = trace(X·Xᵀ) on the tiled
paths, a first pass on the small ones), so tensors need no reduction segments in the moments pass;
another pre-scale (spectral, an option) is filled into `sums` by the host (`prescale_from_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from ._launch import INTERPRET, record
from .ns_common import IC, ICOLS, NS_DTYPES
from .ns_small import ns_small
from .ns_tiled import ns_poly, ns_update, ns_xxt
from .resources import ON_CHIP_MAX_ROWS

ALIGN = 16  # elements: offsets in the stack are multiples of this (aligned vector access)
METHODS = ("textbook", "gram")


@dataclass
class NSConfig:
    """On-chip limits and tile sizes; the defaults are for a GPU, smaller ones keep interpreter tests fast."""

    small_max_rows: int = ON_CHIP_MAX_ROWS["textbook"]
    gram_small_max_rows: int = ON_CHIP_MAX_ROWS["gram"]
    small_block_c: int = 32 if INTERPRET else 64
    block_m: int = 16 if INTERPRET else 128
    block_n: int = 16 if INTERPRET else 128
    block_k: int = 16 if INTERPRET else 64


@dataclass
class NSSpec:
    """One NS-bound tensor: `numel` elements of the stack holding its d, and its items as
    (offset, rows, cols, row stride, col stride) within them (any orientation). Its schedule
    (steps, one (a, b, c) per step, ε, the pre-scale's source, the Gram form's restarts) comes from
    `NSBatch.set_schedule`."""

    numel: int
    blocks: list
    segment: int = 0  # sums index of item 0 (scale mode 1); item j uses segment + j
    steps: int = 0
    coefficients: tuple = ()
    eps: float = 1e-7
    prescale_from_sums: bool = False
    restarts: tuple = ()  # the Gram form: steps before which X and R are recomputed

    @classmethod
    def row_major(cls, rows: int, cols: int, n_blocks: int = 1, **kw) -> "NSSpec":
        """n_blocks consecutive row-major (rows, cols) matrices."""
        blocks = [(j * rows * cols, rows, cols, cols, 1) for j in range(n_blocks)]
        return cls(rows * cols * n_blocks, blocks, **kw)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def _tiles(n_row_tiles: torch.Tensor, n_col_tiles: torch.Tensor, lower_only: bool) -> torch.Tensor:
    """[(item, ti, tj)] for every item: the lower triangle of an n×n grid, or the full n×m grid."""
    rows = []
    for i, (nr, nc) in enumerate(zip(n_row_tiles.tolist(), n_col_tiles.tolist())):
        ti, tj = torch.meshgrid(torch.arange(nr), torch.arange(nc), indexing="ij")
        ti, tj = ti.reshape(-1), tj.reshape(-1)
        if lower_only:
            keep = tj <= ti
            ti, tj = ti[keep], tj[keep]
        rows.append(torch.stack([torch.full_like(ti, i), ti, tj], 1))
    return torch.cat(rows).contiguous() if rows else torch.zeros((0, 3), dtype=torch.int64)


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN) * ALIGN


def _is_large(rows: int, cols: int, method: str, config: NSConfig) -> bool:
    """Whether an item takes the tiled path (rows of its wide orientation above the on-chip limit)."""
    limit = config.gram_small_max_rows if method == "gram" else config.small_max_rows
    return min(rows, cols) > limit


def ns_buffers(specs: list, dtype: torch.dtype, method: str = "textbook", config: NSConfig = None) -> dict:
    """(numel, dtype) of each work buffer of an NSBatch for these specs: the stack, the second buffer
    of the large items, and their m×m workspaces — A (the Gram matrix, fp32) and the polynomial or Q
    (a dot operand: the NS dtype). Lets a caller size memory before building batches (the triton
    backend's rounds)."""
    config = config or NSConfig()
    stack = second = ws = 0
    for s in specs:
        stack += _aligned(s.numel)
        large = [min(r, c) for _, r, c, _, _ in s.blocks if _is_large(r, c, method, config)]
        if large:
            second += _aligned(s.numel)
            ws += sum(m * m for m in large)
    return {"stack": (stack, dtype), "buffer1": (second, dtype), "workspace_a": (ws, torch.float32), "workspace_b": (ws, dtype)}


def ns_buffer_bytes(specs: list, dtype: torch.dtype, method: str = "textbook", config: NSConfig = None) -> int:
    return sum(n * (torch.finfo(dt).bits // 8) for n, dt in ns_buffers(specs, dtype, method, config).values())


@dataclass
class _Item:
    spec: int
    block: int
    offset: int  # in the stack
    rows: int  # ≤ cols (oriented)
    cols: int
    stride_r: int
    stride_c: int
    large: bool = False
    offset1: int = 0
    workspace: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ld_transposed(self) -> tuple:
        if self.stride_c == 1:
            return self.stride_r, 0
        if self.stride_r == 1:
            return self.stride_c, 1
        raise ValueError(f"mango_kernels: NS item needs a unit stride, got strides ({self.stride_r}, {self.stride_c})")


class NSBatch:
    """Every NS item of one NS dtype and form: the stack buffer the moments kernel writes, item
    tables, tile tables and workspaces. Built once per plan; `set_schedule` follows per-step changes
    of ns_steps / coefficients / ns_eps without rebuilding.

    `large_gram(batch)`: the Gram form's large items only — runs their m×m iteration between the
    tiled launches (`launch_xxt`, `launch_update`); the host's torch half, handed in by the caller."""

    def __init__(self, specs: list, dtype: torch.dtype, device, config: NSConfig = None, method: str = "textbook",
                 bind: bool = True, large_gram=None):  # fmt: skip
        if dtype not in NS_DTYPES:
            raise ValueError(f"mango_kernels: Newton–Schulz kernels take {NS_DTYPES}, got {dtype}")
        if method not in METHODS:
            raise ValueError(f"mango_kernels: NS method must be one of {METHODS}, got {method!r}")
        self.specs = list(specs)
        self.dtype = dtype
        self.method = method
        self.device = torch.device(device)
        self.config = config or NSConfig()
        self.large_gram = large_gram
        self.spec_offset = []
        off = 0
        for s in self.specs:
            self.spec_offset.append(off)
            off += _aligned(s.numel)  # keep every tensor's d 16-element aligned
        self.sums = torch.zeros(max(1, sum(s.n_blocks for s in self.specs)), dtype=torch.float32, device=self.device)
        self._build_items()
        if method == "gram" and self.large and large_gram is None:
            raise ValueError(
                "mango_kernels: the Gram form's large items iterate on their m×m matrices on the host: "
                "pass large_gram (mango.backends.ns_gram_host.iterate_large)"
            )
        self._schedule_key = None
        self.buffer_sizes = ns_buffers(self.specs, dtype, method, self.config)
        if bind:
            self.bind()

    def bind(self, alloc=None) -> None:
        """Give the batch its work buffers: fresh ones, or views from `alloc(numel, dtype)` (a
        caller's arena, shared by batches that never run at the same time)."""
        alloc = alloc or (lambda n, dt: torch.empty(n, dtype=dt, device=self.device))
        for name, (n, dt) in self.buffer_sizes.items():
            setattr(self, name, alloc(max(n, 1), dt))

    @property
    def nbytes(self) -> int:
        """Bytes of the work buffers `bind` hands out."""
        return sum(max(n, 1) * (torch.finfo(dt).bits // 8) for n, dt in self.buffer_sizes.values())

    # -- structure -------------------------------------------------------------------------
    def _build_items(self) -> None:
        cfg = self.config
        items = []
        seg = 0
        for si, s in enumerate(self.specs):
            s.segment = seg
            seg += s.n_blocks
            for j, (boff, r, c, sr, sc) in enumerate(s.blocks):
                if r > c:  # use the transpose: rows ≤ cols
                    r, c, sr, sc = c, r, sc, sr
                items.append(_Item(si, j, self.spec_offset[si] + boff, r, c, sr, sc, large=_is_large(r, c, self.method, cfg)))
        self.items = items
        self.small = [k for k, it in enumerate(items) if not it.large]
        self.large = [k for k, it in enumerate(items) if it.large]
        self.spec_is_large = [False] * len(self.specs)
        for k in self.large:
            self.spec_is_large[items[k].spec] = True
        # large items: the second buffer mirrors each large spec's stretch of the stack (strides carry
        # over); R×R workspaces (A in fp32, M or Q in the NS dtype), consecutive for items of the same size (batched host matmuls).
        # `ns_buffers` counts the same sizes.
        self.large_second_offset, n1 = {}, 0
        for si, s in enumerate(self.specs):
            if self.spec_is_large[si]:
                self.large_second_offset[si] = n1
                n1 += _aligned(s.numel)
        nws = 0
        for k in sorted(self.large, key=lambda k: (items[k].rows, k)):
            it = items[k]
            it.offset1 = self.large_second_offset[it.spec] + (it.offset - self.spec_offset[it.spec])
            it.workspace = nws
            nws += it.rows * it.rows
        self.large_by_rows: dict = {}
        for k in sorted(self.large, key=lambda k: (items[k].rows, k)):
            self.large_by_rows.setdefault(items[k].rows, []).append(k)

        def table(indices):
            t = torch.zeros((len(indices), ICOLS), dtype=torch.int64)
            for n, k in enumerate(indices):
                it = items[k]
                ld, transposed = it.ld_transposed
                t[n, IC.OFFSET], t[n, IC.OFFSET1] = it.offset, it.offset1
                t[n, IC.ROWS], t[n, IC.COLS], t[n, IC.LD], t[n, IC.TRANSPOSED] = it.rows, it.cols, ld, transposed
                t[n, IC.WORKSPACE] = it.workspace
            return t

        self.small_items_host = table(self.small)
        self.large_items_host = table(self.large)
        # vectorizable launches: every offset, shape and leading stride a multiple of 8 elements
        aligned = lambda t: bool((t[:, [IC.OFFSET, IC.OFFSET1, IC.ROWS, IC.COLS, IC.LD, IC.WORKSPACE]] % 8 == 0).all())  # noqa: E731
        self.small_aligned = aligned(self.small_items_host)
        self.large_aligned = aligned(self.large_items_host)
        self.small_block_r = max(16, triton.next_power_of_2(max((items[k].rows for k in self.small), default=1)))

        dev = self.device
        R = self.large_items_host[:, IC.ROWS]
        C = self.large_items_host[:, IC.COLS]
        bm, bn = cfg.block_m, cfg.block_n
        self.tri_tiles = _tiles((R + bm - 1) // bm, (R + bm - 1) // bm, lower_only=True).to(dev)
        self.full_tiles = _tiles((R + bm - 1) // bm, (C + bn - 1) // bn, lower_only=False).to(dev)

    # -- per-step schedule -------------------------------------------------------------------
    def set_schedule(self, steps: list, coefficients: list, eps: list, prescale_from_sums: list = None, restarts: list = None) -> None:
        """Per spec: NS steps, (a, b, c) per step, ε, whether its pre-scale comes from `sums` (the
        host filled it: spectral), and in the Gram form the steps before which it restarts
        (mango.newton_schulz.gram_restarts). Uploads on change. The Gram form's large items must share
        one schedule (the host runs their m×m iteration as one batch)."""
        prescale_from_sums = prescale_from_sums or [False] * len(self.specs)
        if self.method == "gram" and restarts is None:
            raise ValueError("mango_kernels: set_schedule of a Gram-form batch needs `restarts` (one tuple of steps per spec)")
        restarts = [tuple(r) for r in restarts] if restarts is not None else [()] * len(self.specs)
        key = (tuple(steps), tuple(map(tuple, coefficients)), tuple(eps), tuple(prescale_from_sums), tuple(restarts))
        if key == self._schedule_key:
            return
        self._schedule_key = key
        for s, n, co, e, ps, rs in zip(self.specs, steps, coefficients, eps, prescale_from_sums, restarts):
            s.steps, s.coefficients, s.eps, s.prescale_from_sums, s.restarts = n, tuple(co), e, bool(ps), rs
        if self.method == "gram" and self.large:
            schedules = {(self.specs[self.items[k].spec].steps, self.specs[self.items[k].spec].coefficients,
                          self.specs[self.items[k].spec].restarts) for k in self.large}  # fmt: skip
            if len(schedules) > 1:
                raise ValueError("mango_kernels: the Gram form's large items of one batch need one NS schedule")
        self.max_steps = max([s.steps for s in self.specs], default=0)
        self.fcols = 1 + 3 * max(self.max_steps, 1)

        def finish(host, indices):
            host = host.clone()
            coef = torch.zeros((len(indices), self.fcols), dtype=torch.float32)
            for n, k in enumerate(indices):
                it = self.items[k]
                s = self.specs[it.spec]
                host[n, IC.SEGMENT] = s.segment + it.block
                host[n, IC.STEPS] = s.steps
                host[n, IC.SCALE_MODE] = int(s.prescale_from_sums)
                host[n, IC.RESTARTS] = sum(1 << r for r in s.restarts) if self.method == "gram" else 0
                coef[n, 0] = s.eps
                if s.steps:
                    coef[n, 1 : 1 + 3 * s.steps] = torch.tensor(s.coefficients, dtype=torch.float64).reshape(-1).float()
            return host.to(self.device), coef.to(self.device)

        self.small_items, self.small_coef = finish(self.small_items_host, self.small)
        self.large_items, self.large_coef = finish(self.large_items_host, self.large)
        self.large_max_steps = max([self.specs[self.items[k].spec].steps for k in self.large], default=0)

    # -- what the elementwise kernels and the host need -----------------------------------------
    def input_view(self, spec_index: int) -> torch.Tensor:
        """The spec's stretch of the stack (what the moments kernel writes), flat."""
        off = self.spec_offset[spec_index]
        return self.stack[off : off + self.specs[spec_index].numel]

    def _rewrites(self, spec_index: int) -> int:
        """How many times the large path rewrites a spec's X into the other buffer."""
        s = self.specs[spec_index]
        if self.method == "gram":
            return (1 + len(s.restarts)) if s.steps else 0
        return s.steps

    def output_view(self, spec_index: int) -> torch.Tensor:
        """Where the spec's NS result is after `run` (flat, same layout as `input_view`)."""
        s = self.specs[spec_index]
        if self.spec_is_large[spec_index] and self._rewrites(spec_index) % 2 == 1:
            off = self.large_second_offset[spec_index]
            return self.buffer1[off : off + s.numel]
        return self.input_view(spec_index)

    def block_views(self, spec_index: int, out: bool = False) -> list:
        """Strided (rows, cols) views of a spec's items in the stack (or where the result is)."""
        flat = self.output_view(spec_index) if out else self.input_view(spec_index)
        return [flat.as_strided((r, c), (sr, sc), flat.storage_offset() + boff) for boff, r, c, sr, sc in self.specs[spec_index].blocks]

    def workspace_view(self, workspace: torch.Tensor, m: int, ks: list) -> torch.Tensor:
        """The (len(ks), m, m) workspaces of large items `ks` of m rows (consecutive by construction)."""
        start = self.items[ks[0]].workspace
        return workspace[start : start + len(ks) * m * m].view(len(ks), m, m)

    # -- launch ---------------------------------------------------------------------------
    def run(self) -> None:
        """Newton–Schulz on every item (pre-scaled from its data, or from `sums` where asked)."""
        cfg = self.config
        gram = self.method == "gram"
        if self.small:
            ns_small(self.small_items, self.small_coef, self.sums, self.stack, dtype=self.dtype, block_r=self.small_block_r,
                     block_c=cfg.small_block_c, aligned=self.small_aligned, gram=gram)  # fmt: skip
        if not self.large:
            return
        if gram:
            if self.specs[self.items[self.large[0]].spec].steps:  # no steps: the pre-scale alone, the caller's job
                self.large_gram(self)
            return
        for k in range(self.large_max_steps):
            self.launch_xxt(k)
            ns_poly(self.large_items, self.large_coef, self.sums, self.tri_tiles, self.workspace_a, self.workspace_b, k,
                    dtype=self.dtype, block_m=cfg.block_m, block_k=cfg.block_k, aligned=self.large_aligned)  # fmt: skip
            self.launch_update(k, 1)

    def launch_xxt(self, k: int) -> None:
        """A = X·Xᵀ into workspace A for every large item, of X after k rewrites."""
        cfg = self.config
        ns_xxt(self.large_items, self.tri_tiles, self.stack, self.buffer1, self.workspace_a, k,
               dtype=self.dtype, block_m=cfg.block_m, block_k=cfg.block_k, aligned=self.large_aligned)  # fmt: skip

    def launch_update(self, k: int, scale_first: int) -> None:
        """Rewrite k of every large item: X ← M·X (M from workspace B) into the other buffer."""
        cfg = self.config
        ns_update(self.large_items, self.large_coef, self.sums, self.full_tiles, self.stack, self.buffer1,
                  self.workspace_a, self.workspace_b, k, scale_first, dtype=self.dtype, block_m=cfg.block_m,
                  block_n=cfg.block_n, block_k=cfg.block_k, aligned=self.large_aligned)  # fmt: skip


def newton_schulz(
    X: torch.Tensor,
    coefficients,
    eps: float = 1e-7,
    *,
    head_dim: int = None,
    dtype: torch.dtype = torch.bfloat16,
    prescale_sums: torch.Tensor = None,
    config: NSConfig = None,
    method: str = "textbook",
    restarts=None,
    large_gram=None,
) -> torch.Tensor:
    """Standalone batched NS of a (B, rows, cols) or (rows, cols) tensor (kernel tests, bench).

    `coefficients`: one (a, b, c) per step. `head_dim` splits rows into head blocks (the
    ns_split layout). Returns the result in `dtype`, same shape as X. `prescale_sums`: the squared
    norm to pre-scale each block by (B × blocks, e.g. the spectral norm's), instead of its
    Frobenius norm from the data. The Gram form takes its `restarts` and, for large items, the
    host's `large_gram` (see `NSBatch`).
    """
    squeeze = X.dim() == 2
    X3 = X.unsqueeze(0) if squeeze else X
    B, rows, cols = X3.shape
    hd = head_dim or rows
    if rows % hd:
        raise ValueError(f"head_dim={hd} does not divide rows={rows}")
    coefficients = [tuple(map(float, c)) for c in coefficients]
    specs = [NSSpec.row_major(hd, cols, rows // hd) for _ in range(B)]
    batch = NSBatch(specs, dtype, X.device, config, method=method, large_gram=large_gram)
    for b in range(B):
        batch.input_view(b).copy_(X3[b].reshape(-1))
    from_sums = prescale_sums is not None
    if from_sums:
        batch.sums.copy_(prescale_sums.reshape(-1))
    steps = len(coefficients)
    batch.set_schedule([steps] * B, [coefficients] * B, [eps] * B, [from_sums] * B, None if restarts is None else [restarts] * B)
    batch.run()
    if steps == 0:
        prescale_only(batch, range(B))
    out = torch.stack([batch.output_view(b) for b in range(B)]).reshape(B, rows, cols)
    return out[0] if squeeze else out


def prescale_only(batch: NSBatch, spec_indices) -> None:
    """ns_steps = 0 on the large path: X / max(‖X‖, ε) per item, by torch (not the hot path)."""
    for si in spec_indices:
        if not batch.spec_is_large[si]:
            continue
        s = batch.specs[si]
        for j, v in enumerate(batch.block_views(si)):
            norm = batch.sums[s.segment + j].sqrt() if s.prescale_from_sums else torch.linalg.vector_norm(v.float())
            v.copy_((v.float() / norm.clamp_min(s.eps)).to(v.dtype))
        record("ns_zero_steps")
