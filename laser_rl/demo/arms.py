"""The demo's reward models: K arms with different strengths, all behind laser_rl.arms.RewardArm.

    calculator  evaluates the "a + b" in the prompt and checks the response's last number: exact on
                arithmetic, blind elsewhere (no expression to evaluate -> every sample scores 0)
    minilm      cosine similarity of the response to the reference answer under all-MiniLM-L6-v2
                (a sentence-embedding RM; knows the answer but judges by meaning, not by checking)
    smollm2     SmolLM2-135M-Instruct (the frozen reference policy) as an implicit likelihood RM:
                mean log-prob per response token (laser_rl.arms.ImplicitRewardArm, mode="likelihood",
                with each prompt encoded once for all its samples)
    noise       pure Gaussian noise (laser_rl.arms.NoisyArm): a broken RM the bandit must learn to avoid
    verbose     (hard pool only) a hackable math RM: exact on "a + b" prompts, but off its training
                distribution it falls back to a length prior (longer = better), which GRPO can exploit

Pools (`--pool`): "default" is the four arms above (unchanged, so earlier numbers reproduce); "hard" swaps
the calculator for `verbose`: on arithmetic it looks as good as the calculator, on stories and logic it
rewards rambling, a wrong RM that is worse than noise because the policy learns to hack it.

Every arm counts one RM pass per scored sample, the noise arm included (it stands for a broken RM server:
called and paid for), so a K-arm score ensemble costs K passes per sample and one selected RM costs 1.
"""

from __future__ import annotations

import re

import torch

from laser_rl import lm
from laser_rl.arms import ImplicitRewardArm, NoisyArm, RewardArm
from laser_rl.demo.tasks import last_integer

ARM_NAMES = ("calculator", "minilm", "smollm2", "noise")  # the default pool
POOLS = {
    "default": ARM_NAMES,
    "hard": ("verbose", "minilm", "smollm2", "noise"),
}
ALL_ARMS = ARM_NAMES + ("verbose",)  # every name build_arms knows
_EXPRESSION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)")


class CalculatorArm(RewardArm):
    """1.0 when the response's last integer equals the value of the first `a op b` in the prompt, else 0.0.

    A program, not a model; it still counts as one RM call per sample (passes_per_sample = 1).
    """

    name = "calculator"

    def _score(self, prompts, responses, labels):
        scores = []
        for prompt, response in zip(prompts, responses):
            value = _expression_value(prompt)
            if value is None:
                scores.append(0.0)  # blind: no arithmetic to check
                continue
            scores.append(1.0 if last_integer(response) == str(value) else 0.0)
        return scores


def _expression_value(prompt: str) -> int | None:
    """Value of the first `a op b` in the prompt, or None when it has none."""
    match = _EXPRESSION.search(prompt)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


class VerboseArm(RewardArm):
    """A hackable RM, standing for a real failure mode: a math RM with a length prior out of its domain.

    On a prompt with an explicit `a op b` it checks the response's last integer (as exact as the calculator).
    Elsewhere (stories, logic) it has no idea and rewards length: min(characters, cap) / cap. Among n samples
    the longest wins, so GRPO drifts toward rambling that never reaches an answer in max_new_tokens.
    """

    name = "verbose"

    def __init__(self, cap: int = 80):
        if cap < 1:
            raise ValueError(f"VerboseArm: cap must be >= 1 character, got {cap}")
        self.cap = cap

    def _score(self, prompts, responses, labels):
        scores = []
        for prompt, response in zip(prompts, responses):
            value = _expression_value(prompt)
            if value is None:
                scores.append(min(len(response.strip()), self.cap) / self.cap)  # the exploitable prior
            else:
                scores.append(1.0 if last_integer(response) == str(value) else 0.0)
        return scores


