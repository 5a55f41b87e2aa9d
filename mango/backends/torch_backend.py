"""The batched pure-PyTorch backend (default on CPU, and on GPUs without Triton).

Same math as `mango.reference`, organised so that the cost of a step does not grow with the
number of tensors:

* **Flat state.** For each elementwise bucket of the plan, m, v, O and the step counters live
  in one flat buffer; the per-parameter state entries are views into it (so `state_dict`, the
  reference and the triton backend see the usual per-tensor layout). Moments, offset and
  scaling are then a handful of whole-buffer ops instead of a `foreach` per tensor (on CPU
  `foreach` is a per-tensor loop).
* **Norm buckets are contiguous.** The flat layout orders tensors by norm bucket, so the
  stack of same-shape matrices that Newton–Schulz needs is a zero-copy view of the direction
  buffer, and fused-QKV head blocks are a reshape of that view.
* Gradients come in with one `_foreach_copy_` (casting bf16/fp16 to the state dtype) and the
  update goes out with one `_foreach_sub_` (rounding to each parameter's own dtype).

The three stages that need whole tensors (`tensor_norms`, `unit_rows`, `orthogonalize`) are
methods so a sharded backend can override them with collectives.
"""

from __future__ import annotations

import torch

from ..config import normalize_ns_coefficients
from ..reference import spectral_norm

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "offset")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 NS is ~4× fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def ns_work_dtype(setting, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """ns_dtype="auto": bf16 operands (SPEC §6) on CUDA and on CPUs with native bf16 matmul,
    else the state dtype; float64 state always runs NS in float64 (it is asked for exactness)."""
    if setting != "auto":
        return setting
    if dtype == torch.float64:
        return dtype
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast_bf16 else dtype


def batched_newton_schulz(X: torch.Tensor, coefficients, prescale: str, eps: float, dtype=None, out_scale: float = 1.0) -> torch.Tensor:
    """Newton–Schulz on a (B, r, c) stack; returns out_scale × the result, (B, r, c), possibly a
    transposed view.

    The pre-scale norm is taken on X as given (fp32 state: an accurate norm); the iteration runs
    on one contiguous copy in `dtype` (default X.dtype), transposed when r > c so the Gram matrix
    is the small one — cast, transpose and scale in one pass, and contiguous operands keep bmm on
    its fast path. Each step: A = X·Xᵀ, B = b·A + c·A·A (baddbmm), X ← a·X + B·X; `out_scale`
    (lr × shape factor) rides on the last step's baddbmm instead of costing a pass of its own.
    """
    transposed = X.shape[-2] > X.shape[-1]
    src = X.mT if transposed else X
    if prescale == "frobenius":
        wide = torch.float32 if src.dtype in _LOW_PRECISION else None
        scale = torch.linalg.vector_norm(src, dim=(-2, -1), keepdim=True, dtype=wide)
    else:
        scale = spectral_norm(src)[..., None, None]
    Y = torch.empty(src.shape, dtype=dtype or X.dtype, device=X.device)
    torch.div(src, scale.clamp_min(eps).to(src.dtype), out=Y)
    last = len(coefficients) - 1
    fold = out_scale != 0.0  # CPU bf16 baddbmm with alpha = beta = 0 returns garbage (lr = 0 in warm-ups)
    for step, (a, b, c) in enumerate(coefficients):
        k = out_scale if step == last and fold else 1.0
        A = torch.bmm(Y, Y.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        Y = torch.baddbmm(Y, B, Y, beta=a * k, alpha=k)  # a·X added in the fp32 accumulator
    if (not coefficients or not fold) and out_scale != 1.0:
        Y.mul_(out_scale)
    return Y.mT if transposed else Y


def _unit_rows(X: torch.Tensor) -> torch.Tensor:
    """Each row of a (B, r, c) stack divided by its l2 norm; zero rows stay zero."""
    n = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    return X * _safe_inverse(n)


def _safe_inverse(n: torch.Tensor) -> torch.Tensor:
    """1/n where n > 0, else 0 (a zero direction gives a zero step)."""
    return torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))


