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
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch

from laser_rl.context import ContextEncoder
from laser_rl.demo.arms import POOLS, build_arms
from laser_rl.demo.grpo import GRPOConfig, GRPOTrainer, sample
from laser_rl.demo.tasks import DOMAINS, Task, build_tasks
from laser_rl.feedback import verifier_agreement
from laser_rl.selector import RewardSelector, check_audit_schedule, selector_from_flags

METHODS = ("laser", "mean", "random", "single")
METHOD_LABELS = {
    "laser": "LASeR (LinUCB)",
    "mean": "mean ensemble",
    "random": "random RM",
    "single": "best single RM",
}


@dataclass
class DemoConfig:
    steps: int = 32  # GRPO steps per method
    prompts_per_domain: int = 2  # per step; every step sees every domain
    samples: int = 8  # n responses per prompt (the GRPO group); prompts are encoded once, so n is cheap
    max_new_tokens: int = 12  # per sampled response (the answers are short)
    temperature: float = 0.8  # sampling temperature of the GRPO rollouts
    arms: tuple[str, ...] | None = None  # reward models from calculator,minilm,smollm2,noise,verbose; overrides the pool
    pool: str = "default"  # "default" (calculator,minilm,smollm2,noise) or "hard" (the hackable verbose replaces calculator)
    feedback: str = "verifier"  # bandit reward: RM agreement with the verifier labels, or pair_loss, spread, consensus, ...
    bandit: str = "linucb"  # linucb | thompson | epsilon_greedy | exp3 | ucb1
    audit_fraction: float | None = None  # consensus feedback: share of prompts every RM scores (None: the selector's, 0.03)
    audit_warmup_steps: int | None = None  # consensus: audit audit_warmup_fraction of prompts in the first steps (None: the selector's, 8)
    audit_warmup_fraction: float | None = None  # consensus: the share audited in those steps (None: the selector's, 0.4)
    # LinUCB exploration and ridge, chosen with benchmarks/demo_bandit_replay.py (docs/demo.md): with per-prompt
    # rewards this noisy (agreement over 8 samples) the paper's alpha = 0.1 locks onto an arm after a few
    # unlucky early rewards; more exploration recovers, at the price of more calls to the noise arm.
    alpha: float = 0.6  # LinUCB exploration (the paper: 0.1; these noisy rewards need more, docs/demo.md)
    lam: float = 1.0  # LinUCB ridge (as the paper's code)
    proj_dim: int | None = 16  # random projection of the policy's hidden state, the bandit's context dimension
    train_per_domain: int = 64  # training prompts per domain (the pool the steps draw from)
    eval_per_domain: int = 24  # held-out prompts per domain, answered greedily before and after training
    probe_prompts: int = 16  # per chunk and domain, for the per-arm accuracy probe (and the context center)
    probe_min_mixed: int = 24  # prompts with both right and wrong samples the probe wants per domain
    warmup_fraction: float = 0.25  # arm shares are reported after this part of the run
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train_layers: int = 8  # top transformer blocks trained (plus the final norm); the rest stays frozen
    seed: int = 0  # seeds sampling, the tasks, the noise arm and the bandit
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    output_dir: str = "laser_runs/demo"  # TensorBoard logs, the PNG and summary.json

    def __post_init__(self):
        from laser_rl.bandits import BANDITS
        from laser_rl.demo.arms import ALL_ARMS
        from laser_rl.feedback import FEEDBACK_SIGNALS

        for name in ("steps", "prompts_per_domain", "max_new_tokens", "train_per_domain", "eval_per_domain",
                     "probe_prompts", "probe_min_mixed", "train_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (GRPO normalizes rewards within each prompt's group), got {self.samples}")
        if self.temperature <= 0 or self.alpha < 0 or self.lam <= 0:
            raise ValueError(f"temperature must be > 0, alpha >= 0 and lam > 0; got {self.temperature}, {self.alpha}, {self.lam}")
        if self.arms is not None:
            arms = tuple(self.arms)
            if len(arms) < 2 or len(set(arms)) != len(arms) or any(a not in ALL_ARMS for a in arms):
                raise ValueError(f"arms takes 2 or more distinct names from {','.join(ALL_ARMS)}; got {','.join(arms)}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose from {sorted(POOLS)}")
        if self.feedback not in FEEDBACK_SIGNALS:
            raise ValueError(f"unknown feedback {self.feedback!r}; choose from {sorted(FEEDBACK_SIGNALS)}")
        check_feedback(self.feedback)  # a signal the demo cannot feed (progress) fails here, before anything loads
        if self.bandit not in BANDITS:
            raise ValueError(f"unknown bandit {self.bandit!r}; choose from {sorted(BANDITS)}")
        if not 0 <= self.warmup_fraction < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"warmup_fraction must lie in [0, 1) and threads be >= 1; got {self.warmup_fraction}, {self.threads}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1 or None, got {self.proj_dim}")
        check_audit_schedule(self.audit_fraction, self.audit_warmup_steps, self.audit_warmup_fraction)

    @property
    def warmup_steps(self) -> int:
        return int(self.steps * self.warmup_fraction)

    @property
    def arm_names(self) -> tuple[str, ...]:
        """The arms this run uses: `arms` when given, else the named pool's."""
        if self.arms is not None:
            return tuple(self.arms)
        if self.pool not in POOLS:
            raise ValueError(f"unknown arm pool {self.pool!r}; choose from {sorted(POOLS)}")
        return POOLS[self.pool]


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
        self.arm_list = build_arms(config.arm_names, self.reference, self.tokenizer, seed=config.seed)
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
@dataclass
class Evaluation:
    """Greedy answers on the held-out prompts: per-prompt correctness and answer length, per domain."""

    correct: dict[str, list[int]]  # domain -> 1/0 per held-out prompt (in the task order)
    length: dict[str, list[int]]  # domain -> characters of each greedy answer (the `verbose` arm's hack)

    @property
    def accuracy(self) -> dict[str, float]:
        return {d: sum(c) / len(c) for d, c in self.correct.items()}

    @property
    def mean_length(self) -> dict[str, float]:
        return {d: sum(n) / len(n) for d, n in self.length.items()}


