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

import copy
import dataclasses
import inspect
import math
import os
import pickle
import threading
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from laser_rl.arms import RewardArm, RewardArmError, ScoreNormalizer, make_arm
from laser_rl.bandits import BANDITS, Bandit, FixedArm, LinearBandit, RandomArm, RoundRobin, make_bandit
from laser_rl.feedback import FEEDBACK_INPUTS, FEEDBACK_SIGNALS, ConsensusEstimator, QuantileNormalizer

ENSEMBLE = -1  # the "arm" select() returns when every RM scores every sample
BASELINES = ("single", "random", "sequential", "mean", "wco", "uwo")
ENSEMBLES = ("mean", "wco", "uwo")
# Label-free, and the best label-free signal the replays and live runs measured; its audits are front-loaded
# (40% of prompts for 8 feedback steps, then 3%). Why, and where it fails: docs/feedback.md ("Defaults").
DEFAULT_FEEDBACK = "consensus"
# `alpha` is the exploration knob of whichever bandit is chosen; None keeps that bandit's own default.
EXPLORATION_KNOB = {"linucb": "alpha", "thompson": "v", "epsilon_greedy": "epsilon", "exp3": "gamma", "ucb1": "c"}
# Inputs that may carry NaN on purpose (an unlabeled sample); every other tensor input must be finite.
_NAN_ALLOWED = ("correct",)


