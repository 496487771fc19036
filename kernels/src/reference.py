"""Plain torch references for the Triton kernels, with the same signatures and contracts.

They are the core's own code (laser_rl.bandits: `ridge_scores`, `linear_update_torch`), so `backend="torch"`
computes exactly what they compute; they run on any device, and the tests check both paths against float64.
"""

from __future__ import annotations

import torch

from laser_rl.bandits import linear_update_torch, ridge_scores

__all__ = ["linear_update_torch", "score_select_torch"]


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
    mean, width = ridge_scores(X.to(theta.dtype), theta, A_inv)
    score = mean + coef * width * noise.to(mean) if noise is not None else mean + coef * width
    arms = score.argmax(dim=1)
    chosen = width.gather(1, arms[:, None]).squeeze(1)
    result = (mean, width, arms, chosen)
    if out is not None:
        for dst, src in zip(out, result):
            dst.copy_(src)
        return out
    return result
