"""The batched pure-PyTorch backend (default on CPU, and on GPUs without Triton).

Same math as `mango.reference`, organised by the plan so each stage is one call per bucket:
`torch._foreach_*` for the elementwise stages across all tensors of a bucket, and one stacked
`torch.baddbmm` Newton–Schulz per same-shape matrix bucket (fused-QKV head blocks are a view
of the stack, not a copy). No Python loop over parameters runs per step beyond collecting
gradients.
"""

from __future__ import annotations

import torch

from ..config import normalize_ns_coefficients
from ..reference import spectral_norm

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def ns_work_dtype(setting, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """ns_dtype="auto": bf16 tensor-core math on CUDA; on CPU the compute dtype (bf16 matmul is slow there)."""
    if setting != "auto":
        return setting
    return torch.bfloat16 if device.type == "cuda" and dtype != torch.float64 else dtype


def batched_newton_schulz(X: torch.Tensor, coefficients, prescale: str, eps: float) -> torch.Tensor:
    """Newton–Schulz on a (B, r, c) stack, in place on a fresh buffer; returns (B, r, c).

    Uses the transposed view when r > c, baddbmm for B = b·A + c·A·A and X ← a·X + B·X.
    """
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    if prescale == "frobenius":
        scale = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32 if X.dtype in _LOW_PRECISION else None)
    else:
        scale = spectral_norm(X)[..., None, None]
    X = X / scale.clamp_min(eps).to(X.dtype)
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X.mT if transposed else X


def _unit_rows(X: torch.Tensor) -> torch.Tensor:
    """Each row of a (B, r, c) stack divided by its l2 norm; zero rows stay zero."""
    n = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    inv = torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
    return X * inv


