"""A synthetic contextual problem where per-prompt reward-model selection matters.

Contexts come from `num_arms - 1` clusters (think: math, logic, writing prompts). Arm k is the best
reward model on cluster k; the last arm is pure noise (its reward ignores the context). Expected
rewards are linear in the context, so a linear bandit can learn them exactly. Shared by the tests
and `benchmarks/bandit_regret.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ClusteredRewardProblem:
    def __init__(
        self,
        num_arms: int = 4,
        dim: int = 16,
        best: float = 0.8,
        other: float = 0.3,
        noise_arm_mean: float = 0.5,
        reward_noise: float = 0.1,
        context_noise: float = 0.1,
        seed: int = 0,
    ):
        if num_arms < 3:
            raise ValueError("the problem needs at least two cluster arms and one noise arm")
        if dim < num_arms:
            raise ValueError(f"dim must be >= num_arms, got dim={dim}, num_arms={num_arms}")
        self.num_arms, self.num_clusters, self.dim = num_arms, num_arms - 1, dim
        self.noise_arm = num_arms - 1
        self.reward_noise, self.context_noise = reward_noise, context_noise
        self.generator = torch.Generator().manual_seed(seed)
        # Orthonormal cluster directions in the first dim-1 coordinates; the last coordinate is a bias of 1.
        q, _ = torch.linalg.qr(torch.randn(dim - 1, dim - 1, generator=self.generator, dtype=torch.float64))
        self.centers = q[:, : self.num_clusters].T  # [C, dim-1]
        # True linear reward weights: w_k . x = best on cluster k, other elsewhere (up to context noise).
        weights = torch.zeros(num_arms, dim, dtype=torch.float64)
        weights[: self.num_clusters, :-1] = (best - other) * self.centers
        weights[: self.num_clusters, -1] = other
        weights[self.noise_arm, -1] = noise_arm_mean
        self.weights = weights

    def contexts(self, batch_size: int, cluster: int | None = None) -> tuple[Tensor, Tensor]:
        """A batch of contexts [B, dim] (float64) and their cluster ids [B]; mixed unless `cluster` is given."""
        if cluster is None:
            clusters = torch.randint(self.num_clusters, (batch_size,), generator=self.generator)
        else:
            clusters = torch.full((batch_size,), cluster, dtype=torch.long)
        noise = torch.randn(batch_size, self.dim - 1, generator=self.generator, dtype=torch.float64)
        X = torch.ones(batch_size, self.dim, dtype=torch.float64)
        X[:, :-1] = self.centers[clusters] + self.context_noise * noise / (self.dim - 1) ** 0.5
        return X, clusters

    def expected_rewards(self, X: Tensor) -> Tensor:
        """[B, K] expected reward of every arm on every context."""
        return X.double() @ self.weights.T

    def rewards(self, X: Tensor, arms: Tensor) -> Tensor:
        """Sampled rewards [B] of the chosen arms; the noise arm's reward is uniform on [0, 2*mean]."""
        mean = self.expected_rewards(X).gather(1, arms.cpu()[:, None]).squeeze(1)
        gaussian = self.reward_noise * torch.randn(len(arms), generator=self.generator, dtype=torch.float64)
        uniform = (torch.rand(len(arms), generator=self.generator, dtype=torch.float64) - 0.5) * 2 * self.weights[self.noise_arm, -1]
        return torch.where(arms.cpu() == self.noise_arm, mean + uniform, mean + gaussian)

    def regret(self, X: Tensor, arms: Tensor) -> Tensor:
        """Per-row regret [B]: best expected reward minus the chosen arm's."""
        expected = self.expected_rewards(X)
        return expected.max(dim=1).values - expected.gather(1, arms.cpu()[:, None]).squeeze(1)
