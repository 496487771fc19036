"""Best-of-n selection with a bandit-chosen reward model (the paper's long-context QA mode; no training).

Per prompt: the bandit picks one RM, the policy samples n responses, the RM's top-scored response is
the answer. The bandit's reward (`feedback`) is about that response: `best_nll`, minus its per-token
NLL under the policy (the paper), or, where labels exist, `best_metric`, its task metric. The bandit's
context is the last prompt token's hidden state from the sampling prefill (laser_rl.lm). Every strategy
(LASeR, random RM, score ensemble, ...) answers the same n samples, so their metrics compare the
choice of RM and nothing else; RM scores are cached per batch so shared samples are scored once.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from laser_rl.arms import RewardArm
from laser_rl.context import ContextEncoder
from laser_rl.lm import sample, sequence_logprobs
from laser_rl.selector import RewardSelector

METRICS = ("accuracy", "exact", "f1")
# Bandit feedback in best-of-n, both about the response the chosen RM ranked best: best_nll = minus its
# per-token NLL under the policy (the paper's), best_metric = its task metric against the answer (needs labels).
BON_FEEDBACKS = ("best_nll", "best_metric")


# =================================================================================================
# Task metrics
# =================================================================================================


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answers(answer) -> list[str]:
    if isinstance(answer, (list, tuple)):
        if not answer:
            raise ValueError("empty answer list")
        return [str(a) for a in answer]
    return [str(answer)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def token_f1(prediction: str, answer) -> float:
    """SQuAD/LongBench token F1 between the prediction and the best-matching gold answer."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for gold in _answers(answer):
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, answer) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in _answers(answer)))


def answer_accuracy(prediction: str, answer) -> float:
    """1.0 if the response gives the answer: for a numeric gold answer, the LAST number in the response
    equals it (the usual GSM8K convention); otherwise the gold answer appears as whole words."""
    for gold in _answers(answer):
        value = _as_number(gold)
        if value is not None:
            numbers = _NUMBER.findall(prediction)
            if numbers and _as_number(numbers[-1]) is not None and abs(_as_number(numbers[-1]) - value) < 1e-6:
                return 1.0
            continue
        gold_norm = normalize_answer(gold)
        if gold_norm and re.search(rf"(^| ){re.escape(gold_norm)}( |$)", normalize_answer(prediction)):
            return 1.0
    return 0.0


def task_score(prediction: str, answer, metric: str = "accuracy") -> float:
    """The task metric of one response: accuracy (see answer_accuracy), exact match, or token F1."""
    if metric == "accuracy":
        return answer_accuracy(prediction, answer)
    if metric == "exact":
        return exact_match(prediction, answer)
    if metric == "f1":
        return token_f1(prediction, answer)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


# =================================================================================================
# Shared RM scores across strategies
# =================================================================================================


class CachedArm(RewardArm):
    """Wraps an arm and remembers its scores, so several strategies scoring the same samples run the RM once.

    Each selector still counts the RM passes its own choice costs (passes_per_sample is the wrapped
    arm's): the cache saves compute in the comparison, not in what a strategy reports.
    """

    def __init__(self, arm: RewardArm):
        self.arm = arm
        self.name = arm.name
        self.passes_per_sample = arm.passes_per_sample
        self.cache: dict[tuple, float] = {}
        self.computed = 0  # samples the wrapped arm actually scored

    def clear(self) -> None:
        self.cache.clear()

    def _score(self, prompts, responses, labels):
        keys = [(p, r, repr(labels[i]) if labels is not None else None) for i, (p, r) in enumerate(zip(prompts, responses))]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            new = self.arm.score(
                [prompts[i] for i in todo], [responses[i] for i in todo], None if labels is None else [labels[i] for i in todo]
            )
            self.computed += len(todo)
            for i, s in zip(todo, new.tolist()):
                self.cache[keys[i]] = s
        return torch.tensor([self.cache[k] for k in keys], dtype=torch.float32)


# =================================================================================================
# Best-of-n
# =================================================================================================