class TorchBackend:
    name = "torch"

    def step(self, opt, plan, grads_by_bucket) -> None:
        for bucket, grads in zip(plan.buckets, grads_by_bucket):
            self._bucket_step(opt.param_groups[bucket.group_index], bucket, grads)

    # ------------------------------------------------------------------------------------
    def _work_lists(self, bucket, grads):
        """fp32 working copies for bf16/fp16 params and grads (buffers cached in the plan)."""
        cache = bucket.cache
        if "low_idx" not in cache:
            low = [i for i, s in enumerate(bucket.slots) if s.param.dtype != bucket.dtype]
            cache["low_idx"] = low
            cache["p_buf"] = [torch.empty(bucket.slots[i].param.shape, dtype=bucket.dtype, device=bucket.device) for i in low]
            cache["g_buf"] = [torch.empty_like(b) for b in cache["p_buf"]]
            cache["params"] = [s.param for s in bucket.slots]
            cache["low_params"] = [bucket.slots[i].param for i in low]
        low = cache["low_idx"]
        params = list(cache["params"])
        if not low:
            return params, grads, None
        grads = list(grads)
        torch._foreach_copy_(cache["g_buf"], [grads[i] for i in low])
        torch._foreach_copy_(cache["p_buf"], cache["low_params"])
        for j, i in enumerate(low):
            grads[i] = cache["g_buf"][j]
            params[i] = cache["p_buf"][j]
        return params, grads, (cache["low_params"], cache["p_buf"])

    def _bucket_step(self, group, bucket, grads) -> None:
        W, G, writeback = self._work_lists(bucket, grads)
        if group["maximize"]:
            G = torch._foreach_neg(G)
        steps = bucket.column("step")
        torch._foreach_add_(steps, 1.0)
        d = self._direction(group, bucket, W, G, steps)
        lr = group["lr"]
        O = bucket.column("offset") if "offset" in bucket.slots[0].state else None
        for nb in bucket.norm_buckets:
            idx = nb.slots
            delta, scale = self._normalize(group, bucket, nb, [d[i] for i in idx], [W[i] for i in idx])
            s = torch._foreach_mul(delta, list((lr * scale).unbind(0))) if scale is not None else torch._foreach_mul(delta, lr * nb.shape_factor)
            if O is not None:
                bo = group["beta_offset"]
                Ob = [O[i] for i in idx]
                torch._foreach_mul_(Ob, bo)
                torch._foreach_add_(Ob, s, alpha=1 - bo)
                torch._foreach_add_(s, Ob)
            Wb = [W[i] for i in idx]
            decay = 0.0 if group["preconditioner"] == "novograd" else lr * group["weight_decay"]
            if decay:
                torch._foreach_add_(s, torch._foreach_mul(Wb, decay))
            torch._foreach_sub_(Wb, s)
        if writeback is not None:
            torch._foreach_copy_(*writeback)

    def _direction(self, group, bucket, W, G, steps):
        """Preconditioner + momentum: returns the direction d for every slot."""
        b1, b2, eps, pre = group["beta1"], group["beta2"], group["eps"], group["preconditioner"]
        ema_v = group["second_moment"] == "ema"
        M = bucket.column("exp_avg")
        if pre in ("laprop", "adam", "novograd"):
            V = bucket.column("exp_avg_sq")
        if pre == "adam":
            torch._foreach_mul_(V, b2)
            torch._foreach_addcmul_(V, G, G, value=(1 - b2) if ema_v else 1.0)
            torch._foreach_mul_(M, b1)
            torch._foreach_add_(M, G, alpha=1 - b1)
            if group["nesterov"]:
                num = torch._foreach_mul(M, b1)
                torch._foreach_add_(num, G, alpha=1 - b1)
            else:
                num = M
            den = torch._foreach_div(V, self._bias(steps, b2))
            torch._foreach_sqrt_(den)
            torch._foreach_add_(den, eps)
            d = torch._foreach_div(num, self._bias(steps, b1))
            torch._foreach_div_(d, den)
            return d
        if pre is None:
            U = G
        elif pre == "laprop":
            torch._foreach_mul_(V, b2)
            torch._foreach_addcmul_(V, G, G, value=(1 - b2) if ema_v else 1.0)
            if group["bias_correction"]:
                den = torch._foreach_div(V, self._bias(steps, b2))
                torch._foreach_sqrt_(den)
            else:
                den = torch._foreach_sqrt(V)
            torch._foreach_add_(den, eps)
            U = torch._foreach_div(G, den)
        elif pre == "novograd":
            sq = self.tensor_norms(G).to(bucket.dtype) ** 2
            v = torch.stack(V)
            first = torch.stack(steps) == 1
            new_v = torch.where(first, sq, b2 * v + ((1 - b2) * sq if ema_v else sq))
            torch._foreach_copy_(V, list(new_v.unbind(0)))
            den = list((new_v.sqrt() + eps).unbind(0))
            U = torch._foreach_div(G, den)
            if group["weight_decay"]:
                torch._foreach_add_(U, W, alpha=group["weight_decay"])
        c = (1 - b1) if group["ema_momentum"] else 1.0
        torch._foreach_mul_(M, b1)
        torch._foreach_add_(M, U, alpha=c)
        correct = group["bias_correction"] and group["ema_momentum"]
        if not group["nesterov"]:
            return torch._foreach_div(M, self._bias(steps, b1)) if correct else M
        d = torch._foreach_mul(M, b1)
        torch._foreach_add_(d, U, alpha=c)
        if correct:
            torch._foreach_div_(d, self._bias(steps, b1))
        return d

    @staticmethod
    def _bias(steps, beta) -> list:
        """1 - beta**t per tensor, as Python floats (t may differ between tensors)."""
        return (1 - beta ** torch.stack(steps).to(torch.float64)).tolist()

    def _normalize(self, group, bucket, nb, d, W):
        """Δ for one norm bucket and the per-tensor scale beyond lr (None: nb.shape_factor for all)."""
        norm = nb.norm
        scale = None
        if norm == "none":
            delta = d
        elif norm == "sign":
            delta = torch._foreach_sign(d)
        elif norm == "l2":
            n = self.tensor_norms(d)
            scale = torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
            delta = d
        elif norm in ("l2_col", "l2_split"):
            delta = self.unit_rows(nb, d)
        else:
            delta = self.orthogonalize(group, bucket, nb, d)
        if group["trust_ratio"]:
            wn = self.tensor_norms(W)
            tr = torch.where(wn > 0, wn, torch.ones_like(wn))
            scale = tr if scale is None else scale * tr
        if scale is not None and nb.shape_factor != 1.0:
            scale = scale * nb.shape_factor
        return delta, scale

    # ------------------------------------------------------------------------------------
    # Stages that need whole tensors. A sharded (distributed) backend overrides these three
    # with collectives; everything else in this class is elementwise and shard-local.
    # ------------------------------------------------------------------------------------
    def tensor_norms(self, tensors) -> torch.Tensor:
        """l2 norm of each tensor, as one 1-D tensor."""
        return torch.stack(torch._foreach_norm(tensors))

    def unit_rows(self, nb, d):
        """l2_col / l2_split: every row block (nb.block_shape) scaled to unit l2 norm."""
        out = _unit_rows(torch.stack(d).view(-1, *nb.block_shape))
        return list(out.reshape(len(d), *nb.shape).unbind(0))

    def orthogonalize(self, group, bucket, nb, d):
        """ns / ns_split: one batched Newton–Schulz over the bucket's stacked (head) blocks."""
        X = torch.stack(d).view(-1, *nb.block_shape)
        coeffs = normalize_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        ns_dtype = ns_work_dtype(group["ns_dtype"], bucket.device, bucket.dtype)
        out = batched_newton_schulz(X.to(ns_dtype), coeffs, group["ns_prescale"], group["ns_eps"])
        return list(out.to(bucket.dtype).reshape(len(d), *nb.shape).unbind(0))
