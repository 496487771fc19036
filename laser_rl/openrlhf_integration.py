"""Everything OpenRLHF-specific in laser-rl lives here; the core (laser_rl.*) never imports OpenRLHF.

LASeR inside OpenRLHF's PPO / GRPO loop (openrlhf 0.11.x), one training step:

    SamplesGenerator (vLLM, unchanged)  ->  rollout_samples, n consecutive samples per prompt
    LaserExperienceMaker.make_experience_batch
      1. contexts   LaserPolicyModelActor.laser_prompt_states: last-token hidden state of each prompt
                    (or the reference actor's, --laser.context reference), through a ContextEncoder
      2. arms       selector.select: one reward model per prompt
      3. rewards    selector.score: each prompt's n samples scored by its arm only; local RMs all live
                    in ONE LaserRewardModelActor group (GroupArm), URLs and module:function run here.
                    They land in samples.rewards, so RemoteExperienceMaker.make_experience skips its
                    own reward model (`use_reward_model = samples_list[0].rewards is None`).
      4. RemoteExperienceMaker.make_experience: actor / reference / critic forwards, unchanged
      5. feedback   from action_log_probs, base_action_log_probs or info["logprobs_diff"] and
                    action_mask, which step 4 already computed: no extra forward pass
      6. RemoteExperienceMaker.compute_advantages_and_returns: group_norm, gae, ... unchanged
    LaserPPOTrainer: selector state in the checkpoint's client_states (restored by --ckpt.load_enable),
    laser/* metrics to OpenRLHF's TensorBoard and wandb loggers.

Importing this module needs neither OpenRLHF nor vLLM: the classes that subclass OpenRLHF's
(importing openrlhf.trainer pulls in vllm) are built on first access, see `__getattr__` at the end.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import math
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from laser_rl.arms import (
    ImplicitRewardArm,
    RemoteArm,
    RewardArm,
    SequenceClassifierArm,
    make_arm,
)
from laser_rl.bandits import BANDITS, LinearBandit
from laser_rl.context import ContextEncoder, pool_hidden_states
from laser_rl.selector import RewardSelector

# Key of the selector state inside OpenRLHF's checkpoint client_states (beside "global_step", ...).
CHECKPOINT_KEY = "laser_selector"
# Feedback signals the integration can feed from tensors OpenRLHF already holds.
FEEDBACKS = ("pair_loss", "spread", "verifier")
# Run in every Ray worker before it unpickles an actor class: a worker imports OpenRLHF (flash_attn)
# before any of our code runs, so the CPU shim must be in place first (a no-op on GPU machines).
WORKER_SETUP_HOOK = "laser_rl.openrlhf_integration.ensure_openrlhf_importable"


def ensure_openrlhf_importable() -> None:
    """Let `import openrlhf.models` work on a machine without CUDA.

    OpenRLHF imports flash_attn for its pure-PyTorch padding helpers (flash_attn.bert_padding), but
    flash_attn/__init__ loads the compiled CUDA extension `flash_attn_2_cuda`, which cannot be built
    without a GPU toolchain. Where that extension is missing (flash-attn installed as a Python-only
    wheel, see scripts/install_cpu.sh) an empty module stands in for it; calling a flash-attention
    kernel would still fail loudly. Where the real extension exists, nothing changes.

    Without CUDA, flash_attn's Triton cross-entropy (which OpenRLHF's log_probs_from_logits tries
    first, falling back to PyTorch only on ImportError) cannot run, so it is made unimportable there.
    """
    if not torch.cuda.is_available():
        sys.modules.setdefault("flash_attn.ops.triton.cross_entropy", None)  # None: import raises ImportError
    if "flash_attn_2_cuda" in sys.modules or importlib.util.find_spec("flash_attn_2_cuda") is not None:
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "OpenRLHF needs flash-attn. On a GPU machine: pip install flash-attn; on a CPU-only machine: "
            "FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE "
            "pip install --no-build-isolation flash-attn==2.8.3 (or run scripts/install_cpu.sh)"
        )
    sys.modules["flash_attn_2_cuda"] = types.ModuleType("flash_attn_2_cuda")


# =================================================================================================
# OpenRLHF's command line, reused as is
# =================================================================================================
# openrlhf.cli.train_ppo_ray builds its parser and checks its arguments inline under
# `if __name__ == "__main__":`. Copying ~300 flags would drift with every release, and importing the
# module would import vLLM, so the statements are read from its source and run here instead:
# every OpenRLHF flag and every OpenRLHF check, for the installed version, without starting anything.


def _openrlhf_main_block() -> tuple[list[ast.stmt], list[ast.stmt], str]:
    """(statements that build `parser`, statements that check `args` after hierarchize, file path)."""
    spec = importlib.util.find_spec("openrlhf.cli.train_ppo_ray")
    if spec is None or spec.origin is None:
        raise ImportError('openrlhf is not installed: pip install "laser-rl[openrlhf]" (or scripts/install_cpu.sh)')
    path = spec.origin
    tree = ast.parse(Path(path).read_text(), path)
    main = next((n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)), None)
    body = main.body if main is not None else []
    code = [ast.unparse(stmt) for stmt in body]
    try:
        parse_at = code.index("args = parser.parse_args()")
        hier_at = code.index("args = hierarchize(args)")
        train_at = code.index("train(args)")
    except ValueError:
        raise RuntimeError(
            f"cannot find OpenRLHF's argument parser in {path}; laser-rl supports openrlhf 0.11.x"
        ) from None
    return body[:parse_at], body[hier_at + 1 : train_at], path


def openrlhf_parser() -> argparse.ArgumentParser:
    """OpenRLHF's own train_ppo_ray ArgumentParser (all its dotted flags), built without importing it."""
    from datetime import datetime

    build, _, path = _openrlhf_main_block()
    namespace = {"argparse": argparse, "datetime": datetime, "os": os}
    exec(compile(ast.Module(body=build, type_ignores=[]), path, "exec"), namespace)
    return namespace["parser"]


