"""Iterative preference training with per-prompt reward-model selection: the regime LASeR was published in.

One step, for a batch of P prompts (arXiv 2410.01735, Sec. 3):

    rollout  = lm.sample(policy, prompts, n)                       # n responses per prompt, one prefill each
    contexts = encoder(rollout.context_hidden)                     # the policy's view of each prompt, from that prefill
    arms     = selector.select(contexts)                           # one RM per prompt (or per batch)
    scores   = selector.score(prompts, responses, arms)            # only the chosen RM scores a prompt
    pairs    = build_preference_pairs(scores)                      # best vs. lower-ranked, WITHIN a prompt
    loss_p   = DPO(policy vs. frozen reference) + NLL(best)        # per prompt; the policy trains on it
    selector.feedback(contexts, arms, raw_rewards=-loss_p)         # pair_loss: the bandit learns which RM helps

Unlike the reference code, the reference model is a real frozen copy (so the DPO term is not a
constant), the NLL is a per-token mean of the chosen response, and pairs never mix prompts. The
DPO + NLL of a pair is laser_rl.feedback.pair_loss_terms, the same function the online feedback uses.
Model plumbing (sampling, log-probs, contexts) is laser_rl.lm's.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from laser_rl.context import ContextEncoder
from laser_rl.feedback import pair_loss_terms
from laser_rl.lm import Rollout, sample, sequence_logprobs
from laser_rl.selector import RewardSelector

# The selector's feedback signals this loop can feed (the selector's names, as in every command): pair_loss
# (the paper: minus the step's DPO + NLL training loss), progress (loss before minus after the update),
# verifier (needs an `answer` per prompt), spread, consensus. majority needs an answer extractor this mode lacks.
FEEDBACKS = ("pair_loss", "progress", "verifier", "spread", "consensus")


# =================================================================================================
# Preference pairs and the DPO + NLL loss
# =================================================================================================


@dataclass
class PreferencePair:
    """One preference pair; both responses are samples of the same prompt by construction."""

    prompt_index: int
    chosen: int  # sample index within the prompt
    rejected: int
    chosen_score: float
    rejected_score: float
    prompt: str = ""
    chosen_text: str = ""
    rejected_text: str = ""


def build_preference_pairs(
    scores: Tensor,
    rollout: Rollout | None = None,
    max_pairs_per_prompt: int | None = None,
) -> list[list[PreferencePair]]:
    """Pairs per prompt from the RM's scores [P, n]: the best sample against each lower-ranked one.

    Pairs are built only inside a prompt's own samples. The best is the top score (ties: lowest
    index); rejected samples are those scored strictly lower, worst first, at most
    max_pairs_per_prompt of them. A prompt whose samples all tie, or whose rejected candidates are
    token-identical to the best, gets no pairs: the RM expressed no preference.
    """
    scores = torch.as_tensor(scores).float()
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [prompts, n >= 2], got shape {tuple(scores.shape)}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    if rollout is not None and (rollout.num_prompts != scores.shape[0] or rollout.n != scores.shape[1]):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {rollout.num_prompts} prompts x {rollout.n} samples")
    n = scores.shape[1]
    pairs: list[list[PreferencePair]] = []
    for p, row in enumerate(scores):
        finite = torch.isfinite(row)
        if finite.sum() < 2:  # skipped (NaN) samples cannot be ranked
            pairs.append([])
            continue
        best = int(torch.where(finite, row, torch.tensor(-math.inf)).argmax())
        order = sorted((j for j in range(len(row)) if finite[j] and row[j] < row[best]), key=lambda j: (float(row[j]), j))
        if rollout is not None:
            best_tokens = rollout.response_tokens(p * n + best)
            order = [j for j in order if rollout.response_tokens(p * n + j) != best_tokens]
        if max_pairs_per_prompt is not None:
            order = order[:max_pairs_per_prompt]
        group = []
        for j in order:
            pair = PreferencePair(p, best, j, float(row[best]), float(row[j]))
            if rollout is not None:
                pair.prompt = rollout.prompts[p] if rollout.prompts is not None else ""
                pair.chosen_text, pair.rejected_text = rollout.responses[p * n + best], rollout.responses[p * n + j]
            group.append(pair)
        pairs.append(group)
    return pairs


def dpo_nll_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    prompt_index: Tensor,
    num_prompts: int,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's objective, DPO + nll_weight * NLL(chosen), averaged per prompt then over prompts.

    Inputs are per pair [M] (sequence log-probs: sums over response tokens); prompt_index [M] says
    which prompt each pair belongs to. Per pair, laser_rl.feedback.pair_loss_terms on the two samples
    (-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) + nll_weight * (-pi_c / |chosen|)); per prompt
    the mean over its pairs. Returns (loss: mean over prompts with pairs, loss per prompt [num_prompts],
    NaN where a prompt has no pair; DPO per prompt [num_prompts]). Differentiable in the policy log-probs.
    """
    tensors = dict(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
    )
    prompt_index = torch.as_tensor(prompt_index).long().reshape(-1).cpu()
    M = prompt_index.shape[0]
    if M == 0:
        raise ValueError("no preference pairs to compute a loss on")
    for name, t in tensors.items():
        if t.dim() != 1 or t.shape[0] != M:
            raise ValueError(f"{name} must be [num_pairs={M}], got shape {tuple(t.shape)}")
    if ((prompt_index < 0) | (prompt_index >= num_prompts)).any():
        raise ValueError(f"prompt_index must lie in [0, {num_prompts})")
    if (chosen_lengths < 1).any():
        raise ValueError("chosen_lengths must be >= 1 token")
    device = policy_chosen_logps.device
    # Each pair as a group of two samples the RM ranked chosen > rejected; only the chosen one's length enters the NLL.
    ranked = torch.tensor([[1.0, 0.0]], device=device).expand(M, 2)
    policy = torch.stack([policy_chosen_logps, policy_rejected_logps], dim=1)
    reference = torch.stack([reference_chosen_logps, reference_rejected_logps], dim=1).to(device)
    lengths = chosen_lengths.to(device).float().unsqueeze(1).expand(M, 2)
    pair_loss, _, _ = pair_loss_terms(ranked, policy, reference, lengths, beta=beta, nll_weight=nll_weight)
    pair_dpo, _, _ = pair_loss_terms(ranked, policy, reference, lengths, beta=beta, nll_weight=0.0)
    index = prompt_index.to(device)
    count = torch.zeros(num_prompts, device=device).index_add(0, index, torch.ones(M, device=device))
    per_prompt = torch.zeros(num_prompts, device=device).index_add(0, index, pair_loss) / count  # 0 / 0 = NaN: no pair
    per_dpo = torch.zeros(num_prompts, device=device).index_add(0, index, pair_dpo) / count
    has_pairs = count > 0
    return per_prompt[has_pairs].mean(), per_prompt, per_dpo


