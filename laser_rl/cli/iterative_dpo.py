"""`laser-rl iterative-dpo`: the paper's regime, iterative DPO + NLL with a bandit-chosen reward model.

    laser-rl iterative-dpo --policy /models/llama-3-8b --reward-models /rms/a /rms/b implicit:/rms/c \\
        --data prompts.jsonl --iterations 2 --n 30 --lora-rank 16 --output-dir runs/idpo

Also holds the model-loading and selector flags the best-of-n and agreement subcommands share.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from collections import Counter, defaultdict

import torch

from laser_rl import BANDITS, BASELINES, RewardSelector
from laser_rl.arms import RewardArm, make_arm
from laser_rl.context import ContextEncoder

# --------------------------------------------------------------------------------------------------
# Shared flags and loaders
# --------------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser, policy_required: bool = True) -> None:
    p.add_argument("--policy", required=policy_required, help="local HF causal-LM directory" + _smollm2_help())
    p.add_argument("--reward-models", nargs="+", required=True, metavar="SPEC",
                   help="reward models (laser_rl.arms.make_arm specs): a local RM directory, implicit:<dir>, "
                        "module:function, http(s)://url (OpenRLHF serve_rm) or noise[:sigma]")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)


def add_selector_args(p: argparse.ArgumentParser, default_granularity: str = "prompt") -> None:
    p.add_argument("--bandit", choices=sorted(BANDITS), default="linucb")
    p.add_argument("--alpha", type=float, default=0.1, help="LinUCB exploration (paper: 0.1)")
    p.add_argument("--discount", type=float, default=1.0, help="< 1 forgets old bandit statistics (drifting rewards)")
    p.add_argument("--granularity", choices=("prompt", "batch"), default=default_granularity,
                   help="one RM per prompt (default) or per batch (the paper's code)")
    p.add_argument("--proj-dim", type=int, default=128,
                   help="random projection of the policy's hidden state for the bandit context (0: none)")
    p.add_argument("--warm-start", default=None, metavar="JSONL",
                   help="labeled preference set (prompt, chosen, rejected, optional domain) to initialize the bandit")
    p.add_argument("--warm-start-weight", type=float, default=1.0)


def _smollm2_help() -> str:
    return "; 'smollm2' loads the demo's packaged SmolLM2-135M" if _smollm2_available() else ""


def _smollm2_available() -> bool:
    try:
        return importlib.util.find_spec("laser_rl.demo.assets") is not None
    except ModuleNotFoundError:
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_policy(path: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a local directory, or the demo's SmolLM2 for 'smollm2'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == "smollm2" and _smollm2_available():
        from laser_rl.demo import assets

        path = str(assets.smollm2_dir())  # converted from the packaged GGUF once, then cached
    if not os.path.isdir(path):
        raise ValueError(f"policy {path!r} is not a local directory (hub ids cannot be downloaded here)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path!r} has no eos token: sampled responses could never end")
    return model.eval(), tokenizer


def build_arms(specs: list[str], device: torch.device) -> list[RewardArm]:
    """Arms from specs, their models moved to the run's device (make_arm loads them on the CPU)."""
    arms = [make_arm(s) for s in specs]
    for arm in arms:
        for attr in ("model", "ref_model"):
            module = getattr(arm, attr, None)
            if isinstance(module, torch.nn.Module):
                module.to(device)
    return arms


def make_encoder(model, proj_dim: int, seed: int) -> ContextEncoder:
    from laser_rl.iterative_dpo import hidden_size

    size = hidden_size(model)
    # Projecting up would only add noise dimensions: project only when it shrinks the context.
    return ContextEncoder(size, proj_dim=proj_dim if 0 < proj_dim < size else None, seed=seed)


def make_selector(args: argparse.Namespace, arms, encoder: ContextEncoder, baseline: str | None, feedback: str = "pair_loss") -> RewardSelector:
    return RewardSelector(
        arms,
        context_dim=encoder.dim,
        bandit=args.bandit,
        baseline=baseline,
        alpha=args.alpha,
        discount=args.discount,
        granularity=args.granularity,
        feedback=feedback,
        seed=args.seed,
    )


def apply_warm_start(args: argparse.Namespace, selector: RewardSelector, policy, tokenizer, encoder: ContextEncoder) -> None:
    from laser_rl.priors import load_preference_set, prior_accuracy_table, warm_start_from_preferences

    if not args.warm_start or selector.bandit is None or not selector.bandit.learns:
        return
    examples = load_preference_set(args.warm_start)
    rewards = warm_start_from_preferences(selector, examples, policy, tokenizer, encoder, weight=args.warm_start_weight)
    print(f"warm start from {len(examples)} labeled pairs: each RM's preference accuracy")
    print(prior_accuracy_table(rewards, selector.names, [e.get("domain") for e in examples]))


def check_common(args: argparse.Namespace) -> None:
    if args.proj_dim < 0:
        args.parser.error("--proj-dim must be >= 0")
    if not 0 < args.discount <= 1:
        args.parser.error("--discount must lie in (0, 1]")
    if args.warm_start_weight <= 0:
        args.parser.error("--warm-start-weight must be > 0")
    if args.warm_start and not os.path.isfile(args.warm_start):
        args.parser.error(f"--warm-start file {args.warm_start!r} does not exist")
    if not os.path.isfile(args.data):
        args.parser.error(f"--data file {args.data!r} does not exist")


