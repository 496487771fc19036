"""`laser-rl example`: per-prompt RM selection on the synthetic clustered problem (seconds, CPU).

    laser-rl example                          LinUCB, one RM per prompt
    laser-rl example --bandit thompson        another bandit
    laser-rl example --granularity batch      the paper code's one RM per batch (it picks the noise RM)
    laser-rl example --baseline random        a baseline instead of the bandit

Contexts come from three clusters (think: math, logic, writing prompts); RM k is the best on cluster k and the
last RM is pure noise. The rewards are the problem's (no model runs), so this shows the bandit alone.
Each variant writes its own folder, OUTPUT_DIR/<variant>/: TensorBoard logs and a PNG of the RM chosen per domain.
"""

from __future__ import annotations

import argparse
import os

from laser_rl.cli.common import make_selector, require

HELP = "per-prompt RM selection on a synthetic problem (CPU, seconds)"
ENSEMBLES = ("mean", "wco", "uwo")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from laser_rl.bandits import BANDITS
    from laser_rl.selector import BASELINES

    p = sub.add_parser("example", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="bandit steps (default 150)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts (contexts) per step (default 32)")
    p.add_argument("--num-arms", type=int, default=4, help="reward models: one best per cluster, plus one noise RM (default 4)")
    p.add_argument("--dim", type=int, default=16, help="context dimension (default 16)")
    p.add_argument("--bandit", choices=sorted(BANDITS), default="linucb", help="the bandit policy (default linucb)")
    p.add_argument("--baseline", choices=[b for b in BASELINES if b not in ENSEMBLES], default=None,
                   help="a non-learning baseline instead of the bandit (score ensembles need real RMs: not here)")
    p.add_argument("--alpha", type=float, default=None,
                   help="exploration knob of the chosen bandit: LinUCB alpha, Thompson v, epsilon-greedy epsilon, "
                        "Exp3 gamma, UCB1 c (default: the bandit's own)")
    p.add_argument("--granularity", choices=("prompt", "batch"), default="prompt",
                   help="one RM per prompt (default) or one per batch (the paper's code)")
    p.add_argument("--seed", type=int, default=0, help="seeds the problem and the bandit (default 0)")
    p.add_argument("--output-dir", default="laser_runs/example", help="each variant writes OUTPUT_DIR/<variant>/")
    p.set_defaults(run=run, parser=p)


def variant_name(args: argparse.Namespace) -> str:
    """The folder name of a run: every setting that changes its result, so no two variants share a folder."""
    policy = f"baseline-{args.baseline}" if args.baseline else args.bandit + (f"-alpha{args.alpha:g}" if args.alpha is not None else "")
    return f"{policy}-{args.granularity}-k{args.num_arms}-d{args.dim}-b{args.batch_size}-s{args.steps}-seed{args.seed}"


def run(args: argparse.Namespace) -> dict:
    if args.steps < 1 or args.batch_size < 1:
        args.parser.error("--steps and --batch-size must be >= 1")
    if args.num_arms < 3 or args.dim < args.num_arms:
        args.parser.error("--num-arms must be >= 3 (two cluster RMs and the noise RM) and --dim >= --num-arms")
    require(args.parser, ["tensorboard", "matplotlib", "tqdm"], "laser-rl example")
    return run_example(args)


def run_example(args: argparse.Namespace) -> dict:
    """Per-prompt selection on the synthetic problem: TensorBoard logs, a PNG of arm use per domain, a table."""
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from laser_rl.arms import RuleArm
    from laser_rl.synthetic import ClusteredRewardProblem

    problem = ClusteredRewardProblem(num_arms=args.num_arms, dim=args.dim, seed=args.seed)
    domains = [f"domain{c}" for c in range(problem.num_clusters)]
    names = [f"rm_best_on_{d}" for d in domains] + ["rm_noise"]
    # The problem supplies the rewards (raw_rewards below); the RMs' own scoring is never called here.
    rms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=n) for n in names]
    selector = make_selector(args, rms, problem.dim)  # before the folder: a bad flag leaves nothing behind
    out = os.path.join(args.output_dir, variant_name(args))
    os.makedirs(out, exist_ok=True)
    writer = SummaryWriter(os.path.join(out, "tensorboard"))
    history = {d: [] for d in domains}
    regret = 0.0
    for step in tqdm(range(args.steps), desc="laser-rl example"):
        X, clusters = problem.contexts(args.batch_size)
        arms = selector.select(X.float(), [domains[c] for c in clusters.tolist()])
        selector.feedback(X.float(), arms, raw_rewards=problem.rewards(X, arms))
        regret += float(problem.regret(X, arms).sum())
        metrics = selector.metrics()
        metrics["laser/cumulative_regret"] = regret
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        for d in domains:
            history[d].append([metrics.get(f"laser/domain/{d}/arm_frac/{n}", 0.0) for n in selector.names])
    writer.close()

    title = f"{describe(args)}: {args.steps} steps x {args.batch_size} prompts, cumulative regret {regret:.1f}"
    plot_path = os.path.join(out, "arm_choice_by_domain.png")
    plot_arm_choice(history, selector.names, plot_path, title)
    last = max(1, args.steps // 4)
    print(f"\nArm chosen per domain over the last {last} steps ({describe(args)}):")
    width = max(len(n) for n in selector.names) + 2
    print(f"{'domain':<10}" + "".join(f"{n:>{width}}" for n in selector.names))
    for d in domains:
        frac = torch.tensor(history[d][-last:]).mean(0)
        print(f"{d:<10}" + "".join(f"{f:>{width}.2f}" for f in frac.tolist()))
    print(f"cumulative regret: {regret:.1f}   (arm k is best on domain k; the last arm is noise)")
    print(f"wrote {plot_path} and TensorBoard logs in {os.path.join(out, 'tensorboard')}")
    return {"regret": regret, "history": history, "output_dir": out}


def describe(args: argparse.Namespace) -> str:
    """'linucb (alpha 0.1), one RM per prompt, seed 0': what made a run, for its plot title and table."""
    policy = f"baseline {args.baseline}" if args.baseline else args.bandit
    if not args.baseline:
        policy += f" (alpha {args.alpha:g})" if args.alpha is not None else " (its default exploration)"
    return f"{policy}, one RM per {args.granularity}, seed {args.seed}"


def plot_arm_choice(history: dict[str, list[list[float]]], names: list[str], path: str, title: str) -> None:
    """One panel per domain: the fraction of its prompts given to each arm, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(1, len(history), figsize=(4 * len(history), 3.4), sharey=True, squeeze=False)
    for ax, (domain, rows) in zip(axes[0], history.items()):
        fractions = torch.tensor(rows).T.numpy()
        ax.stackplot(range(len(rows)), fractions, labels=names)
        ax.set_title(domain)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("fraction of prompts")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
