"""The trainer-side LASeR step inside OpenRLHF, on plain tensors: no Ray, no vLLM, no OpenRLHF import.

    LaserRollout.assign_rewards   contexts -> selector.select -> selector.score -> samples.rewards
    LaserRollout.feedback         sequence log-probs from OpenRLHF's Experiences -> selector.feedback

plus what the command line checks before anything starts (reward-model specs, which signals this
integration can feed) and the token / text helpers that read OpenRLHF's samples. The Ray side (actor
groups, the OpenRLHF subclasses, train()) is in launch.py; it hands LaserRollout a plain function
for the prompt states, so everything here runs on tensors in one process.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from laser_rl.arms import RemoteArm, RewardArm, make_arm
from laser_rl.bandits import BANDITS, LinearBandit
from laser_rl.context import ContextEncoder, pool_hidden_states
from laser_rl.selector import RewardSelector

# Feedback signals this integration can feed (--laser.feedback choices). Left out: `progress` needs each
# prompt's loss after the update (a forward OpenRLHF does not make), `majority` needs extracted final
# answers (no answer-extractor flag here).
FEEDBACKS = ("pair_loss", "spread", "verifier", "consensus")
# The feedback inputs LaserRollout.feedback can build from a rollout and OpenRLHF's Experiences.
FEEDABLE_INPUTS = ("scores", "correct", "policy_logps", "ref_logps", "response_lengths")


# =================================================================================================
# Reward-model specs: checked before any GPU or Ray allocation
# =================================================================================================


def spec_kind(spec: str) -> str:
    """'model' (a local directory, loaded in the reward actor group), 'remote', 'noise' or 'function'."""
    if spec.startswith(("http://", "https://")):
        return "remote"
    if spec == "noise" or spec.startswith("noise:"):
        return "noise"
    if spec.startswith("implicit:") or os.path.isdir(spec):
        return "model"
    return "function"  # module:function, or an error make_arm explains


def spec_name(spec: str) -> str:
    """The arm name make_arm gives a local model: the directory's basename."""
    return os.path.basename(os.path.normpath(spec.removeprefix("implicit:")))


def check_reward_specs(
    specs: Sequence[str],
    weights: Sequence[float] | None = None,
    policy_path: str | None = None,
    remote_timeout: float = 5.0,
) -> list[str]:
    """Check every reward-model spec without loading a model; return notes worth printing.

    Raises ValueError naming the spec: an empty list, a weight list of the wrong length, a model
    directory that does not exist or holds no config/tokenizer, a module:function that does not
    import, a remote RM that does not answer a TCP connect. An RM whose tokenizer differs from the
    policy's is fine (samples reach every RM as text and are re-tokenized by it): that is a note.
    """
    from transformers import AutoConfig, AutoTokenizer

    if not specs:
        raise ValueError("--laser.reward_models is empty: give at least one reward-model spec")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(
            f"--laser.reward_weights has {len(weights)} values for {len(specs)} reward models {list(specs)}: "
            "give one weight per reward model, or none"
        )
    notes, policy_vocab = [], None
    if policy_path and os.path.isdir(policy_path):
        try:
            policy_vocab = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=True).get_vocab()
        except (OSError, ValueError):
            policy_vocab = None  # OpenRLHF reports an unusable policy itself
    for spec in specs:
        kind = spec_kind(spec)
        if kind == "model":
            path = spec.removeprefix("implicit:")
            if not os.path.isdir(path):
                raise ValueError(
                    f"reward model {spec!r}: directory {path!r} does not exist "
                    "(hub ids are not downloaded: pass a local model directory)"
                )
            try:
                AutoConfig.from_pretrained(path, trust_remote_code=True)
                vocab = AutoTokenizer.from_pretrained(path, trust_remote_code=True).get_vocab()
            except (OSError, ValueError) as e:
                raise ValueError(f"reward model {spec!r}: {path!r} is not a model directory with a tokenizer: {e}") from e
            if policy_vocab is not None and vocab != policy_vocab:
                notes.append(
                    f"reward model {spec_name(spec)!r} has its own tokenizer: responses are decoded to text and "
                    "re-tokenized for it"
                )
        elif kind == "remote":
            RemoteArm(spec, timeout=remote_timeout).check()
        elif kind == "function" and ("/" in spec or spec.startswith((".", "~"))):
            raise ValueError(f"reward model path {spec!r} does not exist (hub ids are not downloaded: pass a local directory)")
        else:
            make_arm(spec)  # imports module:function / parses noise:<sigma> (finite); its errors name the spec
    return notes


