"""LASeR inside OpenRLHF (laser_rl.integrations.openrlhf, laser_rl.cli.train_ppo_ray), on CPU.

The experience-making tests run the real installed OpenRLHF on tiny local models: vLLM-shaped
rollouts go through OpenRLHF's SamplesGenerator, LaserExperienceMaker calls OpenRLHF's
RemoteExperienceMaker (its policy/reference forwards, compute_advantages_and_returns), OpenRLHF's
PolicyModelActor / ReferenceModelActor / BaseModelActor methods and DeepSpeed's checkpointing.
What differs from a GPU run, and why:
- vllm (GPU-only) is replaced at the import boundary by tests/openrlhf_stubs (nothing generates);
- the Ray actor handles of RayActorGroup run their methods in this process (InProcessActor below),
  so OpenRLHF's own dispatch code runs but no GPU actors are spawned; a local Ray serves the refs
  (one test also runs the reward-model group as real Ray actors, on CPU slots);
- torch.cuda.current_device / synchronize are pointed at the CPU, which OpenRLHF's actors call;
- OpenRLHF's actors are built without their init_model_from_pretrained (torch.distributed + CUDA):
  the test sets the attributes it would set (an openrlhf.models.Actor, the strategy, the arms).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from laser_rl.cli import train_ppo_ray as cli
from laser_rl.feedback import pair_loss
from laser_rl.integrations.openrlhf.launch import CHECKPOINT_KEY, GroupArm, _concat, openrlhf_parser, run_sharded
from laser_rl.integrations.openrlhf.rollout import LaserRollout, check_reward_specs, needs_reference, pooled_prompt_states

STUBS = Path(__file__).parent / "openrlhf_stubs"
N = 4  # samples per prompt
PROMPTS = ["What is 2 + 3?", "Is Tom an animal?", "Write a happy poem.", "What is 7 + 1?"]

RULES = '''
CALLS = []

def length_reward(prompts, responses, labels):
    CALLS.append(list(responses))
    return [float(len(r)) for r in responses]
'''


# ----- tiny models on disk --------------------------------------------------------------------
def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer, char_tokenizer, causal_lm, reference_lm):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("openrlhf")

    def reward_model(tok, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id, num_labels=1,
        )
        return LlamaForSequenceClassification(config).eval()

    (root / "laser_test_rules.py").write_text(RULES)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"input": p, "label": str(i)}) + "\n" for i, p in enumerate(PROMPTS)))
    return types.SimpleNamespace(
        root=root,
        policy=_save(causal_lm, tokenizer, root / "policy"),
        reference=_save(reference_lm, tokenizer, root / "reference"),
        rm_bpe=_save(reward_model(tokenizer, 1), tokenizer, root / "rm_bpe"),
        # Another tokenizer than the policy's: samples must be re-tokenized for it.
        rm_char=_save(reward_model(char_tokenizer, 2), char_tokenizer, root / "rm_char"),
        data=str(data),
    )


def _argv(dirs, *extra: str) -> list[str]:
    return [
        "--actor.model_name_or_path", dirs.policy,
        "--laser.reward_models", dirs.rm_bpe, dirs.rm_char, "laser_test_rules:length_reward",
        "--laser.context_dim", "8",
        "--algo.advantage.estimator", "group_norm",
        "--algo.kl.init_coef", "0",
        "--rollout.n_samples_per_prompt", str(N), "--rollout.batch_size", str(len(PROMPTS)),
        "--rollout.micro_batch_size", "5",  # micro-batches that cut across prompt groups
        "--train.batch_size", "16", "--train.micro_batch_size", "2",
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--reward.num_gpus_per_node", "2",
        "--data.prompt_dataset", dirs.data, "--data.input_key", "input", "--data.label_key", "label",
        "--data.max_len", "64", "--rollout.max_new_tokens", "8",
        "--ds.zero_stage", "0", "--ds.attn_implementation", "eager",
        "--ckpt.path", str(dirs.root / "ckpt"), "--ckpt.save_steps", "1",
        "--logger.tensorboard_dir", str(dirs.root / "tensorboard"),
        *extra,
    ]


@pytest.fixture
def rules(dirs, monkeypatch):
    monkeypatch.syspath_prepend(str(dirs.root))
    import laser_test_rules

    laser_test_rules.CALLS.clear()
    return laser_test_rules


# ----- the OpenRLHF environment ----------------------------------------------------------------
@pytest.fixture(scope="module")
def openrlhf(dirs):
    """vllm stand-in on sys.path, a local Ray, CUDA calls pointed at the CPU; all undone afterwards."""
    import ray

    import laser_rl.integrations.openrlhf.compat as compat
    import laser_rl.integrations.openrlhf.launch as integration

    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(STUBS))
        mp.syspath_prepend(str(dirs.root))
        mp.setattr(integration, "_classes", None)
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        mp.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
        mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        compat.ensure_openrlhf_importable()
        classes = integration.openrlhf_classes()
        started = not ray.is_initialized()
        if started:
            # Worker processes (one test runs a real Ray actor) find the vllm stand-in through PYTHONPATH.
            worker_path = os.pathsep.join([str(STUBS), *filter(None, [os.environ.get("PYTHONPATH")])])
            runtime_env = {
                "env_vars": {"PYTHONPATH": worker_path, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"},
                "worker_process_setup_hook": integration.WORKER_SETUP_HOOK,  # as train() does
            }
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
        try:
            yield classes
        finally:
            if started:
                ray.shutdown()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            # Leave a normal environment: no vllm stand-in, nothing imported through it.
            for name in set(sys.modules) - before:
                if name.split(".")[0] == "vllm" or name.startswith(("openrlhf.trainer", "openrlhf.cli", "laser_test_rules")):
                    del sys.modules[name]


class InProcessActor:
    """A Ray actor handle whose methods run in this process; results travel as Ray object refs."""

    def __init__(self, obj, calls: list | None = None):
        self.obj, self.calls = obj, calls

    def __getattr__(self, name):
        import ray

        method = getattr(self.obj, name)

        def remote(*args, **kwargs):
            args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
            kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
            if self.calls is not None and name == "execute_batch":
                self.calls.append((args[0], args[1]))
            return ray.put(method(*args, **kwargs))

        return types.SimpleNamespace(remote=remote)


def actor_group(*objs, calls=None):
    """OpenRLHF's RayActorGroup (its dispatch code) over in-process actors."""
    from openrlhf.trainer.ray.launcher import RayActorGroup

    group = RayActorGroup.__new__(RayActorGroup)
    group._actor_handlers = [InProcessActor(o, calls) for o in objs]
    group.duplicate_actors = 1
    return group