# =================================================================================================
# One training step
# =================================================================================================


@dataclass
class IterativeDPOConfig:
    iterations: int = 1  # passes over the prompt set; each batch is sampled fresh from the current policy
    batch_size: int = 16  # prompts per step (the paper's code: 16)
    n_samples: int = 8  # responses per prompt (paper: 30)
    max_new_tokens: int = 128  # per sampled response
    temperature: float = 0.8  # paper: 0.8
    top_p: float = 1.0  # nucleus sampling (1: the full distribution, the paper)
    beta: float = 0.1  # DPO beta
    nll_weight: float = 1.0  # paper: 1 (0 = DPO only, its instruction-following setting)
    lr: float = 5e-6  # paper: 5e-6 with LoRA
    max_pairs_per_prompt: int | None = None  # None: best vs. every lower-ranked sample
    micro_batch_prompts: int = 4  # prompts per forward/backward (gradient accumulation over the batch)
    gen_batch_size: int = 8  # prompts per sampling call (one prefill each)
    feedback: str = "pair_loss"  # the selector's signal: pair_loss (paper: -(DPO + NLL)) | progress | verifier | spread | consensus
    metric: str = "accuracy"  # of verifier feedback and of the eval data: accuracy | exact | f1
    max_prompt_tokens: int | None = None  # None: the model's limit minus max_new_tokens
    max_steps: int | None = None  # stop after this many steps (None: every batch of every iteration)
    grad_clip: float = 1.0  # max gradient norm
    seed: int = 0

    def __post_init__(self):
        for name in ("iterations", "batch_size", "n_samples", "max_new_tokens", "micro_batch_prompts", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_pairs_per_prompt", "max_prompt_tokens", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {getattr(self, name)}")
        if not 0 < self.top_p <= 1 or self.nll_weight < 0 or self.grad_clip <= 0:
            raise ValueError(f"top_p must lie in (0, 1], nll_weight be >= 0 and grad_clip > 0; got {self.top_p}, {self.nll_weight}, {self.grad_clip}")
        if self.n_samples < 2:
            raise ValueError("n_samples must be >= 2: preference pairs need two responses of the same prompt")
        if self.feedback not in FEEDBACKS:
            raise ValueError(f"unknown feedback {self.feedback!r}; choose one of {sorted(FEEDBACKS)}")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError(f"beta and lr must be > 0, got beta={self.beta}, lr={self.lr}")
        if self.temperature <= 0:
            raise ValueError("training samples need temperature > 0: greedy decoding gives n identical responses")


