"""Bandits that pick one reward model (arm) per row of a batch of contexts.

All bandits share one interface, batched over prompts, in torch, on any device:
    select(X [B, d]) -> LongTensor [B]      update(X [B, d], arms [B], rewards [B])
    state_dict() / load_state_dict()
Non-contextual bandits (Exp3, UCB1, random, fixed, round-robin) only use X for its batch size,
so every policy, baselines included, runs through the same selector code.

Every public method checks its inputs before it changes anything: a call that raises leaves the
bandit exactly as it was (its tensors, counters and random generator).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from typing import NamedTuple

import torch
from torch import Tensor


def _check_knob(owner: str, name: str, value: float, low: float = 0.0) -> float:
    """A finite number >= low as a float, or a ValueError naming the knob (NaN, inf, None and strings included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{owner} {name} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


class Bandit:
    """Base class: input checks, a seeded generator and the (de)serialization shared by all policies."""

    learns = True  # False for baselines that ignore feedback (random, fixed, round-robin)
    centered_rewards = False  # True: update() wants rewards centered at 0 instead of in [0, 1]
    min_arms = 2  # choosing needs a choice; only the fixed-arm baseline runs with one RM
    optional_state = frozenset()  # state_dict tensors that older checkpoints lack (loaded as zeros)

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
        if X.is_complex():
            raise ValueError(f"contexts must be real numbers, got {X.dtype}")
        if values and not torch.isfinite(X).all():
            raise ValueError("contexts contain NaN or inf")
        return X

    def _check_update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        X = self._check_contexts(X, values=False)
        arms = torch.as_tensor(arms, device=X.device)
        if arms.is_floating_point() or arms.is_complex() or arms.dtype == torch.bool:
            raise ValueError(f"arm indices must be integers, got {arms.dtype}")
        arms = arms.long().reshape(-1)
        rewards = torch.as_tensor(rewards, device=X.device)
        if rewards.is_complex():
            raise ValueError(f"rewards must be real numbers, got {rewards.dtype}")
        rewards = rewards.reshape(-1)
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

    def _settings(self) -> dict[str, float | int]:
        """Constructor settings that give the statistics their meaning: a state saved under others cannot load."""
        return {}

    def state_dict(self) -> dict:
        state = {name: t.detach().cpu().clone() for name, t in self._tensors().items()}
        state.update(
            self._settings(),
            kind=type(self).__name__,
            num_arms=self.num_arms,
            num_updates=self.num_updates,
            generator=self.generator.get_state(),
        )
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Load a state_dict(); every entry is checked before anything is copied, so a bad state changes nothing."""
        if not isinstance(state, Mapping):
            raise ValueError(f"bandit state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("kind") != type(self).__name__ or state.get("num_arms") != self.num_arms:
            raise ValueError(
                f"state is for {state.get('kind')} with {state.get('num_arms')} arms, "
                f"not {type(self).__name__} with {self.num_arms} arms"
            )
        for name, value in self._settings().items():  # older states without the setting are not checked
            if name in state and state[name] != value:
                raise ValueError(f"state was saved with {name}={state[name]}, this {type(self).__name__} has {name}={value}")
        staged = {}
        for name, t in self._tensors().items():
            if name not in state and name in self.optional_state:
                staged[name] = torch.zeros_like(t)
                continue
            saved = state.get(name)
            if not isinstance(saved, Tensor):
                raise ValueError(f"state has no tensor {name!r} (got {type(saved).__name__})")
            if saved.shape != t.shape:
                raise ValueError(f"state tensor {name!r} has shape {tuple(saved.shape)}, expected {tuple(t.shape)}")
            if saved.is_floating_point() and not torch.isfinite(saved).all():
                raise ValueError(f"state tensor {name!r} contains NaN or inf")
            staged[name] = saved.to(t.device, t.dtype)
        num_updates = state.get("num_updates")
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"state has num_updates={num_updates!r}, expected an int >= 0")
        try:  # on a scratch generator first: set_state raises on a malformed state
            torch.Generator().set_state(state.get("generator"))
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"state has an invalid random generator state: {exc}") from None
        for name, t in self._tensors().items():  # commit
            t.copy_(staged[name])
        self.num_updates = num_updates
        self.generator.set_state(state["generator"])


# =================================================================================================
# Contextual: disjoint linear models, one ridge regression per arm
# =================================================================================================

# The functions a LinearBandit computes with, picked once per bandit (see LinearBandit, `backend`):
#   score_select(X, theta, A_inv, coef, noise) -> (mean [B, K], width [B, K], argmax arms [B], chosen width [B])
#   linear_update(A, A_inv, b, theta, X, arms, rewards, refresh, *, floor) -> (refreshed [K], repaired [K])
ScoreSelect = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
LinearUpdate = Callable[..., tuple[Tensor, Tensor]]


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

    Contexts: any finite real tensor. The CLI and the integrations pass L2-normalized contexts
    (ContextEncoder), the scale the defaults (lam = 1, alpha = 0.1) are meant for. A row whose norm
    exceeds `max_norm` (default 1e6) is scaled down to norm `max_norm`, the same way in select() and
    update(), so float32 x x^T can never overflow; `clipped_rows` counts the rows learned that way.

    Numerics: with large or low-rank contexts (norms in the hundreds and up) a float32 A_k loses its
    ridge to rounding and stops being numerically positive definite. An inverse recomputed from such
    an A_k falls back to float64, then to A_k's float64 eigenvalues floored at lam (true A_k >= lam*I
    always); a Woodbury factor that is not positive definite falls back to that recomputation. Each
    fallback is counted in `repairs` (for the selector's metrics, saved in state_dict); update() never
    raises once its checks have passed. A float32 state that needed a repair cannot hold its statistics
    any more (its A^-1 loses the small eigenvalues to rounding, and choices turn to noise): it moves to
    float64 for good, on the torch backend, with a RuntimeWarning (state_dict() then saves float64, and
    load_state_dict() resumes in float64).

    backend: "torch" runs the torch functions of this module; "triton" the fused kernels of laser_rl.kernels
    (scoring with the argmax fused in, and one launch per step for every arm's Woodbury update; same results to
    float32 rounding); "auto" takes Triton for float32 state on CUDA when triton is installed. The pair of
    functions is picked once, here: select() and update() have one code path for both backends.
    """

    centered_rewards = True
    optional_state = frozenset({"repairs", "clipped_rows"})

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
        max_norm: float = 1e6,
    ):
        if int(dim) < 1:
            raise ValueError(f"context dimension must be >= 1, got dim={dim}")
        if _check_knob("LinearBandit", "lam (ridge)", lam) <= 0:
            raise ValueError(f"LinearBandit lam (ridge) must be > 0, got {lam}")
        if not 0 < discount <= 1:  # NaN fails this too
            raise ValueError(f"discount must lie in (0, 1], got {discount}")
        if int(refresh_every) < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if _check_knob("LinearBandit", "max_norm", max_norm) <= 0:
            raise ValueError(f"LinearBandit max_norm must be > 0, got {max_norm}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"LinearBandit keeps float32 or float64 statistics, got dtype={dtype}")
        super().__init__(num_arms, int(dim), seed, device)
        self.lam, self.discount, self.refresh_every, self.dtype = float(lam), float(discount), int(refresh_every), dtype
        self.max_norm = float(max_norm)
        self.backend = backend
        self.use_triton = _use_triton(backend, self.device, dtype)
        self._score_select, self._linear_update = _backend_functions(self.use_triton)
        eye = torch.eye(self.dim, device=self.device, dtype=dtype)
        self.A = (self.lam * eye).repeat(self.num_arms, 1, 1)  # [K, d, d], kept for exact refreshes
        self.A_inv = (eye / self.lam).repeat(self.num_arms, 1, 1)  # [K, d, d]
        self.b = torch.zeros(self.num_arms, self.dim, device=self.device, dtype=dtype)  # [K, d]
        self.theta = torch.zeros_like(self.b)  # [K, d], cached A^-1 b
        self.counts = torch.zeros(self.num_arms, dtype=torch.long, device=self.device)  # rows seen per arm
        self.updates_since_refresh = torch.zeros(self.num_arms, dtype=torch.long, device=self.device)
        # Counters kept on the device (adding to them never syncs with the host); read them as ints below.
        self._repairs = torch.zeros((), dtype=torch.long, device=self.device)
        self._clipped_rows = torch.zeros((), dtype=torch.long, device=self.device)

    @property
    def repairs(self) -> int:
        """Inverses that float32 arithmetic could not give and that were recovered (see the class docstring)."""
        return int(self._repairs)

    @property
    def clipped_rows(self) -> int:
        """Rows learned from whose context norm exceeded max_norm (scaled down to it)."""
        return int(self._clipped_rows)

    def _tensors(self) -> dict[str, Tensor]:
        return {
            "A": self.A, "A_inv": self.A_inv, "b": self.b, "theta": self.theta,
            "counts": self.counts, "updates_since_refresh": self.updates_since_refresh,
            "repairs": self._repairs, "clipped_rows": self._clipped_rows,
        }

    def _settings(self) -> dict[str, float | int]:
        return {"dim": self.dim, "lam": self.lam}

    def _contexts(self, X: Tensor) -> Tensor:
        """Checked contexts on the bandit's device, rows beyond max_norm scaled down to it (see _clip)."""
        return self._clip(self._check_contexts(X).to(self.device))[0]

    def _clip(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """X with every row of norm > max_norm scaled to norm max_norm, and [B] bool: the rows scaled.

        bf16 hidden states stay bf16 here: the Triton kernels upcast as they load, the torch functions convert.
        """
        if not X.is_floating_point():  # integer contexts: as the statistics' dtype
            X = X.to(self.dtype)
        norms = torch.linalg.vector_norm(X, dim=1, dtype=torch.float64)  # float64: a float32 norm overflows at 1e19
        scale = (self.max_norm / norms).clamp(max=1.0)  # exactly 1 for every row within max_norm: those stay bit for bit
        return X * scale[:, None].to(X.dtype), scale < 1.0

    def scores(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """mean [B, K] = x . theta_k and width [B, K] = sqrt(x^T A_k^-1 x) (without alpha)."""
        mean, width, _, _ = self._score_select(self._contexts(X), self.theta, self.A_inv)
        return mean, width

    def update(self, X: Tensor, arms: Tensor, rewards: Tensor) -> None:
        X, arms, rewards = self._check_update(X, arms, rewards)
        X, clipped = self._clip(X.to(self.device))
        arms, rewards = arms.to(self.device), rewards.to(self.device, self.dtype)
        # index_add_ rather than bincount: on a GPU, bincount syncs to size its output.
        rows = torch.zeros(self.num_arms, dtype=torch.long, device=self.device).index_add_(0, arms, torch.ones_like(arms))
        since = self.updates_since_refresh + (rows > 0)
        if self.discount < 1.0:
            # A changes by more than X^T X: every arm's inverse is recomputed, into new tensors committed below.
            eye = torch.eye(self.dim, device=self.device, dtype=self.dtype)
            A = self.A.mul(self.discount).add_((1 - self.discount) * self.lam * eye)
            b, A_inv, theta = self.b.mul(self.discount), self.A_inv.clone(), self.theta.clone()
            everything = torch.ones(self.num_arms, dtype=torch.bool, device=self.device)
            _, repaired = linear_update_torch(A, A_inv, b, theta, X, arms, rewards, everything, floor=self.lam)
            for k in (rows == 0).nonzero().flatten().tolist():  # the arms without rows decayed too
                A_inv[k], repaired[k] = spd_inverse(A[k], floor=self.lam)
                theta[k] = A_inv[k] @ b[k]
            for mine, new in ((self.A, A), (self.A_inv, A_inv), (self.b, b), (self.theta, theta)):
                mine.copy_(new)
            since.zero_()
        else:
            # An exact inverse every refresh_every updates of an arm, or when the batch gives it so many rows that
            # inverting is cheaper than Woodbury; the update adds the arms whose Woodbury factor failed. In place:
            # on the torch path everything that can fail runs before the first write; the Triton path's kernels
            # write as they go, and nothing after its checks raises.
            refresh = (rows > 0) & ((rows >= self.dim) | (since >= self.refresh_every))
            refreshed, repaired = self._linear_update(
                self.A, self.A_inv, self.b, self.theta, X, arms, rewards, refresh, floor=self.lam
            )
            since[refreshed] = 0
        self.counts += rows
        self.updates_since_refresh.copy_(since)
        self._repairs += repaired.sum()
        self._clipped_rows += clipped.sum()
        self.num_updates += 1
        if self.dtype == torch.float32 and bool(repaired.any()):
            self._promote()

    def _promote(self) -> None:
        """Move the statistics to float64 for good: float32 needed a repair, so it can no longer hold them.

        A float32 A^-1 cannot represent an arm whose A has a condition number beyond ~1e7 (large or low-rank
        contexts): its small eigenvalues fall below the rounding of its large ones, and widths and means turn to
        noise between refreshes. A and b convert exactly; every A^-1 and theta is recomputed from A in float64.
        The Triton kernels keep float32 state, so the bandit continues on the torch backend.
        """
        A, b = self.A.double(), self.b.double()
        A_inv, theta = torch.empty_like(A), torch.empty_like(b)
        for k in range(self.num_arms):
            if int(torch.linalg.cholesky_ex(A[k]).info) != 0:  # float32 rounding left A_k indefinite: restore A_k >= lam*I
                evals, evecs = _floored_eigh(A[k], self.lam)
                A[k] = (evecs * evals) @ evecs.T
            A_inv[k], _ = spd_inverse(A[k], floor=self.lam)
            theta[k] = A_inv[k] @ b[k]
        self._use_float64(A, A_inv, b, theta)
        warnings.warn(
            f"{type(self).__name__}: float32 statistics needed a repair (contexts of large norm or low rank); the "
            "state is float64 from now on (torch backend). Normalized contexts (ContextEncoder) stay in float32.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _use_float64(self, A: Tensor, A_inv: Tensor, b: Tensor, theta: Tensor) -> None:
        self.A, self.A_inv, self.b, self.theta = A, A_inv, b, theta
        self.dtype, self.use_triton = torch.float64, False
        self._score_select, self._linear_update = _backend_functions(False)

    def load_state_dict(self, state: Mapping) -> None:
        saved = state.get("A") if isinstance(state, Mapping) else None
        if not (isinstance(saved, Tensor) and saved.dtype == torch.float64 and self.dtype == torch.float32):
            return super().load_state_dict(state)
        # A state that was promoted to float64 (see _promote) resumes in float64; a rejected state changes nothing.
        before = (self.A, self.A_inv, self.b, self.theta, self.dtype, self.use_triton, self._score_select, self._linear_update)
        self._use_float64(self.A.double(), self.A_inv.double(), self.b.double(), self.theta.double())
        try:
            super().load_state_dict(state)
        except BaseException:
            self.A, self.A_inv, self.b, self.theta, self.dtype, self.use_triton = before[:6]
            self._score_select, self._linear_update = before[6:]
            raise

    def _argmax(self, values: Tensor, best: Tensor | None = None) -> Tensor:
        """Row-wise argmax [B] of values [B, K]; exact ties go to a uniformly random tied arm.

        Ties are exact when arms share their statistics, e.g. all at the prior on the first batch: a plain
        argmax would send every prompt to arm 0, and one bad first batch can lock that arm out for good.
        Rows without ties keep `best` (default: the plain argmax; the score functions pass theirs),
        and the generator is only drawn from when a tie occurs.
        """
        best = values.argmax(dim=1) if best is None else best
        tied = values == values.gather(1, best[:, None])
        if not bool((tied.sum(dim=1) > 1).any()):
            return best
        draws = torch.rand(values.shape, generator=self.generator, dtype=torch.float64).to(values.device)
        return (draws + 2.0 * tied).argmax(dim=1)  # draws < 1, so only tied arms can win


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve a LinearBandit backend: True when the Triton kernels (laser_rl.kernels) do the work."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    if backend == "torch":
        return False
    installed = _triton_installed()
    if backend == "auto":
        return installed and device.type == "cuda" and dtype == torch.float32
    if not installed:
        raise ValueError("backend='triton' needs triton and laser_rl.kernels: pip install -e '.[kernels]'")
    if dtype != torch.float32:
        raise ValueError(f"backend='triton' keeps float32 statistics, got dtype={dtype}; use backend='torch'")
    if device.type != "cuda" and not _backend("triton").runs_on_cpu:
        raise ValueError(
            f"backend='triton' runs on CUDA; on {device} it needs TRITON_INTERPRET=1 (set before triton is imported)"
        )
    return True


def _triton_installed() -> bool:
    """Whether triton and the kernels' package are installed, without importing either."""
    return find_spec("triton") is not None and find_spec("laser_rl.kernels") is not None


def _backend_functions(use_triton: bool) -> tuple[ScoreSelect, LinearUpdate]:
    """The (score_select, linear_update) pair a LinearBandit computes with: the one seam between the backends."""
    found = _backend("triton" if use_triton else "torch")
    return found.score_select, found.linear_update


# ----- the backend registry: kernels -> core, never the reverse ----------------------------------------------------


class Backend(NamedTuple):
    score_select: ScoreSelect
    linear_update: LinearUpdate
    runs_on_cpu: bool  # False for kernels that need CUDA tensors (Triton, unless interpreted)


_BACKENDS: dict[str, Backend] = {}
# Where a backend that is not registered yet registers itself when imported. This module never imports them by
# statement: laser_rl.kernels imports the core (its torch references are the functions below), so the dependency
# runs one way, and a bandit loads the plugin by name only when it is built with that backend.
_PLUGINS = {"triton": "laser_rl.kernels.backend"}


def register_backend(name: str, score_select: ScoreSelect, linear_update: LinearUpdate, runs_on_cpu: bool) -> None:
    """Make a (score_select, linear_update) pair available to LinearBandit(backend=name); same contracts as
    score_select_torch and linear_update_torch."""
    _BACKENDS[name] = Backend(score_select, linear_update, bool(runs_on_cpu))


def _backend(name: str) -> Backend:
    if name not in _BACKENDS and name in _PLUGINS:
        importlib.import_module(_PLUGINS[name])  # registers itself
    if name not in _BACKENDS:
        raise ValueError(f"no backend {name!r} is registered")
    return _BACKENDS[name]


# ----- the torch backend: the core's math, and the reference the Triton kernels are tested against -----


def ridge_scores(X: Tensor, theta: Tensor, A_inv: Tensor) -> tuple[Tensor, Tensor]:
    """mean [B, K] = X theta_k and width [B, K] = sqrt(x^T A_k^-1 x) for contexts X [B, d], theta [K, d],
    A_inv [K, d, d]: one batched matmul, O(K B d^2), with a B x K x d intermediate (the Triton kernel avoids it)."""
    mean = X @ theta.T
    quad = torch.einsum("kbd,bd->bk", torch.matmul(X.unsqueeze(0), A_inv), X)
    return mean, quad.clamp_min(0).sqrt()


def score_select_torch(
    X: Tensor,
    theta: Tensor,
    A_inv: Tensor,
    coef: float = 0.0,
    noise: Tensor | None = None,
    *,
    precision: str | None = None,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Means [B, K], widths [B, K], chosen arms [B] and their widths [B] (laser_rl.kernels.score_select's contract).

    coef: alpha for LinUCB (score = mean + alpha * width), v for Thompson (score = mean + v * width * noise with
    noise [B, K] standard normal); coef = 0 ranks by the mean. The argmax takes the first maximum.
    precision is accepted for the common signature and ignored: torch's float32 matmul settings apply.
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


def spd_inverse(A: Tensor, floor: float | None = None) -> tuple[Tensor, bool]:
    """The inverse of a symmetric positive definite A [d, d] through its Cholesky factor, and whether it needed a
    repair: how every path recomputes an arm's A^-1 from A (periodic refreshes, discounting, a drifted inverse).

    When A is not numerically positive definite in its dtype (float32 rounding has eaten the ridge), the inverse
    comes from A in float64, and failing that from A's float64 eigenvalues floored at `floor` (the bandits pass
    lam: a true ridge matrix has no eigenvalue below it; default: d * eps of the largest). Never raises for a
    finite A.
    """
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_inverse(L), False
    if A.dtype != torch.float64:
        A64 = A.double()
        L, info = torch.linalg.cholesky_ex((A64 + A64.T) / 2)
        if int(info) == 0:
            return torch.cholesky_inverse(L).to(A.dtype), True
    evals, evecs = _floored_eigh(A, floor)
    return ((evecs / evals) @ evecs.T).to(A.dtype), True


def _floored_eigh(A: Tensor, floor: float | None) -> tuple[Tensor, Tensor]:
    """Eigenvalues (floored; default floor: d * eps of the largest) and eigenvectors of the symmetric part of A, in
    float64: the nearest matrix with no eigenvalue below the floor is evecs diag(evals) evecs^T."""
    A64 = A.double()
    evals, evecs = torch.linalg.eigh((A64 + A64.T) / 2)
    if floor is None:
        floor = max(float(evals.abs().max()) * A.shape[0] * torch.finfo(torch.float64).eps, torch.finfo(torch.float64).tiny)
    return evals.clamp_min(floor), evecs


def woodbury_factor(A_inv: Tensor, X: Tensor) -> Tensor | None:
    """W [m, d] with (A + X^T X)^-1 = A^-1 - W^T W, for m new rows X [m, d]: O(m d^2 + m^3) instead of O(d^3).

    W = L^-1 X A^-1 with L L^T = I_m + X A^-1 X^T (for m = 1 this is Sherman-Morrison). Writing the correction as
    W^T W keeps it symmetric without an extra pass. None when I + X A^-1 X^T is not positive definite: float32
    drift has made A^-1 indefinite, and the caller recomputes it from A instead.
    """
    U = X @ A_inv  # [m, d] = X A^-1 (A^-1 is symmetric)
    L, info = torch.linalg.cholesky_ex(torch.eye(X.shape[0], device=X.device, dtype=X.dtype) + U @ X.T)
    if int(info) != 0:
        return None
    return torch.linalg.solve_triangular(L, U, upper=False)


def woodbury_update(A_inv: Tensor, X: Tensor) -> bool:
    """(A + X^T X)^-1 from A^-1 in place (see woodbury_factor). False, with A_inv untouched, when the factor fails."""
    W = woodbury_factor(A_inv, X)
    if W is None:
        return False
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
    floor: float | None = None,
    precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Add rows X [B, d] with rewards [B] to the arms `arms` [B] of a disjoint ridge state, in place, arm by arm:
    A_k += X_k^T X_k, b_k += X_k^T r_k, A_k^-1 by Woodbury (exactly, by spd_inverse, where refresh [K] is set),
    theta_k = A_k^-1 b_k. Arms without a row are untouched.

    Everything that can fail (the Woodbury factors, the exact inverses) is computed first, into temporaries; only
    then is the state written. Returns two [K] bool masks: the arms whose inverse was recomputed exactly (flagged
    ones, and those whose Woodbury factor was not positive definite), and the arms that needed a repair (a failed
    Woodbury factor, or an A that spd_inverse had to repair; floor is its eigenvalue floor).
    laser_rl.kernels.linear_update does the same in a few launches; precision is accepted for its signature.
    """
    X, rewards = X.to(A.dtype), rewards.to(A.dtype)
    refreshed = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    repaired = torch.zeros_like(refreshed)
    steps = []
    for k in arms.unique().tolist():
        rows = arms == k
        X_k, r_k = X[rows], rewards[rows]
        W = None if bool(refresh[k]) else woodbury_factor(A_inv[k], X_k)
        if W is None:  # an exact inverse of the new A_k
            A_k = torch.addmm(A[k], X_k.T, X_k)
            inverse, fixed = spd_inverse(A_k, floor)
            refreshed[k], repaired[k] = True, fixed or not bool(refresh[k])
            steps.append((k, X_k, r_k, None, A_k, inverse))
        else:
            steps.append((k, X_k, r_k, W, None, None))
    for k, X_k, r_k, W, A_k, inverse in steps:  # commit
        if W is None:
            A[k], A_inv[k] = A_k, inverse
        else:
            A[k].addmm_(X_k.T, X_k)
            A_inv[k].addmm_(W.T, W, alpha=-1)
        b[k] += X_k.T @ r_k
        theta[k] = A_inv[k] @ b[k]
    return refreshed, repaired


register_backend("torch", score_select_torch, linear_update_torch, runs_on_cpu=True)


class LinUCB(LinearBandit):
    """Disjoint LinUCB (Li et al. 2010), the paper's bandit: argmax_k theta_k . x + alpha * sqrt(x^T A_k^-1 x)."""

    def __init__(self, num_arms: int, dim: int, alpha: float = 0.1, lam: float = 1.0, **kwargs):
        alpha = _check_knob("LinUCB", "alpha", alpha)
        super().__init__(num_arms, dim, lam=lam, **kwargs)
        self.alpha = alpha
        self.last_width: Tensor | None = None  # width of the chosen arm at the last selection, for metrics

    def select(self, X: Tensor) -> Tensor:
        mean, width, best, _ = self._score_select(self._contexts(X), self.theta, self.A_inv, self.alpha)
        arms = self._argmax(mean + self.alpha * width, best=best)
        self.last_width = width.gather(1, arms[:, None]).squeeze(1)
        return arms


class LinearThompson(LinearBandit):
    """Linear Thompson sampling: theta_k ~ N(theta_hat_k, v^2 A_k^-1), one draw per prompt.

    For one context x, x . theta_k is N(x . theta_hat_k, v^2 x^T A_k^-1 x), so a per-prompt draw needs
    only the LinUCB mean and width, never a d x d Cholesky factor.
    """

    def __init__(self, num_arms: int, dim: int, v: float = 0.1, lam: float = 1.0, **kwargs):
        v = _check_knob("Thompson", "v", v)
        super().__init__(num_arms, dim, lam=lam, **kwargs)
        self.v = v
        self.last_width: Tensor | None = None

    def select(self, X: Tensor) -> Tensor:
        X = self._contexts(X)
        noise = torch.randn((X.shape[0], self.num_arms), generator=self.generator, dtype=torch.float64)
        _, _, arms, self.last_width = self._score_select(X, self.theta, self.A_inv, self.v, noise.to(self.device, self.dtype))
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
        if not 0 < discount <= 1:
            raise ValueError(f"discount must lie in (0, 1], got {discount}")
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
        _check_knob("UCB1", "c", c)
        if not 0 < discount <= 1:
            raise ValueError(f"discount must lie in (0, 1], got {discount}")
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
        X = self._check_contexts(X)  # before the turn advances: a rejected batch does not use up an arm's turn
        arm = int(self.turn) % self.num_arms
        self.turn += 1
        return torch.full((X.shape[0],), arm, dtype=torch.long, device=self.device)


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
