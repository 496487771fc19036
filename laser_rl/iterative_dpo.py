"""Iterative preference training with per-prompt reward-model selection: the regime LASeR was published in.

One step, for a batch of P prompts (arXiv 2410.01735, Sec. 3):

    contexts = encoder(prompt_hidden_states(policy, prompts))     # the policy's view of each prompt
    arms     = selector.select(contexts)                          # one RM per prompt (or per batch)
    samples  = sample_responses(policy, prompts, n)               # n responses per prompt
    scores   = selector.score(prompts, samples, arms)             # only the chosen RM scores a prompt
    pairs    = build_preference_pairs(scores)                     # best vs. lower-ranked, WITHIN a prompt
    loss_p   = DPO(policy vs. frozen reference) + NLL(best)       # per prompt; the policy trains on it
    selector.feedback(contexts, arms, raw_rewards=-loss_p)        # the bandit learns which RM helps

Unlike the reference code, the reference model is a real frozen copy (so the DPO term is not a
constant), the NLL is a per-token mean of the chosen response, and pairs never mix prompts.

This module also holds the generation and log-prob helpers shared by best_of_n and agreement.
"""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from laser_rl.context import ContextEncoder, prompt_hidden_states
from laser_rl.selector import RewardSelector

# Bandit feedback for iterative DPO -> the selector's feedback signal that computes it.
# "loss" is the paper's (-(DPO + NLL), passed as raw rewards); the others answer its criticism.
FEEDBACKS = {"loss": "pair_loss", "progress": "progress", "verifier": "verifier", "spread": "spread"}


# =================================================================================================
# Data
# =================================================================================================


def load_jsonl(path: str, required: Sequence[str] = ("prompt",)) -> list[dict]:
    """Rows of a local JSONL file (via `datasets`), each checked for the required fields."""
    import os

    from datasets import load_dataset

    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    rows = list(load_dataset("json", data_files=path, split="train"))
    if not rows:
        raise ValueError(f"data file {path!r} has no rows")
    for i, row in enumerate(rows):
        missing = [f for f in required if row.get(f) is None]
        if missing:
            raise ValueError(f"{path}: row {i} lacks field(s) {missing} (needs {list(required)})")
    return rows


# =================================================================================================
# Prompts, sampling and log-probs (shared with best_of_n and agreement)
# =================================================================================================


def prompt_token_limit(model: nn.Module, tokenizer, max_new_tokens: int) -> int | None:
    """The longest prompt (in tokens) that leaves room for max_new_tokens, or None if unbounded."""
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit is not None and tok_limit < 1_000_000:  # HF uses a huge sentinel for "no limit"
        limits.append(tok_limit)
    limits = [int(x) for x in limits if x]
    if not limits:
        return None
    limit = min(limits) - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt (model limit {min(limits)})")
    return limit