@dataclass
class BestOfNConfig:
    n: int = 8  # samples per prompt, ranked by the chosen RM
    max_new_tokens: int = 64  # per sampled response
    temperature: float = 0.8  # sampling temperature
    top_p: float = 1.0  # nucleus sampling (1: the full distribution)
    batch_size: int = 8  # prompts per bandit step
    gen_batch_size: int = 8  # prompts per sampling call (one prefill each)
    feedback: str = "best_nll"  # best_nll (paper: -NLL per token of the RM's best response) | best_metric (its task metric; needs answers)
    metric: str = "auto"  # auto: f1 when prompts carry a context (QA), else accuracy
    template: str = "{context}\n\n{prompt}"  # how a context and a question become one prompt
    max_prompt_tokens: int | None = None  # None: the model's limit minus max_new_tokens
    seed: int = 0

    def __post_init__(self):
        for name in ("n", "max_new_tokens", "batch_size", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p lie in (0, 1]; got {self.temperature}, {self.top_p}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 (or None), got {self.max_prompt_tokens}")
        if self.feedback not in BON_FEEDBACKS:
            raise ValueError(f"unknown feedback {self.feedback!r}; choose one of {BON_FEEDBACKS}")
        if self.metric != "auto" and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose auto or one of {METRICS}")
        if "{prompt}" not in self.template:
            raise ValueError("template must contain {prompt}")


@dataclass
class BestOfNResult:
    metric: str
    scores: dict[str, float]  # strategy -> mean task metric; also "first_sample" (no selection) and "oracle"
    by_domain: dict[str, dict[str, float]]  # domain -> strategy -> mean metric
    rm_passes: dict[str, int]  # strategy -> RM forward passes its choices cost
    arm_fractions: dict[str, dict[str, float]]  # strategy -> arm name -> fraction of prompts
    num_prompts: int
    num_truncated: int
    predictions: list[dict] = field(default_factory=list)

    def table(self) -> str:
        names = list(self.scores)
        domains = sorted(self.by_domain)
        lines = [f"{'strategy':<16} {self.metric:>9} {'RM passes':>10}" + "".join(f" {d[:12]:>12}" for d in domains)]
        for name in names:
            passes = f"{self.rm_passes[name]:>10}" if name in self.rm_passes else f"{'-':>10}"
            lines.append(
                f"{name:<16} {self.scores[name]:>9.4f} {passes}" + "".join(f" {self.by_domain[d].get(name, math.nan):>12.4f}" for d in domains)
            )
        return "\n".join(lines)


def build_input(record: dict, template: str = "{context}\n\n{prompt}") -> str:
    """The text the policy answers: the question alone, or the template with the record's context."""
    context = record.get("context")
    if context:
        return template.format(context=context, prompt=record["prompt"])
    return str(record["prompt"])


def resolve_metric(records: Sequence[dict], metric: str) -> str:
    if metric != "auto":
        return metric
    return "f1" if any(r.get("context") for r in records) else "accuracy"


def choose_best(scores: Tensor) -> Tensor:
    """Index of the top-scored sample per prompt [P] from scores [P, n]; ties go to the lowest index,
    NaN (a skipped sample) never wins unless all are NaN."""
    scores = torch.as_tensor(scores).float()
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [prompts, n], got shape {tuple(scores.shape)}")
    return torch.nan_to_num(scores, nan=-math.inf).argmax(dim=1)


def run_best_of_n(
    policy: nn.Module,
    tokenizer,
    selectors: dict[str, RewardSelector],
    encoder: ContextEncoder,
    records: Sequence[dict],
    config: BestOfNConfig,
) -> BestOfNResult:
    """Run every strategy (a RewardSelector each: LASeR or a baseline) on the same samples; report the metric.

    records: dicts with `prompt` and `answer`, optional `context` and `domain`.
    """
    if not records:
        raise ValueError("no prompts")
    if not selectors:
        raise ValueError("give at least one strategy (a name -> RewardSelector)")
    missing = [i for i, r in enumerate(records) if r.get("prompt") is None or r.get("answer") is None]
    if missing:
        raise ValueError(f"records {missing[:5]} lack a prompt or an answer")
    reserved = {"first_sample", "oracle"} & set(selectors)
    if reserved:
        raise ValueError(f"strategy names {sorted(reserved)} are reserved for the reference rows")
    auditing = [name for name, s in selectors.items() if s.consensus is not None]
    if auditing:
        # The bandit learns from config.feedback here; consensus audits would run every RM for nothing.
        raise ValueError(
            f"strategies {auditing} use consensus feedback, which audits prompts with every RM; best-of-n hands the "
            f"bandit its own reward ({config.feedback}): build them with feedback='spread' (unused here)"
        )
    metric = resolve_metric(records, config.metric)
    caches = {id(a): a for s in selectors.values() for a in s.rms if isinstance(a, CachedArm)}
    torch.manual_seed(config.seed)
    names = list(selectors) + ["first_sample", "oracle"]
    totals: dict[str, list[float]] = {s: [] for s in names}
    per_domain: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    arm_counts = {s: Counter() for s in selectors}
    predictions, num_truncated = [], 0

    for start in tqdm(range(0, len(records), config.batch_size), desc="best-of-n"):
        batch = list(records[start : start + config.batch_size])
        P, n = len(batch), config.n
        inputs = [build_input(r, config.template) for r in batch]
        answers = [r["answer"] for r in batch]
        domains = [r.get("domain") for r in batch]
        rollout = sample(
            policy, tokenizer, inputs, n, config.max_new_tokens, config.temperature, top_p=config.top_p,
            batch_size=config.gen_batch_size, max_prompt_tokens=config.max_prompt_tokens,
        )
        num_truncated += rollout.num_truncated
        # Contexts from the sampling prefill (the prompt as the policy saw it, truncated), once for every strategy.
        contexts = encoder(rollout.context_hidden)
        flat_prompts, flat_responses = rollout.flat()
        flat_labels = [a for a in answers for _ in range(n)]
        grouped = rollout.grouped()
        quality = torch.tensor([[task_score(resp, a, metric) for resp in rs] for rs, a in zip(grouped, answers)])
        rows = [
            {"index": start + p, "domain": domains[p], "answer": answers[p], "responses": grouped[p], "task_scores": quality[p].tolist()}
            for p in range(P)
        ]
        for cache in caches.values():
            cache.clear()
        for name, selector in selectors.items():
            arms = selector.select(contexts, domains if any(d is not None for d in domains) else None)
            scores = selector.score(flat_prompts, flat_responses, arms.repeat_interleave(n), flat_labels).reshape(P, n)
            chosen = choose_best(scores)
            picked = quality.gather(1, chosen[:, None]).squeeze(1)
            if selector.bandit is not None and selector.bandit.learns:
                if config.feedback == "best_nll":  # the paper: minus the per-token NLL of the chosen response
                    with torch.no_grad():
                        logps, lengths = sequence_logprobs(policy, rollout, torch.arange(P) * n + chosen)
                    raw = logps.cpu() / lengths
                else:
                    raw = picked.clone()
                selector.feedback(contexts, arms, raw_rewards=raw)
            for p in range(P):
                arm = int(arms[p])
                arm_counts[name][selector.names[arm] if arm >= 0 else "ensemble"] += 1
                rows[p][name] = {
                    "arm": selector.names[arm] if arm >= 0 else "ensemble",
                    "chosen": int(chosen[p]),
                    "rm_scores": scores[p].tolist(),
                    "score": float(picked[p]),
                }
            _add(totals, per_domain, name, picked, domains)
        _add(totals, per_domain, "first_sample", quality[:, 0], domains)
        _add(totals, per_domain, "oracle", quality.max(dim=1).values, domains)
        predictions += rows

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return BestOfNResult(
        metric=metric,
        scores={s: mean(v) for s, v in totals.items()},
        by_domain={d: {s: mean(v) for s, v in per.items()} for d, per in per_domain.items()},
        rm_passes={s: int(sel.rm_passes_total) for s, sel in selectors.items()},
        arm_fractions={s: {a: c / sum(cnt.values()) for a, c in sorted(cnt.items())} for s, cnt in arm_counts.items()},
        num_prompts=len(records),
        num_truncated=num_truncated,
        predictions=predictions,
    )


def greedy_metric(
    policy: nn.Module,
    tokenizer,
    records: Sequence[dict],
    metric: str = "accuracy",
    max_new_tokens: int = 64,
    template: str = "{context}\n\n{prompt}",
    batch_size: int = 8,
) -> float:
    """Mean task metric of the policy's greedy answers (no RM involved): an eval before/after training."""
    if not records:
        raise ValueError("no eval records")
    metric = resolve_metric(records, metric)
    total = 0.0
    for start in tqdm(range(0, len(records), batch_size), desc="greedy eval"):
        batch = list(records[start : start + batch_size])
        rollout = sample(policy, tokenizer, [build_input(r, template) for r in batch], 1, max_new_tokens, temperature=0.0, batch_size=batch_size)
        total += sum(task_score(response, r["answer"], metric) for response, r in zip(rollout.responses, batch))
    return total / len(records)


def _add(totals, per_domain, name: str, values: Tensor, domains: Sequence) -> None:
    totals[name] += values.tolist()
    for d, v in zip(domains, values.tolist()):
        if d is not None:
            per_domain[d][name].append(v)
