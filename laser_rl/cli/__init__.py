"""The `laser-rl` command: one subcommand per module in this package.

    laser-rl example     per-prompt RM selection on a synthetic problem (CPU, seconds)
    laser-rl iterative-dpo   the paper's iterative DPO + NLL training with a bandit-chosen RM
    laser-rl best-of-n       best-of-n answers ranked by a bandit-chosen RM (no training)
    laser-rl agreement       how often reward models order response pairs alike (heatmap)

A subcommand module defines add_parser(subparsers), which registers its flags and sets `run`.
"""

from __future__ import annotations

import argparse
import sys

from laser_rl.cli import agreement, best_of_n, demo, example, iterative_dpo

SUBCOMMANDS = [example, iterative_dpo, best_of_n, agreement, demo]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="laser-rl", description="LASeR: adaptive reward-model selection for RL.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
