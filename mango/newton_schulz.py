"""Newton–Schulz, written to be read: the textbook and the Gram form of the same polynomial,
and their FLOP counts (which form and dtype a bucket runs in is mango.ns_engine's choice).

Every step of Newton–Schulz applies one odd polynomial to the singular values:

    textbook   A = X·Xᵀ,  B = b·A + c·A²,  X ← a·X + B·X                     (X is m×n, m ≤ n)

After k steps X_k = Q_k·X_0, with Q_k a polynomial in the Gram matrix R = X_0·X_0ᵀ; all these
m×m matrices commute. So the iteration can run on m×m matrices and touch X only to form R and,
at the end, Q·X:

    gram       R = X·Xᵀ, Q = I
               each step:  Z = b·R + c·R²,  P = a·I + Z,  Q ← Q·P,  R ← P·R·P   (= X_{k+1}X_{k+1}ᵀ)
               at a restart (steps in `gram_restarts`):  X ← Q·X, R = X·Xᵀ, Q = I
               X ← Q·X

For a wide matrix (m ≪ n: MLP weights 768×3072, a vocabulary head, attention head blocks 64×768)
that is ~1.5–4× fewer FLOPs; for a square one it is more, so "auto" picks per shape (mango.ns_engine). In exact
arithmetic both give the same X; in floating point R carries σ² where X carries σ, so the Gram
form loses precision faster: it restarts every 3 steps from step 2 (the Gram Newton–Schulz
literature restarts at step 2 of 5), and in 16 bits it runs in float16 (10 mantissa bits) rather
than bfloat16 (7), which holds the m×m iterates about as accurately as bf16 holds X in the
textbook form. `mango.backends` runs the same two forms batched and in place; tests compare them
with these functions in float64.
"""

from __future__ import annotations

import torch

__all__ = [
    "spectral_norm",
    "prescale",
    "textbook",
    "gram",
    "newton_schulz",
    "gram_restarts",
    "textbook_step_flops",
    "textbook_flops",
    "gram_flops",
    "flops",
]


def gram_restarts(steps: int) -> tuple[int, ...]:
    """Steps before which the Gram form recomputes X = Q·X and R: 2, 5, 8, ..."""
    return tuple(range(2, steps, 3))


def spectral_norm(X: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a (..., r, c) batch (exact, via SVD; 16-bit
    matrices in float64), in X's dtype."""
    return torch.linalg.matrix_norm(X.to(torch.float64) if X.dtype in (torch.bfloat16, torch.float16) else X, ord=2).to(X.dtype)


def prescale(X: torch.Tensor, how: str = "frobenius", eps: float = 1e-7) -> torch.Tensor:
    """X / max(‖X‖, eps) per matrix of a (..., m, n) batch: singular values into [0, 1]."""
    if how == "frobenius":
        scale = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    elif how == "spectral":
        scale = spectral_norm(X)[..., None, None]
    else:
        raise ValueError(f"mango: invalid ns_prescale={how!r}")
    return X / scale.clamp_min(eps)


def textbook(X: torch.Tensor, coefficients) -> torch.Tensor:
    """The textbook iteration on a pre-scaled (..., m, n) batch with m ≤ n."""
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def gram(X: torch.Tensor, coefficients, restarts=None) -> torch.Tensor:
    """The Gram form on a pre-scaled (..., m, n) batch with m ≤ n (same polynomial as `textbook`)."""
    steps = len(coefficients)
    restarts = gram_restarts(steps) if restarts is None else tuple(restarts)
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    R, Q = X @ X.mT, None
    for k, (a, b, c) in enumerate(coefficients):
        if k in restarts and Q is not None:
            X = Q @ X
            R, Q = X @ X.mT, None
        Z = b * R + c * (R @ R)
        P = a * eye + Z
        Q = P if Q is None else Q @ P
        if k + 1 < steps and k + 1 not in restarts:
            R = P @ R @ P
    return X if Q is None else Q @ X


def newton_schulz(X: torch.Tensor, coefficients, how: str = "frobenius", eps: float = 1e-7, method: str = "textbook") -> torch.Tensor:
    """Orthogonalize every (m, n) matrix of a (..., m, n) batch, in X's dtype: pre-scale, then the
    textbook or Gram iteration on the wide orientation (Xᵀ when m > n)."""
    tall = X.shape[-2] > X.shape[-1]
    Y = prescale(X.mT if tall else X, how, eps)
    Y = gram(Y, coefficients) if method == "gram" else textbook(Y, coefficients)
    return Y.mT if tall else Y


# ----------------------------------------------------------------------------------------
# cost and choice
# ----------------------------------------------------------------------------------------


def textbook_step_flops(m: int, n: int, symmetric: bool = False) -> int:
    """FLOPs of one textbook step on an m×n X whose Gram matrix A = X·Xᵀ is m×m (2 per multiply-add):
    A, A·A and B·X; `symmetric`: A and B counted on one triangle (the least work a step needs)."""
    if symmetric:
        return m * (m + 1) * n + m * m * (m + 1) + 2 * m * m * n
    return 4 * m * m * n + 2 * m**3


def textbook_flops(rows: int, cols: int, steps: int, symmetric: bool = False) -> int:
    """FLOPs of the textbook form on one matrix, used in its wide orientation (2 per multiply-add)."""
    return steps * textbook_step_flops(min(rows, cols), max(rows, cols), symmetric)


def gram_flops(rows: int, cols: int, steps: int, restarts=None) -> int:
    """FLOPs of the Gram form on one matrix, counting exactly the products `gram` performs."""
    m, n = min(rows, cols), max(rows, cols)
    if steps == 0:
        return 0
    restarts = gram_restarts(steps) if restarts is None else tuple(restarts)
    big, small = 2 * m * m * n, 2 * m**3  # X·Xᵀ or Q·X;  one m×m product
    total = big  # R = X·Xᵀ
    fresh = True  # Q is I
    for k in range(steps):
        if k in restarts and not fresh:
            total += 2 * big
            fresh = True
        total += small  # R²
        if not fresh:
            total += small  # Q·P
        fresh = False
        if k + 1 < steps and k + 1 not in restarts:
            total += 2 * small  # P·R·P
    return total + big  # Q·X


def flops(method: str, rows: int, cols: int, steps: int) -> int:
    """FLOPs of the `method` form ("textbook" or "gram") on one matrix."""
    return gram_flops(rows, cols, steps) if method == "gram" else textbook_flops(rows, cols, steps)