def plain(remote_cls, strategy, **attrs):
    """An OpenRLHF actor object without Ray or torch.distributed (its __init__ only sets those up)."""
    cls = remote_cls.__ray_actor_class__
    obj = cls.__new__(cls)
    obj.strategy = strategy
    for key, value in attrs.items():
        setattr(obj, key, value)
    return obj


@pytest.fixture(scope="module")
def setup(openrlhf, dirs):
    """Args from our CLI, the policy/reference/reward actor objects and their groups."""
    from openrlhf.models import Actor
    from openrlhf.utils import get_strategy

    # pair_loss: the experience-path tests check the log-probs it is fed (consensus has its own tests).
    args = cli.parse_args(_argv(dirs, "--laser.bandit", "thompson", "--laser.seed", "3", "--laser.feedback", "pair_loss"))
    strategy = get_strategy(args)

    def actor(path):
        return Actor(path, attn_implementation="eager", param_dtype="bf16", packing_samples=False)

    policy = plain(openrlhf.LaserPolicyModelActor, strategy, actor=actor(dirs.policy), checkpoint_states={},
                   disable_ds_ckpt=False, save_hf_ckpt=False)
    reference = plain(openrlhf.LaserReferenceModelActor, strategy, model=actor(dirs.reference))
    rm_calls: list = []
    rms = [plain(openrlhf.LaserRewardModelActor, strategy) for _ in range(2)]  # two ranks
    for rm in rms:
        rm.load_rms([dirs.rm_bpe, dirs.rm_char])
    return types.SimpleNamespace(
        args=args, strategy=strategy, policy=policy, reference=reference, rms=rms, rm_calls=rm_calls,
        policy_group=actor_group(policy), reference_group=actor_group(reference),
        reward_group=actor_group(*rms, calls=rm_calls),
    )


def make_trainer(openrlhf, setup, args=None, policy_group=None):
    cls = openrlhf.LaserPPOTrainer.__ray_actor_class__
    return cls(
        (args or setup.args).actor.model_name_or_path,
        setup.strategy if args is None else _strategy(args),
        policy_group or setup.policy_group, None, None, setup.reference_group, None,
        laser_reward_group=setup.reward_group,
        do_sample=True, max_len=64, max_new_tokens=8, temperature=1.0, top_p=1.0,
    )


def _strategy(args):
    from openrlhf.utils import get_strategy

    return get_strategy(args)