@torch.no_grad()
def evaluate_detailed(
    policy, tokenizer, tasks: dict[str, list[Task]], max_new_tokens: int, progress: bool = False, chunk: int = 32
) -> Evaluation:
    """Greedy answers on the held-out prompts, scored by reasoning-gym's verifiers, in chunks (tqdm bar)."""
    from tqdm import tqdm

    correct, length = {}, {}
    bar = tqdm(total=sum(len(v) for v in tasks.values()), desc="held-out evaluation", unit="prompt",
               disable=not progress, dynamic_ncols=True, leave=False)
    for domain, items in tasks.items():
        correct[domain], length[domain] = [], []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            rollout = sample(policy, tokenizer, [t.prompt for t in part], 1, max_new_tokens, do_sample=False)
            correct[domain] += [int(t.correct(r)) for t, r in zip(part, rollout.responses)]
            length[domain] += [len(r.strip()) for r in rollout.responses]
            bar.update(len(part))
    bar.close()
    return Evaluation(correct, length)


def evaluate(policy, tokenizer, tasks: dict[str, list[Task]], max_new_tokens: int, progress: bool = False) -> dict[str, float]:
    """Greedy accuracy per domain on the held-out prompts, scored by reasoning-gym's verifiers."""
    return evaluate_detailed(policy, tokenizer, tasks, max_new_tokens, progress).accuracy


