"""The demo's three domains of prompts, generated offline by reasoning-gym and scored by its verifiers.

    arithmetic  two-term one-digit sums        basic_arithmetic          "Calculate 5 + 3."               -> 8
    word        very easy GSM-style problems   basic_arithmetic, told    "Mia has 5 pens. Mia gets 3 more
                                               as a story                 pens. How many pens does ..."  -> 8
    logic       yes/no syllogisms (balanced)   syllogism                 "... Does it follow ...?"        -> Yes

The word problems are reasoning-gym's sums told as a one-line story (the numbers, the answer and the
verifier are reasoning-gym's): the same skill as arithmetic, but no "a + b" left in the text. (reasoning-gym's
own word-problem generators, gsm_symbolic and aiw, are out of reach for a 135M model: it solves almost none,
so GRPO and the bandit get almost no signal.)

The policy answers in free text; the domain's extractor pulls out the final answer (the last number,
in digits or words up to ten, or the first yes/no), and reasoning-gym's `score_answer` on that answer decides correctness (1.0 only).
Training and held-out eval prompts come from different seeds and never share a question.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from laser_rl.demo.assets import require

DOMAINS = ("arithmetic", "word", "logic")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


_NUMBER_WORDS = {
    "zero": "0", "none": "0", "once": "1", "one": "1", "twice": "2", "two": "2", "three": "3", "thrice": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_NUMBER = re.compile(r"-?\d+|[a-z]+")


def last_integer(text: str) -> str:
    """The last number in the text, digits or a number word up to ten ("one", "twice"); "" if none."""
    found = [w if w[-1].isdigit() else _NUMBER_WORDS[w] for w in _NUMBER.findall(text.lower()) if w[-1].isdigit() or w in _NUMBER_WORDS]
    return found[-1] if found else ""


def first_yes_no(text: str) -> str:
    found = _YES_NO.search(text)
    return found.group(1).capitalize() if found else ""


@dataclass
class Task:
    """One prompt: its domain, the question, reasoning-gym's entry (for its verifier) and the reference answer."""

    domain: str
    question: str
    answer: str
    entry: dict = field(repr=False)
    dataset: object = field(repr=False)

    @property
    def prompt(self) -> str:
        return self.question + INSTRUCTIONS[self.domain]

    def extract(self, response: str) -> str:
        return EXTRACTORS[self.domain](response)

    def extract_answer(self, response: str) -> str | None:
        """The response's final answer by reasoning-gym's conventions (the last integer for sums and stories,
        the first yes/no for logic), or None when it gives none. Samples with equal answers agree
        (the `majority` feedback's self-consistency vote)."""
        return self.extract(response) or None

    def correct(self, response: str) -> bool:
        """reasoning-gym's verifier on the extracted final answer: exact match only."""
        return float(self.dataset.score_answer(self.extract(response), self.entry)) >= 1.0


INSTRUCTIONS = {
    "arithmetic": " Answer with the number only.",
    "word": "\nAnswer with the number only.",
    "logic": "",  # syllogism questions already end with "(Answer Yes or No)"
}
EXTRACTORS = {"arithmetic": last_integer, "word": last_integer, "logic": first_yes_no}


def _dataset(domain: str, size: int, seed: int):
    rg = require("reasoning_gym", "reasoning-gym", "prompts and verifiers")
    if domain == "arithmetic":
        return rg.create_dataset(
            "basic_arithmetic", size=size, seed=seed, min_terms=2, max_terms=2, min_digits=1, max_digits=1,
            operators=("+",), allow_parentheses=False, allow_negation=False,
        )
    if domain == "word":  # the story is added in make_tasks
        return rg.create_dataset(
            "basic_arithmetic", size=size, seed=seed, min_terms=2, max_terms=2, min_digits=1, max_digits=1,
            operators=("+",), allow_parentheses=False, allow_negation=False,
        )
    if domain == "logic":
        return rg.create_dataset("syllogism", size=size, seed=seed)
    raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")


def make_tasks(domain: str, count: int, seed: int, exclude: set[str] | None = None) -> list[Task]:
    """`count` distinct prompts of one domain (yes/no balanced for logic), none of whose questions is in `exclude`."""
    exclude = set() if exclude is None else exclude
    pool = 8 * count + 64
    ds = _dataset(domain, pool, seed)
    tasks, seen = [], set(exclude)
    rng = random.Random(seed)
    for entry in ds:
        question = _story(entry, rng) if domain == "word" else entry["question"]
        if question in seen:
            continue
        seen.add(question)
        tasks.append(Task(domain, question, str(entry["answer"]), entry, ds))
    if domain == "logic":  # syllogism answers Yes ~70% of the time: balance so "always Yes" scores 50%
        yes = [t for t in tasks if t.answer == "Yes"]
        no = [t for t in tasks if t.answer == "No"]
        half = count // 2
        tasks = yes[: count - half] + no[:half]
        random.Random(seed).shuffle(tasks)
    if len(tasks) < count:
        raise ValueError(f"reasoning-gym gave only {len(tasks)} distinct {domain} prompts, {count} asked")
    return tasks[:count]


_NAMES = ("Tom", "Anna", "Sam", "Mia", "Leo", "Emma", "Ben", "Lucy")
_THINGS = ("apples", "books", "pens", "cookies", "stickers", "marbles", "shells", "cards")


def _story(entry: dict, rng: random.Random) -> str:
    """A reasoning-gym sum "a + b" as a one-line story; the answer stays reasoning-gym's."""
    a, b = entry["metadata"]["expression"].split(" + ")
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    return f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?"


@dataclass
class TaskSet:
    train: dict[str, list[Task]]
    eval: dict[str, list[Task]]


def build_tasks(domains=DOMAINS, train_per_domain: int = 64, eval_per_domain: int = 32, seed: int = 0) -> TaskSet:
    train, held_out = {}, {}
    for i, domain in enumerate(domains):
        held_out[domain] = make_tasks(domain, eval_per_domain, seed=10_000 + 97 * seed + i)
        train[domain] = make_tasks(
            domain, train_per_domain, seed=20_000 + 97 * seed + i, exclude={t.question for t in held_out[domain]}
        )
    return TaskSet(train, held_out)
