"""Feedback signals: how good was the chosen reward model for a prompt? Plus the paper's reward normalization.

Every signal takes grouped tensors, P prompts x n samples each, and returns float32 [P] raw bandit
rewards (higher = better choice of arm). NaN marks "no signal for this prompt"; callers skip those rows.

- pair_loss: the paper's signal in online-RL form, -(DPO + NLL) on the RM's best vs. worst sample.
- progress: loss before minus loss after the policy update (answers "negative loss favours RMs the
  policy already agrees with": an RM that teaches something gets rewarded).
- verifier: pairwise ranking accuracy of the RM against label checks, where labels exist.
- spread: within-group std of the RM's scores (an RM that cannot tell samples apart gives GRPO no signal).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


# ----- input checks -----------------------------------------------------------------------------
def _grouped(name: str, x, min_samples: int = 1) -> Tensor:
    """A finite float32 [P, n] tensor with P >= 1 and n >= min_samples."""
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be grouped as [prompts, samples], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.shape[1] < min_samples:
        raise ValueError(f"{name} needs n >= {min_samples} samples per prompt to form pairs, got n={x.shape[1]}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _same_shape(reference: tuple[str, Tensor], *others: tuple[str, Tensor]) -> None:
    ref_name, ref = reference
    for name, t in others:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}")


def _pick(x: Tensor, idx: Tensor) -> Tensor:
    """x[p, idx[p]] for each prompt p."""
    return x.gather(1, idx.unsqueeze(1)).squeeze(1)


# ----- signals ----------------------------------------------------------------------------------
def pair_loss_terms(
    scores: Tensor,
    policy_logps: Tensor,
    ref_logps: Tensor,
    response_lengths: Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-prompt DPO + NLL loss on the RM's best vs. worst sample: (loss [P], best_idx [P], worst_idx [P]).

    Inputs are [P, n]: RM scores, SEQUENCE log-probs (sums over response tokens) of the policy and the
    reference, and response lengths in tokens. Score ties go to the lowest index.
    """
    scores = _grouped("scores", scores, min_samples=2)
    policy_logps = _grouped("policy_logps", policy_logps)
    ref_logps = _grouped("ref_logps", ref_logps)
    response_lengths = _grouped("response_lengths", response_lengths)
    _same_shape(
        ("scores", scores),
        ("policy_logps", policy_logps),
        ("ref_logps", ref_logps),
        ("response_lengths", response_lengths),
    )
    if (response_lengths < 1).any():
        raise ValueError("response_lengths must be >= 1 token (the NLL is a per-token mean)")

    best = scores.argmax(dim=1)
    worst = scores.argmin(dim=1)
    # If all n scores tie, best == worst: margin 0, loss = log 2 + NLL. We keep it finite on purpose: an RM
    # that never ranks anything must still get feedback, or a NaN would let it dodge every update forever.
    log_ratio = policy_logps - ref_logps
    margin = _pick(log_ratio, best) - _pick(log_ratio, worst)
    dpo = -F.logsigmoid(beta * margin)
    nll = -_pick(policy_logps, best) / _pick(response_lengths, best)
    return dpo + nll_weight * nll, best, worst