@torch.no_grad()
def label_and_score(tasks: list[Task], rollout, arms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Verifier labels [P, n] of a rollout of `tasks` (rollout.n samples each) and every arm's scores [P, n]."""
    n = rollout.n
    flat = [tasks[i // n] for i in range(len(rollout.responses))]
    correct = torch.tensor([t.correct(r) for t, r in zip(flat, rollout.responses)]).reshape(-1, n)
    prompts, answers = [t.prompt for t in flat], [t.answer for t in flat]
    return correct, {arm.name: arm.score(prompts, rollout.responses, answers).reshape(-1, n) for arm in arms}


@torch.no_grad()
def probe_arm_accuracy(assets: DemoAssets, policy, seed: int, progress: bool = False) -> dict[str, dict[str, float]]:
    """Each arm's accuracy per domain: pairwise agreement with the verifier on samples of the policy.

    Over pairs (correct, wrong) of samples of one prompt, the fraction the arm ranks the right way round
    (ties count half; 0.5 = blind or random), averaged over prompts. Training prompts are drawn in chunks of
    probe_prompts until probe_min_mixed prompts per domain have both right and wrong samples (or the
    training pool runs out): a domain the policy rarely gets right needs more prompts for the same precision.
    The mean of the first chunk's hidden states becomes the bandit's context center (assets.context_center).
    """
    from tqdm import tqdm

    cfg = assets.config
    torch.manual_seed(seed + 7)
    arms = assets.arms(seed + 1000)  # its own noise draws: the probe must not shift the runs' noise
    n = max(cfg.samples, 4)
    out: dict[str, dict[str, float]] = {a.name: {} for a in arms}
    hidden = []
    # Counts mixed prompts (the probe's stopping rule), not chunks: a domain ends when it has enough.
    bar = tqdm(total=cfg.probe_min_mixed * len(DOMAINS), desc="probe: every RM on the untrained policy's samples",
               unit="mixed prompt", disable=not progress, dynamic_ncols=True, leave=False)
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
            new = int((correct.any(1) & ~correct.all(1)).sum())
            bar.update(max(0, min(new, cfg.probe_min_mixed - mixed)))
            mixed += new
            if mixed >= cfg.probe_min_mixed:
                break
        for name, parts in per_arm.items():
            agreement = torch.cat(parts)
            out[name][domain] = float(agreement.nanmean()) if torch.isfinite(agreement).any() else math.nan
            assets.probe_agreement.setdefault(domain, {})[name] = agreement
        assets.probe_mixed[domain] = mixed
        bar.n = cfg.probe_min_mixed * (DOMAINS.index(domain) + 1)  # a short domain still completes its part
        bar.refresh()
    bar.close()
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
    feedback: str = ""  # the bandit's feedback signal (LASeR's; baselines do not learn)
    eval_correct: dict[str, list[int]] = field(default_factory=dict)  # domain -> 1/0 per held-out prompt, after GRPO
    eval_length: dict[str, float] = field(default_factory=dict)  # domain -> mean characters of the greedy held-out answers
    train_length: dict[str, float] = field(default_factory=dict)  # domain -> mean characters of the training samples
    audit: dict[str, float] = field(default_factory=dict)  # consensus: the audit schedule the selector ran with

    def most_chosen(self) -> dict[str, str]:
        return {d: max(c, key=c.get) for d, c in self.arm_counts.items()}

    def share(self, arm: str) -> float:
        total = sum(sum(c.values()) for c in self.arm_counts.values())
        return sum(c.get(arm, 0) for c in self.arm_counts.values()) / max(total, 1)


def method_flags(method: str, cfg: DemoConfig, single_arm: int, feedback: str | None = None) -> dict:
    """The selector flags of one method (RewardSelector's keyword names), for selector_from_flags."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "laser":
        return {"bandit": cfg.bandit, "alpha": cfg.alpha, "lam": cfg.lam, "feedback": feedback or cfg.feedback,
                "audit_fraction": cfg.audit_fraction, "audit_warmup_steps": cfg.audit_warmup_steps,
                "audit_warmup_fraction": cfg.audit_warmup_fraction, "normalize_scores": True, "seed": cfg.seed}
    # A baseline does not learn from feedback: the cheapest signal, so no audit passes are charged to it.
    flags = {"baseline": method, "feedback": "spread", "normalize_scores": True, "seed": cfg.seed}
    if method == "single":
        flags["single_arm"] = single_arm
    return flags


DEMO_INPUTS = ("scores", "correct", "answers", "policy_logps", "ref_logps", "response_lengths")  # what feedback_inputs has


def check_feedback(feedback: str) -> None:
    """Fail before any model loads when the demo cannot feed this signal (e.g. `progress` needs two losses)."""
    from laser_rl.arms import RuleArm

    probe = selector_from_flags([RuleArm(lambda p, r, l: [0.0] * len(p), name=f"rm{k}") for k in range(2)],
                                {"feedback": feedback}, context_dim=1)  # the selector's own list of needed inputs
    missing = [k for k in probe.feedback_inputs if k not in DEMO_INPUTS]
    if missing:
        raise ValueError(f"--feedback {feedback}: the signal needs {missing}, which the demo does not compute; "
                         f"use verifier, pair_loss, spread, consensus or majority")


def feedback_inputs(selector: RewardSelector, batch: list[Task], rollout, scores, correct, old_logps, ref_logps) -> dict:
    """Every feedback input the demo has, grouped per prompt [P, n], narrowed to what the signal needs."""
    P, n = rollout.num_prompts, rollout.n
    mask = rollout.action_mask.float()
    have = {  # keys: DEMO_INPUTS
        "scores": lambda: scores.reshape(P, n),
        "correct": lambda: correct.reshape(P, n),
        "answers": lambda: [[t.extract_answer(rollout.responses[i * n + j]) for j in range(n)] for i, t in enumerate(batch)],
        "policy_logps": lambda: (old_logps * mask).sum(-1).reshape(P, n),  # sequence log-probs
        "ref_logps": lambda: (ref_logps * mask).sum(-1).reshape(P, n),
        "response_lengths": lambda: rollout.response_lengths.clamp(min=1).reshape(P, n),
    }
    needed = selector.feedback_inputs  # only what the signal reads (answers are extracted for `majority` alone)
    missing = [k for k in needed if k not in have]
    if missing:
        raise ValueError(f"feedback {selector.feedback_name!r} needs {missing}, which the demo cannot supply")
    return {k: have[k]() for k in needed}


def run_method(
    method: str,
    assets: DemoAssets,
    eval_before: dict[str, float],
    single_arm: int = 0,
    writer=None,
    progress: bool = True,
    feedback: str | None = None,
) -> MethodResult:
    """One GRPO run with one reward-selection method; returns its evaluation, RM cost and arm usage.

    feedback overrides config.feedback for LASeR (benchmarks/demo_seeds.py runs two signals on one set of assets).
    writer: a TensorBoard SummaryWriter of this method alone, so tags read as documented (laser/arm_frac/...).
    """
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
    flags = method_flags(method, cfg, single_arm, feedback)
    selector = selector_from_flags(arms, flags, context_dim=encoder.dim)
    names = selector.names
    n = cfg.samples
    orders = {d: rng.sample(range(len(assets.tasks.train[d])), len(assets.tasks.train[d])) for d in DOMAINS}
    arm_counts = {d: {a: 0 for a in names} for d in DOMAINS}
    history = {d: [] for d in DOMAINS}
    train_correct = {d: [] for d in DOMAINS}
    train_length = {d: [] for d in DOMAINS}

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
            contexts, chosen, **feedback_inputs(selector, batch, rollout, rewards, correct, old_logps, ref_logps)
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
            train_length[d] += [len(rollout.responses[i * n + j].strip()) for i in rows for j in range(n)]
            metrics[f"demo/train_accuracy/{d}"] = acc_d
        metrics.update({f"grpo/{k}": v for k, v in train_stats.items()})
        metrics["grpo/reward_mean"] = float(rewards.mean())
        if torch.isfinite(normalized).any():
            metrics["demo/bandit_reward_norm"] = float(normalized[torch.isfinite(normalized)].mean())
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
        bar.set_postfix(rm_passes=selector.rm_passes_total, train_acc=f"{correct.float().mean():.2f}")
    bar.close()

    evaluation = evaluate_detailed(policy, tok, assets.tasks.eval, cfg.max_new_tokens, progress)
    eval_after = evaluation.accuracy
    if writer is not None:
        for d in DOMAINS:
            writer.add_scalar(f"demo/eval_accuracy/{d}", eval_before[d], 0)
            writer.add_scalar(f"demo/eval_accuracy/{d}", eval_after[d], cfg.steps)
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
        feedback=flags["feedback"] if method == "laser" else "",
        eval_correct=evaluation.correct,
        eval_length=evaluation.mean_length,
        train_length={d: sum(v) / max(len(v), 1) for d, v in train_length.items()},
        audit={"fraction": selector.audit_fraction, "warmup_steps": selector.audit_warmup_steps,
               "warmup_fraction": selector.audit_warmup_fraction} if selector.consensus is not None else {},
    )


# ------------------------------------------------------------------------------------------------
def plot_arm_choice(
    history: dict[str, list[list[float]]], names: list[str], path: str, window: int = 5, settings: str = ""
) -> None:
    """One panel per domain: the share of its prompts given to each arm, a moving average over `window` steps.

    Integer step ticks; the legend sits below the panels (never over one); `settings` goes into the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(history), figsize=(4.2 * len(history), 3.4), sharey=True, squeeze=False)
    for ax, (domain, rows) in zip(axes[0], history.items()):
        x = torch.tensor(rows, dtype=torch.float64)  # [steps, K]
        smooth = torch.stack([x[max(0, i - window + 1) : i + 1].mean(0) for i in range(len(rows))])
        ax.stackplot(range(1, len(rows) + 1), smooth.T.numpy(), labels=names)
        ax.set_title(f"{domain} prompts")
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 1)
        ax.set_xlim(1, max(len(rows), 2))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(f"share of prompts per RM ({window}-step mean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle("Which reward model LASeR chose, per domain" + (f"\n{settings}" if settings else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend row below the panels
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
def run_name(config: DemoConfig, methods) -> str:
    """The run's folder name under output_dir: its settings, so runs with other settings never overwrite it."""
    what = "compare" if len(methods) > 1 else methods[0]
    pool = config.pool if config.arms is None else "arms-" + "-".join(config.arm_names)
    return f"{what}_{pool}_{config.feedback}_seed{config.seed}_steps{config.steps}"


def settings_line(config: DemoConfig) -> str:
    return (f"pool {config.pool if config.arms is None else ','.join(config.arm_names)}, feedback {config.feedback}, "
            f"{config.bandit} alpha {config.alpha} lam {config.lam}, {config.steps} steps x "
            f"{config.prompts_per_domain * len(DOMAINS)} prompts x {config.samples} samples, seed {config.seed}")


def run_demo(config: DemoConfig, methods=("laser",), progress: bool = True, verbose: bool = True) -> dict:
    """Run the methods with the same seed and budget; write TensorBoard logs, the arm-choice PNG and a table.

    Everything goes into one folder per run, output_dir/run_name(config, methods) (returned as "output_dir"):
    tensorboard/<method>/ (one TensorBoard run per method, tags as documented), tensorboard/probe/, the PNG,
    summary.json.
    """
    from torch.utils.tensorboard import SummaryWriter

    check_feedback(config.feedback)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = os.path.join(config.output_dir, run_name(config, methods))
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(os.path.join(out_dir, "tensorboard"), ignore_errors=True)  # a rerun replaces its curves
    start, cpu_start = time.time(), time.process_time()
    assets = DemoAssets(config, verbose=verbose)
    setup = time.time() - start
    before = evaluate_detailed(assets.reference, assets.tokenizer, assets.tasks.eval, config.max_new_tokens, progress)
    eval_before = before.accuracy
    accuracy = probe_arm_accuracy(assets, assets.reference, config.seed, progress)
    names = [a.name for a in assets.arm_list]
    single = best_single_arm(accuracy)
    say = functools.partial(print, flush=True) if verbose else (lambda *a, **k: None)
    say("untrained policy, held-out accuracy: " + ", ".join(f"{d} {eval_before[d]:.2f}" for d in DOMAINS))
    ties = tied_with_best(assets.probe_agreement)
    say(arm_table(accuracy, ties=ties))
    say("probe: prompts with both right and wrong samples per domain: "
        + ", ".join(f"{d} {assets.probe_mixed.get(d, 0)}" for d in DOMAINS))

    tb_dir = os.path.join(out_dir, "tensorboard")
    with SummaryWriter(os.path.join(tb_dir, "probe")) as writer:
        for arm, per in accuracy.items():
            for d, v in per.items():
                if not math.isnan(v):
                    writer.add_scalar(f"probe/arm_accuracy/{d}/{arm}", v, 0)
    results = []
    for method in methods:
        with SummaryWriter(os.path.join(tb_dir, method)) as writer:
            results.append(run_method(method, assets, eval_before, names.index(single), writer, progress))

    by = {r.method: r for r in results}
    plot_path = None
    if "laser" in by:
        plot_path = os.path.join(out_dir, "arm_choice_by_domain.png")
        plot_arm_choice(by["laser"].arm_history, names, plot_path, settings=settings_line(config))
    ensemble_passes = by["mean"].rm_passes if "mean" in by else None
    total = time.time() - start

    lines = [""]
    if "laser" in by:
        lines.append(arm_table(accuracy, by["laser"], ties=ties))
        lines.append(f"noise arm's share after warm-up (steps {config.warmup_steps + 1}-{config.steps}): "
                     f"{by['laser'].share('noise') if 'noise' in names else float('nan'):.2f}")
        lines.append("")
    lines.append(results_table(results, ensemble_passes))
    # A hacked RM shows in the answers before it shows in accuracy: the `verbose` arm rewards length.
    lengths = [("untrained", before.mean_length)] + [(METHOD_LABELS[r.method], r.eval_length) for r in results]
    lines.append("mean characters of the greedy held-out answers (" + " / ".join(DOMAINS) + "): "
                 + "; ".join(f"{who} " + " / ".join(f"{per[d]:.1f}" for d in DOMAINS) for who, per in lengths))
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
    lines.append(f"TensorBoard logs: {tb_dir} (one run per method)")
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
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return {"accuracy": accuracy, "ties": ties, "results": by, "table": text, "plot": plot_path, "summary": summary,
            "output_dir": out_dir}
