"""`python -m laser_rl.cli.train_ppo_ray`: OpenRLHF's train_ppo_ray, LASeR picking one RM per prompt.

Every flag of `python -m openrlhf.cli.train_ppo_ray` works unchanged (read from the installed
OpenRLHF, see laser_rl.integrations.openrlhf.launch.openrlhf_parser); the --laser.* flags configure the
selector. Every check (flag values, the policy and reward-model paths, remote RMs reachable, OpenRLHF's
own checks) runs before Ray starts or a GPU is touched. Which function each flag reaches: docs/openrlhf.md.

    python -m laser_rl.cli.train_ppo_ray --actor.model_name_or_path /models/policy \\
        --laser.reward_models /models/rm-a implicit:/models/chat-dpo my_rules:exact_match http://rm:5000/get_reward \\
        --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 ...
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from types import SimpleNamespace

from laser_rl.cli.common import quiet_third_party_warnings

quiet_third_party_warnings()  # before torch and OpenRLHF pull in pynvml, bitsandbytes and DeepSpeed

from laser_rl.arms import RuleArm
from laser_rl.bandits import BANDITS
from laser_rl.integrations.openrlhf.launch import hierarchize, openrlhf_check_args, openrlhf_parser
from laser_rl.integrations.openrlhf.rollout import (
    FEEDBACKS,
    check_policy_path,
    check_reward_specs,
    is_contextual,
    needs_reference,
    spec_kind,
    spec_name,
)
from laser_rl.selector import BASELINES, DEFAULT_FEEDBACK, RewardSelector, selector_from_flags

PROG = "python -m laser_rl.cli.train_ppo_ray"
# OpenRLHF's ~300 flags make argparse's generated usage ~180 lines, printed before every error: one line instead.
USAGE = f"{PROG} [OpenRLHF train_ppo_ray flags] --laser.reward_models SPEC [SPEC ...] [--laser.* flags] (see --help)"
# The help texts quote RewardSelector's own defaults: flags left unset (None) keep them.
_SELECTOR_DEFAULTS = {n: p.default for n, p in inspect.signature(RewardSelector).parameters.items()}


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """argparse type: a finite int/float within bounds, with a message that says which bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):  # nan passes every comparison below; inf is no setting either
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