def _format(tokenizer, content: str) -> tuple[list[int], bool]:
    """Token ids of a user turn as the policy sees it: its chat template if it has one, else the raw text."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], True
    return tokenizer(content)["input_ids"], False


def _middle(ids: list[int], keep: int) -> list[int]:
    head = keep // 2
    return ids[:head] + (ids[len(ids) - (keep - head) :] if keep - head > 0 else [])


def encode_prompts(tokenizer, contents: Sequence[str], max_tokens: int | None = None) -> tuple[list[list[int]], list[str], int]:
    """Token ids per prompt, the prompt text actually kept, and how many prompts were truncated.

    A prompt longer than max_tokens is cut in the middle (LongBench's convention: the task
    instruction at the start and the question at the end both survive), never silently: the
    caller gets the count and a warning is raised here.
    """
    ids_out, texts_out, truncated = [], [], 0
    for content in contents:
        ids, templated = _format(tokenizer, content)
        if max_tokens is not None and len(ids) > max_tokens:
            truncated += 1
            content_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
            overhead = len(ids) - len(content_ids)  # template / special tokens around the content
            content = tokenizer.decode(_middle(content_ids, max(1, max_tokens - overhead)), skip_special_tokens=True)
            ids, _ = _format(tokenizer, content)
            if len(ids) > max_tokens:  # BPE can merge differently across the cut: cut the ids themselves
                ids = _middle(ids, max_tokens)
        ids_out.append(ids)
        texts_out.append(content)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(contents)} prompts exceeded {max_tokens} tokens and were truncated in the middle",
            stacklevel=2,
        )
    return ids_out, texts_out, truncated


@dataclass
class Samples:
    """n sampled responses for each of P prompts."""

    prompts: list[str]  # [P] prompt text as the policy and the RMs see it (after any truncation)
    prompt_ids: list[list[int]]  # [P]
    response_ids: list[list[list[int]]]  # [P][n], up to and including the first eos
    responses: list[list[str]]  # [P][n] decoded, special tokens removed
    num_truncated: int = 0

    @property
    def n(self) -> int:
        return len(self.responses[0])

    def flat(self) -> tuple[list[str], list[str]]:
        """(prompts, responses), each of length P*n, prompt-major: sample j of prompt p is at p*n + j."""
        return [p for p, rs in zip(self.prompts, self.responses) for _ in rs], [r for rs in self.responses for r in rs]


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 1.0,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
) -> Samples:
    """Sample n responses per prompt from a HF causal LM (temperature 0: one greedy response, repeated n times)."""
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_new_tokens and batch_size must be >= 1, got {n}, {max_new_tokens}, {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if len(prompts) == 0:
        raise ValueError("no prompts to sample from")
    if max_prompt_tokens is None:
        max_prompt_tokens = prompt_token_limit(model, tokenizer, max_new_tokens)
    prompt_ids, kept, truncated = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    greedy = temperature == 0
    response_ids: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            # Left padding: every prompt ends at the same position, where generation starts.
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                mask[i, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else top_p,
                top_k=0,  # HF's default top_k=50 would silently truncate the paper's temperature sampling
                max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else n,
                pad_token_id=pad,
                eos_token_id=eos,
            )[:, width:].cpu()
            copies = 1 if greedy else n
            for i in range(len(chunk)):
                group = []
                for j in range(copies):
                    ids = out[i * copies + j].tolist()
                    if eos is not None and eos in ids:
                        ids = ids[: ids.index(eos) + 1]  # keep the eos: the policy learns to stop
                    group.append(ids)
                response_ids.append(group * n if greedy else group)
    finally:
        model.train(was_training)
    responses = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in response_ids]
    return Samples(kept, prompt_ids, response_ids, responses, truncated)


def sequence_logps(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of log p(response token | prefix) per sequence [N] (float32) and response lengths [N].

    Gradients flow when called outside no_grad (the policy's training forward). Right padding keeps
    every real token at its unpadded position, so a sequence gets the same log-prob in any batch.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(r) == 0 for r in response_ids):
        raise ValueError("a response has no tokens: nothing to score")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("a prompt has no tokens: the first response token would have no context")
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids)
    logps = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        response_mask = torch.zeros(len(seqs), width)
        for i, (s, p) in enumerate(zip(seqs, prompt_ids[start : start + batch_size])):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            response_mask[i, len(p) : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        # gather - logsumexp: no second [B, T, vocab] log_softmax tensor.
        token_logps = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        logps.append((token_logps * response_mask[:, 1:].to(device)).sum(-1).cpu())
    lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.float32)
    return torch.cat(logps), lengths


def prompt_contexts(model: nn.Module, tokenizer, prompts: Sequence[str], encoder: ContextEncoder, batch_size: int = 16) -> Tensor:
    """Bandit contexts [P, encoder.dim]: the policy's last-token hidden state of each prompt, encoded."""
    texts = list(prompts)
    if tokenizer.chat_template:  # the state the policy is in right before it answers
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in texts]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return encoder(prompt_hidden_states(model, tokenizer, texts, batch_size=batch_size, max_length=limit))