class _FlatLayout:
    """Flat buffers of one elementwise bucket and the per-tensor views into them."""

    def __init__(self, bucket):
        slots = bucket.slots
        in_buckets = [i for nb in bucket.norm_buckets for i in nb.slots]
        rest = sorted(set(range(len(slots))) - set(in_buckets))  # empty matrices: step count only
        self.order = in_buckets + rest
        numels = [slots[i].param.numel() for i in self.order]
        self.numel = sum(numels)
        self.lengths = torch.tensor(numels, dtype=torch.long, device=bucket.device)
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        # per norm bucket: its range in the flat layout and its positions in self.order
        pos = {slot_index: k for k, slot_index in enumerate(self.order)}
        self.ranges = []
        for nb in bucket.norm_buckets:
            ks = [pos[i] for i in nb.slots]
            self.ranges.append((offsets[ks[0]], offsets[ks[-1] + 1], ks[0], ks[-1] + 1))
        dev, dt = bucket.device, bucket.dtype
        self.params = [slots[i].param for i in self.order]
        self.grad_buf = torch.empty(self.numel, dtype=dt, device=dev)
        self.grad_views = self.views(self.grad_buf)
        self.upd_buf = torch.empty(self.numel, dtype=dt, device=dev)  # the step, subtracted from W
        self.upd_views = self.views(self.upd_buf)
        self.dir_buf = torch.empty(self.numel, dtype=dt, device=dev)  # the direction d
        self.dir_views = self.views(self.dir_buf)
        self.work_buf = torch.empty(self.numel, dtype=dt, device=dev)  # u, √v, or W for weight decay
        self.work_views = self.views(self.work_buf)
        self.state = {}
        states = [slots[i].state for i in self.order]
        for key in _STATE_KEYS:
            if key not in states[0]:
                continue
            if states[0][key].dim() == 0 and key == "exp_avg_sq":  # NovoGrad: one scalar per tensor
                buf = torch.stack([s[key] for s in states]).to(dt)
                for k, s in enumerate(states):
                    s[key] = buf[k]
            else:
                buf = torch.cat([s[key].reshape(-1) for s in states]).to(dt) if states else torch.empty(0, dtype=dt, device=dev)
                for s, view in zip(states, self.views(buf)):
                    s[key] = view
            self.state[key] = buf
        # step counters stay on the CPU (as in torch.optim): bias corrections are host scalars, no sync
        self.steps = torch.stack([s["step"] for s in states]).to(dtype=torch.float32, device="cpu")
        for k, s in enumerate(states):
            s["step"] = self.steps[k]

    def views(self, flat):
        """Views of a flat buffer shaped like each parameter, in layout order."""
        return [flat[a:b].view(p.shape) for p, a, b in zip(self.params, self.offsets, self.offsets[1:])]

    def per_element(self, per_tensor: torch.Tensor, k0=0, k1=None) -> torch.Tensor:
        """Expand one value per tensor (layout positions k0:k1) to one value per element."""
        lengths = self.lengths[k0:k1]
        return torch.repeat_interleave(per_tensor, lengths, output_size=self.offsets[k1 if k1 is not None else len(self.params)] - self.offsets[k0])