def rollout(trainer, causal_lm, tokenizer, seed=0, verifier=None):
    """n samples per prompt from the tiny policy, turned into Experiences by OpenRLHF's own code.

    verifier(prompt_index, response_ids) -> score stands for a --reward.remote_url scoring in the rollout.
    """
    torch.manual_seed(seed)
    samples = []
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        out = causal_lm.generate(
            torch.tensor([ids] * N), attention_mask=torch.ones(N, len(ids), dtype=torch.long), do_sample=True,
            max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row in out:
            response = row[len(ids):].tolist()
            if tokenizer.pad_token_id in response:  # generate pads finished rows
                response = response[: response.index(tokenizer.pad_token_id)]
            response = response or [tokenizer.eos_token_id]
            output = {
                "prompt": prompt, "label": str(i), "observation_tokens": ids + response,
                "action_ranges": [(len(ids), len(ids) + len(response))], "rollout_log_probs": None,
            }
            if verifier is not None:
                output["reward"] = output["scores"] = verifier(i, response)
            samples.append(trainer.samples_generator._process_response_into_experience(output, max_len=64))
    return samples


# ----- the command line ------------------------------------------------------------------------
def test_cli_accepts_every_openrlhf_flag_plus_laser_flags(dirs, rules, capsys):
    import ray

    ours = {s for a in cli.build_parser()._actions for s in a.option_strings}
    theirs = {s for a in openrlhf_parser()._actions for s in a.option_strings}
    assert len(theirs) > 150 and theirs <= ours
    assert {"--laser.reward_models", "--laser.reward_weights", "--laser.bandit", "--laser.alpha", "--laser.lambda",
            "--laser.feedback", "--laser.granularity", "--laser.seed", "--laser.context", "--laser.baseline"} <= ours
    argv = _argv(dirs, "--laser.bandit", "linucb", "--laser.alpha", "0.2", "--laser.lambda", "2",
                 "--laser.granularity", "batch", "--laser.context", "reference", "--laser.reward_weights", "1", "1", "0.1",
                 "--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--train.colocate_all", "--ds.enable_sleep",
                 "--actor.gradient_checkpointing_enable", "--laser.check_only")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 reward models" in out and "linucb" in out and "per batch" in out
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--laser.bandit", "greedy"], "argument --laser.bandit: invalid choice: 'greedy'"),
        (["--laser.baseline", "best"], "argument --laser.baseline: invalid choice: 'best'"),
        (["--laser.alpha", "-1"], "argument --laser.alpha: must be >= 0, got -1"),
        (["--laser.lambda", "0"], "argument --laser.lambda: must be > 0, got 0"),
        (["--laser.discount", "1.5"], "argument --laser.discount: must be <= 1, got 1.5"),
        (["--laser.context_dim", "big"], "argument --laser.context_dim: expected an integer, got 'big'"),
        (["--laser.granularity", "token"], "argument --laser.granularity: invalid choice: 'token'"),
        (["--laser.feedback", "progress"], "argument --laser.feedback: invalid choice: 'progress'"),
        (["--laser.feedback", "verifier"], "needs a verifier score per sample: pass --reward.remote_url"),
        (["--laser.baseline", "single", "--laser.single_arm", "3"], "--laser.single_arm 3 is out of range for 3"),
        (["--laser.baseline", "single", "--laser.bandit", "exp3"], None),  # a baseline ignores the bandit: fine
        (["--reward.model_name_or_path", "/x"], "list every RM in --laser.reward_models"),
        (["--rollout.n_samples_per_prompt", "1", "--algo.advantage.estimator", "reinforce"], "n_samples_per_prompt >= 2"),
        (["--algo.dynamic_filtering_enable"], "OpenRLHF: remote_rm_url or agent_func_path must be specified"),
        # NaN passes every range comparison and inf is no setting: every float flag rejects both by name.
        (["--laser.alpha", "nan"], "argument --laser.alpha: must be a finite number, got nan"),
        (["--laser.alpha", "inf"], "argument --laser.alpha: must be a finite number, got inf"),
        (["--laser.lambda", "nan"], "argument --laser.lambda: must be a finite number, got nan"),
        (["--laser.lambda", "inf"], "argument --laser.lambda: must be a finite number, got inf"),
        (["--laser.beta", "nan"], "argument --laser.beta: must be a finite number, got nan"),
        (["--laser.discount", "nan"], "argument --laser.discount: must be a finite number, got nan"),
        (["--laser.discount=-inf"], "argument --laser.discount: must be a finite number, got -inf"),
        (["--laser.reward_weights", "nan", "1", "1"], "argument --laser.reward_weights: must be a finite number, got nan"),
        (["--laser.reward_weights", "1", "inf", "1"], "argument --laser.reward_weights: must be a finite number, got inf"),
        (["--laser.alpha", "0.5", "--laser.bandit", "exp3"], None),  # alpha is Exp3's gamma: in range, fine
        (["--laser.feedback", "consensus", "--laser.audit_fraction", "1.5"], "argument --laser.audit_fraction: must be <= 1"),
        (["--laser.feedback", "consensus", "--laser.audit_fraction", "nan"], "argument --laser.audit_fraction: must be a finite"),
        (["--laser.feedback", "pair_loss", "--laser.audit_fraction", "0.5"], "--laser.audit_fraction applies to --laser.feedback consensus only, not pair_loss"),
        (["--laser.audit_fraction", "0.5"], None),  # consensus is the default
        (["--laser.feedback", "consensus", "--laser.audit_fraction", "0.5"], None),
        (["--laser.feedback", "spread", "--laser.audit_warmup_steps", "4"], "--laser.audit_warmup_steps applies to --laser.feedback consensus only"),
        (["--laser.feedback", "consensus", "--laser.audit_warmup_steps", "-1"], "argument --laser.audit_warmup_steps: must be >= 0, got -1"),
        (["--laser.feedback", "consensus", "--laser.audit_warmup_fraction", "nan"], "argument --laser.audit_warmup_fraction: must be a finite"),
    ],
)
def test_cli_rejects_bad_laser_values_clearly(dirs, rules, capsys, flags, message):
    import ray

    argv = _argv(dirs, *flags, "--laser.check_only")
    if message is None:
        assert cli.main(argv) == 0
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # The usage line and one error line, not OpenRLHF's ~180-line generated usage.
    usage, error = err.strip().splitlines()
    assert usage == f"usage: {cli.USAGE}" and error.startswith(f"{cli.PROG}: error: ")
    assert message in error
    assert not ray.is_initialized()


