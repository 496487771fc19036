"""`laser-rl best-of-n`: per prompt a bandit-chosen RM picks the best of n samples; no training.

    laser-rl best-of-n --policy /models/llama-3-8b --reward-models /rms/a /rms/b \\
        --data longbench_qa.jsonl --n 8 --strategies laser random mean --output-dir runs/bon

Data: JSONL with `prompt` and `answer` (a string or a list of accepted answers), optional `context`
(long-context QA: the metric is then token F1) and `domain`. Prompts longer than the model's limit
are truncated in the middle, and the count is reported. Every strategy answers the same samples.
The sampling and ranking flags are the fields of laser_rl.best_of_n.BestOfNConfig.
"""

from __future__ import annotations

import argparse
import json
import os

from laser_rl.cli.common import (
    add_config_flags,
    add_model_flags,
    add_selector_flags,
    apply_warm_start,
    build_rms,
    check_selector_flags,
    config_from_args,
    load_policy,
    load_records,
    make_encoder,
    make_selector,
)

HELP = "best-of-n answers ranked by a bandit-chosen RM, against random-RM and ensemble selection"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from laser_rl.best_of_n import BestOfNConfig
    from laser_rl.selector import BASELINES

    p = sub.add_parser("best-of-n", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--data", required=True, help="JSONL with `prompt`, `answer`, optional `context` and `domain`")
    p.add_argument("--strategies", nargs="+", choices=("laser",) + tuple(BASELINES), default=["laser", "random", "mean"],
                   help="laser = the bandit; the others are the selector's baselines (mean/wco/uwo: score ensembles)")
    add_selector_flags(p)
    add_config_flags(p, BestOfNConfig, skip=("seed",))  # --seed is a model flag
    p.add_argument("--output-dir", default="laser_runs/best_of_n")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> dict:
    from laser_rl.best_of_n import BestOfNConfig

    config = config_from_args(args.parser, BestOfNConfig, args)  # every ranking check lives in the dataclass
    check_selector_flags(args, *(selector_overrides(s) for s in args.strategies))
    records = load_records(args, "--data", args.data, ("prompt", "answer"))
    return rank(args, config, records)


def selector_overrides(strategy: str) -> dict:
    # run_best_of_n hands the bandit its reward (config.feedback) as raw_rewards: the selector's own signal is
    # unused, so it is the cheapest one (the default, consensus, would audit prompts with every RM).
    return {"feedback": "spread", "baseline": None if strategy == "laser" else strategy}


def rank(args: argparse.Namespace, config, records: list[dict]) -> dict:
    import torch

    from laser_rl.best_of_n import CachedArm, run_best_of_n

    strategies = list(dict.fromkeys(args.strategies))
    # One cache per RM, shared by all strategies: the samples they rank are the same. First: a bad spec fails fast.
    rms = [CachedArm(rm) for rm in build_rms(args, args.reward_models)]
    policy, tokenizer = load_policy(args, args.policy)
    encoder = make_encoder(policy, args.proj_dim, args.seed)
    selectors = {s: make_selector(args, rms, encoder.dim, **selector_overrides(s)) for s in strategies}
    if "laser" in selectors:
        apply_warm_start(args, selectors["laser"], policy, tokenizer, encoder)

    torch.manual_seed(args.seed)
    result = run_best_of_n(policy, tokenizer, selectors, encoder, records, config)

    os.makedirs(args.output_dir, exist_ok=True)
    summary = {
        "metric": result.metric,
        "scores": result.scores,
        "by_domain": result.by_domain,
        "rm_passes": result.rm_passes,
        "arm_fractions": result.arm_fractions,
        "num_prompts": result.num_prompts,
        "num_truncated": result.num_truncated,
        "n": config.n,
        "feedback": config.feedback,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        for row in result.predictions:
            f.write(json.dumps(row) + "\n")
    if "laser" in selectors:  # the encoder's projection beside the bandit: a resume needs both
        state = {"selector": selectors["laser"].state_dict(), "encoder": encoder.state_dict()}
        torch.save(state, os.path.join(args.output_dir, "bandit.pt"))

    print(f"\nbest-of-{config.n} on {result.num_prompts} prompts, metric: {result.metric}")
    print(result.table())
    print("first_sample: no selection (sample 0); oracle: best of the n samples by the label (upper bound)")
    for name, fractions in result.arm_fractions.items():
        print(f"RM use, {name}: " + ", ".join(f"{a} {f:.2f}" for a, f in fractions.items()))
    if result.num_truncated:
        print(f"{result.num_truncated} of {result.num_prompts} prompts were truncated to the model's limit")
    print(f"wrote {args.output_dir}/results.json and predictions.jsonl")
    return summary
