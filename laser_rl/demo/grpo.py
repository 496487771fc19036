"""The demo's GRPO step, built on OpenRLHF's own loss functions (they import on a CPU-only machine).

One step, as OpenRLHF's PPO/GRPO trainer does it with `--advantage_estimator group_norm --use_kl_loss`:
  1. sample n responses per prompt from the policy (`sample`);
  2. base log-probs from the frozen reference (`GRPOTrainer.reference_logprobs`);
  3. rewards from the selected RM, group-normalized advantages (`group_norm_advantages`);
  4. `PolicyLoss` (clipped ratio) + kl_coef * k3 KL to the reference (`compute_approx_kl`), aggregated
     with `aggregate_loss` like OpenRLHF's actor, over `minibatches` optimizer steps (`GRPOTrainer.step`).
On a CPU every forward counts: each prompt is encoded once and its KV cache shared by its n samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laser_rl.demo.assets import MissingAssetError
from laser_rl.integrations.openrlhf.compat import ensure_openrlhf_importable

try:
    ensure_openrlhf_importable()
    from openrlhf.models.loss import PolicyLoss, aggregate_loss
    from openrlhf.models.utils import compute_approx_kl
except ImportError as e:  # the demo trains with OpenRLHF's own loss functions: no second trainer
    raise MissingAssetError(
        "the demo's GRPO step uses OpenRLHF's loss functions: on a CPU-only machine run scripts/install_cpu.sh "
        f"(openrlhf==0.11.2 without its CUDA pins, flash-attn as a Python-only wheel); import failed with: {e}"
    ) from e


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    """Each question as a single user turn in the model's chat template, ready for the assistant's reply."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


@dataclass
class Rollout:
    """P prompts x n samples, flattened prompt-major (sample j of prompt i at row i * n + j)."""

    prompt_ids: Tensor  # [P, Lp] left-padded chat prompts
    prompt_mask: Tensor  # [P, Lp]
    response_ids: Tensor  # [N, R] (pad after the end of turn)
    action_mask: Tensor  # [N, R] response tokens up to and including the first end of turn
    responses: list[str]
    n: int
    context_hidden: Tensor | None = None  # [P, H] last-layer hidden state of each prompt's last token

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
        )


def encode_prompts(tokenizer, questions: list[str], chat: bool = True) -> tuple[Tensor, Tensor]:
    """Left-padded token ids and mask [P, Lp] of the prompts (in the chat template unless chat=False)."""
    texts = chat_prompts(tokenizer, questions) if chat else list(questions)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not chat)
    return enc["input_ids"], enc["attention_mask"]


def _prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, hidden: bool = False):
    """One forward over the prompts with a KV cache; position ids from the mask, so left padding is harmless."""
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True,
        output_hidden_states=hidden, logits_to_keep=1,
    )