def check_policy_path(path: str) -> None:
    """The policy (--actor.model_name_or_path) must be a local model directory: ValueError naming it."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise ValueError(
            f"--actor.model_name_or_path {path!r} does not exist (hub ids are not downloaded: pass a local model directory)"
        )
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--actor.model_name_or_path {path!r} is not a model directory: {e}") from e


class WeightedArm(RewardArm):
    """An arm whose scores are multiplied by a fixed weight (--laser.reward_weights).

    Puts RMs on comparable scales for estimators without group normalization (PPO's gae) and weights
    the mean ensemble baseline; a negative weight flips an RM. Ranking-based feedback is unaffected.
    """

    def __init__(self, arm: RewardArm, weight: float):
        if not math.isfinite(float(weight)):
            raise ValueError(f"--laser.reward_weights: the weight of {arm.name!r} must be a finite number, got {weight}")
        self.arm, self.weight = arm, float(weight)
        self.name, self.passes_per_sample = arm.name, arm.passes_per_sample

    def _score(self, prompts, responses, labels):
        return self.arm.score(prompts, responses, labels) * self.weight


# =================================================================================================
# What the flags imply
# =================================================================================================


def is_contextual(laser) -> bool:
    """Whether the selector reads contexts at all (only the linear bandits do; baselines never)."""
    return laser.baseline is None and issubclass(BANDITS[laser.bandit], LinearBandit)


def needs_reference(laser) -> bool:
    """pair_loss needs the reference log-probs, --laser.context reference the reference model itself."""
    return laser.feedback == "pair_loss" or (laser.context == "reference" and is_contextual(laser))


# =================================================================================================
# Tokens and texts from OpenRLHF's samples
# =================================================================================================


def prompt_token_ids(sample) -> Tensor:
    """The prompt tokens of a one-sample Experience: the tokens vLLM was given, no re-tokenization.

    action_mask[j] marks sequences[j + 1], so the first response token sits at first_action + 1.
    """
    seq, actions, attention = sample.sequences[0], sample.action_mask[0], sample.attention_mask[0].bool()
    first = actions.nonzero()
    end = int(first[0]) + 1 if len(first) else int(attention.sum())
    return seq[:end][attention[:end]].cpu()


def response_token_ids(sample) -> Tensor:
    return sample.sequences[0, 1:][sample.action_mask[0].bool()].cpu()


@torch.no_grad()
def pooled_prompt_states(model, prompt_ids: Sequence[Tensor], batch_size: int = 8) -> Tensor:
    """Last-layer hidden state at each prompt's last token: float32 [len(prompt_ids), hidden] on CPU.

    model: the HF causal LM (unwrapped from DeepSpeed; its ZeRO-3 hooks still gather shards).
    Left padding with position ids from the mask, so a prompt gets the same state alone or batched.
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA) wrapper
    # Only the hidden states are needed: skip the [B, T, vocab] logits where the model allows it.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        pooled = []
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [torch.as_tensor(x).long().reshape(-1) for x in prompt_ids[start : start + batch_size]]
            width = max(len(x) for x in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, x in enumerate(chunk):
                ids[row, width - len(x) :] = x
                mask[row, width - len(x) :] = 1
            position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                output_hidden_states=True,
                use_cache=False,
                **extra,
            )
            pooled.append(pool_hidden_states(out.hidden_states[-1], mask.to(device), "last").cpu())
    finally:
        model.train(was_training)
    return torch.cat(pooled)