class RewardSelector:
    """One reward model per prompt, chosen by a bandit, learned from a feedback signal.

    The default feedback is label-free `consensus` with its audits front-loaded: every RM scores 40% of the
    prompts in the first 8 feedback() steps, then 3% (about 1.4 RM passes per sample over a 32-step run with
    K = 4). Pass feedback="verifier" where labels exist, "pair_loss" for the paper's signal (docs/feedback.md).

    Thread safety: every call that changes state (select, score's bookkeeping, feedback, load) holds one
    lock, so asynchronous trainers may call from several threads; the RMs themselves score outside it.
    With consensus feedback, score() and feedback() belong to the last select(): keep one batch
    in flight at a time, or pass `audit_scores` to feedback() yourself.
    """

    def __init__(
        self,
        rms: Sequence[RewardArm | str | Callable],
        context_dim: int | None = None,
        bandit: str | Bandit = "linucb",
        baseline: str | None = None,
        alpha: float | None = None,
        lam: float = 1.0,
        discount: float = 1.0,
        feedback: str = DEFAULT_FEEDBACK,
        feedback_kwargs: dict | None = None,
        audit_fraction: float = 0.03,
        audit_warmup_steps: int = 8,
        audit_warmup_fraction: float = 0.4,
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
        if isinstance(rms, (str, bytes)) or len(rms) == 0:
            raise ValueError("RewardSelector needs a list of at least one reward model")
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES} or None for LASeR")
        if feedback not in FEEDBACK_SIGNALS:
            raise ValueError(f"unknown feedback signal {feedback!r}; choose one of {sorted(FEEDBACK_SIGNALS)}")
        if granularity not in ("prompt", "batch"):
            raise ValueError(f"granularity must be 'prompt' or 'batch', got {granularity!r}")
        for name, value in (("alpha", alpha), ("lam", lam), ("discount", discount), ("uwo_coef", uwo_coef)):
            if value is not None and not _finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        check_audit_schedule(audit_fraction, audit_warmup_steps, audit_warmup_fraction)
        self.feedback_kwargs = dict(feedback_kwargs or {})
        unknown = set(self.feedback_kwargs) - set(FEEDBACK_SIGNALS[feedback].options)
        if unknown:
            raise ValueError(f"feedback signal {feedback!r} takes options {list(FEEDBACK_SIGNALS[feedback].options)}, not {sorted(unknown)}")
        self.rms = [make_arm(a) for a in rms]
        self.names = _unique_names([a.name for a in self.rms])
        self.num_arms = len(self.rms)
        self.baseline, self.granularity, self.feedback_name = baseline, granularity, feedback
        self.uwo_coef, self.skip_invalid = float(uwo_coef), skip_invalid
        self.ensemble = baseline in ENSEMBLES
        self.audit_fraction = float(audit_fraction)
        # Consensus: audit_warmup_fraction (at least) of prompts for the first audit_warmup_steps feedback steps,
        # then audit_fraction. Early audits keep the bandit off arms it has not yet seen judged (the noise RM).
        self.audit_warmup_steps, self.audit_warmup_fraction = int(audit_warmup_steps), float(audit_warmup_fraction)

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
            if alpha is not None and bandit in EXPLORATION_KNOB:
                common[EXPLORATION_KNOB[bandit]] = float(alpha)
            if contextual:
                common.update(lam=lam, discount=discount)
            elif bandit in ("exp3", "ucb1"):
                common.update(discount=discount)
            self.bandit = make_bandit(bandit, self.num_arms, context_dim if contextual else None, **common)

        self.score_normalizer = ScoreNormalizer(self.num_arms) if normalize_scores else None
        self.reward_normalizer = QuantileNormalizer(
            self.num_arms, window=reward_window, quantiles=reward_quantiles, per_arm=per_arm_normalization, warmup=reward_warmup
        )
        self.consensus: ConsensusEstimator | None = None
        if feedback == "consensus" and self.bandit is not None and self.bandit.learns:  # baselines learn nothing
            options = {k: self.feedback_kwargs[k] for k in ("window", "min_prompts") if k in self.feedback_kwargs}
            self.consensus = ConsensusEstimator(self.num_arms, **options)
        self._audit_generator = torch.Generator().manual_seed(int(seed) + 7919)
        self._pending_audit: dict | None = None  # the last select()'s arms and audit mask, then score()'s audit scores
        self.last_audit = torch.zeros(0, dtype=torch.bool)  # [P]: which prompts the last select() audits
        self.rm_passes_total = 0
        self.steps = 0
        self._lock = threading.RLock()
        self._reset_step_stats()

    # ------------------------------------------------------------------------------------------
    @property
    def feedback_inputs(self) -> tuple[str, ...]:
        """Names of the inputs the feedback signal needs (consensus: none from the caller, see score())."""
        if self.feedback_name == "consensus":
            return ()
        return FEEDBACK_SIGNALS[self.feedback_name].inputs

    @property
    def audits(self) -> bool:
        """Whether select() audits a fraction of prompts with every RM (consensus feedback on a learning bandit)."""
        return self.consensus is not None and self.current_audit_fraction > 0  # consensus exists only on learning bandits

    @property
    def current_audit_fraction(self) -> float:
        """The share of prompts the next select() audits: during the warm-up the larger of the two shares (the
        warm-up only adds audits: audit_fraction=1.0 audits everything from the start), then audit_fraction."""
        if self.steps < self.audit_warmup_steps:
            return max(self.audit_warmup_fraction, self.audit_fraction)
        return self.audit_fraction

    def select(self, contexts: Tensor, domains: Sequence[str] | None = None) -> Tensor:
        """One arm per prompt, LongTensor [P] on the CPU (ENSEMBLE for score ensembles).

        contexts: [P, d] finite prompt contexts (see laser_rl.context). Non-contextual baselines only use P.
        domains: optional tag per prompt, for per-domain selection metrics.
        With consensus feedback, a random audit_fraction of the prompts is marked for scoring by every RM in
        the next score() call (`last_audit`).
        """
        P = _check_contexts(contexts)
        if domains is not None and (isinstance(domains, str) or len(domains) != P):
            raise ValueError(f"got {len(domains)} domain tags for {P} prompts")
        with self._lock:
            if self.bandit is None:
                arms = torch.full((P,), ENSEMBLE, dtype=torch.long)
            elif self.granularity == "batch":  # the paper's code: one arm per batch, from the mean context
                arms = self.bandit.select(contexts.float().mean(dim=0, keepdim=True)).cpu().expand(P).clone()
            else:
                arms = self.bandit.select(contexts).cpu()
            audit = torch.zeros(P, dtype=torch.bool)
            if self.audits:
                audit = torch.rand(P, generator=self._audit_generator) < self.current_audit_fraction
            self.last_audit = audit
            self._pending_audit = {"arms": arms.clone(), "audit": audit, "scores": None}
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

        Samples are grouped per prompt: arms is select()'s output repeated n times each. Samples of an
        audited prompt (consensus feedback) are scored by every RM too; their extra passes count in
        `laser/rm_passes` and `laser/audit_rm_passes`. A sample whose RM raised or returned NaN/inf raises
        RewardArmError naming the arm and the sample, and nothing is counted; with skip_invalid=True its
        reward is NaN instead, counted in `laser/invalid_samples`.
        """
        N = len(prompts)
        arms = torch.as_tensor(arms)
        if arms.is_floating_point():
            raise ValueError(f"arms must be integer indices, got dtype {arms.dtype}")
        arms = arms.long().reshape(-1).cpu()
        if N == 0:
            raise ValueError("empty batch: no samples to score")
        if len(responses) != N or arms.shape[0] != N or (labels is not None and len(labels) != N):
            raise ValueError(
                f"score needs one response, arm (and label) per prompt: got {N} prompts, {len(responses)} responses, "
                f"{arms.shape[0]} arms" + ("" if labels is None else f", {len(labels)} labels")
            )
        if not self.ensemble and ((arms < 0) | (arms >= self.num_arms)).any():
            raise ValueError(f"arm indices must lie in [0, {self.num_arms}), got {arms.unique().tolist()}")
        with self._lock:
            pending = self._pending_audit
        audited = self._audited_samples(pending, arms, N) if pending is not None else None

        # Score first, count after: an RM that fails leaves every counter as it was, so a retry counts once.
        if self.ensemble:
            wanted = {k: torch.arange(N) for k in range(self.num_arms)}
        else:
            wanted = {}
            for k in range(self.num_arms):
                rows = arms == k
                if audited is not None:
                    rows = rows | audited
                if rows.any():
                    wanted[k] = rows.nonzero().squeeze(1)
        scored = {k: self._score_arm(k, idx, prompts, responses, labels) for k, idx in wanted.items()}

        with self._lock:
            passes = audit_passes = 0
            for k, (idx, scores) in ((k, (wanted[k], v)) for k, v in scored.items()):
                count = len(idx) * self.rms[k].passes_per_sample
                passes += count
                if audited is not None:
                    audit_passes += int((audited[idx] & (arms[idx] != k)).sum()) * self.rms[k].passes_per_sample
                finite = torch.isfinite(scores)
                own = finite & (arms[idx] == k) if not self.ensemble else finite
                if own.any():
                    self._stats["score_sum"][k] += float(scores[own].sum())
                    self._stats["score_count"][k] += int(own.sum())
                if self.score_normalizer is not None and finite.any():
                    self.score_normalizer.update(k, scores[finite])
                    scored[k] = torch.where(finite, self.score_normalizer.normalize(k, scores), scores)
            if self.ensemble:
                rewards = self._combine(torch.stack([scored[k] for k in range(self.num_arms)]))
            else:
                rewards = torch.full((N,), math.nan)
                for k, idx in wanted.items():
                    own = arms[idx] == k
                    rewards[idx[own]] = scored[k][own]
            if audited is not None and pending is self._pending_audit:
                n = N // pending["arms"].shape[0]
                table = torch.full((N, self.num_arms), math.nan)
                for k, idx in wanted.items():
                    table[idx, k] = scored[k]
                pending["scores"] = table.reshape(-1, n, self.num_arms).permute(0, 2, 1)  # [P, K, n]
            self.rm_passes_total += passes
            self._stats["rm_passes"] += passes
            self._stats["audit_rm_passes"] += audit_passes
            self._stats["invalid"] += int((~torch.isfinite(rewards)).sum())
            return rewards

    def _audited_samples(self, pending: dict, arms: Tensor, N: int) -> Tensor | None:
        """[N] bool: samples of prompts the last select() audited, or None when nothing is audited."""
        if not pending["audit"].any():
            return None
        P = pending["arms"].shape[0]
        if N % P or not torch.equal(arms, pending["arms"].repeat_interleave(N // P)):
            raise ValueError(
                "consensus feedback audits prompts picked by the last select(): score() must get that batch's "
                f"samples grouped per prompt (select's {P} arms, each repeated n times), got {N} samples"
            )
        return pending["audit"].repeat_interleave(N // P)

    def _score_arm(self, k: int, idx: Tensor, prompts, responses, labels) -> Tensor:
        arm, name = self.rms[k], self.names[k]
        sub = idx.tolist()
        try:
            scores = arm.score(
                [prompts[i] for i in sub], [responses[i] for i in sub], None if labels is None else [labels[i] for i in sub]
            )
        except Exception as e:
            raise RewardArmError(f"reward model {name!r} (arm {k}) failed on samples {sub[:8]}{'...' if len(sub) > 8 else ''}: {e}") from e
        # RewardArm.score has already checked the type and count of what the arm returned (arms._validated_scores).
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
        return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.nan))  # +-inf -> NaN

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
        **inputs,
    ) -> Tensor:
        """Compute the bandit reward per prompt and update the bandit; returns the normalized rewards [P].

        Pass whatever grouped inputs you have ([P, n] per sample, [P] per prompt); the signal uses those it
        needs (`feedback_inputs`):
          pair_loss: scores, policy_logps, ref_logps, response_lengths   (SEQUENCE log-probs)
          progress:  loss_before, loss_after                             ([P] each)
          verifier:  scores, correct            (bool [P, n]; float with NaN for unlabeled samples)
          spread:    scores
          majority:  scores, answers            (P lists of n extracted answers, None if none)
          consensus: nothing: the audit scores come from the last select()/score() of this batch
                     (or pass audit_scores [P, K, n], NaN rows for prompts not audited)
        or raw_rewards [P] to bring your own signal. Prompts whose signal is NaN or inf (a skipped sample,
        no mixed labels, not audited) are left out of the update and counted in `laser/feedback_skipped`.
        A call that raises changes nothing.
        """
        P = _check_contexts(contexts)
        arms = torch.as_tensor(arms)
        if arms.is_floating_point():
            raise ValueError(f"arms must be integer indices, got dtype {arms.dtype}")
        arms = arms.long().reshape(-1).cpu()
        if arms.shape[0] == 0:
            raise ValueError("empty batch: no prompts to learn from")
        if arms.shape[0] != P:
            raise ValueError(f"feedback got {P} contexts for {arms.shape[0]} arms")
        low = ENSEMBLE if self.ensemble else 0
        if ((arms < low) | (arms >= self.num_arms)).any() or (self.ensemble and (arms != ENSEMBLE).any()):
            raise ValueError(f"arm indices must lie in [0, {self.num_arms}), got {arms.unique().tolist()}")
        dim = getattr(self.bandit, "dim", None)
        if dim is not None and contexts.shape[1] != dim:
            raise ValueError(f"context dimension mismatch: bandit was built for dim={dim}, got {contexts.shape[1]}")
        unknown = set(inputs) - set(FEEDBACK_INPUTS)
        if unknown:
            raise ValueError(f"unknown feedback inputs {sorted(unknown)}; known: {list(FEEDBACK_INPUTS)}")

        with self._lock:
            extra_rows = None  # consensus: every RM's reward on audited prompts (full-information updates)
            window = None
            if raw_rewards is not None:
                raw = torch.as_tensor(raw_rewards, dtype=torch.float32).reshape(-1).cpu()
                if raw.shape[0] != P:
                    raise ValueError(f"feedback got {raw.shape[0]} raw rewards for {P} prompts")
                raw = torch.where(torch.isfinite(raw), raw, torch.full_like(raw, math.nan))  # +-inf is no signal
            elif self.feedback_name == "consensus":
                raw, extra_rows, window = self._consensus_rewards(arms, inputs.get("audit_scores"))
            else:
                raw = self._signal_rewards(P, inputs)

            rows_arms, rows_raw, rows_ctx = arms.clamp_min(0), raw, torch.arange(P)
            if extra_rows is not None:  # the other RMs' rewards on audited prompts
                p_idx, k_idx, r = extra_rows
                rows_arms = torch.cat([rows_arms, k_idx])
                rows_raw = torch.cat([rows_raw, r])
                rows_ctx = torch.cat([rows_ctx, p_idx])
            normalized_all, histories = self.reward_normalizer.transform(rows_raw, rows_arms)
            valid = torch.isfinite(normalized_all)
            if self.bandit is not None and self.bandit.learns and valid.any():
                target = normalized_all - 0.5 if self.bandit.centered_rewards else normalized_all
                X, a, r = contexts[rows_ctx[valid]], rows_arms[valid], target[valid]
                if self.granularity == "batch":
                    X, a, r = X.float().mean(dim=0, keepdim=True), a[:1], r.mean().reshape(1)
                self.bandit.update(X, a.to(self.bandit.device), r)  # atomic: raises before changing anything

            # Nothing can fail from here on: commit.
            self.reward_normalizer.commit(histories)
            if window is not None:
                self.consensus.commit(window)
            normalized = normalized_all[:P]
            self._stats["feedback_skipped"] += int((~torch.isfinite(normalized)).sum())
            if valid[:P].any():
                self._stats["raw"].append(raw[valid[:P]])
                self._stats["norm"].append(normalized[valid[:P]])
            self._pending_audit = None
            self.steps += 1
            return normalized

    def _signal_rewards(self, P: int, inputs: dict) -> Tensor:
        """Raw rewards [P] of the per-prompt signals, NaN for prompts with a non-finite input."""
        signal = FEEDBACK_SIGNALS[self.feedback_name]
        missing = [name for name in signal.inputs if inputs.get(name) is None]
        if missing:
            raise ValueError(f"feedback signal {self.feedback_name!r} needs {list(signal.inputs)}; missing {missing}")
        used, ok = {}, torch.ones(P, dtype=torch.bool)
        for name in signal.inputs:
            value = inputs[name]
            if name == "answers":
                if isinstance(value, (str, bytes)) or len(value) != P:
                    raise ValueError(f"feedback input 'answers' needs one list of answers per prompt ({P})")
                used[name] = value
                continue
            t = torch.as_tensor(value).detach().cpu()
            if t.dim() == 0 or t.shape[0] != P:
                raise ValueError(f"feedback input {name!r} has shape {tuple(t.shape)}, expected {P} rows (one per prompt)")
            if name not in _NAN_ALLOWED:
                ok &= torch.isfinite(t.float().reshape(P, -1)).all(dim=1)  # a skipped sample: no signal for its prompt
            used[name] = t
        raw = torch.full((P,), math.nan)
        if ok.any():
            rows = {name: ([v for v, keep in zip(t, ok.tolist()) if keep] if name == "answers" else t[ok]) for name, t in used.items()}
            raw[ok] = signal.fn(**rows, **self.feedback_kwargs).float()
        return torch.where(torch.isfinite(raw), raw, torch.full_like(raw, math.nan))

    def _consensus_rewards(self, arms: Tensor, audit_scores: Tensor | None):
        """Chosen arms' rewards [P] (NaN where not audited), the other RMs' rewards as extra update rows, and
        the consensus window to commit."""
        P = arms.shape[0]
        if self.consensus is None:  # a baseline: it learns nothing, so it keeps no consensus
            return torch.full((P,), math.nan), None, None
        if audit_scores is None:
            pending = self._pending_audit
            if pending is None or not torch.equal(pending["arms"], arms):
                raise ValueError(
                    "consensus feedback learns from the audit of the last select()/score() of this batch: call "
                    "select, score, feedback in that order for one batch, or pass audit_scores [P, K, n]"
                )
            audit_scores = pending["scores"]
            if audit_scores is None:
                return torch.full((P,), math.nan), None, None  # nothing audited in this batch
        audit_scores = torch.as_tensor(audit_scores).float().cpu()
        if audit_scores.dim() != 3 or audit_scores.shape[0] != P or audit_scores.shape[1] != self.num_arms:
            raise ValueError(f"audit_scores must be [{P}, {self.num_arms}, n], got {tuple(audit_scores.shape)}")
        rows = torch.isfinite(audit_scores).all(dim=2).all(dim=1).nonzero().squeeze(1)  # fully audited prompts
        raw = torch.full((P,), math.nan)
        if len(rows) == 0 or audit_scores.shape[2] < 2:
            return raw, None, None
        options = {k: v for k, v in self.feedback_kwargs.items() if k == "method"}
        rewards, _, window = self.consensus.rewards(audit_scores[rows], **options)  # [A, K]
        chosen = arms[rows]
        raw[rows] = rewards.gather(1, chosen.unsqueeze(1)).squeeze(1)
        others = torch.ones_like(rewards, dtype=torch.bool)
        others[torch.arange(len(rows)), chosen] = False
        a_idx, k_idx = others.nonzero(as_tuple=True)
        return raw, (rows[a_idx], k_idx, rewards[a_idx, k_idx]), window

    # ------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Flat dict of the step(s) since the last call, for any logger; resets the step counters."""
        with self._lock:
            s, out = self._stats, {}
            out["laser/rm_passes"] = float(s["rm_passes"])
            out["laser/rm_passes_total"] = float(self.rm_passes_total)
            out["laser/invalid_samples"] = float(s["invalid"])
            out["laser/feedback_skipped"] = float(s["feedback_skipped"])
            if self.consensus is not None:
                out["laser/audit_rm_passes"] = float(s["audit_rm_passes"])
            if hasattr(self.bandit, "repairs"):  # inverses recomputed after float32 drift (see LinearBandit)
                out["laser/bandit_repairs"] = float(self.bandit.repairs)
                out["laser/bandit_clipped_rows"] = float(getattr(self.bandit, "clipped_rows", 0))
            if s["arms"]:
                arms = torch.cat(s["arms"])
                if not self.ensemble:
                    frac = torch.bincount(arms, minlength=self.num_arms).double() / len(arms)
                    for name, f in zip(self.names, frac.tolist()):
                        out[f"laser/arm_frac/{name}"] = f
                    # Entropy of arm usage over log K: 1 = uniform, 0 = collapsed onto one arm (never -0.0).
                    nz = frac[frac > 0]
                    entropy = float(-(nz * nz.log()).sum() / math.log(self.num_arms)) if self.num_arms > 1 else 0.0
                    out["laser/arm_entropy"] = max(entropy, 0.0)
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
            "rm_passes": 0, "audit_rm_passes": 0, "invalid": 0, "feedback_skipped": 0,
            "score_sum": defaultdict(float), "score_count": defaultdict(int),
        }

    # ------------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        """What gives the saved bandit its meaning: a checkpoint with other settings is refused on load."""
        bandit = self.bandit
        return {
            "arm_names": list(self.names),
            "baseline": self.baseline,
            "bandit": None if bandit is None else type(bandit).__name__,
            "context_dim": getattr(bandit, "dim", None),
            "lam": getattr(bandit, "lam", None),
            "feedback": self.feedback_name,
            "granularity": self.granularity,
            "reward_window": self.reward_normalizer.window,
            "reward_quantiles": list(self.reward_normalizer.quantiles),
            "per_arm_normalization": self.reward_normalizer.per_arm,
            "normalize_scores": self.score_normalizer is not None,
        }

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the same bandit (saved beside the policy checkpoint).

        The ContextEncoder is not part of it: rebuild it with the same (input dim, proj_dim, seed), which
        gives the same projection, or save encoder.state_dict() beside this.
        """
        with self._lock:
            return copy.deepcopy({
                "settings": self._settings(),
                "arm_names": list(self.names),
                "baseline": self.baseline,
                "bandit": None if self.bandit is None else self.bandit.state_dict(),
                "reward_normalizer": self.reward_normalizer.state_dict(),
                "score_normalizer": None if self.score_normalizer is None else self.score_normalizer.state_dict(),
                "consensus": None if self.consensus is None else self.consensus.state_dict(),
                "audit_generator": self._audit_generator.get_state(),
                "arm_states": [a.state_dict() if hasattr(a, "state_dict") else None for a in self.rms],
                "rm_passes_total": self.rm_passes_total,
                "steps": self.steps,
            })

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(). A state for other settings (arms, bandit kind, dim, lam, feedback, window, ...)
        is an error before anything is touched; a load that fails part-way restores the previous state."""
        if not isinstance(state, Mapping) or "arm_names" not in state:
            raise ValueError("not a RewardSelector state: it has no 'arm_names'")
        if state["arm_names"] != self.names or state.get("baseline") != self.baseline:
            raise ValueError(
                f"selector state is for arms {state['arm_names']} (baseline {state.get('baseline')}), "
                f"this selector has {self.names} (baseline {self.baseline})"
            )
        saved = state.get("settings")
        if saved is not None:
            ours = self._settings()
            diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
            if diff:
                raise ValueError("selector state was saved with other settings: " + ", ".join(
                    f"{k}={was!r} (this selector: {now!r})" for k, (was, now) in diff.items()))
        if len(state.get("arm_states", [])) != self.num_arms:
            raise ValueError(f"selector state holds {len(state.get('arm_states', []))} arm states, expected {self.num_arms}")
        with self._lock:
            backup = self.state_dict()
            try:
                self._load(state)
            except Exception:
                self._load(backup)
                raise

    def _load(self, state: dict) -> None:
        if self.bandit is not None:
            self.bandit.load_state_dict(state["bandit"])
        self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        if self.score_normalizer is not None and state["score_normalizer"] is not None:
            self.score_normalizer.load_state_dict(state["score_normalizer"])
        if self.consensus is not None and state.get("consensus") is not None:
            self.consensus.load_state_dict(state["consensus"])
        if state.get("audit_generator") is not None:
            self._audit_generator.set_state(state["audit_generator"])
        for arm, arm_state in zip(self.rms, state["arm_states"]):
            if arm_state is not None and hasattr(arm, "load_state_dict"):
                arm.load_state_dict(arm_state)
        self.rm_passes_total, self.steps = int(state["rm_passes_total"]), int(state["steps"])
        self._pending_audit = None

    def save(self, path: str) -> None:
        """Write state_dict() atomically (temporary file, then rename): a crash mid-write leaves the previous file whole."""
        state = self.state_dict()
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, path: str) -> None:
        """Load a file written by save() (tensors and plain data only: weights_only=True, no code runs)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"selector checkpoint {path} does not exist") from None
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise ValueError(f"selector checkpoint {path} is not a readable RewardSelector state (truncated, empty or "
                             f"another kind of file): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError) as e:
            raise ValueError(f"selector checkpoint {path} is malformed: missing or wrong entry {e}") from None
        except ValueError as e:
            raise ValueError(f"selector checkpoint {path}: {e}") from None

    def __getstate__(self) -> dict:  # picklable (Ray, deepcopy): the lock is rebuilt on the other side
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def check_audit_schedule(
    audit_fraction: float | None = None, audit_warmup_steps: int | None = None, audit_warmup_fraction: float | None = None
) -> None:
    """RewardSelector's checks of a consensus audit schedule, for callers that validate flags before building one
    (None: not given, the selector's default). Raises ValueError naming the bad value."""
    for name, value in (("audit_fraction", audit_fraction), ("audit_warmup_fraction", audit_warmup_fraction)):
        if value is None:
            continue
        if not _finite_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    steps = audit_warmup_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"audit_warmup_steps must be an integer >= 0, got {steps!r}")


