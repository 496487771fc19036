"""Hugging Face causal-LM plumbing, in one place: prompts in, sampled tokens, log-probs and contexts out.

Every mode (the demo's GRPO, iterative DPO, best-of-n, warm-start priors, the implicit-reward arms) goes
through these functions, so a prompt is encoded, padded and positioned the same way everywhere:

    prompts  = encode_prompts(tokenizer, texts)             # chat template if the tokenizer has one, else plain
    rollout  = sample(policy, tokenizer, texts, n)          # ONE prefill per prompt, its KV cache shared by n samples
    contexts = encoder(rollout.context_hidden)              # the bandit's context comes free from that prefill
    logps    = response_logprobs(policy, rollout)           # [N, R] token log-probs, prompt KV cache shared again
    seq, lengths = sequence_logprobs(policy, rollout)       # [N] sums over response tokens (DPO's log-probs)

Conventions: prompts are LEFT-padded (every prompt ends at the same column, where generation starts) and
position ids are counted from the attention mask (`position_ids`), so padding never shifts a real token;
samples are prompt-major (sample j of prompt p is row p * n + j); a response keeps its first eos (the policy
learns to stop) and is masked after it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# =================================================================================================
# Local data and model facts
# =================================================================================================


def load_jsonl(path: str, required: Sequence[str] = ("prompt",)) -> list[dict]:
    """Rows of a local JSONL file (via `datasets`), each checked for the required fields."""
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


def hidden_size(model: nn.Module | PretrainedConfig) -> int:
    """The width of a model's last hidden state (the bandit context before any projection).

    Takes a model or its config (AutoConfig.from_pretrained(path): no weights loaded); multimodal configs
    keep it in text_config.
    """
    config = getattr(model, "config", model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config", None) or config
    size = getattr(text, "hidden_size", None) or getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(f"cannot read the hidden size from {type(model).__name__}'s config")
    return int(size)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has none (many causal LMs)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token: set tokenizer.pad_token")
    return int(pad)


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


# =================================================================================================
# Prompts
# =================================================================================================


def chat_text(tokenizer, content: str) -> str:
    """A user turn in the tokenizer's chat template, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _use_chat(tokenizer, chat: bool | None) -> bool:
    if chat is None:  # auto: the policy's own format when it has one
        return bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat=True but {type(tokenizer).__name__} has no chat template")
    return chat


def _prompt_ids(tokenizer, content: str, chat: bool) -> list[int]:
    # A templated text already holds its special tokens; a plain one gets the tokenizer's (e.g. BOS).
    if chat:
        return tokenizer(chat_text(tokenizer, content), add_special_tokens=False)["input_ids"]
    return tokenizer(content)["input_ids"]


def _middle(ids: list[int], keep: int) -> list[int]:
    head = keep // 2
    return ids[:head] + (ids[len(ids) - (keep - head) :] if keep - head > 0 else [])