@dataclass
class StepResult:
    arms: Tensor  # [P]
    rollout: Rollout  # the P x n samples, their tokens and the contexts' hidden states
    scores: Tensor  # [P, n] chosen RM's scores
    pairs: list[list[PreferencePair]]  # per prompt
    loss: Tensor  # [P] DPO + NLL per prompt before the update (tied prompts: log 2 + NLL)
    bandit_rewards: Tensor  # [P] normalized rewards the bandit got
    metrics: dict = field(default_factory=dict)


def _loss_rows(pairs: list[list[PreferencePair]], best: list[int], prompts: Sequence[int], n: int) -> list[int]:
    """Rollout rows whose log-probs the losses of these prompts need: each best sample and every rejected one."""
    return sorted({p * n + best[p] for p in prompts} | {p * n + pr.rejected for p in prompts for pr in pairs[p]})


def _prompt_losses(
    policy: nn.Module,
    ref_logps: dict[int, Tensor],
    rollout: Rollout,
    pairs: list[list[PreferencePair]],
    best: list[int],
    prompts: Sequence[int],
    config: IterativeDPOConfig,
) -> tuple[Tensor, Tensor]:
    """Per-prompt losses [len(prompts)] (with grad where the prompt has pairs) and their DPO parts."""
    n = rollout.n
    rows = _loss_rows(pairs, best, prompts, n)
    logps, lengths = sequence_logprobs(policy, rollout, torch.tensor(rows))
    at = {row: i for i, row in enumerate(rows)}
    trained = [p for p in prompts if pairs[p]]
    if trained:
        flat = [(p, pr) for p in trained for pr in pairs[p]]
        c = torch.tensor([at[p * n + pr.chosen] for p, pr in flat])
        r = torch.tensor([at[p * n + pr.rejected] for p, pr in flat])
        _, per_prompt, per_dpo = dpo_nll_loss(
            logps[c], logps[r],
            torch.stack([ref_logps[p * n + pr.chosen] for p, pr in flat]),
            torch.stack([ref_logps[p * n + pr.rejected] for p, pr in flat]),
            lengths[c], torch.tensor([trained.index(p) for p, _ in flat]), len(trained),
            beta=config.beta, nll_weight=config.nll_weight,
        )
    losses, dpos = [], []
    for p in prompts:
        if pairs[p]:
            i = trained.index(p)
            losses.append(per_prompt[i])
            dpos.append(per_dpo[i].detach())
        else:
            # No preference: margin 0, so DPO = log 2, plus the NLL of the best. A finite feedback on
            # purpose (as in laser_rl.feedback): an RM that never ranks must not dodge every update.
            i = at[p * n + best[p]]
            nll = (-logps[i] / lengths[i].to(logps.device)).detach()
            losses.append(math.log(2) + config.nll_weight * nll)
            dpos.append(torch.tensor(math.log(2), device=logps.device))
    return torch.stack(losses), torch.stack(dpos)


