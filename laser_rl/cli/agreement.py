"""`laser-rl agreement`: how often K reward models order response pairs the same way, as a heatmap.

    laser-rl agreement --reward-models /rms/a /rms/b implicit:/rms/c --data pairs.jsonl --output-dir runs/agree
    laser-rl agreement --reward-models ... --data prompts.jsonl --policy /models/llama --n 4

Data: JSONL with `prompt` and, per row, either `responses` (a list, >= 2, same length on every row),
or `chosen` and `rejected` (then each RM's accuracy on those labels is reported too), or neither:
then --policy samples --n responses per prompt. Optional `domain` gives one matrix per domain.
"""

from __future__ import annotations

import argparse
import json
import os

from laser_rl.cli.common import RM_SPECS, build_rms, check_file, load_policy, load_records

HELP = "pairwise agreement of reward models on response pairs (matrix + heatmap PNG)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agreement", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward-models", nargs="+", required=True, metavar="SPEC", help="two or more " + RM_SPECS)
    p.add_argument("--data", required=True, help="JSONL with `prompt` and `responses`, or `chosen`+`rejected`, or only `prompt`")
    p.add_argument("--policy", default=None, help="local causal-LM directory to sample responses for rows that have none")
    p.add_argument("--n", type=int, default=4, help="responses to sample per prompt with --policy")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="laser_runs/agreement")
    p.set_defaults(run=run, parser=p)


def _responses(rows: list[dict]) -> tuple[str, list[list[str]] | None]:
    """Which kind of data this is: 'responses', 'pairs' (chosen, rejected) or 'prompts' (sample them)."""
    if all(r.get("responses") is not None for r in rows):
        lists = [[str(x) for x in r["responses"]] for r in rows]
        if any(len(x) < 2 for x in lists) or len({len(x) for x in lists}) != 1:
            raise ValueError("every row's `responses` must hold the same number (>= 2) of responses")
        return "responses", lists
    if all(r.get("chosen") is not None and r.get("rejected") is not None for r in rows):
        return "pairs", [[str(r["chosen"]), str(r["rejected"])] for r in rows]
    if any(r.get("responses") is not None or r.get("chosen") is not None for r in rows):
        raise ValueError("mixed data: give `responses` on every row, or `chosen` and `rejected` on every row, or neither")
    return "prompts", None


def run(args: argparse.Namespace) -> dict:
    parser = args.parser
    if len(args.reward_models) < 2:
        parser.error("--reward-models needs at least two reward models to compare")
    if args.n < 2 or args.max_new_tokens < 1:
        parser.error("--n must be >= 2 and --max-new-tokens >= 1")
    check_file(parser, "--data", args.data)
    rows = load_records(args, "--data", args.data, ("prompt",))
    try:
        kind, responses = _responses(rows)
    except ValueError as e:
        parser.error(f"--data: {e}")
    if kind == "prompts" and not args.policy:
        parser.error("--data has no `responses` or `chosen`/`rejected`: give --policy to sample them")
    return compare(args, rows, kind, responses)


def compare(args: argparse.Namespace, rows: list[dict], kind: str, responses: list[list[str]] | None) -> dict:
    import torch

    from laser_rl.agreement import plot_agreement, rm_agreement, save_agreement
    from laser_rl.lm import sample

    prompts = [str(r["prompt"]) for r in rows]
    if kind == "prompts":
        torch.manual_seed(args.seed)
        policy, tokenizer = load_policy(args, args.policy)
        rollout = sample(policy, tokenizer, prompts, args.n, args.max_new_tokens, args.temperature)
        prompts, responses = rollout.prompts, rollout.grouped()
        del policy
    domains = [r.get("domain") for r in rows]
    labels = [r.get("answer") for r in rows]
    rms = build_rms(args, args.reward_models)  # after sampling, with the policy freed: never both in memory
    result = rm_agreement(
        rms, prompts, responses,
        domains=domains if any(d is not None for d in domains) else None,
        labels=labels if all(l is not None for l in labels) else None,
        preferred_first=kind == "pairs",
    )

    os.makedirs(args.output_dir, exist_ok=True)
    png, js = os.path.join(args.output_dir, "agreement.png"), os.path.join(args.output_dir, "agreement.json")
    plot_agreement(result, png)
    save_agreement(result, js)
    if kind == "prompts":  # keep the sampled responses: the matrix can be recomputed without sampling again
        with open(os.path.join(args.output_dir, "responses.jsonl"), "w") as f:
            for row, p, rs in zip(rows, prompts, responses):
                f.write(json.dumps({**{k: v for k, v in row.items() if k != "prompt"}, "prompt": p, "responses": rs}) + "\n")
    print(f"\nfraction of within-prompt response pairs two RMs order the same way (ties are an order too)\n")
    print(result.format())
    print(f"\nwrote {png} and {js}")
    return result.to_json()
