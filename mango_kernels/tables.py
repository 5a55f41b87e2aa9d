"""Host-side tables that drive the multi-tensor kernels.

Multi-tensor scheme (why pointer tables): the optimizer state must stay per-parameter tensors
(the shared state layout, checkpoints move between backends), and gradients are fresh allocations every step,
so nothing lives in one flat buffer we could index. Instead each launch gets

* a **tensor table** `[T, ROW]` int64, one row per tensor: element count, raw addresses
  (`data_ptr()`) of param, grad, m, v, offset, direction and Δ, dtype codes, the norm kind and
  segment ids; its last `NF` columns hold float64 bit patterns (a float64 view of the same
  memory): β's, ε, bias corrections, lr·k, weight decay... One table, one host→device copy
  per step. Kernels turn an address into a typed pointer with `.to(tl.pointer_type(...))`
  (works compiled and under TRITON_INTERPRET=1 with CPU tensors).
* a **tile table** `[n_tiles, 4]` int64 built once per plan: program p handles elements
  `[start, end)` of tensor `t` (at most BLOCK of them) and, for tensors whose norm needs a
  reduction, belongs to *segment* `seg` (the whole tensor for l2/ns, one head block for
  l2_split/ns_split, one row for l2_col). Tiles never cross a segment boundary, so every tile
  writes its own partial sum of squares (no atomics, deterministic) and a segment's sum is the
  sum of a contiguous range of partials (`segments` table, reduced by one launch).

All element indices are int64 (tile starts, table offsets), so tensors beyond 2³¹ elements work.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

# dtype codes used in the tensor table (kernels branch on them at run time, so one launch
# serves fp32, bf16, fp16 and fp64 tensors side by side).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

# preconditioner codes
PRECONDITIONER_CODES = {None: 0, "laprop": 1, "adam": 2, "novograd": 3}

# how the apply kernel turns the direction d into Δ
NORM_NONE, NORM_SIGN, NORM_SEGMENT_L2, NORM_PRECOMPUTED = 0, 1, 2, 3

# flag bits. FLAG_TRUST_RAW (with FLAG_TRUST, norm l2): where the trust ratio's φ is 0 the step is
# the raw direction d, not d/‖d‖ (LAMB's trust ratio 1 on the Adam step)
# FLAG_FUSED (norms none/sign without trust ratio): the moments pass applies the step itself, so
# such tensors (an embedding) need no direction buffer and the apply pass skips them.
FLAG_OFFSET, FLAG_TRUST, FLAG_FIRST_STEP, FLAG_TRUST_RAW, FLAG_FUSED = 1, 2, 4, 8, 16

INT_COLUMNS = (
    "numel",
    "param", "grad", "exp_avg", "exp_avg_sq", "offset",
    "direction",  # where the moments kernel writes d (fp32 work buffer, or the NS input stack)
    "delta",  # where the apply kernel reads d or Δ (the NS output for NS norms)
    "grad_dtype", "param_dtype", "direction_dtype", "delta_dtype",
    "preconditioner", "norm_kind", "flags",
    "w_segment",  # segment id of ‖W‖² (trust ratio)
    "g_segment",  # segment id of ‖g‖² (novograd)
)  # fmt: skip
FLOAT_COLUMNS = (
    "beta1", "beta2", "eps",
    "v_coef",  # coefficient on g² in v: 1−β2 (ema) or 1 (sum)
    "m_coef",  # coefficient on the preconditioned gradient in m: 1−β1 (ema / adam) or 1
    "nesterov_m", "nesterov_x",  # d = nesterov_m·m + nesterov_x·x (Nesterov) or 1·m + 0·x
    "bias1", "bias2",  # divisors 1−β^t where bias correction applies, else 1
    "grad_sign",  # −1 for maximize
    "weight_decay_u",  # novograd: λ inside u
    "lr_k",  # lr × shape factor
    "beta_offset", "one_minus_beta_offset",
    "decay",  # lr·λ (decoupled weight decay; 0 for novograd)
    "trust_clamp",  # trust ratio φ = min(‖W‖, trust_clamp); 0: no clamp
)  # fmt: skip
NI, NF = len(INT_COLUMNS), len(FLOAT_COLUMNS)
ROW = NI + NF
ICOL = SimpleNamespace(**{name.upper(): i for i, name in enumerate(INT_COLUMNS)})
FCOL = SimpleNamespace(**{name.upper(): i for i, name in enumerate(FLOAT_COLUMNS)})

ADDRESS_COLUMNS = [ICOL.PARAM, ICOL.GRAD, ICOL.EXP_AVG, ICOL.EXP_AVG_SQ, ICOL.OFFSET, ICOL.DIRECTION, ICOL.DELTA]



class TensorTable:
    """The per-step tensor table: int64 columns and float64 columns sharing one buffer."""

    def __init__(self, n: int, device: torch.device):
        self.n = n
        self.device = torch.device(device)
        self.host = torch.zeros((n, ROW), dtype=torch.int64)
        self.device_table = self.host if self.device.type == "cpu" else torch.zeros((n, ROW), dtype=torch.int64, device=device)
        self.dirty = True  # the host table holds what the device table does not yet
        self.aligned = None  # cached addresses_aligned()

    @property
    def ints(self) -> torch.Tensor:
        return self.host[:, :NI]

    @property
    def floats(self) -> torch.Tensor:
        return self.host.view(torch.float64)[:, NI:]

    def set_int(self, column: int, values) -> None:
        self.host[:, column] = torch.as_tensor(values, dtype=torch.int64)
        self.changed()

    def set_float(self, column: int, values) -> None:
        self.floats[:, column] = torch.as_tensor(values, dtype=torch.float64)
        self.changed()

    def changed(self) -> None:
        """Mark the host table as rewritten: the next `upload` copies it, `addresses_aligned` rechecks."""
        self.dirty = True
        self.aligned = None

    def addresses_aligned(self) -> bool:
        """Whether every address in the table is 16-byte aligned (lets kernels vectorize)."""
        if self.aligned is None:
            self.aligned = bool((self.host[:, ADDRESS_COLUMNS] % 16 == 0).all())
        return self.aligned

    def upload(self):
        """Copy the host table to the device if it changed since the last upload (one copy; a no-op
        on CPU). Returns (ints, floats) views of the device table."""
        from ._launch import record

        if self.device_table is not self.host and self.dirty:
            staging = self.host.pin_memory() if torch.cuda.is_available() else self.host  # fresh pinned memory: an earlier async copy may still read the last one
            self.device_table.copy_(staging, non_blocking=True)
            record("table_copy")
        self.dirty = False
        return self.device_table, self.device_table.view(torch.float64)


@dataclass
class TensorLayout:
    """What the tile builder needs to know about one tensor."""

    numel: int
    segment_len: int = 0  # elements per reduction segment; 0: no d-reduction (none/sign norms)
    trust_ratio: bool = False  # needs ‖W‖
    novograd: bool = False  # needs ‖g‖ before the moments pass


class ElementwiseLayout:
    """Tiles and reduction segments for a fixed list of tensors (built once per plan).

    Segment ids index one `sums` vector: first the d-segments (norm reductions and NS Frobenius
    pre-scales) of every tensor, then the ‖W‖² segments, then the ‖g‖² segments (novograd).
    The partial-sum vector has three regions of n_tiles each: d², W², g².
    """

    def __init__(self, tensors: list[TensorLayout], block: int, device, rows=None):
        """`rows`: the tensor-table row of each tensor (default 0..n-1), so that several layouts
        (the triton backend's rounds) can share one table."""
        self.block = int(block)
        self.device = torch.device(device)
        n = len(tensors)
        numel = torch.tensor([t.numel for t in tensors], dtype=torch.int64)
        seg_len = torch.tensor([t.segment_len if t.segment_len else t.numel for t in tensors], dtype=torch.int64)
        seg_len = torch.where(seg_len > 0, seg_len, torch.ones_like(seg_len))
        segmented = torch.tensor([bool(t.segment_len) for t in tensors], dtype=torch.bool)
        for t in tensors:
            if t.segment_len and t.numel % t.segment_len:
                raise ValueError(f"segment length {t.segment_len} does not divide {t.numel} elements")

        n_seg = torch.where(numel > 0, numel // seg_len, torch.zeros_like(numel))
        tiles_per_seg = (seg_len + self.block - 1) // self.block
        tile_count = n_seg * tiles_per_seg
        tile_first = torch.cumsum(tile_count, 0) - tile_count
        self.n_tiles = int(tile_count.sum())

        # d-segments: consecutive ids per segmented tensor
        d_seg_count = torch.where(segmented, n_seg, torch.zeros_like(n_seg))
        self.d_segment_base = torch.cumsum(d_seg_count, 0) - d_seg_count
        n_d = int(d_seg_count.sum())

        # the tile table, vectorized: tile -> (tensor, segment within tensor, tile within segment)
        tensor_of = torch.repeat_interleave(torch.arange(n), tile_count)
        local = torch.arange(self.n_tiles) - tile_first[tensor_of]
        tps = tiles_per_seg[tensor_of]
        seg_local, k = local // tps, local % tps
        L = seg_len[tensor_of]
        start = seg_local * L + k * self.block
        end = seg_local * L + L
        seg = torch.where(segmented[tensor_of], self.d_segment_base[tensor_of] + seg_local, torch.full_like(seg_local, -1))
        rows = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
        self.n_rows = int(rows.max()) + 1 if n else 0  # per-tensor scratch is indexed by table row
        row_of = rows[tensor_of]
        self.tiles_host = torch.stack([row_of, start, end, seg], dim=1).contiguous()
        self.tiles_aligned = bool((start % 16 == 0).all() and (end % 16 == 0).all())  # + aligned addresses: vector loads

        # segments: (first partial index, count) for d², then W², then g². Segment j of a
        # segmented tensor t covers tiles tile_first[t] + j·tiles_per_seg[t] onwards.
        seg_tensor = torch.repeat_interleave(torch.arange(n)[segmented], n_seg[segmented])
        seg_index = torch.arange(n_d) - self.d_segment_base[seg_tensor]
        d_count = tiles_per_seg[seg_tensor]
        d_first = tile_first[seg_tensor] + seg_index * d_count
        trust = torch.tensor([t.trust_ratio for t in tensors], dtype=torch.bool)
        novo = torch.tensor([t.novograd for t in tensors], dtype=torch.bool)
        n_w, n_g = int(trust.sum()), int(novo.sum())
        self.w_segment = torch.full((n,), -1, dtype=torch.int64)
        self.w_segment[trust] = n_d + torch.arange(n_w)
        self.g_segment = torch.full((n,), -1, dtype=torch.int64)
        self.g_segment[novo] = n_d + n_w + torch.arange(n_g)
        post = torch.cat(
            [
                torch.stack([d_first, d_count], 1),
                torch.stack([self.n_tiles + tile_first[trust], tile_count[trust]], 1),
            ]
        )
        pre = torch.stack([2 * self.n_tiles + tile_first[novo], tile_count[novo]], 1)
        self.n_post_segments, self.n_pre_segments = post.shape[0], pre.shape[0]
        self.n_sums = n_d + n_w + n_g
        self.n_d_segments = n_d
        self.tile_first, self.tile_count = tile_first, tile_count

        dev = self.device
        self.tiles = self.tiles_host.to(dev)
        self.post_segments = post.reshape(-1, 2).contiguous().to(dev)
        self.pre_segments = pre.reshape(-1, 2).contiguous().to(dev)
        self.novograd_tiles = torch.nonzero(novo[tensor_of]).reshape(-1).to(dev) if n_g else torch.zeros(0, dtype=torch.int64, device=dev)

    def workspaces(self, compute_dtype: torch.dtype) -> dict:
        """Scratch the kernels write: partial sums (3 regions), segment sums, tile flags, novograd v snapshot."""
        dev = self.device
        return dict(
            partials=torch.empty(3 * max(self.n_tiles, 1), dtype=compute_dtype, device=dev),
            sums=torch.empty(max(self.n_sums, 1), dtype=compute_dtype, device=dev),
            tile_flags=torch.empty(max(self.n_tiles, 1), dtype=torch.int8, device=dev),
            v_snapshot=torch.empty(max(self.n_rows, 1), dtype=compute_dtype, device=dev),
        )
