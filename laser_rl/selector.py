"""RewardSelector: one reward model per prompt, chosen by a bandit, learned from a feedback signal.

One step of online RL with the selector:

    arms = selector.select(contexts, domains)                 # [P] one arm per prompt
    rewards = selector.score(prompts, responses, arms.repeat_interleave(n), labels)   # [P*n]
    ...  # the RL update (GRPO / PPO) trains the policy on `rewards`
    selector.feedback(contexts, arms, scores=..., policy_logps=..., ref_logps=..., response_lengths=...)
    logger.log(selector.metrics())

Baselines run through the same calls (`baseline=`): single RM, random, sequential (round-robin) and
score ensembles over all K arms (mean, worst-case, uncertainty-weighted; Coste et al. 2023).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from laser_rl.arms import RewardArm, RewardArmError, ScoreNormalizer, make_arm
from laser_rl.bandits import BANDITS, Bandit, FixedArm, LinearBandit, RandomArm, RoundRobin, make_bandit
from laser_rl.feedback import FEEDBACK_SIGNALS, QuantileNormalizer

ENSEMBLE = -1  # the "arm" select() returns when every RM scores every sample
BASELINES = ("single", "random", "sequential", "mean", "wco", "uwo")
ENSEMBLES = ("mean", "wco", "uwo")

# Inputs each feedback signal needs, all grouped per prompt ([P, n] or [P]).
SIGNAL_INPUTS = {
    "pair_loss": ("scores", "policy_logps", "ref_logps", "response_lengths"),
    "progress": ("loss_before", "loss_after"),
    "verifier": ("scores", "correct"),
    "spread": ("scores",),
}


class RewardSelector:
    def __init__(
        self,
        arms: Sequence[RewardArm | str | Callable],
        context_dim: int | None = None,
        bandit: str | Bandit = "linucb",
        baseline: str | None = None,
        alpha: float = 0.1,
        lam: float = 1.0,
        discount: float = 1.0,
        feedback: str = "pair_loss",
        feedback_kwargs: dict | None = None,
        granularity: str = "prompt",
        single_arm: int = 0,
        uwo_coef: float = 0.5,
        normalize_scores: bool = False,
        skip_invalid: bool = False,
        reward_window: int = 512,
        reward_quantiles: tuple[float, float] = (0.2, 0.8),
        reward_warmup: int = 8,
        per_arm_normalization: bool = False,
        bandit_kwargs: dict | None = None,
        seed: int = 0,
    ):
        if len(arms) == 0:
            raise ValueError("RewardSelector needs at least one reward model")
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES} or None for LASeR")
        if feedback not in FEEDBACK_SIGNALS:
            raise ValueError(f"unknown feedback signal {feedback!r}; choose one of {sorted(FEEDBACK_SIGNALS)}")
        if granularity not in ("prompt", "batch"):
            raise ValueError(f"granularity must be 'prompt' or 'batch', got {granularity!r}")
        self.arms = [make_arm(a) for a in arms]
        self.names = _unique_names([a.name for a in self.arms])
        self.num_arms = len(self.arms)
        self.baseline, self.granularity, self.feedback_name = baseline, granularity, feedback
        self.feedback_kwargs = dict(feedback_kwargs or {})
        self.uwo_coef, self.skip_invalid = float(uwo_coef), skip_invalid
        self.ensemble = baseline in ENSEMBLES

        common = dict(seed=seed, **(bandit_kwargs or {}))
        if baseline == "single":
            self.bandit: Bandit | None = FixedArm(self.num_arms, arm=single_arm, **common)
        elif baseline == "random":
            self.bandit = RandomArm(self.num_arms, **common)
        elif baseline == "sequential":
            self.bandit = RoundRobin(self.num_arms, **common)
        elif self.ensemble:
            self.bandit = None
        elif isinstance(bandit, Bandit):
            if bandit.num_arms != self.num_arms:
                raise ValueError(f"bandit has {bandit.num_arms} arms but {self.num_arms} reward models were given")
            self.bandit = bandit
        else:
            if bandit not in BANDITS:
                raise ValueError(f"unknown bandit {bandit!r}; choose one of {sorted(BANDITS)}")
            contextual = issubclass(BANDITS[bandit], LinearBandit)
            if contextual and context_dim is None:
                raise ValueError(f"bandit {bandit!r} is contextual: give context_dim")
            if bandit == "linucb":
                common.update(alpha=alpha)
            if contextual:
                common.update(lam=lam, discount=discount)
            elif bandit in ("exp3", "ucb1"):
                common.update(discount=discount)
            self.bandit = make_bandit(bandit, self.num_arms, context_dim if contextual else None, **common)

        self.score_normalizer = ScoreNormalizer(self.num_arms) if normalize_scores else None
        self.reward_normalizer = QuantileNormalizer(
            self.num_arms, window=reward_window, quantiles=reward_quantiles, per_arm=per_arm_normalization, warmup=reward_warmup
        )
        self.rm_passes_total = 0
        self.steps = 0
        self._reset_step_stats()

    # ------------------------------------------------------------------------------------------
    def select(self, contexts: Tensor, domains: Sequence[str] | None = None) -> Tensor:
        """One arm per prompt, LongTensor [P] on the CPU (ENSEMBLE for score ensembles).

        contexts: [P, d] prompt contexts (see laser_rl.context). Non-contextual baselines only use P.
        domains: optional tag per prompt, for per-domain selection metrics.
        """
        if not isinstance(contexts, Tensor) or contexts.dim() != 2 or contexts.shape[0] == 0:
            raise ValueError(f"contexts must be a non-empty [num_prompts, dim] tensor, got {getattr(contexts, 'shape', type(contexts))}")
        if domains is not None and len(domains) != contexts.shape[0]:
            raise ValueError(f"got {len(domains)} domain tags for {contexts.shape[0]} prompts")
        P = contexts.shape[0]
        if self.bandit is None:
            arms = torch.full((P,), ENSEMBLE, dtype=torch.long)
        elif self.granularity == "batch":  # the paper's code: one arm per batch, from the mean context
            arms = self.bandit.select(contexts.float().mean(dim=0, keepdim=True)).cpu().expand(P).clone()
        else:
            arms = self.bandit.select(contexts).cpu()
        width = getattr(self.bandit, "last_width", None)
        if width is not None:
            self._stats["width"].append(float(width.float().mean()))
        self._stats["arms"].append(arms)
        self._stats["domains"].extend(domains if domains is not None else [None] * P)
        return arms

    # ------------------------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        arms: Tensor,
        labels: Sequence | None = None,
    ) -> Tensor:
        """Rewards [N] (float32): each sample scored only by its arm (by all arms for an ensemble).

        A sample whose RM raised or returned NaN/inf raises RewardArmError naming the arm and the
        sample; with skip_invalid=True its reward is NaN instead, counted in `laser/invalid_samples`.
        """
        N = len(prompts)
        arms = torch.as_tensor(arms).long().reshape(-1).cpu()
        if N == 0:
            raise ValueError("empty batch: no samples to score")
        if len(responses) != N or arms.shape[0] != N or (labels is not None and len(labels) != N):
            raise ValueError(
                f"score needs one response, arm (and label) per prompt: got {N} prompts, {len(responses)} responses, "
                f"{arms.shape[0]} arms" + ("" if labels is None else f", {len(labels)} labels")
            )
        if self.ensemble:
            all_scores = torch.stack([self._score_arm(k, torch.arange(N), prompts, responses, labels) for k in range(self.num_arms)])
            rewards = self._combine(all_scores)
        else:
            if ((arms < 0) | (arms >= self.num_arms)).any():
                raise ValueError(f"arm indices must lie in [0, {self.num_arms}), got {arms.unique().tolist()}")
            rewards = torch.full((N,), math.nan)
            for k in arms.unique().tolist():
                idx = (arms == k).nonzero().squeeze(1)
                rewards[idx] = self._score_arm(k, idx, prompts, responses, labels)
        self._stats["invalid"] += int((~torch.isfinite(rewards)).sum())
        return rewards

    def _score_arm(self, k: int, idx: Tensor, prompts, responses, labels) -> Tensor:
        arm, name = self.arms[k], self.names[k]
        sub = idx.tolist()
        try:
            scores = arm.score(
                [prompts[i] for i in sub], [responses[i] for i in sub], None if labels is None else [labels[i] for i in sub]
            )
        except Exception as e:
            raise RewardArmError(f"reward model {name!r} (arm {k}) failed on samples {sub[:8]}{'...' if len(sub) > 8 else ''}: {e}") from e
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()
        if scores.shape[0] != len(sub):
            raise RewardArmError(f"reward model {name!r} (arm {k}) returned {scores.shape[0]} scores for {len(sub)} samples")
        bad = (~torch.isfinite(scores)).nonzero().squeeze(1)
        if len(bad) and not self.skip_invalid:
            i = sub[int(bad[0])]
            raise RewardArmError(
                f"reward model {name!r} (arm {k}) returned {scores[int(bad[0])].item()} for sample {i} "
                f"(prompt {str(prompts[i])[:80]!r}); pass skip_invalid=True to leave such samples out"
            )
        self.rm_passes_total += len(sub) * arm.passes_per_sample
        self._stats["rm_passes"] += len(sub) * arm.passes_per_sample
        finite = torch.isfinite(scores)
        if finite.any():
            self._stats["score_sum"][k] += float(scores[finite].sum())
            self._stats["score_count"][k] += int(finite.sum())
        if self.score_normalizer is not None and finite.any():
            self.score_normalizer.update(k, scores[finite])
            scores = torch.where(finite, self.score_normalizer.normalize(k, scores), scores)
        return scores

    def _combine(self, all_scores: Tensor) -> Tensor:
        """Score ensembles over arms, [K, N] -> [N] (Coste et al. 2023)."""
        if self.baseline == "mean":
            return all_scores.mean(dim=0)
        if self.baseline == "wco":  # worst-case optimization
            return all_scores.min(dim=0).values
        # uwo: uncertainty-weighted optimization, mean minus lambda times the variance across RMs
        return all_scores.mean(dim=0) - self.uwo_coef * all_scores.var(dim=0, unbiased=False)

    # ------------------------------------------------------------------------------------------
    def feedback(
        self,
        contexts: Tensor,
        arms: Tensor,
        *,
        raw_rewards: Tensor | None = None,
        **signal_inputs: Tensor,
    ) -> Tensor:
        """Compute the bandit reward per prompt and update the bandit; returns the normalized rewards [P].

        Pass the inputs of the chosen signal, grouped per prompt ([P, n] for per-sample tensors):
          pair_loss: scores, policy_logps, ref_logps, response_lengths   (sequence log-probs)
          progress:  loss_before, loss_after                             ([P] each)
          verifier:  scores, correct                                     (correct: bool [P, n])
          spread:    scores
        or raw_rewards [P] to bring your own signal. Prompts whose signal is NaN (e.g. a skipped
        sample, or no mixed labels) are left out of the update and counted in `laser/feedback_skipped`.
        """
        arms = torch.as_tensor(arms).long().reshape(-1).cpu()
        P = arms.shape[0]
        if P == 0:
            raise ValueError("empty batch: no prompts to learn from")
        if contexts.shape[0] != P:
            raise ValueError(f"feedback got {contexts.shape[0]} contexts for {P} arms")
        if raw_rewards is None:
            needed = SIGNAL_INPUTS[self.feedback_name]
            missing = [name for name in needed if signal_inputs.get(name) is None]
            if missing:
                raise ValueError(f"feedback signal {self.feedback_name!r} needs {list(needed)}; missing {missing}")
            extra = set(signal_inputs) - set(needed)
            if extra:
                raise ValueError(f"feedback signal {self.feedback_name!r} takes {list(needed)}, not {sorted(extra)}")
            inputs = {name: torch.as_tensor(signal_inputs[name]).cpu() for name in needed}
            for name, t in inputs.items():
                if t.shape[0] != P:
                    raise ValueError(f"feedback input {name!r} has {t.shape[0]} rows for {P} prompts")
            # A prompt with a skipped (NaN) sample gets no signal; the others are computed as usual.
            ok = torch.ones(P, dtype=torch.bool)
            for t in inputs.values():
                ok &= torch.isfinite(t.float().reshape(P, -1)).all(dim=1)
            raw = torch.full((P,), math.nan)
            if ok.any():
                rows = {name: t[ok] for name, t in inputs.items()}
                raw[ok] = FEEDBACK_SIGNALS[self.feedback_name](**rows, **self._signal_kwargs()).float()
        else:
            raw = torch.as_tensor(raw_rewards, dtype=torch.float32).reshape(-1).cpu()
        if raw.shape[0] != P:
            raise ValueError(f"feedback produced {raw.shape[0]} rewards for {P} prompts")
        raw = raw.float()

        # Ensembles have no arm to credit; their raw feedback is still logged for comparison.
        norm_arms = arms.clamp_min(0)
        normalized = self.reward_normalizer(raw, norm_arms)
        valid = torch.isfinite(normalized)
        self._stats["feedback_skipped"] += int((~valid).sum())
        if valid.any():
            self._stats["raw"].append(raw[valid])
            self._stats["norm"].append(normalized[valid])
        if self.bandit is not None and self.bandit.learns and valid.any():
            target = normalized - 0.5 if self.bandit.centered_rewards else normalized
            X, a, r = contexts[valid], arms[valid], target[valid]
            if self.granularity == "batch":
                X, a, r = X.float().mean(dim=0, keepdim=True), a[:1], r.mean().reshape(1)
            self.bandit.update(X, a.to(self.bandit.device), r)
        self.steps += 1
        return normalized

    def _signal_kwargs(self) -> dict:
        allowed = {"pair_loss": ("beta", "nll_weight")}.get(self.feedback_name, ())
        unknown = set(self.feedback_kwargs) - set(allowed)
        if unknown:
            raise ValueError(f"feedback signal {self.feedback_name!r} takes options {list(allowed)}, not {sorted(unknown)}")
        return self.feedback_kwargs

    # ------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Flat dict of the step(s) since the last call, for any logger; resets the step counters."""
        s, out = self._stats, {}
        out["laser/rm_passes"] = float(s["rm_passes"])
        out["laser/rm_passes_total"] = float(self.rm_passes_total)
        out["laser/invalid_samples"] = float(s["invalid"])
        out["laser/feedback_skipped"] = float(s["feedback_skipped"])
        if s["arms"]:
            arms = torch.cat(s["arms"])
            if not self.ensemble:
                frac = torch.bincount(arms, minlength=self.num_arms).double() / len(arms)
                for name, f in zip(self.names, frac.tolist()):
                    out[f"laser/arm_frac/{name}"] = f
                # Entropy of arm usage over log K: 1 = uniform, 0 = collapsed onto one arm.
                nz = frac[frac > 0]
                out["laser/arm_entropy"] = float(-(nz * nz.log()).sum() / math.log(self.num_arms)) if self.num_arms > 1 else 0.0
                domains = s["domains"]
                for domain in sorted({d for d in domains if d is not None}):
                    mask = torch.tensor([d == domain for d in domains])
                    dfrac = torch.bincount(arms[mask], minlength=self.num_arms).double() / int(mask.sum())
                    for name, f in zip(self.names, dfrac.tolist()):
                        out[f"laser/domain/{domain}/arm_frac/{name}"] = f
        for k, name in enumerate(self.names):
            if s["score_count"][k]:
                out[f"laser/arm_score_mean/{name}"] = s["score_sum"][k] / s["score_count"][k]
        if s["raw"]:
            out["laser/bandit_reward_raw"] = float(torch.cat(s["raw"]).mean())
            out["laser/bandit_reward_norm"] = float(torch.cat(s["norm"]).mean())
        if s["width"]:
            out["laser/exploration_width"] = sum(s["width"]) / len(s["width"])
        self._reset_step_stats()
        return out

    def _reset_step_stats(self) -> None:
        self._stats = {
            "arms": [], "domains": [], "width": [], "raw": [], "norm": [],
            "rm_passes": 0, "invalid": 0, "feedback_skipped": 0,
            "score_sum": defaultdict(float), "score_count": defaultdict(int),
        }

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the same bandit (saved beside the policy checkpoint)."""
        return {
            "arm_names": list(self.names),
            "baseline": self.baseline,
            "bandit": None if self.bandit is None else self.bandit.state_dict(),
            "reward_normalizer": self.reward_normalizer.state_dict(),
            "score_normalizer": None if self.score_normalizer is None else self.score_normalizer.state_dict(),
            "arm_states": [a.state_dict() if hasattr(a, "state_dict") else None for a in self.arms],
            "rm_passes_total": self.rm_passes_total,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["arm_names"] != self.names or state["baseline"] != self.baseline:
            raise ValueError(
                f"selector state is for arms {state['arm_names']} (baseline {state['baseline']}), "
                f"this selector has {self.names} (baseline {self.baseline})"
            )
        if self.bandit is not None:
            self.bandit.load_state_dict(state["bandit"])
        self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        if self.score_normalizer is not None and state["score_normalizer"] is not None:
            self.score_normalizer.load_state_dict(state["score_normalizer"])
        for arm, arm_state in zip(self.arms, state["arm_states"]):
            if arm_state is not None and hasattr(arm, "load_state_dict"):
                arm.load_state_dict(arm_state)
        self.rm_passes_total, self.steps = int(state["rm_passes_total"]), int(state["steps"])

    def save(self, path: str) -> None:
        """Write state_dict() atomically, so a crash mid-write never leaves a corrupt file."""
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))


def _unique_names(names: list[str]) -> list[str]:
    """Arm names become metric keys, so duplicates get their index appended."""
    seen = defaultdict(int)
    for n in names:
        seen[n] += 1
    return [f"{n}_{i}" if seen[n] > 1 else n for i, n in enumerate(names)]