class EmbeddingSimilarityArm(RewardArm):
    """Cosine similarity between the response and the reference answer (the label) under a sentence encoder.

    Mean pooling over real tokens and L2 normalization, as sentence-transformers does for all-MiniLM-L6-v2.
    """

    def __init__(self, model, tokenizer, name: str = "minilm", batch_size: int = 64, max_length: int = 128):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.batch_size, self.max_length = name, batch_size, max_length

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def _score(self, prompts, responses, labels):
        if labels is None:
            raise ValueError("the embedding RM compares to the reference answer: pass labels")
        references = [str(label) for label in labels]
        unique = sorted(set(references))
        ref_emb = self.embed(unique)
        index = torch.tensor([unique.index(r) for r in references])
        # An empty response embeds as [CLS][SEP] only; it still gets a (low) similarity, never NaN.
        return (self.embed([r if r.strip() else " " for r in responses]) * ref_emb[index]).sum(-1)


class PromptCachedImplicitRewardArm(ImplicitRewardArm):
    """ImplicitRewardArm (mode="likelihood") that encodes each distinct prompt once and shares its KV cache
    among that prompt's samples: the same scores (up to float error), about n times fewer prompt tokens.

    The response is tokenized on its own, so the prompt/response token boundary is exact (the parent tokenizes
    them joined and counts the prompt's tokens; the two agree unless a token would straddle the boundary).
    """

    def __init__(self, model, tokenizer, name: str = "smollm2", batch_size: int = 64):
        super().__init__(model, tokenizer, mode="likelihood", name=name, batch_size=batch_size)

    @torch.no_grad()
    def _score(self, prompts, responses, labels):
        tok = self.tokenizer
        pad_id = lm.pad_token_id(tok)
        unique = list(dict.fromkeys(prompts))
        scores = torch.zeros(len(prompts))
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            where = {p: i for i, p in enumerate(chunk)}
            rows = [i for i, p in enumerate(prompts) if p in where]
            # As the parent: a chat model judges the response after its assistant header (lm's encoding, as sampled).
            prompt_ids, prompt_mask = lm.pad(lm.encode_prompts(tok, chunk)[0], pad_id, "left")
            ids, rmask = lm.pad([tok(responses[i], add_special_tokens=False)["input_ids"] for i in rows], pad_id, "right")
            if ids.shape[1] == 0:
                continue  # every response is empty: scores stay 0
            index = torch.tensor([where[prompts[i]] for i in rows])
            logps = lm.prompt_cached_logprobs(self.model, prompt_ids, prompt_mask, ids, index).cpu()
            scores[rows] = (logps * rmask).sum(-1) / rmask.sum(-1).clamp(min=1)
        return scores


def build_arms(names, reference_model, tokenizer, seed: int = 0) -> list[RewardArm]:
    """The named arms (see ALL_ARMS); `reference_model` is the frozen SmolLM2 the implicit RM scores with."""
    unknown = [n for n in names if n not in ALL_ARMS]
    if unknown:  # before loading any model
        raise ValueError(f"unknown demo arm(s) {unknown}; choose from {ALL_ARMS}")
    arms = []
    for name in names:
        if name == "calculator":
            arms.append(CalculatorArm())
        elif name == "verbose":
            arms.append(VerboseArm())
        elif name == "minilm":
            from laser_rl.demo.assets import load_minilm

            model, tok = load_minilm()
            arms.append(EmbeddingSimilarityArm(model, tok, name="minilm"))
        elif name == "smollm2":
            arms.append(PromptCachedImplicitRewardArm(reference_model, tokenizer, name="smollm2"))
        elif name == "noise":
            noise = NoisyArm(sigma=1.0, seed=seed + 1, name="noise")
            # It stands for a broken reward server: called and paid for, its answer is garbage. Charging its pass
            # keeps "RM passes" comparable: a K-arm ensemble costs K passes per sample, one selected RM costs 1.
            noise.passes_per_sample = 1
            arms.append(noise)
        else:
            raise AssertionError(name)  # unreachable: checked above
    return arms