def encode_prompts(
    tokenizer, contents: Sequence[str], max_tokens: int | None = None, chat: bool | None = None
) -> tuple[list[list[int]], list[str], int]:
    """Token ids per prompt, the prompt text actually kept, and how many prompts were truncated.

    chat=None uses the tokenizer's chat template when it has one. A prompt longer than max_tokens is cut
    in the middle (LongBench's convention: the task instruction at the start and the question at the end
    both survive), never silently: the caller gets the count and a warning is raised here.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    chat = _use_chat(tokenizer, chat)
    ids_out, texts_out, truncated = [], [], 0
    for content in contents:
        ids = _prompt_ids(tokenizer, content, chat)
        if max_tokens is not None and len(ids) > max_tokens:
            truncated += 1
            content_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
            overhead = len(ids) - len(content_ids)  # template / special tokens around the content
            content = tokenizer.decode(_middle(content_ids, max(1, max_tokens - overhead)), skip_special_tokens=True)
            ids = _prompt_ids(tokenizer, content, chat)
            if len(ids) > max_tokens:  # BPE can merge differently across the cut: cut the ids themselves
                ids = _middle(ids, max_tokens)
        if not ids:
            raise ValueError(f"prompt {len(ids_out)} ({content[:40]!r}) tokenizes to no tokens")
        ids_out.append(ids)
        texts_out.append(content)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(contents)} prompts exceeded {max_tokens} tokens and were truncated in the middle",
            stacklevel=2,
        )
    return ids_out, texts_out, truncated


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Token lists -> (ids, mask) LongTensors [B, max length], padded on the given side."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


# =================================================================================================
# Forward passes
# =================================================================================================


def position_ids(mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding gives a prompt the same positions as none."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(
    model: nn.Module, ids: Tensor, mask: Tensor, *, hidden: bool = False, cache: bool = True,
    logits_to_keep: int | None = 1, device: str | torch.device | None = None,
):
    """One forward over padded prompts: the KV cache, the last logits_to_keep logits, optionally the hidden states.

    logits_to_keep=None leaves the argument out (a model without an LM head does not take it).
    """
    device = model_device(model) if device is None else device
    ids, mask = ids.to(device), mask.to(device)
    extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    return model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=cache, output_hidden_states=hidden, **extra
    )


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) under logits [..., V], float32 [...]: gather minus logsumexp, no [.., V] log_softmax copy."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# =================================================================================================
# Sampling
# =================================================================================================


@dataclass
class Rollout:
    """n samples for each of P prompts, prompt-major (sample j of prompt p at row p * n + j)."""

    prompt_ids: Tensor  # [P, Lp] left-padded prompts, as the policy saw them
    prompt_mask: Tensor  # [P, Lp]
    response_ids: Tensor  # [N, R] (pad after the first eos, or after max_new_tokens)
    action_mask: Tensor  # [N, R] response tokens up to and including the first eos
    responses: list[str]  # [N] decoded, special tokens removed
    n: int
    context_hidden: Tensor | None = None  # [P, H] last-layer hidden state of each prompt's last token
    prompts: list[str] | None = None  # [P] prompt texts actually kept (after any truncation)
    num_truncated: int = 0

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def response_lengths(self) -> Tensor:
        return self.action_mask.sum(-1).float()

    def rows(self, prompt_idx: Tensor) -> Tensor:
        """Sample rows of the given prompts."""
        return (prompt_idx.unsqueeze(1) * self.n + torch.arange(self.n)).reshape(-1)

    def subset(self, prompt_idx: Tensor) -> Rollout:
        rows = self.rows(prompt_idx)
        return Rollout(
            self.prompt_ids[prompt_idx], self.prompt_mask[prompt_idx], self.response_ids[rows], self.action_mask[rows],
            [self.responses[i] for i in rows.tolist()], self.n,
            None if self.context_hidden is None else self.context_hidden[prompt_idx],
            None if self.prompts is None else [self.prompts[i] for i in prompt_idx.tolist()],
        )

    def grouped(self) -> list[list[str]]:
        """The responses as [P][n]."""
        return [self.responses[p * self.n : (p + 1) * self.n] for p in range(self.num_prompts)]

    def response_tokens(self, row: int) -> list[int]:
        """Token ids of one sample, up to and including its first eos."""
        return self.response_ids[row, : int(self.action_mask[row].sum())].tolist()

    def flat(self) -> tuple[list[str], list[str]]:
        """(prompts, responses), each [N], for selector.score."""
        if self.prompts is None:
            raise ValueError("this rollout carries no prompt texts")
        return [p for p in self.prompts for _ in range(self.n)], list(self.responses)

    @classmethod
    def from_texts(cls, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[str]], chat: bool | None = None) -> Rollout:
        """A rollout of given responses ([P][n] texts), encoded as `sample` would have produced them."""
        n = len(responses[0]) if len(responses) else 0
        if len(prompts) == 0 or len(responses) != len(prompts) or n == 0 or any(len(g) != n for g in responses):
            raise ValueError(f"need [P][n] responses for P = {len(prompts)} >= 1 prompts, n >= 1 equal per prompt")
        pad_id = pad_token_id(tokenizer)
        prompt_ids, _, _ = encode_prompts(tokenizer, prompts, chat=chat)
        ids, mask = pad(prompt_ids, pad_id, "left")
        flat = [r for g in responses for r in g]
        response_ids, action_mask = pad([tokenizer(r, add_special_tokens=False)["input_ids"] for r in flat], pad_id, "right")
        return cls(ids, mask, response_ids, action_mask, flat, n, prompts=list(prompts))


def response_mask(response_ids: Tensor, eos_id: int | None) -> Tensor:
    """1 for response tokens up to and including the first eos (the model must learn to stop), 0 after."""
    if eos_id is None:
        return torch.ones_like(response_ids)
    is_eos = (response_ids == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first eos
    return (~after_eos).long()


def _warp(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus), as Hugging Face's sampling warpers do, in that order."""
    scores = logits / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)  # ascending
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