def test_cli_rejects_a_bad_policy_path_and_a_non_finite_noise_spec(dirs, rules, capsys, tmp_path):
    import ray

    cases = [
        (_argv(dirs, "--actor.model_name_or_path", str(tmp_path / "no_policy"), "--laser.check_only"),
         f"--actor.model_name_or_path '{tmp_path / 'no_policy'}' does not exist"),
        (_argv(dirs, "--actor.model_name_or_path", str(tmp_path), "--laser.check_only"),
         f"--actor.model_name_or_path '{tmp_path}' is not a model directory"),
    ]
    for sigma in ("nan", "inf"):
        argv = _argv(dirs, "--laser.check_only")
        argv[argv.index("--laser.reward_models") + 3] = f"noise:{sigma}"  # the third RM becomes pure noise
        cases.append((argv, f"bad noise spec 'noise:{sigma}': expected noise or noise:<sigma> with a finite sigma"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2 and message in lines[1], (message, lines)
    argv = _argv(dirs, "--laser.check_only")
    argv[argv.index("--laser.reward_models") + 3] = "noise:0.3"  # a finite sigma is fine
    assert cli.main(argv) == 0
    assert not ray.is_initialized()


def test_laser_flags_reach_the_selector(dirs, rules):
    """The parsed --laser.* namespace goes through selector_from_flags as is: each flag lands on its knob."""
    from laser_rl.arms import RuleArm
    from laser_rl.selector import selector_from_flags

    args = cli.parse_args(_argv(dirs, "--laser.feedback", "consensus", "--laser.audit_fraction", "0.25",
                                "--laser.bandit", "thompson", "--laser.alpha", "0.7", "--laser.lambda", "3",
                                "--laser.discount", "0.9", "--laser.seed", "5"))
    rms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=n) for n in ("a", "b", "c")]
    selector = selector_from_flags(rms, args.laser, context_dim=8)
    assert selector.feedback_name == "consensus" and selector.audit_fraction == 0.25
    warm = selector_from_flags(rms, cli.parse_args(_argv(dirs, "--laser.feedback", "consensus", "--laser.audit_warmup_steps",
                                                         "3", "--laser.audit_warmup_fraction", "0.5")).laser, context_dim=8)
    assert (warm.audit_warmup_steps, warm.audit_warmup_fraction, warm.current_audit_fraction) == (3, 0.5, 0.5)
    assert selector.bandit.v == 0.7 and selector.bandit.lam == 3 and selector.bandit.discount == 0.9
    args = cli.parse_args(_argv(dirs, "--laser.feedback", "pair_loss", "--laser.beta", "0.3"))
    assert selector_from_flags(rms, args.laser, context_dim=8).feedback_kwargs == {"beta": 0.3}