def openrlhf_check_args(args: types.SimpleNamespace) -> None:
    """Run OpenRLHF's own checks and derived defaults on hierarchized args (raises AssertionError)."""
    _, checks, path = _openrlhf_main_block()
    namespace = {"args": args}
    exec(compile(ast.Module(body=checks, type_ignores=[]), path, "exec"), namespace)


def hierarchize(args: argparse.Namespace) -> types.SimpleNamespace:
    """argparse's flat `{"laser.alpha": ...}` to nested namespaces (`args.laser.alpha`), as OpenRLHF does."""
    from openrlhf.utils.config import hierarchize as _hierarchize

    return _hierarchize(args)


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
            make_arm(spec)  # imports module:function / parses noise:<sigma>; its errors name the spec
    return notes


class WeightedArm(RewardArm):
    """An arm whose scores are multiplied by a fixed weight (--laser.reward_weights).

    Puts RMs on comparable scales for estimators without group normalization (PPO's gae) and weights
    the mean ensemble baseline; a negative weight flips an RM. Ranking-based feedback is unaffected.
    """

    def __init__(self, arm: RewardArm, weight: float):
        self.arm, self.weight = arm, float(weight)
        self.name, self.passes_per_sample = arm.name, arm.passes_per_sample

    def _score(self, prompts, responses, labels):
        return self.arm.score(prompts, responses, labels) * self.weight


