"""Feedback signals: how good was the chosen reward model for a prompt? Plus the paper's reward normalization.

Every signal takes grouped tensors, P prompts x n samples each, and returns float32 [P] raw bandit
rewards (higher = better choice of arm). NaN marks "no signal for this prompt"; callers skip those rows.

- pair_loss: the paper's signal in online-RL form, -(DPO + NLL) on the RM's best vs. worst sample.
- progress: loss before minus loss after the policy update (answers "negative loss favours RMs the
  policy already agrees with": an RM that teaches something gets rewarded).
- verifier: pairwise ranking accuracy of the RM against label checks, where labels exist (prompts or samples
  without a label carry NaN and give no signal).
- spread: within-group std of the RM's scores (an RM that cannot tell samples apart gives GRPO no signal).
- majority: label-free; the RM's pairwise agreement with self-consistency pseudo-labels (a sample is "right"
  when its extracted final answer is the prompt's majority answer, as in test-time RL).
- consensus: label-free; on an audited fraction of prompts every RM scores the samples, each RM's
  reliability is estimated from how the RMs agree (a one-factor model, the continuous analogue of the
  spectral meta-learner), and each RM is rewarded by its agreement with the reliability-weighted truth
  estimate. Costs 1 + a * (K - 1) RM passes per sample, a the share audited (RewardSelector's default, and
  so its default feedback: 40% of prompts in the first 8 steps, then 3%).

Which signals read labels: only `verifier`. The others are label-free; `pair_loss` and `progress` need
the policy's and reference's log-probs, `majority` an answer extractor, `consensus` extra RM passes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
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
    correct sample higher; a score tie counts 0.5. `correct` is bool or 0/1, or float with NaN for samples
    without a label (partial labels): unlabeled samples form no pair. NaN for prompts without a mixed pair.
    """
    scores = _grouped("scores", scores, min_samples=2)
    correct = torch.as_tensor(correct, device=scores.device)
    _same_shape(("scores", scores), ("correct", correct))
    if correct.dtype == torch.bool:
        labeled = torch.ones_like(correct)
    else:
        labeled = ~torch.isnan(correct.float()) if correct.is_floating_point() else torch.ones_like(correct, dtype=torch.bool)
        values = torch.where(labeled, correct.float(), torch.zeros_like(correct, dtype=torch.float32))
        if ((values != 0) & (values != 1)).any():
            raise ValueError("correct must be boolean (or 0/1) labels, with NaN only for unlabeled samples")
        correct = values.bool()

    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # [P, n, n]: score_i - score_j
    right, wrong = correct & labeled, ~correct & labeled
    mixed = right.unsqueeze(2) & wrong.unsqueeze(1)  # i labeled correct, j labeled wrong
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    num_pairs = mixed.sum(dim=(1, 2)).float()
    acc = (wins * mixed).sum(dim=(1, 2)) / num_pairs.clamp(min=1)
    return torch.where(num_pairs > 0, acc, torch.full_like(acc, float("nan")))


def majority_labels(answers: Sequence[Sequence[Hashable | None]], min_share: float = 0.0) -> Tensor:
    """Self-consistency pseudo-labels [P, n] (float: 1 = the prompt's majority answer, 0 = another, NaN = none).

    `answers[p][i]` is sample i's extracted final answer (None when nothing could be extracted; such a
    sample counts as not agreeing with the majority). A prompt whose top answer is tied, missing, or held by
    fewer than `min_share` of its samples gets an all-NaN row: no pseudo-label, no feedback.
    """
    if not 0.0 <= float(min_share) <= 1.0 or math.isnan(float(min_share)):
        raise ValueError(f"min_share must lie in [0, 1], got {min_share}")
    if isinstance(answers, (str, bytes)) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of per-prompt lists of extracted answers")
    n = len(answers[0])
    if n < 2 or any(isinstance(row, (str, bytes)) or len(row) != n for row in answers):
        raise ValueError(f"answers must be grouped as [prompts][samples] with the same n >= 2 per prompt, got lengths "
                         f"{[len(row) for row in answers][:8]}")
    out = torch.full((len(answers), n), float("nan"))
    for p, row in enumerate(answers):
        counts = Counter(a for a in row if a is not None).most_common(2)
        if not counts or (len(counts) == 2 and counts[0][1] == counts[1][1]) or counts[0][1] < min_share * n:
            continue
        top = counts[0][0]
        out[p] = torch.tensor([float(a is not None and a == top) for a in row])
    return out