def chat_affixes(tokenizer) -> tuple[str, str] | None:
    """(prefix, suffix) the policy's chat template wraps around one user message, or None.

    With --data.apply_chat_template OpenRLHF hands out the templated prompt; an RM with its own chat
    template should see the user's text, not the policy's template inside its own.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00laser-rl-user-message\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    except Exception:  # templates may reject a lone user turn; then prompts stay as they are
        return None
    if text.count(marker) != 1:
        return None
    prefix, suffix = text.split(marker)
    return prefix, suffix


# =================================================================================================
# The trainer-side LASeR step
# =================================================================================================


class LaserRollout:
    """Contexts -> arms -> rewards before OpenRLHF's forwards, feedback after them; lives in the trainer.

    n consecutive rollout samples belong to one prompt (OpenRLHF's compute_advantages_and_returns
    groups them the same way); all n are scored by that prompt's arm, so group_norm compares like with like.
    prompt_states(prompt_ids) -> [P, hidden] reads the bandit contexts (launch.py runs it on an actor
    group); None for selectors that read no context.
    """

    def __init__(
        self,
        selector: RewardSelector,
        tokenizer,
        n_samples_per_prompt: int,
        encoder: ContextEncoder | None = None,
        prompt_states: Callable[[list[Tensor]], Tensor] | None = None,
        has_reference: bool = True,
        prompt_domains: dict[str, str] | None = None,
    ):
        if (encoder is None) != (prompt_states is None):
            raise ValueError("a contextual selector needs both a ContextEncoder and a prompt_states function")
        name = selector.feedback_name
        if name not in FEEDBACKS or not set(selector.feedback_inputs) <= set(FEEDABLE_INPUTS):
            raise ValueError(f"--laser.feedback {name} is not available with OpenRLHF; use one of {', '.join(FEEDBACKS)}")
        if "ref_logps" in selector.feedback_inputs and not has_reference:
            raise ValueError(
                f"--laser.feedback {name} needs the reference model's log-probs: create the reference group "
                "(laser_rl's train() does so even with --algo.kl.init_coef 0) or use --laser.feedback spread / verifier"
            )
        if n_samples_per_prompt < 1:
            raise ValueError(f"--rollout.n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
        self.selector, self.tokenizer, self.n = selector, tokenizer, int(n_samples_per_prompt)
        self.encoder, self.prompt_states = encoder, prompt_states
        self.prompt_domains = prompt_domains
        self.affixes = chat_affixes(tokenizer)
        self.last_arms: Tensor | None = None  # the latest step's arm per prompt, for inspection
        self._step: dict | None = None

    # ----- before OpenRLHF's forwards ---------------------------------------------------------
    def contexts(self, first_samples: Sequence) -> Tensor:
        """[P, d] bandit contexts, one per prompt; [P, 1] zeros for selectors that ignore them."""
        if self.prompt_states is None:
            return torch.zeros(len(first_samples), 1)
        return self.encoder(self.prompt_states([prompt_token_ids(s) for s in first_samples]))

    def user_text(self, prompt: str) -> str:
        if self.affixes is not None:
            prefix, suffix = self.affixes
            if prompt.startswith(prefix) and prompt.endswith(suffix) and len(prompt) >= len(prefix) + len(suffix):
                return prompt[len(prefix) : len(prompt) - len(suffix)]
        return prompt

    def assign_rewards(self, rollout_samples: Sequence) -> Tensor:
        """Pick an arm per prompt, score each prompt's samples with it, write samples.rewards; returns arms [P]."""
        n, total = self.n, len(rollout_samples)
        if total == 0 or total % n:
            raise ValueError(f"got {total} rollout samples, not a multiple of --rollout.n_samples_per_prompt {n}")
        prompts = [s.prompts[0] for s in rollout_samples]
        for p in range(0, total, n):
            if len(set(prompts[p : p + n])) != 1:
                raise RuntimeError(f"rollout samples {p}..{p + n - 1} are not one prompt's group; LASeR needs them grouped")
        firsts = rollout_samples[::n]
        contexts = self.contexts(firsts)
        domains = None
        if self.prompt_domains:
            domains = [self.prompt_domains.get(s.prompts[0], "unknown") for s in firsts]
        responses = self.tokenizer.batch_decode([response_token_ids(s) for s in rollout_samples], skip_special_tokens=True)
        labels = [s.labels[0] if s.labels else None for s in rollout_samples]
        texts = [self.user_text(p) for p in prompts]
        # select then score, in order, on this prompt-grouped batch (the consensus audit relies on it).
        arms = self.selector.select(contexts, domains)
        rewards = self.selector.score(texts, responses, arms.repeat_interleave(n), labels)
        for sample, reward in zip(rollout_samples, rewards):
            sample.rewards = reward.reshape(1).clone()
            sample.info["reward"] = reward.reshape(1).clone()
        correct = None
        if all(s.scores is not None for s in rollout_samples):  # a verifier's scores (--reward.remote_url)
            correct = torch.cat([s.scores.reshape(1).float() for s in rollout_samples]).view(-1, n) > 0.5
        self._step = {"contexts": contexts, "arms": arms, "scores": rewards.view(-1, n), "correct": correct}
        self.last_arms = arms
        return arms

    # ----- after OpenRLHF's forwards ----------------------------------------------------------
    def feedback(self, experiences: Sequence) -> Tensor:
        """Update the bandit from this step's experiences; returns the normalized bandit rewards [P]."""
        step = self._step
        if step is None:
            raise RuntimeError("LaserRollout.feedback called without assign_rewards for this step")
        needed = set(self.selector.feedback_inputs)
        inputs = {"scores": step["scores"]}
        if "correct" in needed:
            if step["correct"] is None:
                raise ValueError(
                    f"--laser.feedback {self.selector.feedback_name} needs a verifier score per sample: pass --reward.remote_url"
                )
            inputs["correct"] = step["correct"]
        if needed & {"policy_logps", "ref_logps", "response_lengths"}:
            inputs.update(sequence_logps(experiences, *step["scores"].shape))
        normalized = self.selector.feedback(step["contexts"], step["arms"], **inputs)
        self._step = None  # consumed only once the bandit has learned from it
        return normalized

    # ----- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "selector": self.selector.state_dict(),
            "context_encoder": None if self.encoder is None else self.encoder.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state["selector"])
        if self.encoder is not None and state.get("context_encoder") is not None:
            self.encoder.load_state_dict(state["context_encoder"])