# --------------------------------------------------------------------------------------------------
# iterative-dpo
# --------------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("iterative-dpo", help="the paper's iterative DPO + NLL training with a bandit-chosen RM per prompt",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--reference", default=None, help="frozen reference model directory (default: a fresh copy of --policy)")
    p.add_argument("--data", required=True, help="JSONL with `prompt`, optional `answer` and `domain`")
    p.add_argument("--eval-data", default=None, help="JSONL with `prompt` and `answer`: greedy metric before and after training")
    p.add_argument("--baseline", choices=BASELINES, default=None, help="a baseline instead of the bandit")
    add_selector_args(p, default_granularity="prompt")
    p.add_argument("--feedback", choices=("loss", "progress", "verifier", "spread"), default="loss",
                   help="bandit reward: -(DPO+NLL) (paper), loss drop from the update, RM-vs-verifier ranking accuracy "
                        "(needs `answer`), or score spread")
    p.add_argument("--metric", choices=("accuracy", "exact", "f1"), default="accuracy", help="for --feedback verifier and --eval-data")
    p.add_argument("--iterations", type=int, default=1, help="passes over the prompts")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per step (paper code: 16)")
    p.add_argument("--n", type=int, default=8, help="responses per prompt (paper: 30)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--nll-weight", type=float, default=1.0, help="weight of the NLL on the chosen response (0: DPO only)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters (needs peft) instead of all weights")
    p.add_argument("--max-pairs-per-prompt", type=int, default=None, help="default: best vs. every lower-ranked sample")
    p.add_argument("--micro-batch-prompts", type=int, default=4)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's limit minus --max-new-tokens")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--output-dir", default="laser_runs/iterative_dpo")
    p.add_argument("--save-policy", action="store_true", help="save the trained policy to OUTPUT_DIR/policy")
    p.set_defaults(run=run, parser=p)


def _lora(policy, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise SystemExit("--lora-rank needs the peft package (pip install peft)") from e
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(policy, config)


def run(args: argparse.Namespace) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    from laser_rl.best_of_n import greedy_metric
    from laser_rl.iterative_dpo import FEEDBACKS, IterativeDPOConfig, load_jsonl, run_iterative_dpo

    check_common(args)
    for flag in ("iterations", "batch_size", "max_new_tokens", "micro_batch_prompts"):
        if getattr(args, flag) < 1:
            args.parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.n < 2:
        args.parser.error("--n must be >= 2: pairs need two responses of the same prompt")
    if args.temperature <= 0:
        args.parser.error("--temperature must be > 0 (greedy decoding gives n identical responses)")
    if args.lora_rank < 0 or (args.max_pairs_per_prompt is not None and args.max_pairs_per_prompt < 1):
        args.parser.error("--lora-rank must be >= 0 and --max-pairs-per-prompt >= 1")
    records = load_jsonl(args.data, required=("prompt",))
    if args.feedback == "verifier" and any(r.get("answer") is None for r in records):
        args.parser.error("--feedback verifier needs an `answer` on every prompt")
    eval_records = load_jsonl(args.eval_data, required=("prompt", "answer")) if args.eval_data else None

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, tokenizer = load_policy(args.policy, device, dtype)
    reference, _ = load_policy(args.reference or args.policy, device, dtype)
    reference.requires_grad_(False)
    arms = build_arms(args.reward_models, device)
    encoder = make_encoder(policy, args.proj_dim, args.seed)
    selector = make_selector(args, arms, encoder, args.baseline, FEEDBACKS[args.feedback])
    apply_warm_start(args, selector, policy, tokenizer, encoder)
    if args.lora_rank:
        policy = _lora(policy, args.lora_rank)

    config = IterativeDPOConfig(
        iterations=args.iterations, batch_size=args.batch_size, n_samples=args.n, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, beta=args.beta, nll_weight=args.nll_weight, lr=args.lr,
        max_pairs_per_prompt=args.max_pairs_per_prompt, micro_batch_prompts=args.micro_batch_prompts,
        feedback=args.feedback, metric=args.metric, max_prompt_tokens=args.max_prompt_tokens,
        max_steps=args.max_steps, seed=args.seed,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    before = None
    if eval_records:
        before = greedy_metric(policy, tokenizer, eval_records, args.metric, args.max_new_tokens)
        print(f"eval {args.metric} before training: {before:.4f}")

    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "w")
    usage: dict[str, Counter] = defaultdict(Counter)

    def log(step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                writer.add_scalar(key, value, step)
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()

    def on_step(step: int, result) -> None:
        for arm in result.arms.tolist():
            usage["all"][selector.names[arm] if arm >= 0 else "ensemble"] += 1

    try:
        history = run_iterative_dpo(policy, reference, tokenizer, selector, encoder, records, config, log=log, on_step=on_step)
    finally:
        writer.close()
        metrics_file.close()

    torch.save({"selector": selector.state_dict(), "encoder": encoder.state_dict()}, os.path.join(args.output_dir, "bandit.pt"))
    summary = {
        "steps": len(history),
        "first_loss": _finite_or_none(history[0]["train/loss"]),
        "last_loss": _finite_or_none(history[-1]["train/loss"]),
        "arm_usage": {name: count / sum(usage["all"].values()) for name, count in sorted(usage["all"].items())},
        "rm_passes_total": selector.rm_passes_total,
    }
    if eval_records:
        after = greedy_metric(policy, tokenizer, eval_records, args.metric, args.max_new_tokens)
        summary.update({f"eval_{args.metric}_before": before, f"eval_{args.metric}_after": after})
        print(f"eval {args.metric} after training: {after:.4f} (before: {before:.4f})")
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