@torch.no_grad()
def _sample_chunk(model, prompt_ids, prompt_mask, n, max_new_tokens, temperature, top_k, top_p, do_sample, eos, pad_id, generator):
    """One prefill, its cache repeated n times, then token by token until every sample ended or the budget is spent."""
    device = model_device(model)
    out = prefill(model, prompt_ids, prompt_mask, hidden=True)
    context_hidden = out.hidden_states[-1][:, -1].float().cpu()  # left padding: the last column is the last prompt token
    copies = n if do_sample else 1  # greedy: one answer per prompt, repeated by the caller
    cache = out.past_key_values
    if copies > 1:
        cache.batch_repeat_interleave(copies)
    logits = out.logits[:, -1].float().repeat_interleave(copies, dim=0)
    mask = prompt_mask.to(device).repeat_interleave(copies, dim=0)
    position = mask.sum(-1, keepdim=True)  # the first response token's position
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=device)
    tokens = []
    for t in range(max_new_tokens):
        if do_sample:
            probs = _warp(logits, temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        if eos is not None:
            done |= token == eos
        if done.all() or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position + t, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    response_ids = torch.stack(tokens, dim=1).cpu()
    if copies < n:
        response_ids = response_ids.repeat_interleave(n, dim=0)
    return response_ids, context_hidden


def sample(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    *,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    chat: bool | None = None,
    batch_size: int | None = None,
    max_prompt_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """n responses per prompt (greedy when do_sample=False or temperature=0), with each prompt's last hidden state.

    Each prompt is encoded once and its KV cache repeated n times (what vLLM's prefix caching does), so a
    group of n samples costs one prompt forward, and that forward's last hidden state is the bandit context.
    Prompts go through the model batch_size at a time (None: all at once). top_k=0 and top_p=1 sample from
    the full temperature-scaled distribution (the paper); the draws equal Hugging Face `generate`'s with the
    same seed. max_prompt_tokens=None: the model's limit minus max_new_tokens (longer prompts are cut in the
    middle and counted in `num_truncated`).
    """
    if n < 1 or max_new_tokens < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"n, max_new_tokens and batch_size must be >= 1, got {n}, {max_new_tokens}, {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if len(prompts) == 0:
        raise ValueError("no prompts to sample from")
    do_sample = do_sample and temperature > 0
    if max_prompt_tokens is None:
        max_prompt_tokens = prompt_token_limit(model, tokenizer, max_new_tokens)
    ids, kept, truncated = encode_prompts(tokenizer, prompts, max_prompt_tokens, chat)
    pad_id, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
    prompt_ids, prompt_mask = pad(ids, pad_id, "left")
    step = batch_size or len(ids)
    was_training = model.training
    model.eval()
    try:
        chunks = [
            _sample_chunk(model, *pad(ids[s : s + step], pad_id, "left"), n, max_new_tokens, temperature, top_k, top_p, do_sample, eos, pad_id, generator)
            for s in range(0, len(ids), step)
        ]
    finally:
        model.train(was_training)
    width = max(r.shape[1] for r, _ in chunks)  # chunks stop at different lengths: pad the shorter ones
    response_ids = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_id) for r, _ in chunks])
    action_mask = response_mask(response_ids, eos)
    responses = tokenizer.batch_decode(
        torch.where(action_mask.bool(), response_ids, pad_id), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    context_hidden = torch.cat([h for _, h in chunks])
    return Rollout(prompt_ids, prompt_mask, response_ids, action_mask, responses, n, context_hidden, kept, truncated)


# =================================================================================================
# Log-probs and contexts
# =================================================================================================


def response_logprobs(model: nn.Module, rollout: Rollout, rows: Tensor | None = None) -> Tensor:
    """log p(response token | prompt, earlier response tokens) [len(rows), R]; gradients flow outside no_grad.

    rows: the samples to score (default: all). Entries past a sample's action_mask are not meaningful: mask
    them. See `prompt_cached_logprobs`.
    """
    rows = _rows(rollout, rows)
    return prompt_cached_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids[rows], rows // rollout.n)


def prompt_cached_logprobs(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, prompt_index: Tensor) -> Tensor:
    """Token log-probs [N, R] of responses [N, R] (right-padded) after their prompts [P, Lp] (left-padded).

    prompt_index [N]: the prompt of each response. Each prompt that is needed is encoded once and its KV
    cache shared by its responses (the same numbers as one forward over each full sequence, up to float
    error; tests/test_lm.py), then the response tokens run on top, with logits only at response positions.
    """
    prompt_index = torch.as_tensor(prompt_index).long().reshape(-1).cpu()
    if response_ids.dim() != 2 or response_ids.shape[0] != prompt_index.shape[0] or response_ids.shape[0] == 0:
        raise ValueError(f"need response_ids [N >= 1, R] and prompt_index [N], got {tuple(response_ids.shape)} and {tuple(prompt_index.shape)}")
    if ((prompt_index < 0) | (prompt_index >= prompt_ids.shape[0])).any():
        raise ValueError(f"prompt_index must lie in [0, {prompt_ids.shape[0]})")
    device = model_device(model)
    needed, index = prompt_index.unique(return_inverse=True)
    targets = response_ids.to(device)
    R = targets.shape[1]
    out = prefill(model, prompt_ids[needed], prompt_mask[needed])
    index = index.to(device)
    logps = [token_logprobs(out.logits[:, -1][index], targets[:, 0])[:, None]]  # predicts response token 0
    if R > 1:
        cache = out.past_key_values
        cache.batch_select_indices(index)  # one cache row per response
        mask = prompt_mask[needed].to(device)[index]
        positions = mask.sum(-1, keepdim=True) + torch.arange(R - 1, device=device)
        mask = torch.cat([mask, torch.ones_like(targets[:, : R - 1])], dim=1)
        logits = model(input_ids=targets[:, : R - 1], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
        logps.append(token_logprobs(logits, targets[:, 1:]))
    return torch.cat(logps, dim=1)


def _rows(rollout: Rollout, rows) -> Tensor:
    N = rollout.response_ids.shape[0]
    rows = torch.arange(N) if rows is None else torch.as_tensor(rows).long().reshape(-1).cpu()
    if rows.numel() == 0 or ((rows < 0) | (rows >= N)).any():
        raise ValueError(f"rows must be a non-empty selection of the rollout's {N} samples")
    return rows


def sequence_logprobs(model: nn.Module, rollout: Rollout, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequence log-probs (sums over each response's tokens) [len(rows)] and response lengths [len(rows)], float32.

    What DPO and the selector's feedback call "policy_logps" / "ref_logps". Gradients flow outside no_grad.
    """
    rows = _rows(rollout, rows)
    mask = rollout.action_mask[rows].float()
    if (mask.sum(-1) == 0).any():
        raise ValueError("a response has no tokens: nothing to score")
    logps = response_logprobs(model, rollout, rows)
    mask = mask.to(logps.device)
    return (logps * mask).sum(-1), mask.sum(-1).cpu()


@torch.no_grad()
def prompt_contexts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    encoder: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    chat: bool | None = None,
) -> Tensor:
    """The policy's last-token hidden state of each prompt, float32 [P, H] (through `encoder` when given).

    The same encoding and prefill as `sample`, so a context computed here (a warm start's) equals the one a
    sampled rollout carries (`rollout.context_hidden`) for the same prompt. Without a sampling step, this is
    the one forward a context costs.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompt_tokens is None:
        max_prompt_tokens = prompt_token_limit(model, tokenizer, 0)
    ids, _, _ = encode_prompts(tokenizer, prompts, max_prompt_tokens, chat)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()  # dropout would make the same prompt give different contexts
    try:
        hidden = torch.cat([
            prefill(model, *pad(ids[s : s + batch_size], pad_id, "left"), hidden=True, cache=False).hidden_states[-1][:, -1].float().cpu()
            for s in range(0, len(ids), batch_size)
        ])
    finally:
        model.train(was_training)
    return hidden if encoder is None else encoder(hidden)