def majority_agreement(scores: Tensor, answers: Sequence[Sequence[Hashable | None]], min_share: float = 0.0) -> Tensor:
    """The RM's pairwise agreement with self-consistency pseudo-labels (verifier_agreement on majority_labels), [P]."""
    scores = _grouped("scores", scores, min_samples=2)
    labels = majority_labels(answers, min_share)
    if labels.shape != scores.shape:
        raise ValueError(f"answers are grouped as {tuple(labels.shape)}, scores as {tuple(scores.shape)}")
    return verifier_agreement(scores, labels)


def score_spread(scores: Tensor) -> Tensor:
    """Within-group population std of the RM's scores, [P]."""
    scores = _grouped("scores", scores, min_samples=2)
    return scores.std(dim=1, correction=0)


# ----- consensus: reliability-weighted agreement among RMs, no labels --------------------------------
def standardize_groups(audit_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Within-prompt z-scores of every RM's scores, [P, K, n] -> (z [P, K, n], varies [P, K]).

    An RM whose scores are constant on a prompt abstains there (z = 0, varies = False): it cannot rank.
    """
    x = torch.as_tensor(audit_scores).float()
    if x.dim() != 3 or 0 in x.shape or x.shape[2] < 2:
        raise ValueError(f"audit_scores must be [prompts, reward models, samples] with >= 2 samples, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("audit_scores contains NaN or inf")
    centered = x - x.mean(dim=2, keepdim=True)
    std = centered.pow(2).mean(dim=2, keepdim=True).sqrt()
    varies = std.squeeze(2) > 1e-6 * (1.0 + x.abs().amax(dim=2))
    z = torch.where(varies.unsqueeze(2), centered / std.clamp_min(1e-30), torch.zeros_like(x))
    return z, varies


def one_factor_loadings(z: Tensor, varies: Tensor, min_prompts: int = 4, iters: int = 50) -> Tensor | None:
    """Each RM's loading on one shared latent "quality" factor, [K], from z-scored audits [P, K, n].

    Model: z_k = w_k * t + noise_k (independent noise), so the correlation of RMs k != l is w_k * w_l: a
    rank-one off-diagonal correlation matrix (Parisi et al.'s spectral meta-learner, for scores instead of
    votes). Correlations use only prompts where both RMs vary; the rank-one fit iterates the leading
    eigenvector with the diagonal replaced by w^2 (principal-axis factoring). The sign is fixed so that the
    loadings sum to > 0: most RMs are assumed better than chance. None until `min_prompts` audits exist.
    """
    P, K, _ = z.shape
    if P < min_prompts or K < 2:
        return None
    both = (varies.unsqueeze(2) & varies.unsqueeze(1)).float()  # [P, K, K]: prompts where k and l both rank
    products = torch.einsum("pki,pli->pkl", z, z) / z.shape[2]  # per-prompt correlation of k and l
    counts = both.sum(0)
    corr = (products * both).sum(0) / counts.clamp_min(1)
    corr = torch.where(counts > 0, corr, torch.zeros_like(corr)).double()
    off = ~torch.eye(K, dtype=torch.bool)
    w2 = (corr.abs() * off).amax(dim=1).clamp(max=0.9025)
    w = torch.zeros(K, dtype=torch.float64)
    for _ in range(iters):
        m = torch.where(off, corr, torch.diag(w2))
        vals, vecs = torch.linalg.eigh(m)
        w = vecs[:, -1] * vals[-1].clamp_min(0).sqrt()
        w2 = w.pow(2).clamp(max=0.9025)
    if float(w.sum()) < 0:
        w = -w
    return w.clamp(-0.95, 0.95).float()


def consensus_truth(z: Tensor, loadings: Tensor | None, exclude: int | None = None) -> Tensor:
    """The truth estimate per sample, [P, n]: factor-score weights w_k / (1 - w_k^2) on the z-scores.

    Without loadings yet (too few audits), the median of the RMs' z-scores: robust to one wild RM.
    `exclude` leaves one RM out (leave-one-out consensus).
    """
    keep = torch.ones(z.shape[1], dtype=torch.bool)
    if exclude is not None:
        keep[exclude] = False
    if loadings is None:
        return z[:, keep].median(dim=1).values
    weights = (loadings / (1.0 - loadings.pow(2)).clamp_min(0.05)) * keep
    return torch.einsum("pki,k->pi", z, weights)


def agreement_with_truth(scores: Tensor, truth: Tensor) -> Tensor:
    """Soft pairwise agreement of an RM's ranking with a truth estimate, [P]: pairs weighted by the gap in
    the truth estimate (confident pairs count most). NaN where truth is flat.

    An RM that ranks some of a prompt's samples is judged on the pairs it ranks: its ties are no preference,
    not half an error (an exact 0/1 checker ties every pair of equally correct samples, where the continuous
    RMs' own preferences dominate the truth estimate). An RM constant on the prompt is blind there: 0.5.
    """
    diff_truth = truth.unsqueeze(2) - truth.unsqueeze(1)  # [P, n, n]
    weight = diff_truth.clamp_min(0)  # ordered pairs with truth_i > truth_j
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)
    ranked = diff != 0
    varies = ranked.flatten(1).any(dim=1).view(-1, 1, 1)  # the RM ranks something on the prompt
    weight = torch.where(varies, weight * ranked, weight)
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    total = weight.sum(dim=(1, 2))
    acc = (wins * weight).sum(dim=(1, 2)) / total.clamp_min(1e-12)
    return torch.where(total > 1e-9, acc, torch.full_like(acc, float("nan")))


CONSENSUS_METHODS = ("weighted", "leave_one_out", "disattenuated")


def consensus_agreement(audit_scores: Tensor, loadings: Tensor | None = None, method: str = "weighted") -> Tensor:
    """Every RM's bandit reward on audited prompts, [P, K]: how well its ranking agrees with the consensus.

    audit_scores [P, K, n]: every RM's scores of each audited prompt's n samples. Methods:
    - "weighted": pairwise agreement with the truth estimate from all K RMs (a reliable RM's own vote counts,
      weighted by its reliability);
    - "leave_one_out": agreement with the estimate from the other RMs. With only two informative RMs on a
      domain this is symmetric (each is scored by the other) and cannot tell them apart;
    - "disattenuated": the within-prompt correlation of the RM's z-scores with the leave-one-out estimate,
      divided by that estimate's correlation with the truth under the factor model, sqrt(S / (1 + S)) with
      S = sum w_l^2 / (1 - w_l^2) over the other RMs (Spearman's correction for attenuation): an estimate of
      the RM's own correlation with the truth on this prompt, without its own noise in the reference.
    """
    if method not in CONSENSUS_METHODS:
        raise ValueError(f"unknown consensus method {method!r}; choose one of {CONSENSUS_METHODS}")
    z, _ = standardize_groups(audit_scores)
    K = z.shape[1]
    if method == "weighted":
        truth = consensus_truth(z, loadings)
        return torch.stack([agreement_with_truth(z[:, k], truth) for k in range(K)], dim=1)
    cols = []
    for k in range(K):
        truth = consensus_truth(z, loadings, exclude=k)
        if method == "leave_one_out":
            cols.append(agreement_with_truth(z[:, k], truth))
            continue
        centered = truth - truth.mean(dim=1, keepdim=True)
        norm = centered.pow(2).mean(dim=1).sqrt()
        corr = (z[:, k] * centered).mean(dim=1) / norm.clamp_min(1e-12)  # z_k has unit variance (or is 0: blind)
        if loadings is not None:
            others = torch.cat([loadings[:k], loadings[k + 1 :]])
            S = float((others.pow(2) / (1 - others.pow(2)).clamp_min(0.05)).sum())
            corr = corr / max(math.sqrt(S / (1 + S)), 0.1)
        cols.append(torch.where(norm > 1e-9, corr, torch.full_like(corr, float("nan"))))
    return torch.stack(cols, dim=1)


class ConsensusEstimator:
    """Sliding window of audited prompts (z-scores of every RM) and the RM loadings fitted on it."""

    def __init__(self, num_rms: int, window: int = 256, min_prompts: int = 4):
        if int(num_rms) < 2:
            raise ValueError(f"consensus feedback needs at least 2 reward models, got {num_rms}")
        if int(window) < 1 or int(min_prompts) < 1:
            raise ValueError(f"window and min_prompts must be >= 1, got {window}, {min_prompts}")
        self.num_rms, self.window, self.min_prompts = int(num_rms), int(window), int(min_prompts)
        self.z: list[Tensor] = []  # per audited prompt, [K, n]
        self.varies: list[Tensor] = []  # per audited prompt, [K]

    def rewards(self, audit_scores: Tensor, method: str = "weighted") -> tuple[Tensor, Tensor | None, tuple]:
        """([P, K] rewards, loadings, new window) for a batch of audits, fitted on the window plus this batch.

        Nothing changes here: the caller commits the new window with `commit` once nothing else can fail.
        """
        z, varies = standardize_groups(audit_scores)
        if z.shape[1] != self.num_rms:
            raise ValueError(f"audit_scores has {z.shape[1]} reward models, this estimator {self.num_rms}")
        window = ((self.z + list(z.unbind(0)))[-self.window :], (self.varies + list(varies.unbind(0)))[-self.window :])
        loadings = self._fit(*window)
        return consensus_agreement(audit_scores, loadings, method), loadings, window

    def commit(self, window: tuple) -> None:
        self.z, self.varies = list(window[0]), list(window[1])

    def loadings(self) -> Tensor | None:
        return self._fit(self.z, self.varies)

    def _fit(self, window_z: list[Tensor], window_v: list[Tensor]) -> Tensor | None:
        if not window_z:
            return None
        shape = window_z[-1].shape  # audits with another sample count are left out of the fit
        rows = [(t, v) for t, v in zip(window_z, window_v) if t.shape == shape]
        return one_factor_loadings(torch.stack([t for t, _ in rows]), torch.stack([v for _, v in rows]), self.min_prompts)

    def state_dict(self) -> dict:
        return {"num_rms": self.num_rms, "window": self.window, "min_prompts": self.min_prompts,
                "z": [t.clone() for t in self.z], "varies": [v.clone() for v in self.varies]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rms", "window", "min_prompts"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"consensus state has {key}={state[key]!r}, this selector has {getattr(self, key)!r}")
        if len(state["z"]) != len(state["varies"]):
            raise ValueError("consensus state is inconsistent: z and varies differ in length")
        self.z = [torch.as_tensor(t).float().clone() for t in state["z"]]
        self.varies = [torch.as_tensor(v).bool().clone() for v in state["varies"]]


# ----- the registry: one vocabulary for every command ---------------------------------------------
@dataclass(frozen=True)
class FeedbackSignal:
    """A feedback signal: its function, the grouped inputs it needs, the options it takes, and the labels it
    reads (None = label-free)."""

    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    options: tuple[str, ...] = ()
    reads_labels: str | None = None


FEEDBACK_SIGNALS: dict[str, FeedbackSignal] = {
    "pair_loss": FeedbackSignal(pair_loss, ("scores", "policy_logps", "ref_logps", "response_lengths"), ("beta", "nll_weight")),
    "progress": FeedbackSignal(progress, ("loss_before", "loss_after")),
    "verifier": FeedbackSignal(verifier_agreement, ("scores", "correct"), reads_labels="a correct/wrong check per sample"),
    "spread": FeedbackSignal(score_spread, ("scores",)),
    "majority": FeedbackSignal(majority_agreement, ("scores", "answers"), ("min_share",)),
    # The selector supplies audit_scores itself (select/score audit a fraction of prompts with every RM).
    "consensus": FeedbackSignal(consensus_agreement, ("audit_scores",), ("method", "window", "min_prompts")),
}
LABEL_FREE = tuple(name for name, signal in FEEDBACK_SIGNALS.items() if signal.reads_labels is None)
# Every input name a caller may pass to RewardSelector.feedback.
FEEDBACK_INPUTS = tuple(dict.fromkeys(name for s in FEEDBACK_SIGNALS.values() for name in s.inputs))


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
        out, histories = self.transform(raw, arms)
        self.commit(histories)
        return out

    def transform(self, raw: Tensor, arms: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(normalized [B], the histories with these rewards added), changing nothing: `commit` applies them.

        Non-finite raw rewards (NaN, +-inf) are no signal: NaN out, and they never enter the history.
        """
        raw = torch.as_tensor(raw)
        arms = torch.as_tensor(arms, device=raw.device)
        if raw.dim() != 1 or raw.shape[0] == 0:
            raise ValueError(f"raw rewards must be a non-empty 1-D tensor, got shape {tuple(raw.shape)}")
        if arms.shape != raw.shape:
            raise ValueError(f"arms has shape {tuple(arms.shape)}, expected {tuple(raw.shape)} like raw")
        if arms.is_floating_point() or ((arms < 0) | (arms >= self.num_arms)).any():
            raise ValueError(f"arms must be integer indices in [0, {self.num_arms}), got {arms.tolist()}")

        values, arms = raw.detach().float().cpu(), arms.long().cpu()
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))
        out = torch.full_like(values, float("nan"))
        histories = list(self.histories)
        groups = range(self.num_arms) if self.per_arm else [None]
        for g, group in enumerate(groups):
            rows = torch.ones_like(arms, dtype=torch.bool) if group is None else arms == group
            if not rows.any():
                continue
            x = values[rows]
            # Append first, so even the very first batch is normalized against something.
            history = torch.cat([histories[g], x[torch.isfinite(x)]])[-self.window :]
            histories[g] = history
            out[rows] = self._normalize(x, history)
        return out.to(raw.device), histories

    def commit(self, histories: list[Tensor]) -> None:
        if len(histories) != len(self.histories):
            raise ValueError(f"expected {len(self.histories)} histories, got {len(histories)}")
        self.histories = histories

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
