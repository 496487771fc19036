"""Replay the demo's bandit on logged rollouts: which LinUCB settings find each domain's best RM?

A demo run takes minutes, so its bandit settings cannot be tuned by running it many times. Instead:
  1. log once: the untrained SmolLM2 answers `--prompts` training prompts per domain (8 samples each); every
     arm scores every sample; reasoning-gym's verifier labels them (cached in `--log`, ~6 min on 2 cores);
  2. replay: for each setting and seed, the demo's selection loop (same RewardSelector, ContextEncoder,
     context centering, verifier feedback, 2 prompts per domain per step) runs on the logged data, and we
     count how often the arm chosen most after warm-up is the most accurate one on every domain (or tied
     with it within two standard errors, as the demo reports), and how often the noise arm gets >= 10%.

    python benchmarks/demo_bandit_replay.py [--seeds 60 --steps 32 --log laser_runs/replay_log.pt]

The policy does not train during a replay (the demo's does), so this measures the bandit, not GRPO.
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

from laser_rl.arms import RuleArm
from laser_rl.context import ContextEncoder
from laser_rl.demo.grpo import sample
from laser_rl.demo.run import DemoAssets, DemoConfig, label_and_score, tied_with_best
from laser_rl.demo.tasks import DOMAINS
from laser_rl.feedback import verifier_agreement
from laser_rl.selector import RewardSelector

SETTINGS = [  # (alpha, lam)
    (0.1, 1.0),  # the paper's code
    (0.2, 0.1),  # this demo's first default
    (0.2, 1.0),
    (0.4, 1.0),
    (0.6, 1.0),  # the demo's default
    (0.8, 1.0),
    (1.0, 1.0),
    (0.6, 0.3),
]


def collect(path: str, prompts: int, n: int = 8, chunk: int = 24) -> dict:
    config = DemoConfig(train_per_domain=prompts)
    assets = DemoAssets(config, verbose=True)
    torch.manual_seed(0)
    log = {}
    for domain in DOMAINS:
        tasks = assets.tasks.train[domain][:prompts]
        hidden, correct, scores = [], [], {a.name: [] for a in assets.arm_list}
        for start in tqdm(range(0, len(tasks), chunk), desc=f"logging {domain}"):
            part = tasks[start : start + chunk]
            rollout = sample(assets.reference, assets.tokenizer, [t.prompt for t in part], n, config.max_new_tokens, config.temperature)
            labels, arm_scores = label_and_score(part, rollout, assets.arm_list)
            hidden.append(rollout.context_hidden)
            correct.append(labels)
            for name, s in arm_scores.items():
                scores[name].append(s)
        log[domain] = {"hidden": torch.cat(hidden), "correct": torch.cat(correct), "scores": {k: torch.cat(v) for k, v in scores.items()}}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(log, path)
    return log


def replay(log: dict, alpha: float, lam: float, seed: int, steps: int, per_domain: int = 2, warmup: float = 0.25):
    """Arm counts per domain after warm-up for one replayed run."""
    names = list(log[DOMAINS[0]]["scores"])
    hidden_size = log[DOMAINS[0]]["hidden"].shape[1]
    center = torch.cat([log[d]["hidden"][:16] for d in DOMAINS]).mean(0)  # as the demo's probe sets it
    encoder = ContextEncoder(hidden_size, proj_dim=16, seed=seed)
    arms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=name) for name in names]
    selector = RewardSelector(arms, context_dim=encoder.dim, alpha=alpha, lam=lam, feedback="verifier", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    orders = {d: torch.randperm(log[d]["hidden"].shape[0], generator=gen) for d in DOMAINS}
    counts = {d: torch.zeros(len(names)) for d in DOMAINS}
    for step in range(steps):
        rows = [(d, int(orders[d][(step * per_domain + j) % len(orders[d])])) for d in DOMAINS for j in range(per_domain)]
        contexts = encoder(torch.stack([log[d]["hidden"][i] for d, i in rows]) - center)
        chosen = selector.select(contexts, [d for d, _ in rows])
        scores = torch.stack([log[d]["scores"][names[int(k)]][i] for (d, i), k in zip(rows, chosen)])
        correct = torch.stack([log[d]["correct"][i] for d, i in rows])
        selector.feedback(contexts, chosen, scores=scores, correct=correct)
        if step >= int(steps * warmup):
            for (d, _), k in zip(rows, chosen):
                counts[d][int(k)] += 1
    return names, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default="laser_runs/replay_log.pt")
    parser.add_argument("--prompts", type=int, default=96, help="logged prompts per domain")
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    log = torch.load(args.log, weights_only=False) if os.path.exists(args.log) else collect(args.log, args.prompts)
    agreement = {d: {k: verifier_agreement(v, log[d]["correct"]) for k, v in log[d]["scores"].items()} for d in DOMAINS}
    ties = tied_with_best(agreement)
    print(f"logged: {log[DOMAINS[0]]['hidden'].shape[0]} prompts per domain x 8 samples of the untrained policy")
    for d in DOMAINS:
        mixed = int(torch.isfinite(agreement[d]["noise"]).sum()) if "noise" in agreement[d] else "?"
        accs = ", ".join(f"{k} {float(v.nanmean()):.2f}" for k, v in agreement[d].items())
        print(f"  {d:<10} accuracy {accs}; best (with ties) {ties[d]}; prompts with mixed labels {mixed}")
    print(f"\n{args.seeds} seeds x {args.steps} steps x 6 prompts; best RM = most chosen after warm-up is the most accurate (or tied) on every domain")
    print(f"{'alpha':>6} {'lam':>5} {'best RM':>8} {'noise share':>12} {'runs noise>=0.10':>17} {'both criteria':>14}")
    for alpha, lam in SETTINGS:
        ok, both, noise = 0, 0, []
        for seed in range(args.seeds):
            names, counts = replay(log, alpha, lam, seed, args.steps)
            chosen = {d: names[int(c.argmax())] for d, c in counts.items()}
            found = all(chosen[d] in ties[d] for d in DOMAINS)
            total = sum(c.sum() for c in counts.values())
            noise.append(float(sum(c[names.index("noise")] for c in counts.values()) / total) if "noise" in names else 0.0)
            ok += found
            both += found and noise[-1] < 0.10
        noise_t = torch.tensor(noise)
        print(
            f"{alpha:>6.2f} {lam:>5.2f} {ok / args.seeds:>8.2f} {noise_t.mean():>12.3f} "
            f"{(noise_t >= 0.10).float().mean():>17.2f} {both / args.seeds:>14.2f}"
        )


if __name__ == "__main__":
    main()