def sequence_logps(experiences: Sequence, P: int, n: int) -> dict[str, Tensor]:
    """policy_logps, ref_logps, response_lengths [P, n] from OpenRLHF's Experiences: no extra forward.

    Sequence log-probs are summed over response tokens; each Experience's `index` (set by OpenRLHF's
    split_rollout_samples) says which rollout positions its rows hold.
    """
    policy, ref, lengths = (torch.full((P * n,), math.nan) for _ in range(3))
    for e in experiences:
        index = torch.as_tensor(e.index, dtype=torch.long)
        mask = e.action_mask.float()
        length = mask.sum(-1)
        logp = (e.action_log_probs.float() * mask).sum(-1)
        if e.base_action_log_probs is not None:  # kept when --algo.kl.use_loss
            ref_logp = (e.base_action_log_probs.float() * mask).sum(-1)
        else:  # info["logprobs_diff"] is the masked mean of log pi - log pi_ref; times the length, its sum
            ref_logp = logp - e.info["logprobs_diff"].float() * length
        policy[index], ref[index], lengths[index] = logp, ref_logp, length
    # An empty response holds no tokens; count it as one so its NLL (0 / 1) stays finite.
    return {
        "policy_logps": policy.view(P, n), "ref_logps": ref.view(P, n), "response_lengths": lengths.view(P, n).clamp(min=1),
    }