def _response_masks(response_ids: Tensor, eos_id: int) -> Tensor:
    """1 for response tokens up to and including the first eos (the model must learn to stop), 0 after."""
    is_eos = (response_ids == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first eos
    return (~after_eos).long()


@torch.no_grad()
def sample(
    model,
    tokenizer,
    questions: list[str],
    n: int,
    max_new_tokens: int = 12,
    temperature: float = 0.8,
    top_k: int = 50,
    do_sample: bool = True,
    chat: bool = True,
    generator: torch.Generator | None = None,
) -> Rollout:
    """n responses per question (greedy when do_sample=False), with the prompts' last hidden states.

    Each prompt is encoded once and its KV cache repeated n times (what vLLM's prefix caching does), so a
    group of n samples costs one prompt forward, not n. Stops when every sample has ended its turn.
    """
    was_training = model.training
    model.eval()
    try:
        prompt_ids, prompt_mask = encode_prompts(tokenizer, questions, chat)
        out = _prefill(model, prompt_ids, prompt_mask, hidden=True)
        from laser_rl.context import pool_hidden_states

        context_hidden = pool_hidden_states(out.hidden_states[-1], prompt_mask, "last")
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
        mask = prompt_mask.repeat_interleave(n, dim=0)
        position = mask.sum(-1, keepdim=True)  # the first response token's position
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        done = torch.zeros(mask.shape[0], dtype=torch.bool)
        tokens = []
        for t in range(max_new_tokens):
            if do_sample:
                scaled = logits / temperature
                if top_k:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                token = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            done |= token == eos
            if done.all() or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position + t, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
    finally:
        model.train(was_training)
    response_ids = torch.stack(tokens, dim=1)
    action_mask = _response_masks(response_ids, eos)
    responses = tokenizer.batch_decode(
        torch.where(action_mask.bool(), response_ids, pad), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return Rollout(prompt_ids, prompt_mask, response_ids, action_mask, responses, n, context_hidden)


def response_logprobs(model, rollout: Rollout) -> Tensor:
    """log p(response token | prompt, earlier response tokens) [N, R]; gradients flow outside no_grad.

    The prompt is encoded once per prompt and its KV cache repeated over the n samples (exact: the same
    numbers as a forward over each full sequence, see tests/test_demo.py), then the response tokens run
    on top. Logits are only computed at response positions.
    """
    n, R = rollout.n, rollout.response_ids.shape[1]
    out = _prefill(model, rollout.prompt_ids, rollout.prompt_mask)
    first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(n, dim=0)  # predicts response token 0
    targets = rollout.response_ids
    logps = [first.gather(-1, targets[:, :1])]
    if R > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        prompt_mask = rollout.prompt_mask.repeat_interleave(n, dim=0)
        mask = torch.cat([prompt_mask, torch.ones_like(targets[:, : R - 1])], dim=1)
        position_ids = prompt_mask.sum(-1, keepdim=True) + torch.arange(R - 1)
        logits = model(
            input_ids=targets[:, : R - 1], attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        ).logits.float()
        logps.append(logits.gather(-1, targets[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(logps, dim=1)


def full_sequence_logprobs(model, rollout: Rollout) -> Tensor:
    """The same as response_logprobs by one plain forward per full sequence (the reference for tests)."""
    n = rollout.n
    ids = torch.cat([rollout.prompt_ids.repeat_interleave(n, dim=0), rollout.response_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask.repeat_interleave(n, dim=0), torch.ones_like(rollout.response_ids)], dim=1)
    R = rollout.response_ids.shape[1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -R - 1 : -1].float()
    return logits.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def group_norm_advantages(rewards: Tensor, n: int) -> Tensor:
    """GRPO advantages [P * n]: each reward normalized within its prompt's group of n samples.

    The same formula as OpenRLHF's `group_norm` estimator (RemoteExperienceMaker.compute_advantages_and_returns
    in openrlhf/trainer/ppo_utils/experience_maker.py): (r - mean) / (std + 1e-9) per prompt group. That
    module imports ray and vllm, which do not install on a CPU-only machine, so the line is restated here.
    A group whose samples all got the same reward gets advantage 0: no signal, as in OpenRLHF.
    """
    grouped = rewards.float().reshape(-1, n)
    return ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-9)).reshape(-1)


@dataclass
class GRPOConfig:
    lr: float = 1e-5
    kl_coef: float = 0.02
    kl_estimator: str = "k3"
    clip_eps: float = 0.2
    # Optimizer steps per rollout. 1 (GRPO's mu = 1): the update is exactly on-policy, the ratio is 1 and the
    # clip never binds, and the old log-probs come free from the training forward. >= 2: one extra no-grad
    # forward for the old log-probs, and from the second minibatch on the clipped ratio is active.
    minibatches: int = 1
    max_grad_norm: float = 1.0


class GRPOTrainer:
    """Policy update from a scored rollout with OpenRLHF's PolicyLoss, compute_approx_kl and aggregate_loss."""

    def __init__(self, policy, reference, config: GRPOConfig | None = None):
        self.policy, self.reference = policy, reference
        self.config = config or GRPOConfig()
        if self.config.minibatches < 1:
            raise ValueError(f"minibatches must be >= 1, got {self.config.minibatches}")
        self.policy_loss = PolicyLoss(clip_eps_low=self.config.clip_eps, clip_eps_high=self.config.clip_eps)
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> Tensor:
        """Token log-probs [N, R] of the frozen reference: the KL anchor, and the DPO reference of pair_loss."""
        return response_logprobs(self.reference, rollout)

    def _loss(self, logps: Tensor, old_logps: Tensor, ref_logps: Tensor, advantages: Tensor, mask: Tensor):
        adv = advantages.unsqueeze(-1).expand_as(logps)
        policy_loss, clip_ratio, _, _, _ = self.policy_loss(logps, old_logps, adv, action_mask=mask)
        kl = compute_approx_kl(logps, ref_logps, kl_estimator=self.config.kl_estimator)
        kl_loss = aggregate_loss(kl, mask)  # token-mean, as OpenRLHF's actor aggregates its KL loss
        return policy_loss + self.config.kl_coef * kl_loss, policy_loss, kl_loss, clip_ratio

    def _optimizer_step(self, loss: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return float(grad_norm)

    def step(self, rollout: Rollout, rewards: Tensor, ref_logps: Tensor) -> tuple[Tensor, dict[str, float]]:
        """One GRPO update on the rollout; returns the policy's token log-probs before it ([N, R]) and stats."""
        cfg = self.config
        advantages = group_norm_advantages(rewards, rollout.n)
        action_mask = rollout.action_mask.float()
        stats = {"policy_loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "grad_norm": 0.0}
        self.policy.train()
        try:
            if cfg.minibatches == 1:
                logps = response_logprobs(self.policy, rollout)
                old_logps = logps.detach()
                loss, policy_loss, kl_loss, clip_ratio = self._loss(logps, old_logps, ref_logps, advantages, action_mask)
                stats["grad_norm"] = self._optimizer_step(loss)
                stats.update(policy_loss=policy_loss.item(), kl=kl_loss.item(), clip_ratio=clip_ratio.item())
                return old_logps, stats
            with torch.no_grad():
                old_logps = response_logprobs(self.policy, rollout)
            chunks = torch.arange(rollout.num_prompts).chunk(min(cfg.minibatches, rollout.num_prompts))
            for prompts in chunks:
                rows = rollout.rows(prompts)
                logps = response_logprobs(self.policy, rollout.subset(prompts))
                loss, policy_loss, kl_loss, clip_ratio = self._loss(
                    logps, old_logps[rows], ref_logps[rows], advantages[rows], action_mask[rows]
                )
                stats["grad_norm"] += self._optimizer_step(loss) / len(chunks)
                stats["policy_loss"] += policy_loss.item() / len(chunks)
                stats["kl"] += kl_loss.item() / len(chunks)
                stats["clip_ratio"] += clip_ratio.item() / len(chunks)
            return old_logps, stats
        finally:
            self.policy.eval()