def test_cli_feedback_choices_are_what_the_integration_can_feed():
    """--laser.feedback lists only signals LaserRollout can feed; each one builds a selector it accepts."""
    from laser_rl.arms import RuleArm
    from laser_rl.feedback import FEEDBACK_SIGNALS
    from laser_rl.integrations.openrlhf.rollout import FEEDBACKS
    from laser_rl.selector import RewardSelector

    (action,) = [a for a in cli.build_parser()._actions if "--laser.feedback" in a.option_strings]
    assert tuple(action.choices) == FEEDBACKS and set(FEEDBACKS) <= set(FEEDBACK_SIGNALS)
    assert "progress" not in FEEDBACKS and "majority" not in FEEDBACKS
    rms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=n) for n in ("a", "b")]
    for name in FEEDBACKS:
        LaserRollout(RewardSelector(rms, context_dim=4, bandit="exp3", feedback=name), None, 2)
    for name in set(FEEDBACK_SIGNALS) - set(FEEDBACKS):
        with pytest.raises(ValueError, match=f"--laser.feedback {name} is not available with OpenRLHF"):
            LaserRollout(RewardSelector(rms, context_dim=4, bandit="exp3", feedback=name), None, 2)


# The launch lines docs/openrlhf.md shows: an OpenRLHF command with --laser.* flags added.
DOCUMENTED = {
    "grpo": ["--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss", "--algo.kl.estimator", "k3",
             "--algo.kl.init_coef", "1e-3"],
    "ppo": ["--algo.advantage.estimator", "gae", "--laser.normalize_scores"],
    "reinforce++-baseline": ["--algo.advantage.estimator", "reinforce_baseline", "--algo.kl.init_coef", "0.01"],
    "dapo": ["--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
             "--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0", "1",
             "--reward.remote_url", "/path/to/verifier.py", "--laser.feedback", "verifier",
             "--actor.eps_clip_low_high", "0.2", "0.28", "--reward.overlong_buffer_len", "512"],
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_documented_launch_lines_pass_every_check(dirs, rules, capsys, name):
    assert cli.main(_argv(dirs, *DOCUMENTED[name], "--laser.check_only")) == 0
    out = capsys.readouterr().out
    if name == "ppo":
        assert "estimator gae" in out
    if name == "dapo":  # verifier feedback and no KL: no reference model at all
        args = cli.parse_args(_argv(dirs, *DOCUMENTED[name], "--laser.check_only"))
        assert not needs_reference(args.laser) and args.critic.model_name_or_path is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_reward_models_fail_before_any_gpu_or_ray(dirs, rules, capsys, tmp_path):
    import ray

    down = f"http://127.0.0.1:{_free_port()}/get_reward"  # nothing listens there
    cases = [
        ([str(tmp_path / "missing_rm")], None, "does not exist"),
        (["implicit:" + str(tmp_path / "missing_lm")], None, "does not exist"),
        ([str(tmp_path)], None, "is not a model directory"),
        ([dirs.rm_bpe, dirs.rm_char], ["1"], "--laser.reward_weights has 1 values for 2 reward models"),
        ([dirs.rm_bpe, down], None, "is not reachable"),
        ([dirs.rm_bpe, "no_such_module:score"], None, "spec 'no_such_module:score': no module 'no_such_module'"),
    ]
    for specs, weights, message in cases:
        argv = _argv(dirs, "--laser.check_only")
        at = argv.index("--laser.reward_models")
        argv[at + 1 : at + 4] = specs
        if weights:
            argv += ["--laser.reward_weights", *weights]
        with pytest.raises(SystemExit):
            cli.main(argv)
        err = capsys.readouterr().err
        assert message in err, (specs, err)
    assert not ray.is_initialized()


# ----- the experience path ---------------------------------------------------------------------
def test_experience_step_per_prompt_arms_rewards_advantages_feedback(openrlhf, setup, dirs, rules, causal_lm, tokenizer, monkeypatch):
    from laser_rl.arms import make_arm

    trainer = make_trainer(openrlhf, setup)
    samples = rollout(trainer, causal_lm, tokenizer)
    setup.rm_calls.clear()
    seen = {}
    feedback = trainer.laser.selector.feedback

    def record_feedback(contexts, arms, **inputs):  # records what the bandit is fed, then feeds it
        seen.update(inputs)
        return feedback(contexts, arms, **inputs)

    monkeypatch.setattr(trainer.laser.selector, "feedback", record_feedback)
    experiences = trainer.experience_maker.make_experience_batch(samples)
    laser = trainer.laser

    # One arm per prompt; this seed picks each of the three kinds of arm at least once.
    chosen = laser.last_arms
    assert chosen.shape == (len(PROMPTS),) and set(chosen.tolist()) == {0, 1, 2}

    # Rewards in the right slots: every sample carries its prompt's arm's score, re-computed here.
    by_position = {}
    for e in experiences:
        for j, position in enumerate(e.index):
            by_position[position] = (float(e.info["reward"][j]), e)
    reference_arms = [make_arm(dirs.rm_bpe), make_arm(dirs.rm_char)]
    for position, sample in enumerate(samples):
        arm = int(chosen[position // N])
        response = tokenizer.decode(sample.sequences[0, 1:][sample.action_mask[0].bool()], skip_special_tokens=True)
        if arm == 2:
            expected = float(len(response))
        else:
            expected = float(reference_arms[arm].score([PROMPTS[position // N]], [response])[0])
        assert by_position[position][0] == pytest.approx(expected, rel=1e-5, abs=1e-6)

    # Only the chosen RM ran: each reward rank scored arm k's samples (padded to equal shares), the
    # rule function saw only its prompts' samples, and one RM pass was paid per sample.
    for k in (0, 1):
        n_k = N * int((chosen == k).sum())
        shares = [call for call in setup.rm_calls if call[0] == "laser_score" and call[1]["arm"] == [k]]
        assert len(shares) == 2 * (n_k > 0)
        assert sum(len(p) for _, chunk in shares for p in chunk["prompts"]) == 2 * -(-n_k // 2)
    assert sum(len(c) for c in rules.CALLS) == N * int((chosen == 2).sum())

    # Advantages by OpenRLHF's group_norm: (r - mean) / (std + 1e-9) over each prompt's n samples.
    rewards = torch.tensor([by_position[i][0] for i in range(len(samples))]).view(-1, N)
    normalized = ((rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)).view(-1)
    for e in experiences:
        for j, position in enumerate(e.index):
            mask = e.action_mask[j].bool()
            assert torch.allclose(e.advantages[j][mask], normalized[position].expand(int(mask.sum())), atol=1e-4)

    # Feedback from the log-probs OpenRLHF computed, no forward of our own: the sequence log-probs the
    # bandit saw equal those of OpenRLHF's policy and reference actors, called here sample by sample.
    def sequence_logps(actor_obj, sample):
        logps = actor_obj.forward(sample.sequences, sample.action_mask, sample.attention_mask)
        return float((logps * sample.action_mask).sum())

    policy = torch.tensor([sequence_logps(setup.policy, s) for s in samples]).view(-1, N)
    ref = torch.tensor([sequence_logps(setup.reference, s) for s in samples]).view(-1, N)
    lengths = torch.tensor([float(s.action_mask.sum()) for s in samples]).view(-1, N)
    assert (policy - ref).abs().max() > 0.5  # two different models: the reference term matters
    assert torch.allclose(seen["policy_logps"], policy, atol=2e-2)  # bf16, batched vs alone
    assert torch.allclose(seen["ref_logps"], ref, atol=2e-2)
    assert torch.equal(seen["response_lengths"], lengths) and torch.allclose(seen["scores"], rewards)
    metrics = laser.selector.metrics()
    expected_raw = pair_loss(seen["scores"], seen["policy_logps"], seen["ref_logps"], lengths, beta=0.1).mean()
    assert metrics["laser/bandit_reward_raw"] == pytest.approx(float(expected_raw), rel=1e-5)
    assert laser.selector.steps == 1 and metrics["laser/rm_passes"] == len(samples)
    assert int(laser.selector.bandit.counts.sum()) == len(PROMPTS)  # the bandit learned from every prompt


def test_checkpoint_carries_the_selector_and_tensorboard_gets_laser_curves(openrlhf, setup, dirs, rules, causal_lm, tokenizer, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(openrlhf, setup)
    trainer.experience_maker.make_experience_batch(rollout(trainer, causal_lm, tokenizer, seed=1))
    status = trainer.laser.selector.metrics()
    status["policy_loss"] = 0.5

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for key, value in env.items():  # a one-process gloo group, undone after the test
        monkeypatch.setenv(key, value)
    import deepspeed

    # The policy's model becomes a DeepSpeed engine, as PolicyModelActor's is (fp32 here: a bf16 engine
    # needs an optimizer to save, and DeepSpeed's CPU Adam would first compile for minutes).
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 0}}
    setup.policy.actor.model, *_ = deepspeed.initialize(model=setup.policy.actor.model, config=config, dist_init_required=True)
    try:
        trainer.save_logs_and_checkpoints(1, status, {"global_step": 1, "episode": 0, "total_consumed_prompts": 4})
        ckpt = dirs.root / "ckpt" / "_actor"
        assert (ckpt / "global_step1").is_dir()
        _, states = setup.strategy.load_ckpt(setup.policy.actor.model, str(ckpt))  # what --ckpt.load_enable runs
    finally:
        setup.policy.actor.model = setup.policy.actor.model.module
        torch.distributed.destroy_process_group()
    assert states[CHECKPOINT_KEY]["selector"]["steps"] == 1

    # A resumed trainer continues the same bandit.
    args = copy.deepcopy(setup.args)
    args.ckpt.load_enable = True
    resumed_policy = plain(openrlhf.LaserPolicyModelActor, setup.strategy, checkpoint_states=states)
    resumed = make_trainer(openrlhf, setup, args=args, policy_group=actor_group(resumed_policy))
    assert resumed.laser.selector.steps == 0
    resumed.init_checkpoint_states()
    before, after = trainer.laser.state_dict(), resumed.laser.state_dict()
    assert after["selector"]["steps"] == 1
    for key in ("A", "A_inv", "b", "counts"):
        assert torch.equal(before["selector"]["bandit"][key], after["selector"]["bandit"][key])
    assert torch.equal(before["context_encoder"]["projection"], after["context_encoder"]["projection"])
    contexts = torch.randn(6, trainer.laser.encoder.dim)
    assert torch.equal(trainer.laser.selector.select(contexts), resumed.laser.selector.select(contexts))

    # laser/* curves in OpenRLHF's TensorBoard run, beside its train/* ones.
    trainer.tensorboard_logger.writer.flush()
    run = dirs.root / "tensorboard" / setup.args.logger.wandb.run_name
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"laser/arm_entropy", "laser/rm_passes", "laser/bandit_reward_raw", "train/policy_loss"} <= set(tags)
    assert any(t.startswith("laser/arm_frac/") for t in tags)


def test_verifier_scores_filter_and_teach_but_the_chosen_rm_rewards(openrlhf, setup, dirs, rules, causal_lm, tokenizer):
    """DAPO-style: a --reward.remote_url verifier scores samples in the rollout (OpenRLHF filters on them);
    LASeR replaces the training reward by the chosen RM's score and learns from the verifier's agreement."""
    from laser_rl.feedback import verifier_agreement

    args = cli.parse_args(_argv(dirs, "--laser.feedback", "verifier", "--reward.remote_url", "/verifier.py",
                                "--laser.bandit", "epsilon_greedy"))
    trainer = make_trainer(openrlhf, setup, args=args)
    samples = rollout(trainer, causal_lm, tokenizer, seed=3, verifier=lambda i, response: float(response[0] % 2))
    verifier_rewards = torch.tensor([float(s.rewards[0]) for s in samples]).view(-1, N)
    correct = torch.tensor([float(s.scores[0]) for s in samples]).view(-1, N) > 0.5
    assert correct.any() and not correct.all()
    trainer.experience_maker.make_experience_batch(samples)
    rewards = torch.tensor([float(s.rewards[0]) for s in samples]).view(-1, N)
    assert not torch.allclose(rewards, verifier_rewards)  # the training reward is the chosen RM's
    assert all(float(s.scores[0]) in (0.0, 1.0) for s in samples)  # the verifier's scores stay for OpenRLHF
    expected = verifier_agreement(rewards, correct)
    metrics = trainer.laser.selector.metrics()
    assert metrics["laser/feedback_skipped"] == int(expected.isnan().sum()) < len(PROMPTS)  # no mixed labels: no signal
    assert metrics["laser/bandit_reward_raw"] == pytest.approx(float(expected.nanmean()), rel=1e-5)


def test_ensemble_baseline_scores_with_every_rm_and_weights(openrlhf, setup, dirs, rules, causal_lm, tokenizer):
    from laser_rl.arms import make_arm

    args = cli.parse_args(_argv(dirs, "--laser.baseline", "mean", "--laser.reward_weights", "2", "1", "0.5",
                                "--laser.feedback", "spread"))
    trainer = make_trainer(openrlhf, setup, args=args)
    assert trainer.laser.prompt_states is None  # baselines read no context: no extra forward
    samples = rollout(trainer, causal_lm, tokenizer, seed=2)
    trainer.experience_maker.make_experience_batch(samples)
    sample = samples[0]
    response = tokenizer.decode(sample.sequences[0, 1:][sample.action_mask[0].bool()], skip_special_tokens=True)
    scores = [2 * make_arm(dirs.rm_bpe).score([PROMPTS[0]], [response])[0],
              make_arm(dirs.rm_char).score([PROMPTS[0]], [response])[0], 0.5 * len(response)]
    assert float(sample.rewards[0]) == pytest.approx(float(sum(scores) / 3), rel=1e-5)
    assert trainer.laser.selector.metrics()["laser/rm_passes"] == 3 * len(samples)


def test_prompt_states_match_the_core_context_and_ignore_padding(openrlhf, setup, tokenizer, causal_lm):
    from laser_rl.context import prompt_hidden_states

    prompts = ["What is 2 + 3?", "All cats are animals. Tom is a cat. Is Tom an animal?"]
    ids = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    batched = pooled_prompt_states(causal_lm, ids)
    alone = torch.cat([pooled_prompt_states(causal_lm, [x]) for x in ids])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(batched, prompt_hidden_states(causal_lm, tokenizer, prompts), atol=1e-5)
    # Through the actor group, shared over two ranks with padding, the same states come back.
    group = actor_group(setup.policy, setup.policy)
    three = ids + ids[:1]
    states = _concat(run_sharded(group, "laser_prompt_states", prompt_ids=three), 3)
    assert states.shape == (3, causal_lm.config.hidden_size)
    assert torch.allclose(states[:2], batched, atol=0.1) and torch.equal(states[0], states[2])  # bf16 actor
    # --laser.context reference: the same method on OpenRLHF's reference actor, another model's states.
    ref_states = _concat(run_sharded(setup.reference_group, "laser_prompt_states", prompt_ids=ids), 2)
    assert ref_states.shape == batched.shape and not torch.allclose(ref_states, batched, atol=0.1)


def test_reward_group_scores_in_real_ray_workers(openrlhf, setup, dirs):
    """The K-RM actor group as real Ray actors (CPU, no GPU slots): the class ships to the workers,
    each rank loads the RMs and scores its share; GroupArm gets back the right scores in order."""
    import ray
    from openrlhf.trainer.ray.launcher import RayActorGroup

    from laser_rl.arms import make_arm

    # Two ranks as two "nodes" of one slot each: with several per node OpenRLHF reserves GPU bundles.
    group = RayActorGroup(2, 1, openrlhf.LaserRewardModelActor, num_gpus_per_actor=0)
    # What init_model_from_pretrained does, minus torch.distributed / CUDA: a strategy, then the arms.
    strategy = setup.strategy
    ray.get([h.__ray_call__.remote(lambda actor: setattr(actor, "strategy", strategy)) for h in group._actor_handlers])
    ray.get(group.async_run_method("load_rms", [dirs.rm_bpe, dirs.rm_char]), timeout=180)
    prompts, responses = PROMPTS[:3], ["5", "Yes, Tom is an animal.", "The sea and the sun."]
    for index, path in enumerate([dirs.rm_bpe, dirs.rm_char]):
        scores = GroupArm(group, index, "rm").score(prompts, responses)
        assert torch.allclose(scores, make_arm(path).score(prompts, responses), atol=1e-5)
    for handle in group._actor_handlers:
        ray.kill(handle)


def test_reward_with_another_tokenizer_is_retokenized(openrlhf, setup, dirs, tokenizer, char_tokenizer):
    rm = setup.rms[0]
    text = tokenizer.decode(tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])
    scores = rm.laser_score(1, ["Write a short poem."], [text], [None])
    assert torch.isfinite(scores).all() and scores.shape == (1,)
    notes = check_reward_specs([dirs.rm_bpe, dirs.rm_char], policy_path=dirs.policy)
    assert len(notes) == 1 and "rm_char" in notes[0] and "re-tokenized" in notes[0]


def test_rms_see_the_user_text_not_the_policy_chat_template(tokenizer):
    """With --data.apply_chat_template OpenRLHF hands out templated prompts; RMs get the user's text."""
    from laser_rl.arms import RuleArm
    from laser_rl.selector import RewardSelector

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=n) for n in ("a", "b")]
    laser = LaserRollout(RewardSelector(rms, baseline="random", feedback="spread"), chat, n_samples_per_prompt=2)
    templated = chat.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
    assert templated != "What is 2 + 3?" and laser.user_text(templated) == "What is 2 + 3?"
    assert laser.user_text("plain prompt") == "plain prompt"
    assert LaserRollout(RewardSelector(rms, baseline="random", feedback="spread"), tokenizer, 2).user_text(templated) == templated


def test_cli_and_module_import_without_vllm():
    """On a CPU login node (no vLLM) the CLI parses and checks; only training imports OpenRLHF's trainer."""
    import subprocess

    code = (
        "import sys; from laser_rl.cli import train_ppo_ray as cli; p = cli.build_parser(); "
        "import laser_rl.integrations.openrlhf.launch as m; assert m._classes is None; "
        "assert not any(n.split('.')[0] == 'vllm' or n.startswith('openrlhf.trainer') for n in sys.modules); print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
