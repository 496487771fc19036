"""Cumulative regret of every selection policy on the synthetic clustered problem, in one run.

Each policy runs through RewardSelector exactly as in training (raw reward -> 20/80 quantile
normalization -> bandit update), on the same seeded stream of mixed batches. Arm k is the best
RM on cluster k; the last arm is pure noise.

    python benchmarks/bandit_regret.py                  # 200 steps x 32 prompts, 3 seeds
    python benchmarks/bandit_regret.py --plot regret.png

"+ warm start" rows first update the bandit from a small labeled set (laser_rl.priors): for each
labeled context every arm's reward is a Bernoulli draw with that arm's expected reward (did the RM
prefer the right response?), drawn from a separate stream so the online batches match the cold runs.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from laser_rl import RewardSelector
from laser_rl.arms import RuleArm
from laser_rl.priors import warm_start_selector
from laser_rl.synthetic import ClusteredRewardProblem

EARLY_STEPS = 20  # "early regret": the steps where a cold bandit is still exploring

POLICIES = {
    "linucb/prompt": dict(bandit="linucb"),
    "linucb/batch (paper code)": dict(bandit="linucb", granularity="batch"),
    "linucb/prompt + warm start": dict(bandit="linucb", warm_start=64),
    "thompson/prompt": dict(bandit="thompson"),
    "thompson/prompt + warm start": dict(bandit="thompson", warm_start=64),
    "epsilon_greedy/prompt": dict(bandit="epsilon_greedy"),
    "exp3": dict(bandit="exp3"),
    "ucb1": dict(bandit="ucb1"),
    "random": dict(baseline="random"),
    "sequential": dict(baseline="sequential"),
    "single (arm 0)": dict(baseline="single"),
}


def run(policy: dict, steps: int, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    """Cumulative regret curve [steps] and the best-arm rate over the second half."""
    problem = ClusteredRewardProblem(seed=seed)
    # The arms' scoring is not exercised here: the benchmark feeds the problem's rewards directly.
    arms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=f"arm{k}") for k in range(problem.num_arms)]
    policy = dict(policy)
    warm = policy.pop("warm_start", 0)
    sel = RewardSelector(arms, context_dim=problem.dim, seed=seed, **policy)
    if warm:
        # Same problem (same clusters and arms), its own random stream for the labeled set.
        labeled = ClusteredRewardProblem(seed=seed)
        labeled.generator.manual_seed(10_000 + seed)
        X, _ = labeled.contexts(warm)
        p_right = labeled.expected_rewards(X).clamp(0, 1)
        prefers_chosen = torch.bernoulli(p_right, generator=labeled.generator)  # [N, K] in {0, 1}
        warm_start_selector(sel, X.float(), prefers_chosen.float())
    regret, hits, total = [], 0, 0
    for t in range(steps):
        X, clusters = problem.contexts(batch)
        chosen = sel.select(X.float())
        sel.feedback(X.float(), chosen, raw_rewards=problem.rewards(X, chosen))
        regret.append(float(problem.regret(X, chosen).sum()))
        if t >= steps // 2:
            hits += int((chosen == clusters).sum())
            total += batch
    return torch.tensor(regret).cumsum(0), hits / total


def ratio(a: float, b: float) -> float:
    """a / b, inf when b is 0 (a short run in which a warm-started bandit made no mistake)."""
    return a / b if b > 0 else float("inf")


def early(curve: torch.Tensor) -> float:
    """Cumulative regret after the first EARLY_STEPS steps."""
    return float(curve[min(EARLY_STEPS, len(curve)) - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--plot", type=str, default=None, help="write the regret curves to this PNG")
    args = parser.parse_args()

    curves, rates = {}, {}
    bar = tqdm(total=len(POLICIES) * args.seeds, desc="policy x seed runs")
    for name, policy in POLICIES.items():
        bar.set_postfix_str(name)
        runs = []
        for seed in range(args.seeds):
            runs.append(run(policy, args.steps, args.batch, seed))
            bar.update()
        curves[name] = torch.stack([c for c, _ in runs]).mean(0)
        rates[name] = sum(r for _, r in runs) / len(runs)
    bar.close()

    random_regret = float(curves["random"][-1])
    print(f"\n{args.steps} steps x {args.batch} prompts, mean of {args.seeds} seeds")
    early_label = f"first {EARLY_STEPS}"
    print(f"{'policy':<30} {'cum. regret':>11} {'random/this':>11} {'best-arm rate':>13} {early_label:>9}")
    for name, curve in sorted(curves.items(), key=lambda kv: float(kv[1][-1])):
        print(
            f"{name:<30} {float(curve[-1]):>11.1f} {ratio(random_regret, float(curve[-1])):>10.1f}x {rates[name]:>13.3f}"
            f" {early(curve):>9.1f}"
        )
    ours, paper = float(curves["linucb/prompt"][-1]), float(curves["linucb/batch (paper code)"][-1])
    print(f"\nper-prompt LinUCB vs random: {ratio(random_regret, ours):.1f}x less regret (target >= 2x)")
    print(f"per-prompt LinUCB vs per-batch LinUCB: {ratio(paper, ours):.1f}x less regret")
    for bandit in ("linucb", "thompson"):
        cold, warm = early(curves[f"{bandit}/prompt"]), early(curves[f"{bandit}/prompt + warm start"])
        print(
            f"early regret (first {EARLY_STEPS} steps), {bandit}/prompt: cold {cold:.1f}, warm-started {warm:.1f} "
            f"({ratio(cold, warm):.1f}x less)"
        )

    if args.plot:
        settings = f"{args.steps} steps x {args.batch} prompts, mean of {args.seeds} seed{'s' if args.seeds > 1 else ''}"
        plot_curves(curves, args.plot, settings)
        print(f"wrote {args.plot}")


def plot_curves(curves: dict[str, torch.Tensor], path: str, settings: str) -> None:
    """Every policy's mean cumulative regret; a distinct colour AND line style per curve, on a symlog axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem = ClusteredRewardProblem()
    # tab20's dark shades: 10 distinct colours, then black; the line style changes with every curve as well,
    # so no two curves look alike even in grey print.
    colours = [plt.get_cmap("tab20")(2 * i) for i in range(10)] + ["black"]
    styles = ["-", "--", "-.", ":"]
    fig, ax = plt.subplots(figsize=(10, 5))
    order = list(curves)  # a policy keeps its colour and style from run to run; the legend is sorted by regret
    for name, curve in sorted(curves.items(), key=lambda kv: float(kv[1][-1])):
        i = order.index(name)
        ax.plot(range(1, len(curve) + 1), curve.numpy(), label=f"{name} ({float(curve[-1]):.0f})",
                color=colours[i % len(colours)], linestyle=styles[i % len(styles)], linewidth=1.8)
    # Final regrets span about three decades (warm-started LinUCB vs random): a linear axis flattens the good ones.
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative regret (symlog)")
    ax.set_title(f"RM selection on the synthetic clustered problem: {problem.num_arms} RMs (one noise), "
                 f"d = {problem.dim}\n{settings}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="policy (final regret)", title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    main()
