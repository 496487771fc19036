"""The demo's reward models: K arms with different strengths, all behind laser_rl.arms.RewardArm.

    calculator  evaluates the "a + b" in the prompt and checks the response's last number: exact on
                arithmetic, blind elsewhere (no expression to evaluate -> every sample scores 0)
    minilm      cosine similarity of the response to the reference answer under all-MiniLM-L6-v2
                (a sentence-embedding RM; knows the answer but judges by meaning, not by checking)
    smollm2     SmolLM2-135M-Instruct (the frozen reference policy) as an implicit likelihood RM:
                mean log-prob per response token (laser_rl.arms.ImplicitRewardArm, mode="likelihood",
                with each prompt encoded once for all its samples)
    noise       pure Gaussian noise (laser_rl.arms.NoisyArm): a broken RM the bandit must learn to avoid

Every arm counts one RM pass per scored sample, the noise arm included (it stands for a broken RM server:
called and paid for), so a K-arm score ensemble costs K passes per sample and one selected RM costs 1.
"""

from __future__ import annotations

import re

import torch

from laser_rl.arms import ImplicitRewardArm, NoisyArm, RewardArm
from laser_rl.demo.tasks import last_integer

ARM_NAMES = ("calculator", "minilm", "smollm2", "noise")
_EXPRESSION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)")


class CalculatorArm(RewardArm):
    """1.0 when the response's last integer equals the value of the first `a op b` in the prompt, else 0.0.

    A program, not a model; it still counts as one RM call per sample (passes_per_sample = 1).
    """

    name = "calculator"

    def _score(self, prompts, responses, labels):
        scores = []
        for prompt, response in zip(prompts, responses):
            match = _EXPRESSION.search(prompt)
            if match is None:
                scores.append(0.0)  # blind: no arithmetic to check
                continue
            a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
            value = a + b if op == "+" else a - b if op == "-" else a * b
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
        unique = list(dict.fromkeys(prompts))
        scores = torch.zeros(len(prompts))
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            where = {p: i for i, p in enumerate(chunk)}
            rows = [i for i, p in enumerate(prompts) if p in where]
            if tok.chat_template:  # as the parent: a chat model judges the response after its assistant header
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in chunk]
            else:
                texts = chunk
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not tok.chat_template)
            position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            out = self.model(**enc, position_ids=position_ids, use_cache=True, logits_to_keep=1)
            index = torch.tensor([where[prompts[i]] for i in rows])
            cache = out.past_key_values
            cache.batch_select_indices(index)
            first = out.logits[:, -1].float().log_softmax(-1)[index]
            resp = tok([responses[i] for i in rows], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
            ids, rmask = resp["input_ids"], resp["attention_mask"]
            if ids.shape[1] == 0:
                continue  # every response is empty: scores stay 0
            logps = first.gather(-1, ids[:, :1])
            if ids.shape[1] > 1:
                prompt_mask = enc["attention_mask"][index]
                mask = torch.cat([prompt_mask, rmask[:, :-1]], dim=1)
                pos = prompt_mask.sum(-1, keepdim=True) + torch.arange(ids.shape[1] - 1)
                logits = self.model(input_ids=ids[:, :-1], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits.float()
                logps = torch.cat([logps, logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)], dim=1)
            scores[rows] = (logps * rmask).sum(-1) / rmask.sum(-1).clamp(min=1)
        return scores


def build_arms(names, reference_model, tokenizer, seed: int = 0) -> list[RewardArm]:
    """The named arms (see ARM_NAMES); `reference_model` is the frozen SmolLM2 the implicit RM scores with."""
    arms = []
    for name in names:
        if name == "calculator":
            arms.append(CalculatorArm())
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
            raise ValueError(f"unknown demo arm {name!r}; choose from {ARM_NAMES}")
    return arms
