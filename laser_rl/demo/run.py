"""The demo's loop: LASeR-GRPO (or a baseline) on SmolLM2 over three reasoning-gym domains, on the CPU.

Per step, for each method, through the same RewardSelector calls as the OpenRLHF path:
    rollout  = sample(policy, prompts, n)                              # n responses per prompt
    contexts = encoder(rollout.context_hidden)                         # the paper's context: last prompt token
    arms     = selector.select(contexts, domains)                      # one RM per prompt
    rewards  = selector.score(prompts, responses, arms per sample, reference answers)
    GRPO update on rewards (OpenRLHF PolicyLoss + KL)                  # grpo.py
    selector.feedback(contexts, arms, <signal inputs>)                 # the bandit learns
    log selector.metrics()

Before training, a probe scores the untrained policy's samples with every arm and measures each
arm's accuracy per domain (pairwise agreement with reasoning-gym's verifier), so the run can say
whether the bandit ended up on the arm that is really best for each domain.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from laser_rl.context import ContextEncoder
from laser_rl.demo.arms import ARM_NAMES, build_arms
from laser_rl.demo.grpo import GRPOConfig, GRPOTrainer, sample
from laser_rl.demo.tasks import DOMAINS, Task, build_tasks
from laser_rl.feedback import verifier_agreement
from laser_rl.selector import RewardSelector

METHODS = ("laser", "mean", "random", "single")
METHOD_LABELS = {
    "laser": "LASeR (LinUCB)",
    "mean": "mean ensemble",
    "random": "random RM",
    "single": "best single RM",
}


@dataclass
class DemoConfig:
    steps: int = 32
    prompts_per_domain: int = 2  # per step; every step sees every domain
    samples: int = 8  # n responses per prompt (the GRPO group); prompts are encoded once, so n is cheap
    max_new_tokens: int = 12
    temperature: float = 0.8
    arms: tuple[str, ...] = ARM_NAMES
    feedback: str = "verifier"
    bandit: str = "linucb"
    # LinUCB exploration and ridge, chosen with benchmarks/demo_bandit_replay.py (docs/demo.md): with per-prompt
    # rewards this noisy (agreement over 8 samples) the paper's alpha = 0.1 locks onto an arm after a few
    # unlucky early rewards; more exploration recovers, at the price of more calls to the noise arm.
    alpha: float = 0.6
    lam: float = 1.0
    proj_dim: int | None = 16
    train_per_domain: int = 64
    eval_per_domain: int = 24
    probe_prompts: int = 16  # per chunk and domain, for the per-arm accuracy probe (and the context center)
    probe_min_mixed: int = 24  # prompts with both right and wrong samples the probe wants per domain
    warmup_fraction: float = 0.25  # arm shares are reported after this part of the run
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train_layers: int = 8  # top transformer blocks trained (plus the final norm); the rest stays frozen
    seed: int = 0
    threads: int | None = None
    output_dir: str = "laser_runs/demo"

    @property
    def warmup_steps(self) -> int:
        return int(self.steps * self.warmup_fraction)


# ------------------------------------------------------------------------------------------------
class DemoAssets:
    """What every method shares: the frozen reference policy, the tokenizer, the tasks, the loaded arms."""

    def __init__(self, config: DemoConfig, verbose: bool = True):
        from laser_rl.demo.assets import load_policy

        self.config = config
        self.reference, self.tokenizer = load_policy(verbose=verbose)
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.tasks = build_tasks(DOMAINS, config.train_per_domain, config.eval_per_domain, seed=config.seed)
        self.arm_list = build_arms(config.arms, self.reference, self.tokenizer, seed=config.seed)
        # Subtracted from every prompt's hidden state before the ContextEncoder. The untrained policy's hidden
        # states share one large component (cosine ~0.9 across domains); without it the domains differ only in
        # a small residual, which a ridge model with few observations learns slowly. Set by the probe.
        self.context_center: torch.Tensor | None = None
        self.probe_mixed: dict[str, int] = {}
        self.probe_agreement: dict[str, dict[str, torch.Tensor]] = {}  # domain -> arm -> agreement per probe prompt

    def arms(self, seed: int):
        """The arms for one method: the same models, a freshly seeded noise arm (same draws for every method)."""
        out = []
        for arm in self.arm_list:
            if hasattr(arm, "generator"):
                arm = copy.copy(arm)
                arm.generator = torch.Generator().manual_seed(seed + 1)
            out.append(arm)
        return out

    def new_policy(self):
        policy = copy.deepcopy(self.reference)
        for p in policy.parameters():
            p.requires_grad_(False)
        blocks = policy.model.layers
        for block in blocks[len(blocks) - self.config.train_layers :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in policy.model.norm.parameters():
            p.requires_grad_(True)
        return policy.eval()


# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy, tokenizer, tasks: dict[str, list[Task]], max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy per domain on the held-out prompts, scored by reasoning-gym's verifiers."""
    acc = {}
    for domain, items in tasks.items():
        rollout = sample(policy, tokenizer, [t.prompt for t in items], 1, max_new_tokens, do_sample=False)
        acc[domain] = sum(t.correct(r) for t, r in zip(items, rollout.responses)) / len(items)
    return acc


