"""The `laser-rl` command: one subcommand per module in this package.

    laser-rl example         per-prompt RM selection on a synthetic problem (CPU, seconds)
    laser-rl demo            offline LASeR-GRPO on SmolLM2-135M over three reasoning-gym domains (CPU, minutes)
    laser-rl iterative-dpo   the paper's iterative DPO + NLL training with a bandit-chosen RM
    laser-rl best-of-n       best-of-n answers ranked by a bandit-chosen RM (no training)
    laser-rl agreement       how often reward models order response pairs alike (heatmap)

A subcommand module imports only the standard library at module level and defines HELP (its one-line summary),
add_parser(subparsers) (registers its flags and sets `run`) and run(args). Only the chosen subcommand builds its
flags, so `laser-rl --help` needs none of the optional packages and imports no model code.
"""

from __future__ import annotations

import importlib
import sys

from laser_rl.cli.common import Parser, missing_package_message, quiet_third_party_warnings

SUBCOMMANDS = {
    "example": "laser_rl.cli.example",
    "demo": "laser_rl.cli.demo",
    "iterative-dpo": "laser_rl.cli.iterative_dpo",
    "best-of-n": "laser_rl.cli.best_of_n",
    "agreement": "laser_rl.cli.agreement",
}


def build_parser(argv: list[str]) -> Parser:
    parser = Parser(prog="laser-rl", description="LASeR: a contextual bandit picks one reward model per prompt.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        if name == chosen:
            module.add_parser(sub)
        else:  # listed in `laser-rl --help` without building its flags
            sub.add_parser(name, help=module.HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()  # before anything imports torch
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = build_parser(argv).parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):  # a subcommand that cannot build its flags
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.run(args)
    except ModuleNotFoundError as e:
        # An optional third-party package (tensorboard, peft, openrlhf, ...) is missing: one line and the fix.
        if e.name is None or e.name.split(".")[0] == "laser_rl":
            raise
        args.parser.error(missing_package_message(e.name, f"laser-rl {args.command}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
