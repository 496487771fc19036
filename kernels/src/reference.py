"""Plain torch references for the Triton kernels, with the same signatures and contracts.

They mirror the core (laser_rl.bandits.LinearBandit.scores / LinUCB.select / LinearBandit.update) operation for
operation, run on any device, and are what `backend="torch"` computes; the tests check both against float64.
"""

from __future__ import annotations

import torch

from laser_rl.bandits import woodbury_update


def score_select_torch(
    X: torch.Tensor,
    theta: torch.Tensor,
    A_inv: torch.Tensor,
    coef: float = 0.0,
    noise: torch.Tensor | None = None,
    *,
    precision: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means [B, K], widths [B, K], chosen arms [B] and their widths [B]; see scoring.score_select.

    precision is accepted for a common signature and ignored: torch's float32 matmul settings apply.
    """
    X = X.to(theta.dtype)
    mean = X @ theta.T
    # B x K x d intermediate: the memory traffic the fused kernel avoids.
    quad = torch.einsum("kbd,bd->bk", torch.matmul(X.unsqueeze(0), A_inv), X)
    width = quad.clamp_min(0).sqrt()
    score = mean + coef * width * noise.to(mean) if noise is not None else mean + coef * width
    arms = score.argmax(dim=1)
    chosen = width.gather(1, arms[:, None]).squeeze(1)
    result = (mean, width, arms, chosen)
    if out is not None:
        for dst, src in zip(out, result):
            dst.copy_(src)
        return out
    return result


def linear_update_torch(
    A: torch.Tensor,
    A_inv: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    X: torch.Tensor,
    arms: torch.Tensor,
    rewards: torch.Tensor,
    refresh: torch.Tensor,
    *,
    precision: str | None = None,
) -> None:
    """In-place A += X^T X, b += X^T r, A^-1 by Woodbury (or exactly where `refresh`), theta = A^-1 b, per arm.

    The core's per-arm loop; precision is accepted for a common signature and ignored.
    """
    X, rewards = X.to(A.dtype), rewards.to(A.dtype)
    for k in arms.unique().tolist():
        rows = arms == k
        X_k, r_k = X[rows], rewards[rows]
        A[k].addmm_(X_k.T, X_k)
        b[k] += X_k.T @ r_k
        if bool(refresh[k]):
            A_inv[k] = torch.cholesky_inverse(torch.linalg.cholesky(A[k]))
        else:
            woodbury_update(A_inv[k], X_k)
        theta[k] = A_inv[k] @ b[k]