@torch.no_grad()
def label_and_score(tasks: list[Task], rollout, arms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Verifier labels [P, n] of a rollout of `tasks` (rollout.n samples each) and every arm's scores [P, n]."""
    n = rollout.n
    flat = [tasks[i // n] for i in range(len(rollout.responses))]
    correct = torch.tensor([t.correct(r) for t, r in zip(flat, rollout.responses)]).reshape(-1, n)
    prompts, answers = [t.prompt for t in flat], [t.answer for t in flat]
    return correct, {arm.name: arm.score(prompts, rollout.responses, answers).reshape(-1, n) for arm in arms}


@torch.no_grad()
def probe_arm_accuracy(assets: DemoAssets, policy, seed: int) -> dict[str, dict[str, float]]:
    """Each arm's accuracy per domain: pairwise agreement with the verifier on samples of the policy.

    Over pairs (correct, wrong) of samples of one prompt, the fraction the arm ranks the right way round
    (ties count half; 0.5 = blind or random), averaged over prompts. Training prompts are drawn in chunks of
    probe_prompts until probe_min_mixed prompts per domain have both right and wrong samples (or the
    training pool runs out): a domain the policy rarely gets right needs more prompts for the same precision.
    The mean of the first chunk's hidden states becomes the bandit's context center (assets.context_center).
    """
    cfg = assets.config
    torch.manual_seed(seed + 7)
    arms = assets.arms(seed + 1000)  # its own noise draws: the probe must not shift the runs' noise
    n = max(cfg.samples, 4)
    out: dict[str, dict[str, float]] = {a.name: {} for a in arms}
    hidden = []
    for domain in DOMAINS:
        pool = assets.tasks.train[domain]
        per_arm: dict[str, list[torch.Tensor]] = {a.name: [] for a in arms}
        mixed = 0
        for start in range(0, len(pool), cfg.probe_prompts):
            tasks = pool[start : start + cfg.probe_prompts]
            rollout = sample(policy, assets.tokenizer, [t.prompt for t in tasks], n, cfg.max_new_tokens, cfg.temperature)
            if start == 0:
                hidden.append(rollout.context_hidden)
            correct, scores = label_and_score(tasks, rollout, arms)
            for name, arm_scores in scores.items():
                per_arm[name].append(verifier_agreement(arm_scores, correct))
            mixed += int((correct.any(1) & ~correct.all(1)).sum())
            if mixed >= cfg.probe_min_mixed:
                break
        for name, parts in per_arm.items():
            agreement = torch.cat(parts)
            out[name][domain] = float(agreement.nanmean()) if torch.isfinite(agreement).any() else math.nan
            assets.probe_agreement.setdefault(domain, {})[name] = agreement
        assets.probe_mixed[domain] = mixed
    assets.context_center = torch.cat(hidden).mean(0)
    return out


def best_arm_per_domain(accuracy: dict[str, dict[str, float]]) -> dict[str, str]:
    return {d: max(accuracy, key=lambda a: -1.0 if math.isnan(accuracy[a][d]) else accuracy[a][d]) for d in DOMAINS}


def tied_with_best(agreement: dict[str, dict[str, torch.Tensor]], z: float = 2.0) -> dict[str, list[str]]:
    """Per domain, the most accurate arm and every arm the probe cannot tell apart from it.

    Paired test on the probe prompts both arms scored: arm k ties with the best when the mean per-prompt
    agreement gap is below z standard errors. "Most accurate" is only known up to the probe's error.
    """
    out = {}
    for domain, per_arm in agreement.items():
        means = {a: float(v.nanmean()) if torch.isfinite(v).any() else -1.0 for a, v in per_arm.items()}
        best = max(means, key=means.get)
        tied = [best]
        for arm, values in per_arm.items():
            if arm == best:
                continue
            gap = per_arm[best] - values
            gap = gap[torch.isfinite(gap)]
            if len(gap) >= 2:
                se = float(gap.std()) / math.sqrt(len(gap))
                if float(gap.mean()) <= z * se:
                    tied.append(arm)
        out[domain] = tied
    return out


def best_single_arm(accuracy: dict[str, dict[str, float]]) -> str:
    """The single RM a practitioner would pick: best mean accuracy over the domains (nan counts 0.5)."""
    return max(accuracy, key=lambda a: sum(0.5 if math.isnan(v) else v for v in accuracy[a].values()))


# ------------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    method: str
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    rm_passes: int
    wall_time: float
    arm_counts: dict[str, dict[str, int]]  # domain -> arm -> prompts given to it after warm-up
    arm_history: dict[str, list[list[float]]]  # domain -> per step, fraction of its prompts per arm
    train_accuracy: dict[str, float]  # mean verifier accuracy of the training samples, per domain
    single_arm: str | None = None
    cpu_time: float = 0.0  # process CPU seconds (all threads): on a shared machine, cpu_time / threads bounds the idle wall time

    def most_chosen(self) -> dict[str, str]:
        return {d: max(c, key=c.get) for d, c in self.arm_counts.items()}

    def share(self, arm: str) -> float:
        total = sum(sum(c.values()) for c in self.arm_counts.values())
        return sum(c.get(arm, 0) for c in self.arm_counts.values()) / max(total, 1)


def _make_selector(method: str, arms, context_dim: int, cfg: DemoConfig, single_arm: int) -> RewardSelector:
    common = {"feedback": cfg.feedback, "normalize_scores": True, "seed": cfg.seed}
    if method == "laser":
        return RewardSelector(arms, context_dim=context_dim, bandit=cfg.bandit, alpha=cfg.alpha, lam=cfg.lam, **common)
    if method == "single":
        return RewardSelector(arms, baseline="single", single_arm=single_arm, **common)
    if method in ("mean", "random"):
        return RewardSelector(arms, baseline=method, **common)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _feedback_inputs(feedback: str, scores, correct, old_logps, ref_logps, rollout, P: int, n: int) -> dict:
    mask = rollout.action_mask.float()
    if feedback == "verifier":
        return {"scores": scores.reshape(P, n), "correct": correct.reshape(P, n)}
    if feedback == "pair_loss":
        return {
            "scores": scores.reshape(P, n),
            "policy_logps": (old_logps * mask).sum(-1).reshape(P, n),
            "ref_logps": (ref_logps * mask).sum(-1).reshape(P, n),
            "response_lengths": rollout.response_lengths.clamp(min=1).reshape(P, n),
        }
    if feedback == "spread":
        return {"scores": scores.reshape(P, n)}
    raise ValueError(f"the demo supports feedback verifier, pair_loss or spread, not {feedback!r}")


def run_method(
    method: str,
    assets: DemoAssets,
    eval_before: dict[str, float],
    single_arm: int = 0,
    writer=None,
    progress: bool = True,
) -> MethodResult:
    """One GRPO run with one reward-selection method; returns its evaluation, RM cost and arm usage."""
    from tqdm import tqdm

    cfg = assets.config
    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = assets.tokenizer
    policy = assets.new_policy()
    trainer = GRPOTrainer(policy, assets.reference, cfg.grpo)
    hidden = policy.config.hidden_size
    encoder = ContextEncoder(hidden, proj_dim=cfg.proj_dim, seed=cfg.seed)
    arms = assets.arms(cfg.seed)
    selector = _make_selector(method, arms, encoder.dim, cfg, single_arm)
    names = selector.names
    n = cfg.samples
    orders = {d: rng.sample(range(len(assets.tasks.train[d])), len(assets.tasks.train[d])) for d in DOMAINS}
    arm_counts = {d: {a: 0 for a in names} for d in DOMAINS}
    history = {d: [] for d in DOMAINS}
    train_correct = {d: [] for d in DOMAINS}

    bar = tqdm(range(cfg.steps), desc=f"laser-rl demo [{METHOD_LABELS[method]}]", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch: list[Task] = []
        for d in DOMAINS:
            pool, order = assets.tasks.train[d], orders[d]
            for j in range(cfg.prompts_per_domain):
                batch.append(pool[order[(step * cfg.prompts_per_domain + j) % len(order)]])
        questions = [t.prompt for t in batch]
        domains = [t.domain for t in batch]
        P = len(batch)

        # The policy encodes each prompt once: the same forward gives the bandit's context (the last prompt
        # token's hidden state, laser_rl.context.pool_hidden_states) and the KV cache the n samples start from.
        rollout = sample(policy, tok, questions, n, cfg.max_new_tokens, cfg.temperature)
        hidden_states = rollout.context_hidden
        if assets.context_center is not None:
            hidden_states = hidden_states - assets.context_center
        contexts = encoder(hidden_states)
        chosen = selector.select(contexts, domains)
        flat = [batch[i // n] for i in range(P * n)]
        rewards = selector.score([t.prompt for t in flat], rollout.responses, chosen.repeat_interleave(n), [t.answer for t in flat])
        correct = torch.tensor([t.correct(r) for t, r in zip(flat, rollout.responses)])
        ref_logps = trainer.reference_logprobs(rollout)
        old_logps, train_stats = trainer.step(rollout, rewards, ref_logps)
        normalized = selector.feedback(
            contexts, chosen, **_feedback_inputs(cfg.feedback, rewards, correct, old_logps, ref_logps, rollout, P, n)
        )

        metrics = selector.metrics()
        for d in DOMAINS:
            rows = [i for i, x in enumerate(domains) if x == d]
            fractions = [metrics.get(f"laser/domain/{d}/arm_frac/{a}", 0.0) for a in names]
            history[d].append(fractions)
            if step >= cfg.warmup_steps and not selector.ensemble:
                for i in rows:
                    arm_counts[d][names[int(chosen[i])]] += 1
            acc_d = correct.reshape(P, n)[rows].float().mean().item()
            train_correct[d].append(acc_d)
            metrics[f"demo/train_accuracy/{d}"] = acc_d
        metrics.update({f"grpo/{k}": v for k, v in train_stats.items()})
        metrics["grpo/reward_mean"] = float(rewards.mean())
        if torch.isfinite(normalized).any():
            metrics["demo/bandit_reward_norm"] = float(normalized[torch.isfinite(normalized)].mean())
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"{method}/{key}", value, step)
        bar.set_postfix(rm_passes=selector.rm_passes_total, train_acc=f"{correct.float().mean():.2f}")
    bar.close()

    eval_after = evaluate(policy, tok, assets.tasks.eval, cfg.max_new_tokens)
    if writer is not None:
        for d in DOMAINS:
            writer.add_scalar(f"{method}/demo/eval_accuracy/{d}", eval_before[d], 0)
            writer.add_scalar(f"{method}/demo/eval_accuracy/{d}", eval_after[d], cfg.steps)
        writer.flush()
    return MethodResult(
        method=method,
        eval_before=dict(eval_before),
        eval_after=eval_after,
        rm_passes=selector.rm_passes_total,
        wall_time=time.time() - start,
        arm_counts=arm_counts,
        arm_history=history,
        train_accuracy={d: sum(v) / len(v) for d, v in train_correct.items()},
        single_arm=names[single_arm] if method == "single" else None,
        cpu_time=time.process_time() - cpu_start,
    )


# ------------------------------------------------------------------------------------------------
def plot_arm_choice(history: dict[str, list[list[float]]], names: list[str], path: str, window: int = 5) -> None:
    """One panel per domain: the share of its prompts given to each arm, a moving average over `window` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(history), figsize=(4.2 * len(history), 3.4), sharey=True, squeeze=False)
    for ax, (domain, rows) in zip(axes[0], history.items()):
        x = torch.tensor(rows, dtype=torch.float64)  # [steps, K]
        smooth = torch.stack([x[max(0, i - window + 1) : i + 1].mean(0) for i in range(len(rows))])
        ax.stackplot(range(1, len(rows) + 1), smooth.T.numpy(), labels=names)
        ax.set_title(f"{domain} prompts")
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 1)
        ax.set_xlim(1, max(len(rows), 2))
    axes[0][0].set_ylabel(f"share of prompts per RM ({window}-step mean)")
    axes[0][-1].legend(loc="lower right", fontsize=8, framealpha=0.8)
    fig.suptitle("Which reward model LASeR chose, per domain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.2f}"


def arm_table(accuracy: dict[str, dict[str, float]], result: MethodResult | None = None, ties: dict | None = None) -> str:
    """Per-arm accuracy per domain (and, for LASeR, its share of each domain's prompts after warm-up)."""
    lines = ["RM accuracy per domain (pairwise agreement with the verifier on the untrained policy's samples; 0.5 = blind)"]
    head = f"{'arm':<12}" + "".join(f"{d:>12}" for d in DOMAINS)
    if result is not None:
        head += "   | LASeR's share of each domain's prompts after warm-up"
    lines.append(head)
    for arm, per in accuracy.items():
        row = f"{arm:<12}" + "".join(f"{_fmt(per[d]):>12}" for d in DOMAINS)
        if result is not None:
            shares = []
            for d in DOMAINS:
                total = sum(result.arm_counts[d].values())
                shares.append(f"{result.arm_counts[d].get(arm, 0) / max(total, 1):5.2f}")
            row += "   | " + "  ".join(f"{s:>10}" for s in shares)
        lines.append(row)
    best = best_arm_per_domain(accuracy)
    def _best(d):
        others = [a for a in (ties or {}).get(d, [best[d]]) if a != best[d]]
        return best[d] + (f" (tied within the probe's error: {', '.join(others)})" if others else "")
    lines.append("most accurate: " + "; ".join(f"{d} -> {_best(d)}" for d in DOMAINS))
    if result is not None:
        chosen = result.most_chosen()
        lines.append("most chosen:   " + "; ".join(f"{d} -> {chosen[d]}" for d in DOMAINS))
    return "\n".join(lines)


def results_table(results: list[MethodResult], ensemble_passes: int | None = None) -> str:
    """Accuracy per domain (untrained -> trained), RM passes and wall time per method."""
    cols = "".join(f"{d:>17}" for d in DOMAINS)
    lines = [f"{'method':<24}{cols}{'mean':>17}{'RM passes':>12}{'vs ensemble':>13}{'wall':>8}"]
    for r in results:
        label = METHOD_LABELS[r.method] + (f" ({r.single_arm})" if r.single_arm else "")
        cells = "".join(f"{r.eval_before[d]:>8.2f} -> {r.eval_after[d]:.2f}" for d in DOMAINS)
        mb = sum(r.eval_before.values()) / len(DOMAINS)
        ma = sum(r.eval_after.values()) / len(DOMAINS)
        ratio = f"{r.rm_passes / ensemble_passes:>13.2f}" if ensemble_passes else f"{'':>13}"
        lines.append(f"{label:<24}{cells}{mb:>8.2f} -> {ma:.2f}{r.rm_passes:>12d}{ratio}{r.wall_time:>7.0f}s")
    lines.append("accuracy: greedy answers on held-out prompts, scored by reasoning-gym; untrained -> after GRPO")
    return "\n".join(lines)


def verdict(results: list[MethodResult]) -> str:
    """Plain words: did LASeR beat each baseline on mean held-out accuracy after training?"""
    by = {r.method: r for r in results}
    if "laser" not in by:
        return ""
    def mean(r: MethodResult) -> float:
        return sum(r.eval_after.values()) / len(DOMAINS)

    laser = mean(by["laser"])
    out = []
    for r in results:
        if r.method == "laser":
            continue
        other = mean(r)
        word = "beats" if laser > other + 1e-9 else "ties" if abs(laser - other) <= 1e-9 else "does NOT beat"
        out.append(f"LASeR {word} {METHOD_LABELS[r.method]} on mean accuracy ({laser:.2f} vs {other:.2f})")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
def run_demo(config: DemoConfig, methods=("laser",), progress: bool = True, verbose: bool = True) -> dict:
    """Run the methods with the same seed and budget; write TensorBoard logs, the arm-choice PNG and a table."""
    from torch.utils.tensorboard import SummaryWriter

    if config.threads:
        torch.set_num_threads(config.threads)
    os.makedirs(config.output_dir, exist_ok=True)
    start, cpu_start = time.time(), time.process_time()
    assets = DemoAssets(config, verbose=verbose)
    setup = time.time() - start
    eval_before = evaluate(assets.reference, assets.tokenizer, assets.tasks.eval, config.max_new_tokens)
    accuracy = probe_arm_accuracy(assets, assets.reference, config.seed)
    names = [a.name for a in assets.arm_list]
    single = best_single_arm(accuracy)
    say = functools.partial(print, flush=True) if verbose else (lambda *a, **k: None)
    say("untrained policy, held-out accuracy: " + ", ".join(f"{d} {eval_before[d]:.2f}" for d in DOMAINS))
    ties = tied_with_best(assets.probe_agreement)
    say(arm_table(accuracy, ties=ties))
    say("probe: prompts with both right and wrong samples per domain: "
        + ", ".join(f"{d} {assets.probe_mixed.get(d, 0)}" for d in DOMAINS))

    writer = SummaryWriter(os.path.join(config.output_dir, "tensorboard"))
    for arm, per in accuracy.items():
        for d, v in per.items():
            if not math.isnan(v):
                writer.add_scalar(f"probe/arm_accuracy/{d}/{arm}", v, 0)
    results = []
    for method in methods:
        results.append(run_method(method, assets, eval_before, names.index(single), writer, progress))
    writer.close()

    by = {r.method: r for r in results}
    plot_path = None
    if "laser" in by:
        plot_path = os.path.join(config.output_dir, "arm_choice_by_domain.png")
        plot_arm_choice(by["laser"].arm_history, names, plot_path)
    ensemble_passes = by["mean"].rm_passes if "mean" in by else None
    total = time.time() - start

    lines = [""]
    if "laser" in by:
        lines.append(arm_table(accuracy, by["laser"], ties=ties))
        lines.append(f"noise arm's share after warm-up (steps {config.warmup_steps + 1}-{config.steps}): "
                     f"{by['laser'].share('noise') if 'noise' in names else float('nan'):.2f}")
        lines.append("")
    lines.append(results_table(results, ensemble_passes))
    if ensemble_passes is None and "laser" in by:
        per_sample = sum(a.passes_per_sample for a in assets.arm_list)
        samples = config.steps * config.prompts_per_domain * len(DOMAINS) * config.samples
        lines.append(f"a mean ensemble would spend {per_sample * samples} RM passes on the same samples "
                     f"(LASeR: {by['laser'].rm_passes / (per_sample * samples):.2f} of that; 1/K = {1 / len(names):.2f})")
    v = verdict(results)
    if v:
        lines.append(v)
    lines.append(
        f"setup {setup:.0f}s, total wall time {total:.0f}s, CPU time {time.process_time() - cpu_start:.0f}s "
        f"({torch.get_num_threads()} threads)"
    )
    if plot_path:
        lines.append(f"wrote {plot_path}")
    lines.append(f"TensorBoard logs: {os.path.join(config.output_dir, 'tensorboard')}")
    text = "\n".join(lines)
    say(text)

    summary = {
        "config": {k: v for k, v in asdict(config).items()},
        "arm_accuracy": accuracy,
        "best_arm_per_domain": best_arm_per_domain(accuracy),
        "tied_with_best": ties,
        "probe_mixed_prompts": dict(assets.probe_mixed),
        "single_arm": single,
        "results": [asdict(r) | {"most_chosen": r.most_chosen()} for r in results],
        "total_wall_time": total,
        "table": text,
    }
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return {"accuracy": accuracy, "ties": ties, "results": by, "table": text, "plot": plot_path, "summary": summary}