def hidden_size(model: nn.Module) -> int:
    config = model.config
    size = getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", None)
    if size is None:
        raise ValueError(f"cannot read the hidden size from {type(model).__name__}'s config")
    return int(size)


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
    samples: Samples | None = None,
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
    if samples is not None and (len(samples.responses) != scores.shape[0] or samples.n != scores.shape[1]):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(samples.responses)} prompts x {samples.n} samples")
    pairs: list[list[PreferencePair]] = []
    for p, row in enumerate(scores):
        finite = torch.isfinite(row)
        if finite.sum() < 2:  # skipped (NaN) samples cannot be ranked
            pairs.append([])
            continue
        best = int(torch.where(finite, row, torch.tensor(-math.inf)).argmax())
        order = sorted((j for j in range(len(row)) if finite[j] and row[j] < row[best]), key=lambda j: (float(row[j]), j))
        if samples is not None:
            order = [j for j in order if samples.response_ids[p][j] != samples.response_ids[p][best]]
        if max_pairs_per_prompt is not None:
            order = order[:max_pairs_per_prompt]
        group = []
        for j in order:
            pair = PreferencePair(p, best, j, float(row[best]), float(row[j]))
            if samples is not None:
                pair.prompt, pair.chosen_text, pair.rejected_text = samples.prompts[p], samples.responses[p][best], samples.responses[p][j]
            group.append(pair)
        pairs.append(group)
    return pairs


@functools.lru_cache(maxsize=8)
def openrlhf_dpo_loss(beta: float) -> nn.Module:
    """OpenRLHF's DPOLoss (sigmoid loss, mean over the pairs it is given)."""
    from laser_rl.integrations.openrlhf.compat import ensure_openrlhf_importable

    ensure_openrlhf_importable()
    from openrlhf.models.loss import DPOLoss

    return DPOLoss(beta)


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
    which prompt each pair belongs to. Per prompt p: DPO_p = OpenRLHF's DPOLoss over p's pairs
    (mean of -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))), NLL_p = mean over p's pairs
    of -pi_c / |chosen|. Returns (loss: mean over prompts with pairs, loss per prompt [num_prompts],
    NaN where a prompt has no pair; DPO per prompt [num_prompts]).
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
    dpo_fn = openrlhf_dpo_loss(float(beta))
    device = policy_chosen_logps.device
    index = prompt_index.to(device)
    per_prompt = [torch.tensor(math.nan, device=device)] * num_prompts
    per_dpo = [torch.tensor(math.nan, device=device)] * num_prompts
    for p in prompt_index.unique().tolist():
        rows = index == p
        dpo, _, _ = dpo_fn(
            policy_chosen_logps[rows], policy_rejected_logps[rows], reference_chosen_logps[rows], reference_rejected_logps[rows]
        )
        nll = (-policy_chosen_logps[rows] / chosen_lengths[rows].to(device)).mean()
        per_prompt[p] = dpo + nll_weight * nll if nll_weight else dpo
        per_dpo[p] = dpo
    per_prompt_t, per_dpo_t = torch.stack(per_prompt), torch.stack(per_dpo)
    has_pairs = torch.isfinite(per_prompt_t.detach())
    return per_prompt_t[has_pairs].mean(), per_prompt_t, per_dpo_t


# =================================================================================================
# One training step
# =================================================================================================


