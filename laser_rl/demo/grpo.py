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

from laser_rl import lm
from laser_rl.demo.assets import MissingAssetError
from laser_rl.lm import Rollout, response_logprobs  # noqa: F401  (re-exported: the demo's callers import them from here)
from laser_rl.lm import response_mask as _response_masks  # noqa: F401
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
    """laser_rl.lm.sample with the demo's settings: chat template, top-k 50, short answers, all prompts at once."""
    return lm.sample(
        model, tokenizer, questions, n, max_new_tokens, temperature, top_k=top_k, do_sample=do_sample, chat=chat, generator=generator
    )


def full_sequence_logprobs(model, rollout: Rollout) -> Tensor:
    """The same as response_logprobs by one plain forward per full sequence (the reference for tests)."""
    n = rollout.n
    ids = torch.cat([rollout.prompt_ids.repeat_interleave(n, dim=0), rollout.response_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask.repeat_interleave(n, dim=0), torch.ones_like(rollout.response_ids)], dim=1)
    R = rollout.response_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=lm.position_ids(mask), use_cache=False).logits
    return lm.token_logprobs(logits[:, -R - 1 : -1], rollout.response_ids)


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