def load_model_arm(spec: str, strategy=None) -> RewardArm:
    """A local reward model for the reward actor group: `<dir>` (sequence classifier) or `implicit:<dir>`.

    With a DeepspeedStrategy the model is loaded in --ds.param_dtype and wrapped by DeepSpeed like
    OpenRLHF's own reward model: under ZeRO-3 each of the K RMs is sharded over the group's GPUs, so
    K RMs take the GPU slots of one. Without a strategy (CPU, tests) this is make_arm(spec).
    """
    if strategy is None:
        return make_arm(spec)
    from openrlhf.utils.utils import convert_to_torch_dtype
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    args = strategy.args
    implicit = spec.startswith("implicit:")
    path = spec.removeprefix("implicit:")
    ds_config = strategy.get_ds_eval_config(offload=args.reward.offload)
    # While this object lives, from_pretrained loads only this rank's ZeRO-3 shard.
    dschf = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None  # noqa: F841
    auto = AutoModelForCausalLM if implicit else AutoModelForSequenceClassification
    model = auto.from_pretrained(
        path,
        dtype=convert_to_torch_dtype(args.ds.param_dtype),
        attn_implementation=args.ds.attn_implementation,
        trust_remote_code=True,
    )
    model._offload = args.reward.offload  # read by DeepspeedStrategy._ds_init_eval_model
    engine = strategy.prepare(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    kwargs = dict(name=spec_name(spec), max_length=args.data.max_len)
    # The arms call the HF module; ZeRO-3's hooks on it gather the shards during each forward.
    if implicit:
        return ImplicitRewardArm(engine.module, tokenizer, mode="likelihood", **kwargs)
    return SequenceClassifierArm(engine.module, tokenizer, **kwargs)


# =================================================================================================
# Work spread over an OpenRLHF actor group
# =================================================================================================


def run_sharded(group, method: str, sync: bool = False, constants: dict | None = None, **lists: list) -> list:
    """Call `method` on every actor of an OpenRLHF RayActorGroup with an equal share of `lists`.

    Each rank gets exactly one chunk of the same length (the last item repeated as padding): under
    ZeRO-3 a forward is a collective, so every rank must run as many forwards as the others. Returns
    the per-chunk results, in order, padding dropped by the caller (see `_concat`).
    `constants` go to every chunk unchanged; `sync` empties the CUDA cache afterwards like OpenRLHF
    does for its own forwards when models share GPUs (--train.colocate_all).
    """
    import ray

    total = len(next(iter(lists.values())))
    world = len(group._actor_handlers) // group.duplicate_actors  # ranks that get distinct data
    per = math.ceil(total / world)
    order = list(range(total)) + [total - 1] * (per * world - total)
    chunks = {
        key: [[values[i] for i in order[r * per : (r + 1) * per]] for r in range(world)] for key, values in lists.items()
    }
    for key, value in (constants or {}).items():
        chunks[key] = [value] * world
    refs = group.async_run_method_batch(method_name=method, **chunks)
    results = [out[0] for out in ray.get(refs)[:: group.duplicate_actors]]  # ring / TP duplicates agree
    if sync:
        ray.get(group.async_run_method(method_name="empty_cache"))
    return results


def _concat(chunks: list, total: int) -> Tensor:
    return torch.cat([torch.as_tensor(c) for c in chunks])[:total]


class GroupArm(RewardArm):
    """Trainer-side handle of a local RM loaded in the LaserRewardModelActor group (arm `index` there).

    The selector treats it like any arm; scoring runs on the group's GPUs, sharded over its ranks.
    """

    def __init__(self, group, index: int, name: str, sync: bool = False):
        self.group, self.index, self.name, self.sync = group, int(index), name, sync

    def _score(self, prompts, responses, labels):
        labels = [None] * len(prompts) if labels is None else labels
        chunks = run_sharded(
            self.group, "laser_score", self.sync, {"arm": self.index}, prompts=prompts, responses=responses, labels=labels
        )
        return _concat(chunks, len(prompts))


# =================================================================================================
# Contexts and texts from OpenRLHF's samples
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


def is_contextual(laser) -> bool:
    """Whether the selector reads contexts at all (only the linear bandits do; baselines never)."""
    return laser.baseline is None and issubclass(BANDITS[laser.bandit], LinearBandit)


def needs_reference(laser) -> bool:
    """pair_loss needs the reference log-probs, --laser.context reference the reference model itself."""
    return laser.feedback == "pair_loss" or (laser.context == "reference" and is_contextual(laser))


def make_selector(laser, arms: Sequence, context_dim: int | None) -> RewardSelector:
    """The RewardSelector a set of --laser.* flags describes (laser: the hierarchized `args.laser`)."""
    return RewardSelector(
        arms,
        context_dim=context_dim,
        bandit=laser.bandit,
        baseline=laser.baseline,
        alpha=laser.alpha,
        lam=laser.lam,
        discount=laser.discount,
        feedback=laser.feedback,
        feedback_kwargs={"beta": laser.beta} if laser.feedback == "pair_loss" else None,
        granularity=laser.granularity,
        single_arm=laser.single_arm,
        normalize_scores=laser.normalize_scores,
        seed=laser.seed,
    )


# =================================================================================================
# The trainer-side LASeR step
# =================================================================================================


class LaserRollout:
    """Contexts -> arms -> rewards before OpenRLHF's forwards, feedback after them; lives in the trainer.

    n consecutive rollout samples belong to one prompt (OpenRLHF's compute_advantages_and_returns
    groups them the same way); all n are scored by that prompt's arm, so group_norm compares like with like.
    """

    def __init__(
        self,
        selector: RewardSelector,
        tokenizer,
        n_samples_per_prompt: int,
        encoder: ContextEncoder | None = None,
        context_group=None,
        has_reference: bool = True,
        sync: bool = False,
        prompt_domains: dict[str, str] | None = None,
    ):
        if (encoder is None) != (context_group is None):
            raise ValueError("a contextual selector needs both a ContextEncoder and an actor group to read contexts from")
        if selector.feedback_name == "pair_loss" and not has_reference:
            raise ValueError(
                "--laser.feedback pair_loss needs the reference model's log-probs: create the reference group "
                "(laser_rl's train() does so even with --algo.kl.init_coef 0) or use --laser.feedback spread / verifier"
            )
        if selector.feedback_name not in FEEDBACKS:
            raise ValueError(f"--laser.feedback {selector.feedback_name} is not available with OpenRLHF; use one of {FEEDBACKS}")
        self.selector, self.tokenizer, self.n = selector, tokenizer, int(n_samples_per_prompt)
        self.encoder, self.context_group, self.sync = encoder, context_group, sync
        self.prompt_domains = prompt_domains
        self.affixes = chat_affixes(tokenizer)
        self.last_arms: Tensor | None = None  # the latest step's arm per prompt, for inspection
        self._step: dict | None = None

    # ----- before OpenRLHF's forwards ---------------------------------------------------------
    def contexts(self, first_samples: Sequence) -> Tensor:
        """[P, d] bandit contexts, one per prompt; [P, 1] zeros for selectors that ignore them."""
        if self.context_group is None:
            return torch.zeros(len(first_samples), 1)
        ids = [prompt_token_ids(s) for s in first_samples]
        states = _concat(run_sharded(self.context_group, "laser_prompt_states", self.sync, prompt_ids=ids), len(ids))
        return self.encoder(states)

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
        arms = self.selector.select(contexts, domains)
        responses = self.tokenizer.batch_decode([response_token_ids(s) for s in rollout_samples], skip_special_tokens=True)
        labels = [s.labels[0] if s.labels else None for s in rollout_samples]
        texts = [self.user_text(p) for p in prompts]
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
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("LaserRollout.feedback called without assign_rewards for this step")
        P, n = step["scores"].shape
        policy, ref, lengths = (torch.full((P * n,), math.nan) for _ in range(3))
        for e in experiences:
            index = torch.as_tensor(e.index, dtype=torch.long)  # rollout positions, set by split_rollout_samples
            mask = e.action_mask.float()
            length = mask.sum(-1)
            logp = (e.action_log_probs.float() * mask).sum(-1)
            if e.base_action_log_probs is not None:  # kept when --algo.kl.use_loss
                ref_logp = (e.base_action_log_probs.float() * mask).sum(-1)
            else:  # info["logprobs_diff"] is the masked mean of log pi - log pi_ref; times the length, its sum
                ref_logp = logp - e.info["logprobs_diff"].float() * length
            policy[index], ref[index], lengths[index] = logp, ref_logp, length
        name = self.selector.feedback_name
        if name == "pair_loss":
            # An empty response holds no tokens; count it as one so its NLL (0 / 1) stays finite.
            inputs = dict(
                scores=step["scores"], policy_logps=policy.view(P, n), ref_logps=ref.view(P, n),
                response_lengths=lengths.view(P, n).clamp(min=1),
            )
        elif name == "verifier":
            if step["correct"] is None:
                raise ValueError("--laser.feedback verifier needs a verifier score per sample: pass --reward.remote_url")
            inputs = dict(scores=step["scores"], correct=step["correct"])
        else:
            inputs = dict(scores=step["scores"])
        return self.selector.feedback(step["contexts"], step["arms"], **inputs)

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


def policy_hidden_size(pretrain: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrain, trust_remote_code=True)
    return int(config.get_text_config().hidden_size)


def build_laser_rollout(
    args, tokenizer, actor_group, reference_group=None, reward_group=None, prompt_domains=None
) -> LaserRollout:
    """The LaserRollout for hierarchized OpenRLHF args with a `laser` namespace (see the CLI)."""
    laser = args.laser
    sync = bool(args.train.colocate_all)
    arms, local = [], 0
    for i, spec in enumerate(laser.reward_models):
        if spec_kind(spec) == "model":
            if reward_group is None:
                raise ValueError(f"reward model {spec!r} is a local model but no reward actor group was created")
            arm = GroupArm(reward_group, local, spec_name(spec), sync=sync)
            local += 1
        else:
            arm = make_arm(spec)  # URLs, rules and noise are scored right here in the trainer
        if laser.reward_weights is not None and laser.reward_weights[i] != 1.0:
            arm = WeightedArm(arm, laser.reward_weights[i])
        arms.append(arm)
    encoder, context_group = None, None
    if is_contextual(laser):
        context_group = reference_group if laser.context == "reference" else actor_group
        if context_group is None:
            raise ValueError("--laser.context reference needs the reference model group")
        encoder = ContextEncoder(
            policy_hidden_size(args.actor.model_name_or_path), proj_dim=laser.context_dim or None, seed=laser.seed
        )
    selector = make_selector(laser, arms, None if encoder is None else encoder.dim)
    return LaserRollout(
        selector,
        tokenizer,
        args.rollout.n_samples_per_prompt,
        encoder=encoder,
        context_group=context_group,
        has_reference=reference_group is not None,
        sync=sync,
        prompt_domains=prompt_domains,
    )


def _prompt_domains(dataloader) -> dict[str, str] | None:
    """prompt -> the dataset's "datasource" field, for laser/domain/<source>/arm_frac/* (if it varies)."""
    dataset = getattr(dataloader, "dataset", None)
    sources = getattr(dataset, "datasources", None)
    if not sources or len(set(sources)) < 2:
        return None
    return dict(zip(dataset.prompts, sources))


# =================================================================================================
# OpenRLHF subclasses (built on first access: importing openrlhf.trainer imports vLLM)
# =================================================================================================

_LAZY = ("LaserExperienceMaker", "LaserPolicyModelActor", "LaserReferenceModelActor", "LaserRewardModelActor", "LaserPPOTrainer")
_classes: types.SimpleNamespace | None = None


def _define_openrlhf_classes() -> types.SimpleNamespace:
    ensure_openrlhf_importable()
    import ray
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.launcher import BaseModelActor, ReferenceModelActor
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from openrlhf.utils.logging_utils import init_logger

    logger = init_logger(__name__)

    class LaserExperienceMaker(RemoteExperienceMaker):
        """RemoteExperienceMaker with LASeR's rewards before its forwards and the bandit update after."""

        def __init__(self, *args, laser: LaserRollout, **kwargs):
            super().__init__(*args, **kwargs)
            self.laser = laser

        @torch.no_grad()
        def make_experience_batch(self, rollout_samples):
            # Rewards set here make make_experience skip OpenRLHF's reward model.
            self.laser.assign_rewards(rollout_samples)
            return super().make_experience_batch(rollout_samples)

        @torch.no_grad()
        def make_experience(self, samples_list):
            experiences = super().make_experience(samples_list)
            self.laser.feedback(experiences)
            return experiences

    class _PromptStates:
        def laser_prompt_states(self, prompt_ids: list[Tensor]) -> Tensor:
            """Pooled last-token hidden states [len(prompt_ids), hidden] of this actor's model."""
            actor = self.actor if hasattr(self, "actor") else self.model  # policy actor / reference actor
            module = getattr(actor.model, "module", actor.model)  # DeepSpeed engine -> HF model
            return pooled_prompt_states(module, prompt_ids)

    class LaserPolicyModelActor(_PromptStates, PolicyModelActor.__ray_actor_class__):
        """OpenRLHF's policy actor plus laser_prompt_states (bandit contexts from the policy)."""

    class LaserReferenceModelActor(_PromptStates, ReferenceModelActor.__ray_actor_class__):
        """OpenRLHF's reference actor plus laser_prompt_states (--laser.context reference)."""

    class LaserRewardModelActor(BaseModelActor):
        """All K local reward models in one actor group: each sample is scored by its own arm only."""

        def init_model_from_pretrained(self, strategy, specs: list[str]) -> None:
            self._setup_distributed(strategy)
            self.load_arms(specs, strategy)

        def load_arms(self, specs: list[str], strategy=None) -> None:
            self.arms = [load_model_arm(spec, strategy) for spec in specs]

        def laser_score(self, arm: int, prompts: list[str], responses: list[str], labels: list) -> Tensor:
            labels = None if all(label is None for label in labels) else list(labels)
            return self.arms[arm].score(list(prompts), list(responses), labels)

    class LaserPPOTrainer(PPOTrainer.__ray_actor_class__):
        """OpenRLHF's PPOTrainer with a LaserRollout: checkpointed with the policy, logged under laser/."""

        def __init__(
            self, pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
            reference_model_group, vllm_engines, laser_reward_group=None, **generate_kwargs,
        ):
            super().__init__(
                pretrain, strategy, actor_model_group, critic_model_group, reward_model_group,
                reference_model_group, vllm_engines, **generate_kwargs,
            )
            self.laser = build_laser_rollout(
                self.args, self.tokenizer, actor_model_group, reference_model_group, laser_reward_group,
                prompt_domains=_prompt_domains(self.prompts_dataloader),
            )
            self.experience_maker = LaserExperienceMaker(
                actor_model_group, critic_model_group, reward_model_group, reference_model_group,
                self.kl_ctl, self.strategy, self.tokenizer, laser=self.laser,
            )
            if self.wandb_logger:
                self.wandb_logger.handle.define_metric("laser/*", step_metric="train/global_step", step_sync=True)

        def train_step(self, rollout_samples, global_step):
            status, global_step = super().train_step(rollout_samples, global_step)
            status.update(self.laser.selector.metrics())
            return status, global_step

        def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
            logs = dict(logs_dict or {})
            laser_logs = {k: logs.pop(k) for k in list(logs) if k.startswith("laser/")}
            # OpenRLHF's loggers prefix "train/"; LASeR's curves keep their own laser/ section.
            if laser_logs and global_step % self.args.logger.logging_steps == 0:
                if self.tensorboard_logger:
                    for key, value in laser_logs.items():
                        self.tensorboard_logger.writer.add_scalar(key, value, global_step)
                if self.wandb_logger:
                    self.wandb_logger.handle.log({**laser_logs, "train/global_step": global_step})
            client_states = dict(client_states or {})
            if global_step % self.args.ckpt.save_steps == 0:  # copy the bandit only when a checkpoint is written
                client_states[CHECKPOINT_KEY] = self.laser.state_dict()
            super().save_logs_and_checkpoints(global_step, logs, client_states)

        def save_best_checkpoint(self, eval_metrics, global_step, client_states=None):
            client_states = {**(client_states or {}), CHECKPOINT_KEY: self.laser.state_dict()}
            super().save_best_checkpoint(eval_metrics, global_step, client_states)

        def init_checkpoint_states(self):
            states = super().init_checkpoint_states()
            if CHECKPOINT_KEY in states:
                self.laser.load_state_dict(states[CHECKPOINT_KEY])
                logger.info(f"LASeR: resumed the selector after {self.laser.selector.steps} steps")
            elif states.get("global_step", 0) > 0:
                logger.warning("LASeR: the checkpoint holds no selector state; the bandit starts from scratch")
            return states

    return types.SimpleNamespace(
        LaserExperienceMaker=LaserExperienceMaker,
        LaserPolicyModelActor=ray.remote(num_gpus=1)(LaserPolicyModelActor),
        LaserReferenceModelActor=ray.remote(num_gpus=1)(LaserReferenceModelActor),
        LaserRewardModelActor=ray.remote(num_gpus=1)(LaserRewardModelActor),
        LaserPPOTrainer=ray.remote(LaserPPOTrainer),
    )


def openrlhf_classes() -> types.SimpleNamespace:
    """The OpenRLHF subclasses above (Ray actor classes; `.__ray_actor_class__` is the plain class)."""
    global _classes
    if _classes is None:
        _classes = _define_openrlhf_classes()
    return _classes


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(openrlhf_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =================================================================================================
# Launch: OpenRLHF's train_ppo_ray.train with LASeR's actors
# =================================================================================================


def train(args: types.SimpleNamespace) -> None:
    """openrlhf.cli.train_ppo_ray.train with the LASeR policy/reference actors, one reward group for
    all local RMs and LaserPPOTrainer; placement (colocation, placement groups) is OpenRLHF's."""
    ensure_openrlhf_importable()
    import ray
    from openrlhf.trainer.ray import create_vllm_engines
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from openrlhf.trainer.ray.ppo_critic import CriticModelActor
    from openrlhf.utils import get_strategy
    from ray.util.placement_group import placement_group

    c = openrlhf_classes()
    laser = args.laser
    if not ray.is_initialized():
        ray.init(
            runtime_env={
                "env_vars": {
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
                    "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
                    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
                },
                "worker_process_setup_hook": WORKER_SETUP_HOOK,
            }
        )
    strategy = get_strategy(args)
    strategy.print(args)
    # The reference model also runs when LASeR needs it (pair_loss, --laser.context reference) even
    # with --algo.kl.init_coef 0: its KL then has weight 0 in the reward.
    need_ref = args.algo.kl.init_coef > 0 or needs_reference(laser)
    duplicate = args.ds.ring_attn_size * args.ds.tensor_parallel_size

    pg = None
    if args.train.colocate_actor_ref or args.train.colocate_all:
        if need_ref:
            assert (
                args.actor.num_nodes == args.ref.num_nodes and args.actor.num_gpus_per_node == args.ref.num_gpus_per_node
            ), "num_nodes and num_gpus_per_node must be the same when colocate actor and ref model."
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.actor.num_nodes * args.actor.num_gpus_per_node)]
        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready())

    vllm_engines = None
    if args.vllm.num_engines is not None and args.vllm.num_engines > 0:
        if args.train.colocate_all:
            assert args.actor.num_nodes * args.actor.num_gpus_per_node == args.vllm.num_engines * args.vllm.tensor_parallel_size, (
                "actor.num_nodes * actor.num_gpus_per_node must equal vllm.num_engines * vllm.tensor_parallel_size"
            )
        vllm_engines = create_vllm_engines(
            args.vllm.num_engines,
            args.vllm.tensor_parallel_size,
            args.actor.model_name_or_path,
            args.train.seed,
            args.train.full_determinism_enable,
            args.vllm.enable_prefix_caching,
            args.vllm.enforce_eager,
            args.data.max_len,
            pg if args.train.colocate_all else None,
            args.vllm.gpu_memory_utilization,
            args.vllm.enable_sleep,
            "processed_logprobs" if args.algo.advantage.is_correction_level != "off" else None,
            agent_func_path=args.train.agent_func_path,
            # A verifier here only gives samples.scores (dynamic filtering, eval, verifier feedback);
            # training rewards come from the selector's RMs.
            remote_rm_url=args.reward.remote_url,
            max_images_per_prompt=getattr(args.data, "max_images_per_prompt", 0),
        )

    def group(num_nodes, num_gpus_per_node, actor_type, pg):
        return RayActorGroup(
            num_nodes, num_gpus_per_node, actor_type, pg=pg, num_gpus_per_actor=0.2 if pg else 1, duplicate_actors=duplicate
        )

    actor_model = group(args.actor.num_nodes, args.actor.num_gpus_per_node, c.LaserPolicyModelActor, pg)
    ref_model = group(args.ref.num_nodes, args.ref.num_gpus_per_node, c.LaserReferenceModelActor, pg) if need_ref else None
    if not args.train.colocate_all:
        pg = None
    if args.critic.model_name_or_path and args.train.colocate_critic_reward:
        assert (
            args.critic.num_nodes == args.reward.num_nodes and args.critic.num_gpus_per_node == args.reward.num_gpus_per_node
        ), "num_nodes and num_gpus_per_node must be the same when colocate critic and reward model."
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.critic.num_nodes * args.critic.num_gpus_per_node)]
        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready())
    critic_model = (
        group(args.critic.num_nodes, args.critic.num_gpus_per_node, CriticModelActor, pg) if args.critic.model_name_or_path else None
    )
    # One group, all local RMs: the GPU slots of OpenRLHF's single reward model.
    local_specs = [s for s in laser.reward_models if spec_kind(s) == "model"]
    reward_model = (
        group(args.reward.num_nodes, args.reward.num_gpus_per_node, c.LaserRewardModelActor, pg) if local_specs else None
    )

    ppo_trainer = c.LaserPPOTrainer.remote(
        args.actor.model_name_or_path,
        strategy,
        actor_model,
        critic_model,
        None,  # OpenRLHF's own reward model never runs: LASeR fills samples.rewards
        ref_model,
        vllm_engines,
        laser_reward_group=reward_model,
        do_sample=True,
        max_len=args.data.max_len,
        max_new_tokens=args.rollout.max_new_tokens,
        temperature=args.rollout.temperature,
        top_p=args.rollout.top_p,
    )
    max_steps = ray.get(ppo_trainer.get_max_steps.remote())

    refs = actor_model.async_init_model_from_pretrained(strategy, args.actor.model_name_or_path, max_steps, vllm_engines)
    if ref_model is not None:
        refs.extend(ref_model.async_init_model_from_pretrained(strategy, args.actor.model_name_or_path))
    if reward_model is not None:
        refs.extend(reward_model.async_init_model_from_pretrained(strategy, local_specs))
    ray.get(refs)
    if critic_model is not None:
        ray.get(critic_model.async_init_model_from_pretrained(strategy, args.critic.model_name_or_path, max_steps))

    ray.get(ppo_trainer.fit.remote())
    ray.get(actor_model.async_save_model())
    if critic_model is not None and args.critic.save_value_network:
        ray.get(critic_model.async_save_model())
