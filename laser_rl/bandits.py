"""Bandits that pick one reward model (arm) per row of a batch of contexts.

All bandits share one interface, batched over prompts, in torch, on any device:
    select(X [B, d]) -> LongTensor [B]      update(X [B, d], arms [B], rewards [B])
    state_dict() / load_state_dict()
Non-contextual bandits (Exp3, UCB1, random, fixed, round-robin) only use X for its batch size,
so every policy, baselines included, runs through the same selector code.
"""

from __future__ import annotations

import math
import os
from importlib.util import find_spec

import torch
from torch import Tensor


class Bandit:
    """Base class: input checks, a seeded generator and the (de)serialization shared by all policies."""

    learns = True  # False for baselines that ignore feedback (random, fixed, round-robin)
    centered_rewards = False  # True: update() wants rewards centered at 0 instead of in [0, 1]
    min_arms = 2  # choosing needs a choice; only the fixed-arm baseline runs with one RM

    def __init__(self, num_arms: int, dim: int | None = None, seed: int = 0, device: str | torch.device = "cpu"):
        if int(num_arms) < self.min_arms:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_arms} arms (reward models), got {num_arms}")
        self.num_arms = int(num_arms)
        self.dim = dim
        self.device = torch.device(device)
        # Random draws come from a CPU generator so a seed gives the same choices on any device.
        self.generator = torch.Generator().manual_seed(int(seed))
        self.num_updates = 0

    # ----- input checks -------------------------------------------------------------------------
    def _check_contexts(self, X: Tensor, values: bool = True) -> Tensor:
        if not isinstance(X, Tensor) or X.dim() != 2:
            raise ValueError(f"contexts must be a 2-D tensor [batch, dim], got {getattr(X, 'shape', type(X))}")
        if X.shape[0] == 0:
            raise ValueError("empty batch: contexts has 0 rows")
        if self.dim is not None and X.shape[1] != self.dim:
            raise ValueError(f"context dimension mismatch: bandit was built for dim={self.dim}, got {X.shape[1]}")
        if values and not torch.isfinite(X).all():
            raise ValueError("contexts contain NaN or inf")
        return X

    def _check_update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        X = self._check_contexts(X, values=False)
        arms = torch.as_tensor(arms, device=X.device).long().reshape(-1)
        rewards = torch.as_tensor(rewards, device=X.device).reshape(-1)
        if arms.shape[0] != X.shape[0] or rewards.shape[0] != X.shape[0]:
            raise ValueError(
                f"update needs one arm and one reward per context: got {X.shape[0]} contexts, "
                f"{arms.shape[0]} arms, {rewards.shape[0]} rewards"
            )
        # The three value checks in one device-to-host transfer: on a GPU each separate check is a sync.
        finite_x, arms_ok, finite_r = torch.stack([
            torch.isfinite(X).all(), ((arms >= 0) & (arms < self.num_arms)).all(), torch.isfinite(rewards).all(),
        ]).tolist()
        if not finite_x:
            raise ValueError("contexts contain NaN or inf")
        if not arms_ok:
            raise ValueError(f"arm indices must lie in [0, {self.num_arms}), got {arms.unique().tolist()}")
        if not finite_r:
            raise ValueError("rewards contain NaN or inf: drop those rows before updating the bandit")
        return X, arms, rewards

    def _uniform_arms(self, batch_size: int) -> Tensor:
        return torch.randint(self.num_arms, (batch_size,), generator=self.generator).to(self.device)

    # ----- interface ----------------------------------------------------------------------------
    def select(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> None:
        self._check_update(X, arms, rewards)
        self.num_updates += 1

    def _tensors(self) -> dict[str, Tensor]:
        """The learned statistics; subclasses list theirs."""
        return {}

    def state_dict(self) -> dict:
        state = {name: t.detach().cpu().clone() for name, t in self._tensors().items()}
        state.update(
            kind=type(self).__name__,
            num_arms=self.num_arms,
            num_updates=self.num_updates,
            generator=self.generator.get_state(),
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != type(self).__name__ or state.get("num_arms") != self.num_arms:
            raise ValueError(
                f"state is for {state.get('kind')} with {state.get('num_arms')} arms, "
                f"not {type(self).__name__} with {self.num_arms} arms"
            )
        for name, t in self._tensors().items():
            if state[name].shape != t.shape:
                raise ValueError(f"state tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}")
            t.copy_(state[name].to(t.device, t.dtype))
        self.num_updates = int(state["num_updates"])
        self.generator.set_state(state["generator"])


# =================================================================================================
# Contextual: disjoint linear models, one ridge regression per arm
# =================================================================================================


class LinearBandit(Bandit):
    """Disjoint ridge regression per arm: A_k = lam*I + sum x x^T, b_k = sum r x, theta_k = A_k^-1 b_k.

    A_k^-1 is kept up to date with Woodbury (rank-m) updates, so selection never inverts a matrix;
    every `refresh_every` updates of an arm its inverse is recomputed from A_k to stop float32 drift.
    With `discount` < 1 (rewards that drift as the policy trains) old statistics decay by that factor
    at each update call: A_k <- discount*A_k + (1-discount)*lam*I + X^T X (the ridge stays lam), which
    is not a low-rank change, so the inverse is recomputed exactly then: one Cholesky per arm per
    training step, never per selection.

    The ridge prior theta = 0 predicts a reward of 0, so rewards should be centered: the selector
    passes its [0, 1]-normalized reward minus 0.5, which makes an untried arm look average rather
    than worst and lets a small alpha (the paper's 0.1) still explore.

    backend: "torch" runs the code below; "triton" the fused kernels of laser_rl.kernels (scoring with
    the argmax fused in, and one launch per step for every arm's Woodbury update; same results to
    float32 rounding); "auto" takes Triton for float32 state on CUDA when triton is installed.
    """

    centered_rewards = True

    def __init__(
        self,
        num_arms: int,
        dim: int,
        lam: float = 1.0,
        discount: float = 1.0,
        refresh_every: int = 100,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        if int(dim) < 1:
            raise ValueError(f"context dimension must be >= 1, got dim={dim}")
        if lam <= 0:
            raise ValueError(f"ridge lam must be > 0, got {lam}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must lie in (0, 1], got {discount}")
        super().__init__(num_arms, int(dim), seed, device)
        self.lam, self.discount, self.refresh_every, self.dtype = float(lam), float(discount), int(refresh_every), dtype
        self.backend = backend
        self.use_triton = _use_triton(backend, self.device, dtype)
        eye = torch.eye(self.dim, device=self.device, dtype=dtype)
        self.A = (self.lam * eye).repeat(self.num_arms, 1, 1)  # [K, d, d], kept for exact refreshes
        self.A_inv = (eye / self.lam).repeat(self.num_arms, 1, 1)  # [K, d, d]
        self.b = torch.zeros(self.num_arms, self.dim, device=self.device, dtype=dtype)  # [K, d]
        self.theta = torch.zeros_like(self.b)  # [K, d], cached A^-1 b
        self.counts = torch.zeros(self.num_arms, dtype=torch.long, device=self.device)  # rows seen per arm
        self.updates_since_refresh = torch.zeros(self.num_arms, dtype=torch.long, device=self.device)

    def _tensors(self) -> dict[str, Tensor]:
        return {
            "A": self.A, "A_inv": self.A_inv, "b": self.b, "theta": self.theta,
            "counts": self.counts, "updates_since_refresh": self.updates_since_refresh,
        }

    def scores(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """mean [B, K] = x . theta_k and width [B, K] = sqrt(x^T A_k^-1 x) (without alpha)."""
        if self.use_triton:
            mean, width, _, _ = self._triton_scores(X)
            return mean, width
        return ridge_scores(self._check_contexts(X).to(self.device, self.dtype), self.theta, self.A_inv)

    def update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> None:
        X, arms, rewards = self._check_update(X, arms, rewards)
        # bf16 hidden states stay bf16 on the Triton path: its kernels upcast as they load.
        X = X.to(self.device) if self.use_triton else X.to(self.device, self.dtype)
        arms, rewards = arms.to(self.device), rewards.to(self.device, self.dtype)
        # index_add_ rather than bincount: on a GPU, bincount syncs to size its output.
        rows = torch.zeros(self.num_arms, dtype=torch.long, device=self.device).index_add_(0, arms, torch.ones_like(arms))
        self.counts += rows
        self.updates_since_refresh += rows > 0
        if self.discount < 1.0:  # A changes by more than X^T X: every arm's inverse is recomputed
            eye = torch.eye(self.dim, device=self.device, dtype=self.dtype)
            self.A.mul_(self.discount).add_((1 - self.discount) * self.lam * eye)
            self.b.mul_(self.discount)
            refresh = torch.ones(self.num_arms, dtype=torch.bool, device=self.device)
            linear_update_torch(self.A, self.A_inv, self.b, self.theta, X, arms, rewards, refresh)
            for k in (rows == 0).nonzero().flatten().tolist():  # the arms without rows decayed too
                self.A_inv[k] = spd_inverse(self.A[k])
                self.theta[k] = self.A_inv[k] @ self.b[k]
            self.updates_since_refresh.zero_()
        else:
            # An exact inverse every refresh_every updates of an arm, or when the batch gives it so many rows that
            # inverting is cheaper than Woodbury; the update adds the arms whose Woodbury factor failed.
            refresh = (rows > 0) & ((rows >= self.dim) | (self.updates_since_refresh >= self.refresh_every))
            if self.use_triton:
                from laser_rl.kernels import linear_update
            else:
                linear_update = linear_update_torch
            refreshed = linear_update(self.A, self.A_inv, self.b, self.theta, X, arms, rewards, refresh)
            self.updates_since_refresh[refreshed] = 0
        self.num_updates += 1

    def _argmax(self, values: Tensor, best: Tensor | None = None) -> Tensor:
        """Row-wise argmax [B] of values [B, K]; exact ties go to a uniformly random tied arm.

        Ties are exact when arms share their statistics, e.g. all at the prior on the first batch: a plain
        argmax would send every prompt to arm 0, and one bad first batch can lock that arm out for good.
        Rows without ties keep `best` (default: the plain argmax; the Triton path passes its fused argmax),
        and the generator is only drawn from when a tie occurs.
        """
        best = values.argmax(dim=1) if best is None else best
        tied = values == values.gather(1, best[:, None])
        if not bool((tied.sum(dim=1) > 1).any()):
            return best
        draws = torch.rand(values.shape, generator=self.generator, dtype=torch.float64).to(values.device)
        return (draws + 2.0 * tied).argmax(dim=1)  # draws < 1, so only tied arms can win

    # ----- Triton path (laser_rl.kernels) ---------------------------------------------------------
    def _triton_scores(self, X: Tensor, coef: float = 0.0, thompson: bool = False) -> tuple[Tensor, ...]:
        """(mean, width, arms, chosen width) from the fused kernel; Thompson noise drawn as in the torch path."""
        from laser_rl.kernels import score_select

        X = self._check_contexts(X).to(self.device)  # bf16 hidden states stay bf16: the kernel upcasts on load
        noise = None
        if thompson:
            noise = torch.randn((X.shape[0], self.num_arms), generator=self.generator, dtype=torch.float64)
            noise = noise.to(self.device, self.dtype)
        return score_select(X, self.theta, self.A_inv, coef, noise)


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve a LinearBandit backend: True when the Triton kernels (laser_rl.kernels) do the work."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    if backend == "torch":
        return False
    installed = find_spec("triton") is not None and find_spec("laser_rl.kernels") is not None
    if backend == "auto":
        return installed and device.type == "cuda" and dtype == torch.float32
    if not installed:
        raise ValueError("backend='triton' needs triton and laser_rl.kernels: pip install -e '.[kernels]'")
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")
    if device.type != "cuda" and not interpret:
        raise ValueError(
            f"backend='triton' runs on CUDA; on {device} it needs TRITON_INTERPRET=1 (set before triton is imported)"
        )
    if dtype != torch.float32:
        raise ValueError(f"backend='triton' keeps float32 statistics, got dtype={dtype}; use backend='torch'")
    return True


def ridge_scores(X: Tensor, theta: Tensor, A_inv: Tensor) -> tuple[Tensor, Tensor]:
    """mean [B, K] = X theta_k and width [B, K] = sqrt(x^T A_k^-1 x) for contexts X [B, d], theta [K, d],
    A_inv [K, d, d]: one batched matmul, O(K B d^2), with a B x K x d intermediate (the Triton kernel avoids it)."""
    mean = X @ theta.T
    quad = torch.einsum("kbd,bd->bk", torch.matmul(X.unsqueeze(0), A_inv), X)
    return mean, quad.clamp_min(0).sqrt()


def spd_inverse(A: Tensor) -> Tensor:
    """The exact inverse of a symmetric positive definite A through its Cholesky factor: how every path
    recomputes an arm's A^-1 from A (periodic refreshes, discounting, a drifted Woodbury inverse)."""
    return torch.cholesky_inverse(torch.linalg.cholesky(A))


def woodbury_update(A_inv: Tensor, X: Tensor) -> bool:
    """(A + X^T X)^-1 from A^-1 for m new rows X [m, d], in place: O(m d^2 + m^3) instead of O(d^3).

    (A + X^T X)^-1 = A^-1 - W^T W with W = L^-1 X A^-1 and L L^T = I_m + X A^-1 X^T (for m = 1 this
    is Sherman-Morrison). Writing the correction as W^T W keeps it symmetric without an extra pass.
    Returns False, with A_inv untouched, when I + X A^-1 X^T is not positive definite: float32 drift has
    made A^-1 indefinite, and the caller recomputes it from A instead.
    """
    U = X @ A_inv  # [m, d] = X A^-1 (A^-1 is symmetric)
    L, info = torch.linalg.cholesky_ex(torch.eye(X.shape[0], device=X.device, dtype=X.dtype) + U @ X.T)
    if int(info) != 0:
        return False
    W = torch.linalg.solve_triangular(L, U, upper=False)  # [m, d]
    A_inv.addmm_(W.T, W, alpha=-1)
    return True


def linear_update_torch(
    A: Tensor,
    A_inv: Tensor,
    b: Tensor,
    theta: Tensor,
    X: Tensor,
    arms: Tensor,
    rewards: Tensor,
    refresh: Tensor,
    *,
    precision: str | None = None,
) -> Tensor:
    """Add rows X [B, d] with rewards [B] to the arms `arms` [B] of a disjoint ridge state, in place, arm by arm:
    A_k += X_k^T X_k, b_k += X_k^T r_k, A_k^-1 by Woodbury (exactly, by Cholesky, where refresh [K] is set),
    theta_k = A_k^-1 b_k. Arms without a row are untouched.

    Returns [K] bool: the arms whose inverse was recomputed exactly (flagged ones, and those whose Woodbury
    factor was not positive definite). laser_rl.kernels.linear_update does the same in a few launches;
    precision is accepted for its signature and ignored.
    """
    X, rewards = X.to(A.dtype), rewards.to(A.dtype)
    refreshed = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    for k in arms.unique().tolist():
        rows = arms == k
        X_k, r_k = X[rows], rewards[rows]
        A[k].addmm_(X_k.T, X_k)
        b[k] += X_k.T @ r_k
        if bool(refresh[k]) or not woodbury_update(A_inv[k], X_k):
            A_inv[k] = spd_inverse(A[k])
            refreshed[k] = True
        theta[k] = A_inv[k] @ b[k]
    return refreshed


class LinUCB(LinearBandit):
    """Disjoint LinUCB (Li et al. 2010), the paper's bandit: argmax_k theta_k . x + alpha * sqrt(x^T A_k^-1 x)."""

    def __init__(self, num_arms: int, dim: int, alpha: float = 0.1, lam: float = 1.0, **kwargs):
        super().__init__(num_arms, dim, lam=lam, **kwargs)
        self.alpha = float(alpha)
        self.last_width: Tensor | None = None  # width of the chosen arm at the last selection, for metrics

    def select(self, X: Tensor) -> Tensor:
        if self.use_triton:  # scores, argmax and the chosen width in one fused pass
            mean, width, arms, _ = self._triton_scores(X, self.alpha)
            arms = self._argmax(mean + self.alpha * width, best=arms)
        else:
            mean, width = self.scores(X)
            arms = self._argmax(mean + self.alpha * width)
        self.last_width = width.gather(1, arms[:, None]).squeeze(1)
        return arms


class LinearThompson(LinearBandit):
    """Linear Thompson sampling: theta_k ~ N(theta_hat_k, v^2 A_k^-1), one draw per prompt.

    For one context x, x . theta_k is N(x . theta_hat_k, v^2 x^T A_k^-1 x), so a per-prompt draw needs
    only the LinUCB mean and width, never a d x d Cholesky factor.
    """

    def __init__(self, num_arms: int, dim: int, v: float = 0.1, lam: float = 1.0, **kwargs):
        super().__init__(num_arms, dim, lam=lam, **kwargs)
        self.v = float(v)
        self.last_width: Tensor | None = None

    def select(self, X: Tensor) -> Tensor:
        if self.use_triton:  # the same draws, then scores and the sampled argmax in one fused pass
            _, _, arms, self.last_width = self._triton_scores(X, self.v, thompson=True)
            return arms
        mean, width = self.scores(X)
        noise = torch.randn(mean.shape, generator=self.generator, dtype=torch.float64).to(mean)
        arms = (mean + self.v * width * noise).argmax(dim=1)
        self.last_width = width.gather(1, arms[:, None]).squeeze(1)
        return arms


class LinearEpsilonGreedy(LinearBandit):
    """Greedy on the ridge estimate, a uniformly random arm with probability epsilon."""

    def __init__(self, num_arms: int, dim: int, epsilon: float = 0.1, lam: float = 1.0, **kwargs):
        if not 0 <= epsilon <= 1:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        super().__init__(num_arms, dim, lam=lam, **kwargs)
        self.epsilon = float(epsilon)

    def select(self, X: Tensor) -> Tensor:
        mean, _ = self.scores(X)
        greedy = self._argmax(mean)
        explore = (torch.rand(X.shape[0], generator=self.generator) < self.epsilon).to(greedy.device)
        return torch.where(explore, self._uniform_arms(X.shape[0]), greedy)


# =================================================================================================
# Non-contextual bandits and baselines
# =================================================================================================


class Exp3(Bandit):
    """Exp3 (Auer et al. 2002), the paper's non-contextual bandit in its noisy-reward ablation.

    Rewards must lie in [0, 1] (the selector's quantile normalization guarantees it). Each row draws
    its own arm from p = (1 - gamma) * w / sum(w) + gamma / K; updates use importance weighting.
    """

    def __init__(self, num_arms: int, dim: int | None = None, gamma: float = 0.1, discount: float = 1.0, **kwargs):
        if not 0 < gamma <= 1:
            raise ValueError(f"Exp3 gamma must lie in (0, 1], got {gamma}")
        super().__init__(num_arms, dim, **kwargs)
        self.gamma, self.discount = float(gamma), float(discount)
        self.log_weights = torch.zeros(self.num_arms, dtype=torch.float64)

    def _tensors(self) -> dict[str, Tensor]:
        return {"log_weights": self.log_weights}

    def probabilities(self) -> Tensor:
        w = torch.softmax(self.log_weights, dim=0)
        return (1 - self.gamma) * w + self.gamma / self.num_arms

    def select(self, X: Tensor) -> Tensor:
        X = self._check_contexts(X)
        return torch.multinomial(self.probabilities(), X.shape[0], replacement=True, generator=self.generator).to(self.device)

    def update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> None:
        X, arms, rewards = self._check_update(X, arms, rewards)
        if ((rewards < 0) | (rewards > 1)).any():
            raise ValueError("Exp3 needs rewards in [0, 1]; normalize them first")
        p = self.probabilities()
        estimate = torch.zeros(self.num_arms, dtype=torch.float64)
        estimate.index_add_(0, arms.cpu(), rewards.cpu().double() / p[arms.cpu()])
        # Average over the batch so the learning rate does not scale with the batch size.
        self.log_weights = self.discount * self.log_weights + self.gamma * estimate / (self.num_arms * X.shape[0])
        self.log_weights -= self.log_weights.max()  # only differences matter; keeps exp() finite forever
        self.num_updates += 1


class UCB1(Bandit):
    """UCB1 (Auer et al. 2002): argmax mean_k + c * sqrt(2 ln t / n_k); untried arms first."""

    def __init__(self, num_arms: int, dim: int | None = None, c: float = 1.0, discount: float = 1.0, **kwargs):
        super().__init__(num_arms, dim, **kwargs)
        self.c, self.discount = float(c), float(discount)
        self.counts = torch.zeros(self.num_arms, dtype=torch.float64)
        self.sums = torch.zeros(self.num_arms, dtype=torch.float64)

    def _tensors(self) -> dict[str, Tensor]:
        return {"counts": self.counts, "sums": self.sums}

    def select(self, X: Tensor) -> Tensor:
        X = self._check_contexts(X)
        if (self.counts == 0).any():
            arm = int((self.counts == 0).nonzero()[0])
        else:
            bonus = self.c * torch.sqrt(2 * math.log(self.counts.sum().item()) / self.counts)
            arm = int((self.sums / self.counts + bonus).argmax())
        return torch.full((X.shape[0],), arm, dtype=torch.long, device=self.device)

    def update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> None:
        X, arms, rewards = self._check_update(X, arms, rewards)
        self.counts.mul_(self.discount).index_add_(0, arms.cpu(), torch.ones(len(arms), dtype=torch.float64))
        self.sums.mul_(self.discount).index_add_(0, arms.cpu(), rewards.cpu().double())
        self.num_updates += 1


class RandomArm(Bandit):
    """Baseline: a uniformly random arm per row (the paper's random RM, per batch when the selector says so)."""

    learns = False

    def select(self, X: Tensor) -> Tensor:
        return self._uniform_arms(self._check_contexts(X).shape[0])


class FixedArm(Bandit):
    """Baseline: always the same arm (single RM)."""

    learns = False
    min_arms = 1

    def __init__(self, num_arms: int, dim: int | None = None, arm: int = 0, **kwargs):
        super().__init__(num_arms, dim, **kwargs)
        if not 0 <= arm < self.num_arms:
            raise ValueError(f"fixed arm {arm} out of range for {self.num_arms} arms")
        self.arm = int(arm)

    def select(self, X: Tensor) -> Tensor:
        return torch.full((self._check_contexts(X).shape[0],), self.arm, dtype=torch.long, device=self.device)


class RoundRobin(Bandit):
    """Baseline: the paper's sequential RMs; each select() call (one batch) uses the next arm in turn."""

    learns = False

    def __init__(self, num_arms: int, dim: int | None = None, **kwargs):
        super().__init__(num_arms, dim, **kwargs)
        self.turn = torch.zeros((), dtype=torch.long)

    def _tensors(self) -> dict[str, Tensor]:
        return {"turn": self.turn}

    def select(self, X: Tensor) -> Tensor:
        arm = int(self.turn) % self.num_arms
        self.turn += 1
        return torch.full((self._check_contexts(X).shape[0],), arm, dtype=torch.long, device=self.device)


BANDITS: dict[str, type[Bandit]] = {
    "linucb": LinUCB,
    "thompson": LinearThompson,
    "epsilon_greedy": LinearEpsilonGreedy,
    "exp3": Exp3,
    "ucb1": UCB1,
    "random": RandomArm,
    "fixed": FixedArm,
    "round_robin": RoundRobin,
}


def make_bandit(name: str, num_arms: int, dim: int, **kwargs) -> Bandit:
    """Build a bandit by name; kwargs that the chosen policy does not take are an error, not ignored."""
    if name not in BANDITS:
        raise ValueError(f"unknown bandit {name!r}; choose one of {sorted(BANDITS)}")
    return BANDITS[name](num_arms, dim, **kwargs)
