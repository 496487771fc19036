"""Reward models ("arms") the bandit chooses between, behind one interface.

Every arm maps (prompts, responses, labels) to a float32 CPU tensor of scores. Arms never check
finiteness themselves: the selector does, so it can name the arm and sample and optionally skip.
"""

from __future__ import annotations

import contextlib

import http.client
import importlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

import torch
from torch import nn


class RewardArmError(ValueError):
    """A reward arm failed or answered something unusable; the message names the arm."""


class RewardArm:
    """Scores (prompt, response) pairs. Subclasses implement _score."""

    name: str = "arm"
    passes_per_sample: int = 1  # RM forward passes one scored sample costs (for RM-pass accounting)

    def score(self, prompts: list[str], responses: list[str], labels: list | None = None) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"arm {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        if labels is not None and len(labels) != len(prompts):
            raise ValueError(f"arm {self.name!r}: {len(prompts)} prompts but {len(labels)} labels")
        if len(prompts) == 0:
            return torch.zeros(0, dtype=torch.float32)
        raw = self._score(list(prompts), list(responses), None if labels is None else list(labels))
        try:
            scores = torch.as_tensor(raw, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardArmError(f"arm {self.name!r} returned scores that are not numbers: {e}") from e
        if scores.ndim != 1 or scores.numel() != len(prompts):
            raise RewardArmError(
                f"arm {self.name!r} returned {scores.numel()} scores (shape {tuple(scores.shape)}) "
                f"for {len(prompts)} samples"
            )
        return scores

    def _score(self, prompts: list[str], responses: list[str], labels: list | None):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _model_name(model: nn.Module | str) -> str:
    """Default arm name: basename of the path the model came from, else its class name."""
    path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    return os.path.basename(os.path.normpath(path)) if path else type(model).__name__


def _load_pretrained(auto_cls, path: str, what: str):
    # Hub ids cannot be downloaded here, so only local directories are accepted.
    if not os.path.isdir(path):
        raise ValueError(f"{what} path {path!r} does not exist or is not a directory (hub ids are not supported)")
    return auto_cls.from_pretrained(path)


def _resolve_model_and_tokenizer(model, tokenizer, auto_cls, device):
    from transformers import AutoTokenizer

    if isinstance(tokenizer, str):
        tokenizer = _load_pretrained(AutoTokenizer, tokenizer, "tokenizer")
    if isinstance(model, str):
        path = model
        model = _load_pretrained(auto_cls, path, "model")
        if tokenizer is None:
            tokenizer = _load_pretrained(AutoTokenizer, path, "tokenizer")
    if tokenizer is None:
        raise ValueError("a tokenizer is required when the model is given as a module")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    # Reward models are frozen: eval() turns off dropout so scores are deterministic.
    return model.eval(), tokenizer


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class SequenceClassifierArm(RewardArm):
    """A classic scalar RM (AutoModelForSequenceClassification, num_labels=1) with its own tokenizer.

    Works on text, so an RM whose tokenizer differs from the policy's just works.
    """

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer=None,
        name: str | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
        device: str | torch.device | None = None,
    ):
        from transformers import AutoModelForSequenceClassification

        self.name = name or _model_name(model)
        self.model, self.tokenizer = _resolve_model_and_tokenizer(
            model, tokenizer, AutoModelForSequenceClassification, device
        )
        # HF classifiers pool the last token that is not pad_token_id: it must be the id we pad with.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def _score(self, prompts, responses, labels):
        tok = self.tokenizer
        if tok.chat_template:
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses)
            ]
        else:
            texts = [p + r for p, r in zip(prompts, responses)]
        device = _model_device(self.model)
        scores = []
        for i in range(0, len(texts), self.batch_size):
            # Right padding keeps real tokens at their unpadded positions (RoPE), so a sample scores the
            # same alone or in a batch; templated text already carries its special tokens. Text over
            # max_length loses its start (the prompt side), never the response being judged.
            with _truncating_left(tok):
                batch = tok(
                    texts[i : i + self.batch_size],
                    padding=True,
                    padding_side="right",
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=not tok.chat_template,
                    return_tensors="pt",
                ).to(device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores)


