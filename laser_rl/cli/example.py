"""`laser-rl example`: per-prompt RM selection on the synthetic clustered problem (seconds, CPU)."""

from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

from laser_rl import BANDITS, BASELINES, RewardSelector
from laser_rl.arms import RuleArm
from laser_rl.synthetic import ClusteredRewardProblem


def run_example(args: argparse.Namespace) -> dict:
    """Per-prompt selection on the synthetic problem: TensorBoard logs, a PNG of arm use per domain, a table."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(args.output_dir, exist_ok=True)
    problem = ClusteredRewardProblem(num_arms=args.num_arms, dim=args.dim, seed=args.seed)
    domains = [f"domain{c}" for c in range(problem.num_clusters)]
    names = [f"rm_best_on_{d}" for d in domains] + ["rm_noise"]
    # The example feeds the problem's rewards to the bandit; the arms' own scoring is not exercised.
    arms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=n) for n in names]
    policy = dict(baseline=args.baseline) if args.baseline else dict(bandit=args.bandit, alpha=args.alpha)
    selector = RewardSelector(arms, context_dim=problem.dim, granularity=args.granularity, seed=args.seed, **policy)
    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    history = {d: [] for d in domains}
    regret = 0.0
    for step in tqdm(range(args.steps), desc="laser-rl example"):
        X, clusters = problem.contexts(args.batch_size)
        chosen = selector.select(X.float(), [domains[c] for c in clusters.tolist()])
        selector.feedback(X.float(), chosen, raw_rewards=problem.rewards(X, chosen))
        regret += float(problem.regret(X, chosen).sum())
        metrics = selector.metrics()
        metrics["laser/cumulative_regret"] = regret
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        for d in domains:
            history[d].append([metrics.get(f"laser/domain/{d}/arm_frac/{n}", 0.0) for n in selector.names])
    writer.close()

    plot_path = os.path.join(args.output_dir, "arm_choice_by_domain.png")
    plot_arm_choice(history, selector.names, plot_path)
    last = max(1, args.steps // 4)
    print(f"\nArm chosen per domain over the last {last} steps ({args.bandit if not args.baseline else args.baseline}):")
    width = max(len(n) for n in selector.names) + 2
    print(f"{'domain':<10}" + "".join(f"{n:>{width}}" for n in selector.names))
    for d in domains:
        frac = torch.tensor(history[d][-last:]).mean(0)
        print(f"{d:<10}" + "".join(f"{f:>{width}.2f}" for f in frac.tolist()))
    print(f"cumulative regret: {regret:.1f}   (arm k is best on domain k; the last arm is noise)")
    print(f"wrote {plot_path} and TensorBoard logs in {os.path.join(args.output_dir, 'tensorboard')}")
    return {"regret": regret, "history": history}


def plot_arm_choice(history: dict[str, list[list[float]]], names: list[str], path: str) -> None:
    """One panel per domain: the fraction of its prompts given to each arm, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(history), figsize=(4 * len(history), 3.2), sharey=True, squeeze=False)
    for ax, (domain, rows) in zip(axes[0], history.items()):
        fractions = torch.tensor(rows).T.numpy()
        ax.stackplot(range(len(rows)), fractions, labels=names)
        ax.set_title(domain)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("fraction of prompts")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("example", help="per-prompt RM selection on a synthetic problem (CPU, seconds)")
    ex.add_argument("--steps", type=int, default=150)
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--num-arms", type=int, default=4)
    ex.add_argument("--dim", type=int, default=16)
    ex.add_argument("--bandit", choices=sorted(BANDITS), default="linucb")
    ex.add_argument("--baseline", choices=BASELINES, default=None)
    ex.add_argument("--alpha", type=float, default=0.1)
    ex.add_argument("--granularity", choices=("prompt", "batch"), default="prompt")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--output-dir", default="laser_runs/example")
    ex.set_defaults(run=run, parser=ex)


def run(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.batch_size < 1:
        args.parser.error("--steps and --batch-size must be >= 1")
    if args.baseline in ("mean", "wco", "uwo"):
        args.parser.error("score ensembles need real reward models to score samples; the example has none")
    run_example(args)
