"""The OpenRLHF launch: its command line read from source, Ray actor groups, its subclasses, train().

    openrlhf_parser / openrlhf_check_args   OpenRLHF's own flags and checks, read from the installed source
    run_sharded, GroupArm                   work spread over a RayActorGroup (reward models, prompt states)
    build_laser_rollout                     flags + actor groups -> a rollout.LaserRollout
    LaserExperienceMaker, LaserPPOTrainer,  OpenRLHF subclasses, built on first access (importing
    Laser{Policy,Reference,Reward}ModelActor  openrlhf.trainer imports vLLM), see `__getattr__` at the end
    train                                   openrlhf.cli.train_ppo_ray.train with LASeR's actors

Importing this module needs neither OpenRLHF nor vLLM nor Ray.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import functools
import importlib.util
import math
import os
import types
from pathlib import Path

import torch
from torch import Tensor

from laser_rl.arms import ImplicitRewardArm, RewardArm, SequenceClassifierArm, make_arm
from laser_rl.context import ContextEncoder
from laser_rl.integrations.openrlhf.compat import ensure_openrlhf_importable
from laser_rl.integrations.openrlhf.rollout import (
    LaserRollout,
    WeightedArm,
    is_contextual,
    needs_reference,
    pooled_prompt_states,
    spec_kind,
    spec_name,
)
from laser_rl.selector import selector_from_flags

# Key of the selector state inside OpenRLHF's checkpoint client_states (beside "global_step", ...).
CHECKPOINT_KEY = "laser_selector"
# Run in every Ray worker before it unpickles an actor class: a worker imports OpenRLHF (flash_attn)
# before any of our code runs, so the CPU shim must be in place first (a no-op on GPU machines).
WORKER_SETUP_HOOK = f"{ensure_openrlhf_importable.__module__}.{ensure_openrlhf_importable.__name__}"
OPENRLHF_MISSING = (
    "OpenRLHF is not installed: pip install \".[openrlhf]\" from the laser-rl checkout on a GPU machine "
    "(or bash scripts/install_cpu.sh on a CPU-only one)"
)
SUPPORTED = "laser-rl supports openrlhf 0.11.x"


# =================================================================================================
# OpenRLHF's command line, reused as is
# =================================================================================================
# openrlhf.cli.train_ppo_ray builds its parser and checks its arguments inline under
# `if __name__ == "__main__":`. Copying ~300 flags would drift with every release, and importing the
# module would import vLLM, so the statements are read from its source and run here instead:
# every OpenRLHF flag and every OpenRLHF check, for the installed version, without starting anything.


@functools.cache
def openrlhf_source(module: str = "openrlhf.cli.train_ppo_ray") -> tuple[str, ast.Module]:
    """(path, parsed tree) of an installed OpenRLHF module, parsed once per process.

    ImportError (OPENRLHF_MISSING: the package and the install command) when OpenRLHF is absent.
    """
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(OPENRLHF_MISSING)
    path = spec.origin
    return path, ast.parse(Path(path).read_text(), path)


@functools.cache
def _openrlhf_main_block() -> tuple[list[ast.stmt], list[ast.stmt], str]:
    """(statements that build `parser`, statements that check `args` after hierarchize, file path)."""
    path, tree = openrlhf_source()
    main = next((n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)), None)
    if main is None:
        raise RuntimeError(f"no `if __name__ == \"__main__\":` block in OpenRLHF's {path}; {SUPPORTED}")
    code = [ast.unparse(stmt) for stmt in main.body]
    markers = ("args = parser.parse_args()", "args = hierarchize(args)", "train(args)")
    missing = [m for m in markers if m not in code]
    if missing:
        raise RuntimeError(f"cannot find {missing} in the __main__ block of OpenRLHF's {path}; {SUPPORTED}")
    parse_at, hier_at, train_at = (code.index(m) for m in markers)
    return main.body[:parse_at], main.body[hier_at + 1 : train_at], path


def _free_names(statements: list[ast.stmt]) -> set[str]:
    """Names the statements read but neither define nor get from builtins."""
    defined, loaded = set(dir(builtins)), set()
    for node in (n for s in statements for n in ast.walk(s)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.alias):
            defined.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
    return loaded - defined


def _run_block(statements: list[ast.stmt], path: str, namespace: dict, what: str) -> dict:
    """exec OpenRLHF's statements in `namespace`; a name they read that is not there is an error naming it."""
    missing = sorted(_free_names(statements) - set(namespace))
    if missing:
        raise RuntimeError(f"OpenRLHF's {what} in {path} reads {missing}, which laser-rl does not provide; {SUPPORTED}")
    exec(compile(ast.Module(body=statements, type_ignores=[]), path, "exec"), namespace)
    return namespace


