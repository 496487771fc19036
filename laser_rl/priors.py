"""Warm-start priors: initialize the bandit from a small labeled preference set before training starts.

A cold bandit knows nothing and explores (or, per batch, collapses early onto one arm; BayesianRouter,
ICLR 2026). A few hundred labeled pairs (prompt, chosen, rejected, optional domain) tell it which RM
is right on which kind of prompt: for each example and each arm, the arm's reward is whether it
prefers the chosen response (1), ties (0.5) or prefers the rejected one (0). Every arm is scored on
every example, so the prior is full-information, and the bandit is updated with exactly these rows:
the warm-started statistics are those of a bandit updated on the same data, nothing more.

The prior's rewards (preference accuracy in [0, 1]) live on the same [0, 1] scale as the selector's
normalized online rewards, and are centered the same way (minus 0.5) for the linear bandits. The
online signal (e.g. -loss) is a different quantity, so the prior is a head start, not a substitute:
`weight` < 1 softens it, and a discount < 1 lets online rewards take over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from laser_rl.arms import RewardArm, make_arm
from laser_rl.bandits import UCB1, Bandit, LinearBandit
from laser_rl.context import ContextEncoder
from laser_rl.lm import load_jsonl, prompt_contexts
from laser_rl.selector import RewardSelector


def load_preference_set(path: str) -> list[dict]:
    """Rows of a local JSONL file with `prompt`, `chosen`, `rejected` and optional `domain`."""
    return load_jsonl(path, required=("prompt", "chosen", "rejected"))


def preference_rewards(
    rms: Sequence[RewardArm | str],
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    labels: Sequence | None = None,
) -> Tensor:
    """[N, K] reward of arm k on example i: 1 if it scores chosen above rejected, 0.5 on a tie, else 0."""
    if not (len(prompts) == len(chosen) == len(rejected)) or len(prompts) == 0:
        raise ValueError(f"need as many prompts, chosen and rejected (>= 1): got {len(prompts)}, {len(chosen)}, {len(rejected)}")
    columns = []
    for arm in (make_arm(rm) for rm in rms):
        # One call per arm over chosen then rejected, so batched RMs stay batched.
        scores = arm.score(list(prompts) * 2, list(chosen) + list(rejected), None if labels is None else list(labels) * 2)
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward model {arm.name!r} returned NaN or inf on the preference set")
        diff = scores[: len(prompts)] - scores[len(prompts) :]
        columns.append((diff > 0).float() + 0.5 * (diff == 0).float())
    return torch.stack(columns, dim=1)


def prior_rows(bandit: Bandit, contexts: Tensor, rewards: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The update rows a warm start feeds the bandit: (X [N*K, d], arms [N*K], rewards [N*K]).

    Example-major: example i gives K rows, one per arm. Linear bandits get rewards centered at 0,
    as the selector gives them; with weight w the rows are scaled by sqrt(w), so each example adds
    w * x x^T to A_k and w * r * x to b_k (w = 1: exactly the data itself).
    """
    contexts, rewards = torch.as_tensor(contexts).float(), torch.as_tensor(rewards).float()
    if contexts.dim() != 2 or rewards.dim() != 2 or contexts.shape[0] != rewards.shape[0] or contexts.shape[0] == 0:
        raise ValueError(f"need contexts [N, d] and rewards [N, K] with N >= 1, got {tuple(contexts.shape)} and {tuple(rewards.shape)}")
    if rewards.shape[1] != bandit.num_arms:
        raise ValueError(f"rewards has {rewards.shape[1]} columns but the bandit has {bandit.num_arms} arms")
    if not torch.isfinite(rewards).all() or ((rewards < 0) | (rewards > 1)).any():
        raise ValueError("prior rewards must be finite and lie in [0, 1]")
    if weight <= 0:
        raise ValueError(f"weight must be > 0, got {weight}")
    N, K = rewards.shape
    X = contexts.repeat_interleave(K, dim=0)
    arms = torch.arange(K).repeat(N)
    r = rewards.reshape(-1) - (0.5 if bandit.centered_rewards else 0.0)
    if weight != 1.0:
        if not isinstance(bandit, LinearBandit):
            raise ValueError("weight != 1 is only defined for linear bandits (it scales the ridge statistics)")
        X, r = X * weight**0.5, r * weight**0.5
    return X, arms, r


def warm_start_bandit(bandit: Bandit, contexts: Tensor, rewards: Tensor, weight: float = 1.0) -> None:
    """Update every arm of a linear bandit (LinUCB, Thompson, epsilon-greedy) or UCB1 with the prior data."""
    if not bandit.learns:
        raise ValueError(f"{type(bandit).__name__} is a baseline that ignores feedback: there is nothing to warm-start")
    if not isinstance(bandit, (LinearBandit, UCB1)):
        raise ValueError(
            f"warm start supports linear bandits and UCB1, not {type(bandit).__name__} "
            "(Exp3's importance-weighted update assumes Exp3 drew the arm itself)"
        )
    X, arms, r = prior_rows(bandit, contexts, rewards, weight)
    bandit.update(X.to(bandit.device), arms.to(bandit.device), r.to(bandit.device))


def warm_start_selector(selector: RewardSelector, contexts: Tensor, rewards: Tensor, weight: float = 1.0) -> None:
    """Warm-start a selector's bandit (per-example contexts, whatever its granularity)."""
    if selector.bandit is None:
        raise ValueError(f"baseline {selector.baseline!r} has no bandit to warm-start")
    warm_start_bandit(selector.bandit, contexts, rewards, weight)


def warm_start_from_preferences(
    selector: RewardSelector,
    examples: Sequence[dict],
    policy: nn.Module,
    tokenizer,
    encoder: ContextEncoder,
    weight: float = 1.0,
) -> Tensor:
    """Contexts from the policy, rewards from the selector's own arms, then the update. Returns rewards [N, K].

    examples: dicts with prompt, chosen, rejected (and optional answer, passed to the arms as labels).
    The contexts are the ones sampling would give each prompt (laser_rl.lm: same encoding, same prefill).
    """
    if not examples:
        raise ValueError("the preference set is empty")
    prompts = [str(e["prompt"]) for e in examples]
    labels = [e.get("answer") for e in examples]
    rewards = preference_rewards(
        selector.rms, prompts, [str(e["chosen"]) for e in examples], [str(e["rejected"]) for e in examples],
        labels if all(l is not None for l in labels) else None,
    )
    contexts = prompt_contexts(policy, tokenizer, prompts, encoder)
    warm_start_selector(selector, contexts, rewards, weight)
    return rewards


def prior_accuracy_table(rewards: Tensor, names: Sequence[str], domains: Sequence[str | None] | None = None) -> str:
    """Each arm's preference accuracy on the prior set, overall and per domain (what the bandit starts from)."""
    groups = [("all", torch.ones(rewards.shape[0], dtype=torch.bool))]
    if domains is not None:
        groups += [(d, torch.tensor([x == d for x in domains])) for d in sorted({d for d in domains if d is not None})]
    width = max(10, max(len(n) for n in names) + 2)
    lines = [f"{'prior set':<12}" + "".join(f"{n:>{width}}" for n in names)]
    for label, rows in groups:
        lines.append(f"{str(label)[:12]:<12}" + "".join(f"{v:>{width}.3f}" for v in rewards[rows].mean(dim=0).tolist()))
    return "\n".join(lines)