def selector_from_flags(rms: Sequence, flags, context_dim: int | None = None) -> RewardSelector:
    """The one translation from a flag namespace (argparse Namespace, dataclass or dict) to a RewardSelector.

    Field names equal RewardSelector's keywords; `beta` (and `nll_weight`, `min_share`, `method`)
    become feedback options of the signals that take them. Absent fields keep RewardSelector's defaults;
    fields RewardSelector does not know are ignored (a CLI namespace holds other flags too).
    """
    if isinstance(flags, Mapping):
        values = dict(flags)
    elif dataclasses.is_dataclass(flags):
        values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(flags)}
    else:
        values = dict(vars(flags))
    accepted = set(inspect.signature(RewardSelector.__init__).parameters) - {"self", "rms", "context_dim"}
    kwargs = {k: v for k, v in values.items() if k in accepted and v is not None}
    feedback = kwargs.get("feedback", DEFAULT_FEEDBACK)
    options = dict(kwargs.pop("feedback_kwargs", None) or {})
    for key in FEEDBACK_SIGNALS[feedback].options if feedback in FEEDBACK_SIGNALS else ():
        if values.get(key) is not None:
            options[key] = values[key]
    if isinstance(kwargs.get("reward_quantiles"), list):
        kwargs["reward_quantiles"] = tuple(kwargs["reward_quantiles"])
    return RewardSelector(rms, context_dim=context_dim, feedback_kwargs=options or None, **kwargs)


def _check_contexts(contexts) -> int:
    """Number of prompts P of a finite [P, d] context tensor; a clear error otherwise."""
    if not isinstance(contexts, Tensor) or contexts.dim() != 2 or contexts.shape[0] == 0:
        raise ValueError(f"contexts must be a non-empty [num_prompts, dim] tensor, got {getattr(contexts, 'shape', type(contexts))}")
    if contexts.is_floating_point() and not torch.isfinite(contexts).all():
        raise ValueError("contexts contain NaN or inf")
    return contexts.shape[0]


def _unique_names(names: list[str]) -> list[str]:
    """Arm names become metric keys, so duplicates get their index appended."""
    seen = defaultdict(int)
    for n in names:
        seen[n] += 1
    return [f"{n}_{i}" if seen[n] > 1 else n for i, n in enumerate(names)]