def pair_loss(
    scores: Tensor,
    policy_logps: Tensor,
    ref_logps: Tensor,
    response_lengths: Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> Tensor:
    """The paper's bandit reward: -(DPO + nll_weight * NLL) on the chosen RM's best vs. worst sample, [P]."""
    loss, _, _ = pair_loss_terms(scores, policy_logps, ref_logps, response_lengths, beta, nll_weight)
    return -loss


def progress(loss_before: Tensor, loss_after: Tensor) -> Tensor:
    """Learning progress per prompt: loss before the policy update minus loss after it, [P]."""
    loss_before = torch.as_tensor(loss_before).float()
    loss_after = torch.as_tensor(loss_after).float()
    if loss_before.dim() != 1 or loss_before.shape[0] == 0:
        raise ValueError(f"loss_before must be a non-empty 1-D tensor [prompts], got shape {tuple(loss_before.shape)}")
    _same_shape(("loss_before", loss_before), ("loss_after", loss_after))
    return loss_before - loss_after  # NaN in either stays NaN: no signal for that prompt


def verifier_agreement(scores: Tensor, correct: Tensor) -> Tensor:
    """Pairwise ranking accuracy of the RM against a verifier, [P].

    Over pairs (i, j) of one prompt with correct_i != correct_j, the fraction where the RM scores the
    correct sample higher; a score tie counts 0.5. NaN for prompts without a mixed pair.
    """
    scores = _grouped("scores", scores, min_samples=2)
    correct = torch.as_tensor(correct, device=scores.device)
    if correct.dtype != torch.bool:
        if ((correct != 0) & (correct != 1)).any():
            raise ValueError("correct must be boolean (or 0/1) labels")
        correct = correct.bool()
    _same_shape(("scores", scores), ("correct", correct))

    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # [P, n, n]: score_i - score_j
    mixed = correct.unsqueeze(2) & ~correct.unsqueeze(1)  # i correct, j wrong
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    num_pairs = mixed.sum(dim=(1, 2)).float()
    acc = (wins * mixed).sum(dim=(1, 2)) / num_pairs.clamp(min=1)
    return torch.where(num_pairs > 0, acc, torch.full_like(acc, float("nan")))


def score_spread(scores: Tensor) -> Tensor:
    """Within-group population std of the RM's scores, [P]."""
    scores = _grouped("scores", scores, min_samples=2)
    return scores.std(dim=1, correction=0)


FEEDBACK_SIGNALS: dict[str, Callable[..., Tensor]] = {
    "pair_loss": pair_loss,
    "progress": progress,
    "verifier": verifier_agreement,
    "spread": score_spread,
}


# ----- normalization ----------------------------------------------------------------------------
class QuantileNormalizer:
    """Paper's reward normalization: map raw rewards to [0, 1] by the q_low/q_high (default 0.2/0.8)
    percentiles of a sliding window of past raw rewards: 0 below q_low, 1 above q_high, linear between.

    Pooled by default: per-arm histories would erase differences in the mean reward level between arms,
    which is exactly what the bandit must learn. per_arm=True is for arms whose raw rewards live on
    different scales.
    """

    def __init__(
        self,
        num_arms: int,
        window: int = 512,
        quantiles: tuple[float, float] = (0.2, 0.8),
        per_arm: bool = False,
        warmup: int = 8,
    ):
        q_low, q_high = (float(q) for q in quantiles)
        if int(num_arms) < 1:
            raise ValueError(f"num_arms must be >= 1, got {num_arms}")
        if not 0.0 <= q_low < q_high <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= q_low < q_high <= 1, got {quantiles}")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 <= int(warmup) <= int(window):
            raise ValueError(f"warmup must lie in [0, window={window}], got {warmup}")
        self.num_arms = int(num_arms)
        self.window = int(window)
        self.quantiles = (q_low, q_high)
        self.per_arm = bool(per_arm)
        self.warmup = int(warmup)
        # One CPU float32 history per arm, or a single pooled one.
        self.histories: list[Tensor] = [torch.empty(0) for _ in range(self.num_arms if self.per_arm else 1)]

    def __call__(self, raw: Tensor, arms: Tensor) -> Tensor:
        """Add the finite raw rewards [B] of the chosen arms [B] to the history, then normalize them."""
        raw = torch.as_tensor(raw)
        arms = torch.as_tensor(arms, device=raw.device)
        if raw.dim() != 1 or raw.shape[0] == 0:
            raise ValueError(f"raw rewards must be a non-empty 1-D tensor, got shape {tuple(raw.shape)}")
        if arms.shape != raw.shape:
            raise ValueError(f"arms has shape {tuple(arms.shape)}, expected {tuple(raw.shape)} like raw")
        if arms.is_floating_point() or ((arms < 0) | (arms >= self.num_arms)).any():
            raise ValueError(f"arms must be integer indices in [0, {self.num_arms}), got {arms.tolist()}")

        values, arms = raw.detach().float().cpu(), arms.long().cpu()
        out = torch.full_like(values, float("nan"))
        groups = range(self.num_arms) if self.per_arm else [None]
        for g, group in enumerate(groups):
            rows = torch.ones_like(arms, dtype=torch.bool) if group is None else arms == group
            if not rows.any():
                continue
            x = values[rows]
            # Append first, so even the very first batch is normalized against something.
            history = torch.cat([self.histories[g], x[torch.isfinite(x)]])[-self.window :]
            self.histories[g] = history
            out[rows] = self._normalize(x, history)
        return out.to(raw.device)

    def _normalize(self, x: Tensor, history: Tensor) -> Tensor:
        if history.numel() < max(self.warmup, 1):
            y = torch.full_like(x, 0.5)  # too little history: uninformative
        else:
            lo, hi = torch.quantile(history, torch.tensor(self.quantiles)).tolist()
            if hi > lo:
                y = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
            else:
                y = torch.full_like(x, 0.5)  # equal quantiles (the reference code divided by zero here)
        return torch.where(torch.isnan(x), x, y)  # NaN in -> NaN out: the caller skips it

    def state_dict(self) -> dict:
        return {
            "num_arms": self.num_arms,
            "window": self.window,
            "quantiles": self.quantiles,
            "per_arm": self.per_arm,
            "warmup": self.warmup,
            "histories": [h.clone() for h in self.histories],
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_arms", "window", "quantiles", "per_arm", "warmup"):
            saved, ours = state[key], getattr(self, key)
            if key == "quantiles":  # some serializers turn tuples into lists
                saved = tuple(float(q) for q in saved)
            if saved != ours:
                raise ValueError(f"QuantileNormalizer state has {key}={state[key]!r}, this one has {ours!r}")
        if len(state["histories"]) != len(self.histories):
            raise ValueError(f"state holds {len(state['histories'])} histories, expected {len(self.histories)}")
        self.histories = [torch.as_tensor(h).float().cpu().clone() for h in state["histories"]]