@dataclass
class IterativeDPOConfig:
    iterations: int = 1  # passes over the prompt set; each batch is sampled fresh from the current policy
    batch_size: int = 16  # prompts per step (the paper's code: 16)
    n_samples: int = 8  # responses per prompt (paper: 30)
    max_new_tokens: int = 128
    temperature: float = 0.8  # paper: 0.8
    top_p: float = 1.0
    beta: float = 0.1
    nll_weight: float = 1.0  # paper: 1 (0 = DPO only, its instruction-following setting)
    lr: float = 5e-6  # paper: 5e-6 with LoRA
    max_pairs_per_prompt: int | None = None  # None: best vs. every lower-ranked sample
    micro_batch_prompts: int = 4  # prompts per forward/backward (gradient accumulation over the batch)
    gen_batch_size: int = 8  # prompts per generate() call
    feedback: str = "loss"  # loss | progress | verifier | spread
    metric: str = "accuracy"  # for verifier feedback: accuracy | exact | f1
    max_prompt_tokens: int | None = None  # None: the model's limit minus max_new_tokens
    max_steps: int | None = None
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("iterations", "batch_size", "n_samples", "max_new_tokens", "micro_batch_prompts", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
    samples: Samples
    scores: Tensor  # [P, n] chosen RM's scores
    pairs: list[list[PreferencePair]]  # per prompt
    loss: Tensor  # [P] DPO + NLL per prompt before the update (tied prompts: log 2 + NLL)
    bandit_rewards: Tensor  # [P] normalized rewards the bandit got
    metrics: dict = field(default_factory=dict)


def _tokens_of(samples: Samples, p: int, j: int) -> tuple[list[int], list[int]]:
    return samples.prompt_ids[p], samples.response_ids[p][j]


def _prompt_losses(
    policy: nn.Module,
    ref_logps: dict[tuple[int, int], Tensor],
    samples: Samples,
    pairs: list[list[PreferencePair]],
    best: list[int],
    prompts: Sequence[int],
    config: IterativeDPOConfig,
    pad: int,
) -> tuple[Tensor, Tensor]:
    """Per-prompt losses [len(prompts)] (with grad where the prompt has pairs) and their DPO parts."""
    keys = sorted({(p, best[p]) for p in prompts} | {(p, pr.rejected) for p in prompts for pr in pairs[p]})
    logps, lengths = sequence_logps(policy, *zip(*(_tokens_of(samples, p, j) for p, j in keys)), pad_token_id=pad)
    at = {k: i for i, k in enumerate(keys)}
    losses, dpos = [], []
    trained = [p for p in prompts if pairs[p]]
    if trained:
        flat = [(p, pr) for p in trained for pr in pairs[p]]
        c = torch.tensor([at[(p, pr.chosen)] for p, pr in flat])
        r = torch.tensor([at[(p, pr.rejected)] for p, pr in flat])
        _, per_prompt, per_dpo = dpo_nll_loss(
            logps[c], logps[r],
            torch.stack([ref_logps[(p, pr.chosen)] for p, pr in flat]),
            torch.stack([ref_logps[(p, pr.rejected)] for p, pr in flat]),
            lengths[c], torch.tensor([trained.index(p) for p, _ in flat]), len(trained),
            beta=config.beta, nll_weight=config.nll_weight,
        )
    for p in prompts:
        if pairs[p]:
            i = trained.index(p)
            losses.append(per_prompt[i])
            dpos.append(per_dpo[i].detach())
        else:
            # No preference: margin 0, so DPO = log 2, plus the NLL of the best. A finite feedback on
            # purpose (as in laser_rl.feedback): an RM that never ranks must not dodge every update.
            i = at[(p, best[p])]
            nll = (-logps[i] / lengths[i]).detach()
            losses.append(math.log(2) + config.nll_weight * nll)
            dpos.append(torch.tensor(math.log(2)))
    return torch.stack(losses), torch.stack(dpos)


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
    """Select an RM per prompt, sample, rank, train on within-prompt pairs, give the bandit -loss."""
    if not records:
        raise ValueError("empty batch: no prompts")
    if config.feedback != "loss" and selector.feedback_name != FEEDBACKS[config.feedback]:
        raise ValueError(
            f"feedback {config.feedback!r} needs a selector built with feedback={FEEDBACKS[config.feedback]!r}, "
            f"got {selector.feedback_name!r}"
        )
    t0 = time.perf_counter()
    P, n = len(records), config.n_samples
    prompts = [str(r["prompt"]) for r in records]
    domains = [r.get("domain") for r in records]
    answers = [r.get("answer") for r in records]
    has_answers = all(a is not None for a in answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # Sampling does not depend on the RM, so sample first: the contexts then see each prompt exactly
    # as the policy answered it (after any truncation to the model's limit).
    samples = sample_responses(
        policy, tokenizer, prompts, n, config.max_new_tokens, config.temperature, config.top_p,
        config.gen_batch_size, config.max_prompt_tokens,
    )
    contexts = prompt_contexts(policy, tokenizer, samples.prompts, encoder)
    arms = selector.select(contexts, domains if any(d is not None for d in domains) else None)
    flat_prompts, flat_responses = samples.flat()
    scores = selector.score(
        flat_prompts, flat_responses, arms.repeat_interleave(n), [a for a in answers for _ in range(n)] if has_answers else None
    ).reshape(P, n)
    pairs = build_preference_pairs(scores, samples, config.max_pairs_per_prompt)
    best = [int(torch.nan_to_num(row, nan=-math.inf).argmax()) for row in scores]

    # The frozen reference: log-probs of every response a loss needs, once, without gradients.
    if reference is policy:
        raise ValueError("the reference must be a separate frozen model, not the policy itself (the DPO term would be constant)")
    reference.eval().requires_grad_(False)
    with torch.no_grad():
        keys = sorted({(p, best[p]) for p in range(P)} | {(p, pr.rejected) for p in range(P) for pr in pairs[p]})
        ref, _ = sequence_logps(reference, *zip(*(_tokens_of(samples, p, j) for p, j in keys)), pad_token_id=pad, batch_size=config.micro_batch_prompts * n)
        ref_logps = {k: ref[i].to(next(policy.parameters()).device) for i, k in enumerate(keys)}

    # The policy update, accumulated over micro-batches of prompts; loss = mean over prompts with pairs.
    num_trained = sum(1 for g in pairs if g)
    loss = torch.full((P,), math.nan)
    dpo = torch.full((P,), math.nan)
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, P, config.micro_batch_prompts):
        chunk = list(range(start, min(P, start + config.micro_batch_prompts)))
        chunk_loss, chunk_dpo = _prompt_losses(policy, ref_logps, samples, pairs, best, chunk, config, pad)
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

    # Bandit feedback: the paper's -loss, or a signal that does not favour RMs the policy agrees with.
    # A prompt whose RM failed on a sample (NaN score, skip_invalid=True) teaches the bandit nothing.
    scored = torch.isfinite(scores).all(dim=1)
    if config.feedback == "loss":
        rewards = selector.feedback(contexts, arms, raw_rewards=torch.where(scored, -loss, math.nan))
    elif config.feedback == "progress":
        with torch.no_grad():
            after = torch.cat([
                _prompt_losses(policy, ref_logps, samples, pairs, best, list(range(s, min(P, s + config.micro_batch_prompts))), config, pad)[0].float().cpu()
                for s in range(0, P, config.micro_batch_prompts)
            ])
        rewards = selector.feedback(contexts, arms, loss_before=torch.where(scored, loss, math.nan), loss_after=after)
    elif config.feedback == "verifier":
        if not has_answers:
            raise ValueError("feedback 'verifier' needs an 'answer' field on every prompt")
        from laser_rl.best_of_n import task_score

        correct = torch.tensor([[task_score(r, a, config.metric) >= 0.5 for r in rs] for rs, a in zip(samples.responses, answers)])
        rewards = selector.feedback(contexts, arms, scores=scores, correct=correct)
    else:
        rewards = selector.feedback(contexts, arms, scores=scores)

    metrics = {
        "train/loss": float(loss[torch.tensor([bool(g) for g in pairs])].mean()) if num_trained else math.nan,
        "train/dpo": float(dpo[torch.tensor([bool(g) for g in pairs])].mean()) if num_trained else math.nan,
        "train/pairs": float(sum(len(g) for g in pairs)),
        "train/prompts_without_pairs": float(P - num_trained),
        "train/grad_norm": grad_norm,
        "train/truncated_prompts": float(samples.num_truncated),
        "train/response_tokens": float(sum(len(ids) for g in samples.response_ids for ids in g) / (P * n)),
        "train/best_score": float(torch.nan_to_num(scores, nan=-math.inf).max(dim=1).values.mean()),
        "train/step_seconds": time.perf_counter() - t0,
    }
    return StepResult(arms, samples, scores, pairs, loss, rewards, metrics)


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
    reference.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
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
