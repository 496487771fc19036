"""`laser-rl iterative-dpo`: the paper's regime, iterative DPO + NLL with a bandit-chosen reward model.

    laser-rl iterative-dpo --policy /models/llama-3-8b --reward-models /rms/a /rms/b implicit:/rms/c \\
        --data prompts.jsonl --iterations 2 --n 30 --lora-rank 16 --output-dir runs/idpo

Each step: sample --n responses per prompt, the bandit picks one RM per prompt, that RM ranks the prompt's samples,
the policy trains on DPO + NLL pairs (best vs. lower-ranked, within a prompt) against a frozen reference, and the
bandit learns from --feedback. The training flags are the fields of laser_rl.iterative_dpo.IterativeDPOConfig.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter

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
    require,
)

HELP = "the paper's iterative DPO + NLL training with a bandit-chosen RM per prompt"
FLAGS = {"n_samples": "--n"}  # the paper's n


def add_parser(sub: argparse._SubParsersAction) -> None:
    from laser_rl.iterative_dpo import IterativeDPOConfig
    from laser_rl.selector import BASELINES

    p = sub.add_parser("iterative-dpo", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--reference", default=None, help="frozen reference model directory (default: a fresh copy of --policy)")
    p.add_argument("--data", required=True, help="JSONL with `prompt`, optional `answer` and `domain`")
    p.add_argument("--eval-data", default=None, help="JSONL with `prompt` and `answer`: greedy metric before and after training")
    p.add_argument("--baseline", choices=BASELINES, default=None, help="a baseline instead of the bandit")
    add_selector_flags(p)
    add_config_flags(p, IterativeDPOConfig, flags=FLAGS, skip=("seed",))  # --seed is a model flag
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters (needs peft) instead of all weights")
    p.add_argument("--output-dir", default="laser_runs/iterative_dpo")
    p.add_argument("--save-policy", action="store_true", help="save the trained policy to OUTPUT_DIR/policy")
    p.set_defaults(run=run, parser=p)


def _lora(policy, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(policy, config)


def run(args: argparse.Namespace) -> dict:
    from laser_rl.iterative_dpo import IterativeDPOConfig

    parser = args.parser
    config = config_from_args(parser, IterativeDPOConfig, args)  # every training check lives in the dataclass
    check_selector_flags(args)
    if args.lora_rank < 0:
        parser.error("--lora-rank must be >= 0")
    if args.lora_rank:
        require(parser, ["peft"], "--lora-rank")
    require(parser, ["tensorboard"], "laser-rl iterative-dpo")
    records = load_records(args, "--data", args.data, ("prompt",))
    if config.feedback == "verifier" and all(r.get("answer") is None for r in records):
        parser.error("--feedback verifier needs an `answer` on at least one row of --data (rows without one are skipped)")
    eval_records = load_records(args, "--eval-data", args.eval_data, ("prompt", "answer")) if args.eval_data else None
    return train(args, config, records, eval_records)


def train(args: argparse.Namespace, config, records: list[dict], eval_records: list[dict] | None) -> dict:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from laser_rl.best_of_n import greedy_metric
    from laser_rl.iterative_dpo import run_iterative_dpo

    rms = build_rms(args, args.reward_models)  # first: a bad spec fails before the policy loads
    torch.manual_seed(args.seed)
    policy, tokenizer = load_policy(args, args.policy)
    reference, _ = load_policy(args, args.reference or args.policy, "--reference" if args.reference else "--policy")
    reference.requires_grad_(False)
    encoder = make_encoder(policy, args.proj_dim, args.seed)
    selector = make_selector(args, rms, encoder.dim)
    apply_warm_start(args, selector, policy, tokenizer, encoder)
    if args.lora_rank:
        policy = _lora(policy, args.lora_rank)

    os.makedirs(args.output_dir, exist_ok=True)
    before = None
    if eval_records:
        before = greedy_metric(policy, tokenizer, eval_records, config.metric, config.max_new_tokens)
        print(f"eval {config.metric} before training: {before:.4f}")

    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "w")
    usage: Counter = Counter()

    def log(step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                writer.add_scalar(key, value, step)
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()

    def on_step(step: int, result) -> None:
        for arm in result.arms.tolist():
            usage[selector.names[arm] if arm >= 0 else "ensemble"] += 1

    try:
        history = run_iterative_dpo(policy, reference, tokenizer, selector, encoder, records, config, log=log, on_step=on_step)
    finally:
        writer.close()
        metrics_file.close()

    # The encoder's projection is saved beside the bandit: a resume needs both (docs/paper_modes.md).
    torch.save({"selector": selector.state_dict(), "encoder": encoder.state_dict()}, os.path.join(args.output_dir, "bandit.pt"))
    summary = {
        "steps": len(history),
        "first_loss": _finite_or_none(history[0]["train/loss"]),
        "last_loss": _finite_or_none(history[-1]["train/loss"]),
        "arm_usage": {name: count / sum(usage.values()) for name, count in sorted(usage.items())},
        "rm_passes_total": selector.rm_passes_total,
    }
    if eval_records:
        after = greedy_metric(policy, tokenizer, eval_records, config.metric, config.max_new_tokens)
        summary.update({f"eval_{config.metric}_before": before, f"eval_{config.metric}_after": after})
        print(f"eval {config.metric} after training: {after:.4f} (before: {before:.4f})")
    if args.save_policy:
        model = policy.merge_and_unload() if args.lora_rank else policy
        model.save_pretrained(os.path.join(args.output_dir, "policy"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "policy"))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{len(history)} steps; loss {history[0]['train/loss']:.4f} -> {history[-1]['train/loss']:.4f}; "
          f"RM passes {selector.rm_passes_total}")
    print("RM usage: " + ", ".join(f"{name} {frac:.2f}" for name, frac in summary["arm_usage"].items()))
    print(f"wrote {args.output_dir}/metrics.jsonl, summary.json, bandit.pt and TensorBoard logs")
    return summary


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