def add_laser_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LASeR (laser-rl): one reward model per prompt, chosen by a bandit")
    g.add_argument(
        "--laser.reward_models", nargs="+", metavar="SPEC", default=None,
        help="the K reward models: local model directory (sequence classifier), implicit:<dir> (causal LM as an "
        "implicit RM), module:function (rule/verifier, fn(prompts, responses, labels)), http(s)://host:port/path "
        "(OpenRLHF serve_rm protocol) or noise[:sigma]. Local models share one Ray actor group.",
    )
    g.add_argument(
        "--laser.reward_weights", nargs="+", type=_number(float), metavar="W", default=None,
        help="one multiplier per reward model, applied to its scores (default: 1 each)",
    )
    g.add_argument("--laser.bandit", choices=sorted(BANDITS), default="linucb", help="selection policy (default linucb)")
    g.add_argument(
        "--laser.baseline", choices=BASELINES, default=None,
        help="run a paper baseline instead of the bandit: single RM, random, sequential (round-robin), or the "
        "mean / wco (worst-case) / uwo (uncertainty-weighted) ensembles, which score every sample with all K RMs",
    )
    g.add_argument("--laser.single_arm", type=_number(int, 0), default=0, metavar="K", help="the RM (index) for --laser.baseline single")
    g.add_argument(
        "--laser.alpha", type=_number(float, 0), default=None, metavar="ALPHA",
        help="exploration knob of the chosen bandit: LinUCB alpha (paper 0.1), Thompson v, epsilon-greedy epsilon, "
        "Exp3 gamma, UCB1 c (default: the bandit's own)",
    )
    g.add_argument(
        "--laser.lambda", dest="laser.lam", type=_number(float, 0, low_open=True), default=1.0, metavar="LAMBDA",
        help="ridge regularizer of the linear bandits (paper 1.0)",
    )
    g.add_argument(
        "--laser.discount", type=_number(float, 0, 1, low_open=True), default=1.0, metavar="GAMMA",
        help="per-step decay of bandit statistics, < 1 tracks RMs whose usefulness drifts (default 1: none)",
    )
    g.add_argument(
        "--laser.feedback", choices=FEEDBACKS, default=DEFAULT_FEEDBACK,
        help=f"bandit reward (default {DEFAULT_FEEDBACK}): consensus (label-free: on an audited share of prompts every "
        "RM scores the samples; agreement with their reliability-weighted consensus), verifier (agreement with the "
        "--reward.remote_url verifier's scores; reads labels), pair_loss (the paper's: -(DPO + NLL) on the chosen "
        "RM's best vs worst sample, from the log-probs OpenRLHF already computed; measured preferring the policy's "
        "own likelihood RM) or spread (within-prompt score spread). Not available here: progress (needs a forward "
        "pass after the update), majority (needs an answer extractor)",
    )
    g.add_argument("--laser.beta", type=_number(float, 0, low_open=True), default=0.1, metavar="BETA", help="DPO beta of pair_loss")
    g.add_argument(
        "--laser.audit_fraction", type=_number(float, 0, 1), default=None, metavar="F",
        help="consensus feedback: share of prompts scored by every RM to estimate their reliability "
        f"(costs F * (K - 1) extra RM passes per sample; default: the selector's, {_SELECTOR_DEFAULTS['audit_fraction']})",
    )
    g.add_argument(
        "--laser.audit_warmup_steps", type=_number(int, 0), default=None, metavar="STEPS",
        help="consensus feedback: audit --laser.audit_warmup_fraction of prompts in the first STEPS rollout steps, "
        "then --laser.audit_fraction (front-loads the audit budget; 0: off; default: the selector's, "
        f"{_SELECTOR_DEFAULTS['audit_warmup_steps']})",
    )
    g.add_argument(
        "--laser.audit_warmup_fraction", type=_number(float, 0, 1), default=None, metavar="F",
        help="consensus feedback: the share audited during --laser.audit_warmup_steps (default: the selector's, "
        f"{_SELECTOR_DEFAULTS['audit_warmup_fraction']})",
    )
    g.add_argument(
        "--laser.granularity", choices=("prompt", "batch"), default="prompt",
        help="one RM per prompt (default) or per rollout batch (the paper's code)",
    )
    g.add_argument(
        "--laser.context", choices=("policy", "reference"), default="policy",
        help="bandit context: last prompt token's hidden state from the policy (paper) or the reference model",
    )
    g.add_argument(
        "--laser.context_dim", type=_number(int, 0), default=256, metavar="D",
        help="random projection of the hidden state to this many dims (0: the full hidden size, as in the paper)",
    )
    g.add_argument(
        "--laser.normalize_scores", action="store_true", default=False,
        help="standardize each RM's scores by its running mean/std (RMs on different scales, e.g. with gae)",
    )
    g.add_argument("--laser.seed", type=int, default=None, metavar="SEED", help="bandit and projection seed (default: --train.seed)")
    g.add_argument(
        "--laser.check_only", action="store_true", default=False,
        help="run every check (flags, RM specs, remote RMs, OpenRLHF's checks), print the LASeR set-up and exit",
    )


def build_parser() -> argparse.ArgumentParser:
    """OpenRLHF's train_ppo_ray parser plus the --laser.* flags."""
    parser = openrlhf_parser()
    parser.prog, parser.usage = PROG, USAGE
    parser.description = __doc__.split("\n\n")[0]
    add_laser_arguments(parser)
    return parser