def _check_feedback(selector: RewardSelector, config: IterativeDPOConfig, has_answers: bool) -> None:
    if selector.feedback_name != config.feedback:
        raise ValueError(
            f"feedback {config.feedback!r} needs a selector built with feedback={config.feedback!r}, got {selector.feedback_name!r}"
        )
    if config.feedback not in FEEDBACKS:
        raise ValueError(f"iterative DPO cannot feed feedback {config.feedback!r}; choose one of {FEEDBACKS}")
    if config.feedback == "verifier" and not has_answers:
        raise ValueError("feedback 'verifier' needs an 'answer' field on at least one prompt")


def iterative_dpo_step(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    selector: RewardSelector,
    encoder: ContextEncoder,
    optimizer: torch.optim.Optimizer,
    records: Sequence[dict],
    config: IterativeDPOConfig,
) -> StepResult:
    """Sample, select an RM per prompt, rank, train on within-prompt pairs, give the bandit its feedback."""
    if not records:
        raise ValueError("empty batch: no prompts")
    if reference is policy:
        raise ValueError("the reference must be a separate frozen model, not the policy itself (the DPO term would be constant)")
    P, n = len(records), config.n_samples
    prompts = [str(r["prompt"]) for r in records]
    domains = [r.get("domain") for r in records]
    answers = [r.get("answer") for r in records]
    has_answers = all(a is not None for a in answers)
    _check_feedback(selector, config, any(a is not None for a in answers))
    t0 = time.perf_counter()

    # Sampling does not depend on the RM, so sample first: its prefill gives the contexts, each prompt
    # exactly as the policy answered it (after any truncation to the model's limit), at no extra forward.
    rollout = sample(
        policy, tokenizer, prompts, n, config.max_new_tokens, config.temperature, top_p=config.top_p,
        batch_size=config.gen_batch_size, max_prompt_tokens=config.max_prompt_tokens,
    )
    contexts = encoder(rollout.context_hidden)
    arms = selector.select(contexts, domains if any(d is not None for d in domains) else None)
    flat_prompts, flat_responses = rollout.flat()
    scores = selector.score(
        flat_prompts, flat_responses, arms.repeat_interleave(n), [a for a in answers for _ in range(n)] if has_answers else None
    ).reshape(P, n)
    pairs = build_preference_pairs(scores, rollout, config.max_pairs_per_prompt)
    best = [int(torch.nan_to_num(row, nan=-math.inf).argmax()) for row in scores]

    # The frozen reference: log-probs of every response a loss needs, once, without gradients.
    reference.eval().requires_grad_(False)
    device = next(policy.parameters()).device
    ref_logps: dict[int, Tensor] = {}
    with torch.no_grad():
        for start in range(0, P, config.micro_batch_prompts):
            rows = _loss_rows(pairs, best, range(start, min(P, start + config.micro_batch_prompts)), n)
            ref, _ = sequence_logprobs(reference, rollout, torch.tensor(rows))
            ref_logps.update({row: ref[i].to(device) for i, row in enumerate(rows)})

    # The policy update, accumulated over micro-batches of prompts; loss = mean over prompts with pairs.
    num_trained = sum(1 for g in pairs if g)
    loss = torch.full((P,), math.nan)
    dpo = torch.full((P,), math.nan)
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, P, config.micro_batch_prompts):
        chunk = list(range(start, min(P, start + config.micro_batch_prompts)))
        chunk_loss, chunk_dpo = _prompt_losses(policy, ref_logps, rollout, pairs, best, chunk, config)
        loss[chunk], dpo[chunk] = chunk_loss.detach().float().cpu(), chunk_dpo.float().cpu()
        trained = torch.tensor([bool(pairs[p]) for p in chunk])
        if trained.any():
            (chunk_loss[trained.to(chunk_loss.device)].sum() / num_trained).backward()
    grad_norm = math.nan
    if num_trained:
        params = [p for p in policy.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # Bandit feedback. A prompt whose RM failed on a sample (NaN score, skip_invalid=True) teaches the bandit nothing.
    scored = torch.isfinite(scores).all(dim=1)
    if config.feedback == "pair_loss":  # the paper: minus the loss the policy just trained on
        rewards = selector.feedback(contexts, arms, raw_rewards=torch.where(scored, -loss, math.nan))
    else:
        # Every input this mode can give, computed only when the selector's signal reads it.
        available: dict[str, Callable[[], Tensor]] = {
            "scores": lambda: scores,
            "loss_before": lambda: torch.where(scored, loss, math.nan),
            "loss_after": lambda: _losses_after(policy, ref_logps, rollout, pairs, best, config),
            "correct": lambda: _correct(rollout, answers, config.metric),
        }
        rewards = selector.feedback(contexts, arms, **{name: available[name]() for name in selector.feedback_inputs})

    metrics = {
        "train/loss": float(loss[torch.tensor([bool(g) for g in pairs])].mean()) if num_trained else math.nan,
        "train/dpo": float(dpo[torch.tensor([bool(g) for g in pairs])].mean()) if num_trained else math.nan,
        "train/pairs": float(sum(len(g) for g in pairs)),
        "train/prompts_without_pairs": float(P - num_trained),
        "train/grad_norm": grad_norm,
        "train/truncated_prompts": float(rollout.num_truncated),
        "train/response_tokens": float(rollout.response_lengths.mean()),
        "train/best_score": float(torch.nan_to_num(scores, nan=-math.inf).max(dim=1).values.mean()),
        "train/step_seconds": time.perf_counter() - t0,
    }
    return StepResult(arms, rollout, scores, pairs, loss, rewards, metrics)


@torch.no_grad()
def _losses_after(policy, ref_logps, rollout: Rollout, pairs, best, config: IterativeDPOConfig) -> Tensor:
    """The same per-prompt losses under the updated policy (progress feedback)."""
    P = rollout.num_prompts
    return torch.cat([
        _prompt_losses(policy, ref_logps, rollout, pairs, best, list(range(s, min(P, s + config.micro_batch_prompts))), config)[0].float().cpu()
        for s in range(0, P, config.micro_batch_prompts)
    ])


def _correct(rollout: Rollout, answers: Sequence, metric: str) -> Tensor:
    """Verifier labels [P, n]: the task metric >= 0.5 (NaN for prompts without an answer)."""
    from laser_rl.best_of_n import task_score

    return torch.tensor([
        [math.nan if a is None else float(task_score(r, a, metric) >= 0.5) for r in rs] for rs, a in zip(rollout.grouped(), answers)
    ])


# =================================================================================================
# The loop
# =================================================================================================


def run_iterative_dpo(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    selector: RewardSelector,
    encoder: ContextEncoder,
    records: Sequence[dict],
    config: IterativeDPOConfig,
    log: Callable[[int, dict], None] | None = None,
    on_step: Callable[[int, StepResult], None] | None = None,
) -> list[dict]:
    """`iterations` passes over the prompts in shuffled batches; returns the metrics of every step."""
    if not records:
        raise ValueError("no prompts to train on")
    for name, model in (("policy", policy), ("reference", reference)):
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name} must be a torch module, got {type(model).__name__}")
    if reference is policy:
        raise ValueError("the reference must be a separate frozen model, not the policy itself (the DPO term would be constant)")
    _check_feedback(selector, config, any(r.get("answer") is not None for r in records))
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    reference.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    policy.eval()  # no dropout: log-probs before and after an update must be comparable

    batches = []
    for _ in range(config.iterations):
        order = list(range(len(records)))
        rng.shuffle(order)
        batches += [[records[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]
    if config.max_steps is not None:
        batches = batches[: config.max_steps]

    history = []
    for step, batch in enumerate(tqdm(batches, desc="iterative DPO")):
        result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, batch, config)
        metrics = {**result.metrics, **selector.metrics(), "step": step}
        history.append(metrics)
        if log is not None:
            log(step, metrics)
        if on_step is not None:
            on_step(step, result)
    return history