def openrlhf_parser() -> argparse.ArgumentParser:
    """OpenRLHF's own train_ppo_ray ArgumentParser (all its dotted flags), built without importing it."""
    from datetime import datetime

    build, _, path = _openrlhf_main_block()
    namespace = {"argparse": argparse, "datetime": datetime, "os": os}
    return _run_block(build, path, namespace, "argument parser")["parser"]


def openrlhf_check_args(args: types.SimpleNamespace) -> None:
    """Run OpenRLHF's own checks and derived defaults on hierarchized args (raises AssertionError)."""
    _, checks, path = _openrlhf_main_block()
    _run_block(checks, path, {"args": args}, "argument checks")


def hierarchize(args: argparse.Namespace) -> types.SimpleNamespace:
    """argparse's flat `{"laser.alpha": ...}` to nested namespaces (`args.laser.alpha`), as OpenRLHF does."""
    from openrlhf.utils.config import hierarchize as _hierarchize

    return _hierarchize(args)


# =================================================================================================
# Local reward models in the reward actor group
# =================================================================================================


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
# The LaserRollout for a launch
# =================================================================================================


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
    rms, local = [], 0
    for i, spec in enumerate(laser.reward_models):
        if spec_kind(spec) == "model":
            if reward_group is None:
                raise ValueError(f"reward model {spec!r} is a local model but no reward actor group was created")
            rm = GroupArm(reward_group, local, spec_name(spec), sync=sync)
            local += 1
        else:
            rm = make_arm(spec)  # URLs, rules and noise are scored right here in the trainer
        if laser.reward_weights is not None and laser.reward_weights[i] != 1.0:
            rm = WeightedArm(rm, laser.reward_weights[i])
        rms.append(rm)
    encoder, prompt_states = None, None
    if is_contextual(laser):
        context_group = reference_group if laser.context == "reference" else actor_group
        if context_group is None:
            raise ValueError("--laser.context reference needs the reference model group")
        encoder = ContextEncoder(
            policy_hidden_size(args.actor.model_name_or_path), proj_dim=laser.context_dim or None, seed=laser.seed
        )

        def prompt_states(prompt_ids: list[Tensor]) -> Tensor:  # the group's ranks share the prompts
            return _concat(run_sharded(context_group, "laser_prompt_states", sync, prompt_ids=prompt_ids), len(prompt_ids))

    # The --laser.* dests are RewardSelector's keyword names (--laser.lambda -> lam); the rest is ignored there.
    selector = selector_from_flags(rms, laser, context_dim=None if encoder is None else encoder.dim)
    return LaserRollout(
        selector,
        tokenizer,
        args.rollout.n_samples_per_prompt,
        encoder=encoder,
        prompt_states=prompt_states,
        has_reference=reference_group is not None,
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
            self.load_rms(specs, strategy)

        def load_rms(self, specs: list[str], strategy=None) -> None:
            self.rms = [load_model_arm(spec, strategy) for spec in specs]

        def laser_score(self, arm: int, prompts: list[str], responses: list[str], labels: list) -> Tensor:
            labels = None if all(label is None for label in labels) else list(labels)
            return self.rms[arm].score(list(prompts), list(responses), labels)

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

    refs = []
    refs.extend(actor_model.async_init_model_from_pretrained(strategy, args.actor.model_name_or_path, max_steps, vllm_engines))
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
