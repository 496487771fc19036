"""`laser-rl best-of-n`: per prompt a bandit-chosen RM picks the best of n samples; no training.

    laser-rl best-of-n --policy /models/llama-3-8b --reward-models /rms/a /rms/b \\
        --data longbench_qa.jsonl --n 8 --strategies laser random mean --output-dir runs/bon

Data: JSONL with `prompt` and `answer` (a string or a list of accepted answers), optional `context`
(long-context QA: the metric is then token F1) and `domain`. Prompts longer than the model's limit
are truncated in the middle, and the count is reported. Every strategy answers the same samples.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from laser_rl import BASELINES
from laser_rl.cli.iterative_dpo import (
    add_model_args,
    add_selector_args,
    apply_warm_start,
    build_arms,
    check_common,
    load_policy,
    make_encoder,
    make_selector,
    resolve_device,
    resolve_dtype,
)

STRATEGIES = ("laser",) + BASELINES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("best-of-n", help="best-of-n answers ranked by a bandit-chosen RM, against random-RM and ensemble selection",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL with `prompt`, `answer`, optional `context` and `domain`")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["laser", "random", "mean"],
                   help="laser = the bandit; the others are the selector's baselines (mean/wco/uwo: score ensembles)")
    add_selector_args(p)
    p.add_argument("--feedback", choices=("nll", "verifier"), default="nll",
                   help="bandit reward: minus the per-token NLL of the chosen response (paper) or its task metric (needs labels)")
    p.add_argument("--metric", choices=("auto", "accuracy", "exact", "f1"), default="auto",
                   help="auto: token F1 when prompts carry a context (QA), else accuracy")
    p.add_argument("--template", default="{context}\n\n{prompt}", help="how context and prompt are joined")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per bandit step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's limit minus --max-new-tokens")
    p.add_argument("--output-dir", default="laser_runs/best_of_n")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> dict:
    from laser_rl.best_of_n import BestOfNConfig, CachedArm, run_best_of_n
    from laser_rl.iterative_dpo import load_jsonl

    check_common(args)
    for flag in ("n", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            args.parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature < 0:
        args.parser.error("--temperature must be >= 0")
    if "{prompt}" not in args.template:
        args.parser.error("--template must contain {prompt}")
    strategies = list(dict.fromkeys(args.strategies))
    records = load_jsonl(args.data, required=("prompt", "answer"))

    device = resolve_device(args.device)
    policy, tokenizer = load_policy(args.policy, device, resolve_dtype(args.dtype, device))
    # One cache per RM, shared by all strategies: the samples they rank are the same.
    arms = [CachedArm(a) for a in build_arms(args.reward_models, device)]
    encoder = make_encoder(policy, args.proj_dim, args.seed)
    selectors = {s: make_selector(args, arms, encoder, None if s == "laser" else s) for s in strategies}
    if "laser" in selectors:
        apply_warm_start(args, selectors["laser"], policy, tokenizer, encoder)

    config = BestOfNConfig(
        n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        batch_size=args.batch_size, gen_batch_size=args.batch_size, feedback=args.feedback, metric=args.metric,
        template=args.template, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed,
    )
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
        "n": args.n,
        "feedback": args.feedback,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        for row in result.predictions:
            f.write(json.dumps(row) + "\n")
    if "laser" in selectors:
        torch.save({"selector": selectors["laser"].state_dict(), "encoder": encoder.state_dict()}, os.path.join(args.output_dir, "bandit.pt"))

    print(f"\nbest-of-{args.n} on {result.num_prompts} prompts, metric: {result.metric}")
    print(result.table())
    print("first_sample: no selection (sample 0); oracle: best of the n samples by the label (upper bound)")
    for name, fractions in result.arm_fractions.items():
        print(f"RM use, {name}: " + ", ".join(f"{a} {f:.2f}" for a, f in fractions.items()))
    if result.num_truncated:
        print(f"{result.num_truncated} of {result.num_prompts} prompts were truncated to the model's limit")
    print(f"wrote {args.output_dir}/results.json and predictions.jsonl")
    return summary