def check_args(parser: argparse.ArgumentParser, args: SimpleNamespace) -> list[str]:
    """LASeR's and OpenRLHF's checks on hierarchized args; parser.error() on the first problem.

    Fills derived defaults (laser.seed, a gae critic) and returns notes worth printing.
    """
    laser = args.laser
    specs = laser.reward_models
    if not specs:
        parser.error(
            "--laser.reward_models is required: one spec per reward model (a local model directory, implicit:<dir>, "
            "module:function, http(s)://host:port/path or noise[:sigma])"
        )
    if not args.actor.model_name_or_path:
        parser.error("--actor.model_name_or_path is required")
    if laser.feedback == "verifier" and not (args.reward.remote_url or args.train.agent_func_path):
        parser.error(
            "--laser.feedback verifier needs a verifier score per sample: pass --reward.remote_url "
            "(a reward_func .py file or a URL; OpenRLHF scores each sample with it during rollout)"
        )
    for flag in ("audit_fraction", "audit_warmup_steps", "audit_warmup_fraction"):
        if getattr(laser, flag) is not None and laser.feedback != "consensus":
            parser.error(f"--laser.{flag} applies to --laser.feedback consensus only, not {laser.feedback}")
    if args.reward.model_name_or_path:
        parser.error("--reward.model_name_or_path is OpenRLHF's single RM; with LASeR list every RM in --laser.reward_models")
    if args.train.async_enable:
        parser.error("--train.async_enable is not supported with --laser.* yet: drop it (synchronous PPO/GRPO)")
    if args.ds.ring_attn_size > 1:
        parser.error("--ds.ring_attn_size > 1 is not supported with --laser.*: the RMs and context forwards run unsharded")
    if args.rollout.n_samples_per_prompt < 2:
        parser.error(
            f"--laser.feedback {laser.feedback} compares the chosen RM's samples of one prompt: "
            "set --rollout.n_samples_per_prompt >= 2"
        )
    if laser.baseline == "single" and laser.single_arm >= len(specs):
        parser.error(f"--laser.single_arm {laser.single_arm} is out of range for {len(specs)} reward models")
    if laser.seed is None:
        laser.seed = args.train.seed
    # OpenRLHF starts a gae critic from its RM; LASeR has K of them, so the critic starts from the policy.
    if args.algo.advantage.estimator == "gae" and not args.critic.model_name_or_path:
        args.critic.model_name_or_path = args.actor.model_name_or_path
    try:
        openrlhf_check_args(args)
    except AssertionError as e:
        parser.error(f"OpenRLHF: {e}")
    # Placement rules OpenRLHF's train() asserts after Ray has started; checked here first.
    actor_gpus = args.actor.num_nodes * args.actor.num_gpus_per_node
    if args.train.colocate_all and (args.vllm.num_engines or 0) > 0:
        if actor_gpus != args.vllm.num_engines * args.vllm.tensor_parallel_size:
            parser.error(
                f"--train.colocate_all: actor GPUs ({actor_gpus}) must equal vllm.num_engines * vllm.tensor_parallel_size "
                f"({args.vllm.num_engines} * {args.vllm.tensor_parallel_size})"
            )
    if (args.train.colocate_all or args.train.colocate_actor_ref) and (args.algo.kl.init_coef > 0 or needs_reference(laser)):
        if (args.ref.num_nodes, args.ref.num_gpus_per_node) != (args.actor.num_nodes, args.actor.num_gpus_per_node):
            parser.error("colocated actor and reference need the same --ref.num_nodes / --ref.num_gpus_per_node as the actor")
    try:
        check_policy_path(args.actor.model_name_or_path)
        notes = check_reward_specs(specs, laser.reward_weights, args.actor.model_name_or_path)
        # Selector options (arm counts, bandit parameters) are checked on stand-in arms: nothing loads.
        stand_ins = [RuleArm(lambda p, r, l: [0.0] * len(p), name=spec_name(s)) for s in specs]
        selector_from_flags(stand_ins, laser, context_dim=8 if is_contextual(laser) else None)
    except ValueError as e:
        parser.error(str(e))
    if needs_reference(laser) and args.algo.kl.init_coef <= 0:
        notes.append("the reference model runs for LASeR's pair_loss / context although --algo.kl.init_coef is 0")
    return notes


def parse_args(argv: list[str] | None = None) -> SimpleNamespace:
    parser = build_parser()
    args = hierarchize(parser.parse_args(argv))
    for note in check_args(parser, args):
        print(f"[laser] {note}", flush=True)
    return args


def describe(args: SimpleNamespace) -> str:
    laser = args.laser
    kinds = ", ".join(f"{spec_name(s) if spec_kind(s) == 'model' else s} ({spec_kind(s)})" for s in laser.reward_models)
    alpha = "the bandit's default" if laser.alpha is None else laser.alpha
    policy = f"baseline {laser.baseline}" if laser.baseline else f"{laser.bandit} (alpha {alpha}, lambda {laser.lam})"
    return (
        f"[laser] {len(laser.reward_models)} reward models: {kinds}\n"
        f"[laser] {policy}, per {laser.granularity}, feedback {laser.feedback}, context {laser.context}, "
        f"estimator {args.algo.advantage.estimator}, seed {laser.seed}"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ImportError as e:  # OpenRLHF itself is missing: its flags cannot even be listed
        sys.exit(f"{PROG}: error: {e}")
    print(describe(args), flush=True)
    if args.laser.check_only:
        return 0
    from laser_rl.integrations.openrlhf.launch import train

    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