@contextlib.contextmanager
def _truncating_left(tokenizer):
    """Truncate from the left inside the block (the tokenizer's own setting is restored after)."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.truncation_side = side


class ImplicitRewardArm(RewardArm):
    """A causal LM as an implicit reward model.

    mode="dpo": beta * (log p_model(response|prompt) - log p_ref(response|prompt)), summed over
    response tokens (the DPO implicit reward). mode="likelihood": mean log-prob per response token.
    A response with no tokens (empty or truncated away) scores 0.
    """

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer=None,
        ref_model: nn.Module | str | None = None,
        beta: float = 0.1,
        mode: str = "dpo",
        name: str | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str | torch.device | None = None,
    ):
        from transformers import AutoModelForCausalLM

        if mode not in ("dpo", "likelihood"):
            raise ValueError(f"ImplicitRewardArm mode must be 'dpo' or 'likelihood', got {mode!r}")
        if mode == "dpo" and ref_model is None:
            raise ValueError("ImplicitRewardArm mode='dpo' needs a ref_model")
        self.name = name or _model_name(model)
        self.model, self.tokenizer = _resolve_model_and_tokenizer(model, tokenizer, AutoModelForCausalLM, device)
        self.ref_model = None
        if ref_model is not None and mode == "dpo":
            self.ref_model, _ = _resolve_model_and_tokenizer(ref_model, self.tokenizer, AutoModelForCausalLM, device)
        self.passes_per_sample = 2 if self.ref_model is not None else 1
        self.beta = beta
        self.mode = mode
        self.batch_size = batch_size
        self.max_length = max_length

    @staticmethod
    def _response_logps(model: nn.Module, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """Per-sample sum of log p(token | prefix) over the tokens marked by response_mask."""
        ids = input_ids.to(_model_device(model))
        logits = model(input_ids=ids, attention_mask=attention_mask.to(ids.device)).logits[:, :-1].float()
        targets = ids[:, 1:]
        # gather - logsumexp avoids materialising a second [B, T, vocab] log_softmax tensor.
        token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return (token_logps.cpu() * response_mask[:, 1:]).sum(-1)

    @torch.no_grad()
    def _score(self, prompts, responses, labels):
        tok = self.tokenizer
        if tok.chat_template:
            # Chat models judge a response in their own format: the response follows the assistant header.
            prompts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        special = not tok.chat_template
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            batch_prompts = prompts[i : i + self.batch_size]
            full = [p + r for p, r in zip(batch_prompts, responses[i : i + self.batch_size])]
            # Over max_length, the prompt loses its start; the response is kept whole (when it fits alone).
            with _truncating_left(tok):
                enc = tok(
                    full,
                    padding=True,
                    padding_side="right",
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=special,
                    return_tensors="pt",
                )
            prompt_lens = [len(ids) for ids in tok(batch_prompts, add_special_tokens=special)["input_ids"]]
            full_lens = [len(ids) for ids in tok(full, add_special_tokens=special)["input_ids"]]
            kept = enc["attention_mask"].sum(-1).tolist()
            # Response tokens: the last (full - prompt) kept tokens, before padding. Position 0 has no context.
            positions = torch.arange(enc["input_ids"].shape[1])
            starts = torch.tensor([max(k - (f - p), 1) for k, f, p in zip(kept, full_lens, prompt_lens)]).unsqueeze(1)
            response_mask = (positions >= starts).float() * enc["attention_mask"]

            logps = self._response_logps(self.model, enc["input_ids"], enc["attention_mask"], response_mask)
            if self.mode == "dpo":
                ref = self._response_logps(self.ref_model, enc["input_ids"], enc["attention_mask"], response_mask)
                scores.append(self.beta * (logps - ref))
            else:
                scores.append(logps / response_mask.sum(-1).clamp(min=1))
        return torch.cat(scores)


class RuleArm(RewardArm):
    """A reward function with OpenRLHF's batch signature: fn(prompts, responses, labels) -> floats."""

    def __init__(self, fn: Callable[[list[str], list[str], list | None], Sequence[float]], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"RuleArm needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def _score(self, prompts, responses, labels):
        # Exceptions from fn propagate on purpose: the selector wraps them with arm and batch context.
        result = self.fn(prompts, responses, labels)
        return list(result) if not isinstance(result, torch.Tensor) else result


class RemoteArm(RewardArm):
    """A reward model behind OpenRLHF's serve_rm HTTP protocol.

    POST {"query": [prompt + response], "prompts": [prompt], "labels": labels} -> {"rewards": [...]}.
    The timeout applies per socket operation; connection errors, timeouts and 5xx answers are retried
    `retries` times with a short backoff, so a call is bounded by about timeout * (retries + 1) + backoff.
    """

    def __init__(
        self, url: str, name: str | None = None, timeout: float = 30.0, retries: int = 2, batch_size: int = 64
    ):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"RemoteArm needs an http(s) URL, got {url!r}")
        self.url = url
        self.name = name or parsed.netloc
        self.timeout = timeout
        self.retries = retries
        self.batch_size = batch_size

    def check(self) -> None:
        """Raise RewardArmError if nothing listens at the URL (cheap: a TCP connect, no scoring)."""
        parsed = urlparse(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=self.timeout).close()
        except OSError as e:
            raise RewardArmError(f"arm {self.name!r}: reward server {self.url} is not reachable: {e}") from e

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        attempts = self.retries + 1
        cause = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    body = answer.read()
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RewardArmError(f"arm {self.name!r}: {self.url} answered HTTP {e.code} {e.reason}") from e
                cause = f"HTTP {e.code} {e.reason}"
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                cause = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            else:
                try:
                    return json.loads(body)
                except json.JSONDecodeError as e:
                    raise RewardArmError(f"arm {self.name!r}: {self.url} answered invalid JSON: {e}") from e
        raise RewardArmError(f"arm {self.name!r}: {self.url} failed after {attempts} attempts, last error: {cause}")

    def _score(self, prompts, responses, labels):
        rewards: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk_prompts = prompts[i : i + self.batch_size]
            chunk_responses = responses[i : i + self.batch_size]
            answer = self._post(
                {
                    "query": [p + r for p, r in zip(chunk_prompts, chunk_responses)],
                    "prompts": chunk_prompts,
                    "labels": None if labels is None else labels[i : i + self.batch_size],
                }
            )
            if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
                raise RewardArmError(f"arm {self.name!r}: {self.url} answered without a 'rewards' list")
            chunk = answer["rewards"]
            if len(chunk) != len(chunk_prompts):
                raise RewardArmError(
                    f"arm {self.name!r}: {self.url} returned {len(chunk)} rewards for {len(chunk_prompts)} samples"
                )
            for j, value in enumerate(chunk):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise RewardArmError(f"arm {self.name!r}: reward for sample {i + j} is not a number: {value!r}")
            rewards.extend(float(v) for v in chunk)
        return rewards