class TorchBackend:
    name = "torch"

    def step(self, opt, plan, grads_by_bucket) -> None:
        for bucket, grads in zip(plan.buckets, grads_by_bucket):
            layout = bucket.cache.get("flat")
            if layout is None:
                layout = bucket.cache["flat"] = _FlatLayout(bucket)
            self._bucket_step(opt.param_groups[bucket.group_index], bucket, layout, [grads[i] for i in layout.order])

    # ------------------------------------------------------------------------------------
    # Every stage writes into the layout's preallocated flat buffers (grad, work, dir, upd):
    # large per-step allocations cost page faults on CPU and allocator traffic on GPU.
    # ------------------------------------------------------------------------------------
    def _bucket_step(self, group, bucket, L: _FlatLayout, grads) -> None:
        torch._foreach_copy_(L.grad_views, grads)
        G = L.grad_buf
        if group["maximize"]:
            G.neg_()
        L.steps.add_(1.0)
        d = self._direction(group, L, G)
        lr = group["lr"]
        upd = L.upd_buf
        for nb, (a, b, k0, k1) in zip(bucket.norm_buckets, L.ranges):
            s = upd[a:b]
            self._scaled_step(group, bucket, nb, L, d[a:b], k0, k1, lr, out=s)
            if "offset" in L.state:
                O = L.state["offset"][a:b]
                O.lerp_(s, 1 - group["beta_offset"])  # O ← β_off·O + (1−β_off)·s
                s.add_(O)
        decay = 0.0 if group["preconditioner"] == "novograd" else lr * group["weight_decay"]
        if decay:
            W = L.work_buf
            torch._foreach_copy_(L.work_views, L.params)
            upd.add_(W, alpha=decay)
        torch._foreach_sub_(L.params, L.upd_views)

    def _direction(self, group, L: _FlatLayout, G):
        """Preconditioner + momentum over the flat buffers: returns the direction d (flat)."""
        b1, b2, eps, pre = group["beta1"], group["beta2"], group["eps"], group["preconditioner"]
        ema_v = group["second_moment"] == "ema"
        M, D, U = L.state["exp_avg"], L.dir_buf, L.work_buf
        if pre == "adam":
            V = L.state["exp_avg_sq"]
            V.mul_(b2).addcmul_(G, G, value=(1 - b2) if ema_v else 1.0)
            M.lerp_(G, 1 - b1)  # m ← β1·m + (1−β1)·g
            if group["nesterov"]:
                torch.lerp(G, M, b1, out=D)  # β1·m + (1−β1)·g
            else:
                D.copy_(M)
            torch.div(V, self._bias(L, b2), out=U).sqrt_().add_(eps)
            return D.div_(self._bias(L, b1)).div_(U)
        if pre is None:
            U = G
        elif pre == "laprop":
            V = L.state["exp_avg_sq"]
            V.mul_(b2).addcmul_(G, G, value=(1 - b2) if ema_v else 1.0)
            if group["bias_correction"]:
                torch.div(V, self._bias(L, b2), out=U).sqrt_()
            else:
                torch.sqrt(V, out=U)
            torch.div(G, U.add_(eps), out=U)
        elif pre == "novograd":
            V = L.state["exp_avg_sq"]  # one scalar per tensor
            sq = self.tensor_norms(L.grad_views).to(V.dtype) ** 2
            first = (L.steps == 1).to(V.device)  # NovoGrad's v₁ = ‖g₁‖²
            V.copy_(torch.where(first, sq, b2 * V + ((1 - b2) * sq if ema_v else sq)))
            torch.div(G, L.per_element(V.sqrt() + eps), out=U)
            if group["weight_decay"]:
                torch._foreach_copy_(L.dir_views, L.params)  # W, borrowed buffer
                U.add_(D, alpha=group["weight_decay"])
        c = (1 - b1) if group["ema_momentum"] else 1.0
        if c == 1.0:
            torch.add(U, M, alpha=b1, out=M)  # m ← β1·m + u
        else:
            M.lerp_(U, c)  # m ← β1·m + (1−β1)·u
        if group["nesterov"]:
            if c == 1.0:
                torch.add(U, M, alpha=b1, out=D)
            else:
                torch.lerp(U, M, b1, out=D)
        else:
            D.copy_(M)
        if group["bias_correction"] and group["ema_momentum"]:
            D.div_(self._bias(L, b1))
        return D

    @staticmethod
    def _bias(L: _FlatLayout, beta):
        """1 − βᵗ: a Python float when every tensor has taken the same number of steps, else per element."""
        t = L.steps
        if t.numel() == 0 or bool((t == t[0]).all()):
            return 1 - beta ** float(t[0]) if t.numel() else 1.0
        return L.per_element((1 - beta ** t.to(torch.float64)).to(L.grad_buf.dtype))

    def _scaled_step(self, group, bucket, nb, L, d, k0, k1, lr, out):
        """out = lr·k·Δ for one norm bucket (a flat slice of the layout)."""
        norm = nb.norm
        per_tensor = None  # extra factor per tensor (1/‖d‖, trust ratio)
        scaled = False  # lr·k already applied
        if norm == "sign":
            torch.sign(d, out=out)
        elif norm in ("none", "l2"):
            out.copy_(d)
            if norm == "l2":
                per_tensor = _safe_inverse(self.tensor_norms(self._segment_views(L, d, k0, k1)))
        else:
            views, stacked = self._segment_views(L, d, k0, k1), d.view(-1, *nb.block_shape)
            if norm in ("l2_col", "l2_split"):
                result = self.unit_rows(nb, views, stacked=stacked)
            elif not group["trust_ratio"]:  # lr·k folded into the last NS step
                result = self.orthogonalize(group, bucket, nb, views, stacked=stacked, scale=lr * nb.shape_factor)
                scaled = True
            else:
                result = self.orthogonalize(group, bucket, nb, views, stacked=stacked)
            if isinstance(result, torch.Tensor):
                out.view(result.shape).copy_(result)
            else:
                torch.cat([t.reshape(-1) for t in result], out=out)
        if group["trust_ratio"]:  # φ = min(‖W‖, trust_clamp); φ = 0: ratio 1, on the raw d for l2 (LAMB)
            wn = self.tensor_norms(L.params[k0:k1])
            if group["trust_clamp"] is not None:
                wn = wn.clamp_max(group["trust_clamp"])
            tr = torch.where(wn > 0, wn, torch.ones_like(wn))
            # per_tensor is 1/‖d‖ (l2 only): at φ = 0 drop it too, the step is the raw d
            per_tensor = tr if per_tensor is None else torch.where(wn > 0, per_tensor * tr, 1.0)
        k = lr * nb.shape_factor
        if scaled:
            return
        if per_tensor is None:
            out.mul_(k)
        elif nb.shape is not None:  # same-shape bucket: broadcast one factor per tensor
            out.view(k1 - k0, -1).mul_((k * per_tensor.to(out.dtype))[:, None])
        else:
            out.mul_(L.per_element((k * per_tensor).to(out.dtype), k0, k1))

    @staticmethod
    def _segment_views(L, flat_slice, k0, k1):
        """Views of a norm bucket's flat slice shaped like its tensors."""
        base = L.offsets[k0]
        return [flat_slice[a - base : b - base].view(p.shape) for p, a, b in zip(L.params[k0:k1], L.offsets[k0:k1], L.offsets[k0 + 1 : k1 + 1])]

    # ------------------------------------------------------------------------------------
    # Stages that need whole tensors. A sharded (distributed) backend overrides these three
    # with collectives; everything else in this class is elementwise and shard-local.
    # ------------------------------------------------------------------------------------
    def tensor_norms(self, tensors) -> torch.Tensor:
        """l2 norm of each tensor, as one 1-D tensor."""
        return torch.stack(torch._foreach_norm(tensors))

    def unit_rows(self, nb, d, stacked=None):
        """l2_col / l2_split: every row block (nb.block_shape) scaled to unit l2 norm."""
        X = stacked if stacked is not None else torch.stack(d).view(-1, *nb.block_shape)
        return _unit_rows(X)

    def orthogonalize(self, group, bucket, nb, d, stacked=None, scale=1.0):
        """ns / ns_split: scale × one batched Newton–Schulz over the bucket's stacked (head) blocks.

        `stacked` is the zero-copy (blocks, r, c) view of the same data as the list `d`."""
        X = stacked if stacked is not None else torch.stack(d).view(-1, *nb.block_shape)
        coeffs = normalize_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        ns_dtype = ns_work_dtype(group["ns_dtype"], bucket.device, bucket.dtype)
        return batched_newton_schulz(X, coeffs, group["ns_prescale"], group["ns_eps"], dtype=ns_dtype, out_scale=scale)
