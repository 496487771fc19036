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
    for name, policy in tqdm(POLICIES.items(), desc="policies"):
        runs = [run(policy, args.steps, args.batch, seed) for seed in range(args.seeds)]
        curves[name] = torch.stack([c for c, _ in runs]).mean(0)
        rates[name] = sum(r for _, r in runs) / len(runs)

    random_regret = float(curves["random"][-1])
    print(f"\n{args.steps} steps x {args.batch} prompts, mean of {args.seeds} seeds")
    early_label = f"first {EARLY_STEPS}"
    print(f"{'policy':<30} {'cum. regret':>11} {'random/this':>11} {'best-arm rate':>13} {early_label:>9}")
    for name, curve in sorted(curves.items(), key=lambda kv: float(kv[1][-1])):
        print(
            f"{name:<30} {float(curve[-1]):>11.1f} {random_regret / float(curve[-1]):>10.1f}x {rates[name]:>13.3f}"
            f" {early(curve):>9.1f}"
        )
    ours, paper = float(curves["linucb/prompt"][-1]), float(curves["linucb/batch (paper code)"][-1])
    print(f"\nper-prompt LinUCB vs random: {random_regret / ours:.1f}x less regret (target >= 2x)")
    print(f"per-prompt LinUCB vs per-batch LinUCB: {paper / ours:.1f}x less regret")
    for bandit in ("linucb", "thompson"):
        cold, warm = early(curves[f"{bandit}/prompt"]), early(curves[f"{bandit}/prompt + warm start"])
        print(
            f"early regret (first {EARLY_STEPS} steps), {bandit}/prompt: cold {cold:.1f}, warm-started {warm:.1f} "
            f"({cold / max(warm, 1e-9):.1f}x less)"
        )

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, curve in curves.items():
            ax.plot(curve.numpy(), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("cumulative regret")
        ax.set_title("Reward-model selection on the synthetic clustered problem")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