class NoisyArm(RewardArm):
    """Adds N(0, sigma^2) noise to another arm's scores, or (replace=True / arm=None) is pure noise.

    A pure-noise arm runs no model, so passes_per_sample is 0; a wrapped arm keeps its own cost.
    """

    def __init__(
        self,
        arm: RewardArm | None = None,
        sigma: float = 1.0,
        replace: bool = False,
        seed: int = 0,
        name: str | None = None,
    ):
        if sigma < 0:
            raise ValueError(f"NoisyArm sigma must be >= 0, got {sigma}")
        self.arm = None if replace else arm
        self.sigma = float(sigma)
        self.generator = torch.Generator().manual_seed(seed)
        self.passes_per_sample = self.arm.passes_per_sample if self.arm is not None else 0
        self.name = name or ("noise" if self.arm is None else f"{self.arm.name}+noise")

    def _score(self, prompts, responses, labels):
        # Score first: if the wrapped arm fails, no noise is drawn and the generator stays in step.
        base = torch.zeros(len(prompts)) if self.arm is None else self.arm.score(prompts, responses, labels)
        return base + torch.randn(len(prompts), generator=self.generator) * self.sigma

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ScoreNormalizer:
    """Running per-arm mean/std so arms on different scales can share a batch.

    Exact running statistics (Welford/Chan merge, unbiased std) by default; with `momentum` an
    exponential moving average where momentum is the weight kept by the old statistics (e.g. 0.99),
    which follows arms whose scale drifts as the policy trains.
    """

    def __init__(self, num_arms: int, momentum: float | None = None):
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        self.num_arms = num_arms
        self.momentum = momentum
        self.count = torch.zeros(num_arms, dtype=torch.long)
        self.mean = torch.zeros(num_arms, dtype=torch.float64)
        self.var = torch.zeros(num_arms, dtype=torch.float64)

    def update(self, arm_index: int, scores: torch.Tensor) -> None:
        x = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"ScoreNormalizer.update: non-finite scores for arm {arm_index}")
        n_old, n_new = int(self.count[arm_index]), x.numel()
        mean_old, mean_new = self.mean[arm_index].item(), x.mean().item()
        var_new = x.var().item() if n_new > 1 else 0.0
        delta = mean_new - mean_old
        if n_old == 0:
            mean, var = mean_new, var_new
        elif self.momentum is None:
            # Chan et al. merge of two (count, mean, sum of squared deviations) summaries.
            n = n_old + n_new
            m2 = self.var[arm_index].item() * (n_old - 1) + ((x - mean_new) ** 2).sum().item()
            m2 += delta**2 * n_old * n_new / n
            mean, var = mean_old + delta * n_new / n, m2 / (n - 1)
        else:
            # Variance of the mixture (old weight m, new weight 1 - m), including the shift in means.
            m = self.momentum
            mean = mean_old + (1 - m) * delta
            var = m * self.var[arm_index].item() + (1 - m) * var_new + m * (1 - m) * delta**2
        self.count[arm_index] += n_new
        self.mean[arm_index] = mean
        self.var[arm_index] = var

    def normalize(self, arm_index: int, scores: torch.Tensor) -> torch.Tensor:
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if self.count[arm_index] < 2:  # no spread known yet
            return scores
        std = max(self.var[arm_index].sqrt().item(), 1e-6)
        return ((scores.double() - self.mean[arm_index]) / std).to(scores.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["count"]) != self.num_arms:
            raise ValueError(f"normalizer state has {len(state['count'])} arms, expected {self.num_arms}")
        self.count = torch.as_tensor(state["count"], dtype=torch.long).clone()
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float64).clone()
        self.var = torch.as_tensor(state["var"], dtype=torch.float64).clone()


_FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def make_arm(spec, **kwargs) -> RewardArm:
    """Build an arm from a RewardArm, a callable, or a string spec (see the error message below)."""
    if isinstance(spec, RewardArm):
        return spec
    if callable(spec):
        return RuleArm(spec, **kwargs)
    if not isinstance(spec, str):
        raise ValueError(f"unknown reward-model spec {spec!r}: expected a RewardArm, a callable or a string")
    if spec.startswith(("http://", "https://")):
        return RemoteArm(spec, **kwargs)
    if spec == "noise" or spec.startswith("noise:"):
        sigma = spec.partition(":")[2] or "1.0"
        try:
            return NoisyArm(sigma=float(sigma), **kwargs)
        except ValueError as e:
            raise ValueError(f"bad noise spec {spec!r}: expected noise or noise:<sigma>") from e
    if spec.startswith("implicit:"):
        path = spec.removeprefix("implicit:")
        model, at, ref = path.rpartition("@")
        if at and not os.path.isdir(path):  # implicit:<dir>@<ref_dir>: the DPO reward against its reference
            return ImplicitRewardArm(model, ref_model=ref, **{"mode": "dpo", **kwargs})
        return ImplicitRewardArm(path, **{"mode": "likelihood", **kwargs})
    # A directory wins over module:function, since a directory name may contain ':'.
    if os.path.isdir(spec):
        return SequenceClassifierArm(spec, **kwargs)
    if _FUNCTION_SPEC.fullmatch(spec):
        module_name, function_name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"reward-model spec {spec!r}: cannot import {function_name} from {module_name}: {e}"
            ) from e
        if not callable(fn):
            raise ValueError(f"reward-model spec {spec!r} names {type(fn).__name__}, not a function")
        return RuleArm(fn, **kwargs)
    raise ValueError(
        f"unknown reward-model spec {spec!r}: expected an http(s) URL, module:function, a local model directory, "
        "implicit:<dir>[@<ref_dir>] or noise[:sigma]"
    )
