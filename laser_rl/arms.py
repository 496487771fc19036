"""Reward models ("arms") the bandit chooses between, behind one interface.

Every arm maps (prompts, responses, labels) to a float32 CPU tensor of scores, one per sample.
RewardArm.score checks what every arm returns in one place (_validated_scores): real numbers in a
flat list, tuple, tensor or array, one per sample, else a RewardArmError naming the arm. Arms never
reject non-finite values themselves: the selector does, so it can name the arm and sample and
optionally skip them.

Deadlines: RemoteArm always has one per score() call (connect, read, retries and backoff together);
RuleArm (callables and module:function specs) has an optional `timeout`. An arm that overruns raises
RewardArmError naming the arm.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import json
import math
import numbers
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn


class RewardArmError(ValueError):
    """A reward arm failed or answered something unusable; the message names the arm."""


def _one_line(error: BaseException) -> str:
    """An exception as one line (the CLI prints errors as one line)."""
    return " ".join(str(error).split()) or type(error).__name__


def _validated_scores(raw, n: int, name: str) -> torch.Tensor:
    """The one check of what an arm returned: n real numbers -> float32 CPU tensor [n].

    Accepted: a 1-D torch.Tensor or numpy array of a real (or bool) dtype, or a list/tuple whose items
    are real numbers, bools (1/0) or 0-d tensors. A dict, string, set, generator or nested list is an
    error: a dict's keys must never be taken for scores. NaN and inf pass (the selector handles them).
    """
    if isinstance(raw, (torch.Tensor, np.ndarray)):
        try:
            values = torch.as_tensor(raw).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardArmError(f"arm {name!r} returned an array that is not numbers: {_one_line(e)}") from e
        if values.is_complex():  # every other dtype as_tensor accepts is real (ints, floats, bools)
            raise RewardArmError(f"arm {name!r} returned scores of dtype {values.dtype}, not real numbers")
        if values.ndim != 1:
            raise RewardArmError(
                f"arm {name!r} returned scores of shape {tuple(values.shape)} for {n} samples: return a flat list of {n} numbers"
            )
    elif isinstance(raw, (list, tuple)):
        for j, value in enumerate(raw):
            is_scalar_tensor = isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex()
            if not (is_scalar_tensor or isinstance(value, (numbers.Real, np.bool_))):
                raise RewardArmError(f"arm {name!r}: score for sample {j} is not a number: {repr(value)[:80]}")
        values = torch.tensor([float(v) for v in raw], dtype=torch.float64)
    else:
        raise RewardArmError(
            f"arm {name!r} returned a {type(raw).__name__}, not scores: return a list, tuple or 1-D tensor of {n} numbers"
        )
    if values.numel() != n:
        raise RewardArmError(f"arm {name!r} returned {values.numel()} scores for {n} samples")
    return values.to(dtype=torch.float32, device="cpu")


class RewardArm:
    """Scores (prompt, response) pairs. Subclasses implement _score; score() checks its input and output.

    _score may return a list, tuple, 1-D tensor or array of real numbers, one per sample (see
    _validated_scores); anything else is a RewardArmError naming the arm.
    """

    name: str = "arm"
    passes_per_sample: int = 1  # RM forward passes one scored sample costs (for RM-pass accounting)

    def score(self, prompts: list[str], responses: list[str], labels: list | None = None) -> torch.Tensor:
        for what, items in (("prompts", prompts), ("responses", responses)):
            if isinstance(items, (str, bytes)):  # list("abc") would score three one-letter samples
                raise ValueError(f"arm {self.name!r}: {what} must be a list of strings, got one {type(items).__name__}")
        if len(prompts) != len(responses):
            raise ValueError(f"arm {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        if labels is not None and len(labels) != len(prompts):
            raise ValueError(f"arm {self.name!r}: {len(prompts)} prompts but {len(labels)} labels")
        if len(prompts) == 0:
            return torch.zeros(0, dtype=torch.float32)
        raw = self._score(list(prompts), list(responses), None if labels is None else list(labels))
        return _validated_scores(raw, len(prompts), self.name)

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
        from laser_rl.lm import token_logprobs

        logits = model(input_ids=ids, attention_mask=attention_mask.to(ids.device)).logits[:, :-1]
        token_logps = token_logprobs(logits, ids[:, 1:])
        return (token_logps.cpu() * response_mask[:, 1:]).sum(-1)

    @torch.no_grad()
    def _score(self, prompts, responses, labels):
        from laser_rl.lm import chat_text

        tok = self.tokenizer
        if tok.chat_template:
            # Chat models judge a response in their own format: the response follows the assistant header.
            prompts = [chat_text(tok, p) for p in prompts]
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


def _check_seconds(value, what: str, allow_none: bool = False) -> float | None:
    """A duration flag: a finite number of seconds > 0 (or None where that means 'off')."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _call_with_deadline(fn: Callable, args: tuple, seconds: float, name: str):
    """fn(*args) in a daemon worker thread; RewardArmError if it has not returned after `seconds`.

    Python cannot kill a thread: an overrunning fn keeps running in the background and its late
    result is dropped. Its exceptions are re-raised here, in the caller's thread.
    """
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e

    worker = threading.Thread(target=run, name=f"laser-rl arm {name}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise RewardArmError(
            f"arm {name!r} did not return within its {seconds:g} s timeout "
            "(the call keeps running in a background thread: Python cannot stop it)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class RuleArm(RewardArm):
    """A reward function with OpenRLHF's batch signature: fn(prompts, responses, labels) -> floats.

    fn returns one real number per sample as a list, tuple or 1-D tensor (bools count as 1/0); a dict,
    a string or nested lists are a RewardArmError naming the arm. Exceptions from fn propagate
    unchanged (the selector adds the arm and the samples).

    Deadline: off by default (timeout=None: fn runs in the calling thread for as long as it takes).
    With `timeout` seconds, fn runs in a worker thread and score() stops waiting at the deadline with
    a RewardArmError naming the arm. The worker cannot be killed: an overrunning fn keeps running in
    a daemon thread and its late result is dropped. Thread-local settings (torch.no_grad) do not reach
    the worker thread.
    """

    def __init__(
        self,
        fn: Callable[[list[str], list[str], list | None], Sequence[float]],
        name: str | None = None,
        timeout: float | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"RuleArm needs a callable, got {type(fn).__name__}")
        name = name or getattr(fn, "__name__", type(fn).__name__)
        self.timeout = _check_seconds(timeout, f"arm {name!r}: timeout", allow_none=True)
        self.fn = fn
        self.name = name

    def _score(self, prompts, responses, labels):
        if self.timeout is None:
            return self.fn(prompts, responses, labels)
        return _call_with_deadline(self.fn, (prompts, responses, labels), self.timeout, self.name)


class RemoteArm(RewardArm):
    """A reward model behind OpenRLHF's serve_rm HTTP protocol.

    POST {"query": [prompt + response], "prompts": [prompt], "labels": labels} -> {"rewards": [...]},
    one request per `batch_size` samples.

    Deadlines: a score() call returns or raises within `deadline` seconds, everything included:
    connecting, sending, reading the answer, every retry and the backoff sleeps between them. When the
    deadline passes, the open connection is shut and a RewardArmError names the arm, so a server that
    trickles its answer byte by byte cannot hold a call longer. The default deadline is
    timeout * (retries + 1) for each request the call sends (ceil(samples / batch_size) requests).
    `timeout` also bounds each single socket operation (connect, one read) inside that. Not covered:
    the host name lookup (DNS), which the OS resolver bounds; use an IP address to avoid it.
    Connection errors, timeouts and 5xx answers are retried up to `retries` times while the deadline
    leaves time (backoff 0.2 s, 0.4 s, ... at most 2 s); 4xx answers and unusable answers are not.
    Proxy environment variables (http_proxy) are not used.
    """

    def __init__(
        self,
        url: str,
        name: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        batch_size: int = 64,
        deadline: float | None = None,
    ):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"RemoteArm needs an http(s) URL, got {url!r}")
        name = name or parsed.netloc
        timeout = _check_seconds(timeout, f"arm {name!r}: timeout")
        deadline = _check_seconds(deadline, f"arm {name!r}: deadline", allow_none=True)
        for what, value, low in (("retries", retries, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"arm {name!r}: {what} must be an integer >= {low}, got {value!r}")
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError as e:
            raise ValueError(f"RemoteArm URL {url!r} has a bad port: {e}") from e
        self.url = url
        self.name = name
        self.timeout = timeout
        self.retries = int(retries)
        self.batch_size = int(batch_size)
        self.deadline = deadline
        self._address = (parsed.scheme, parsed.hostname, port, (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else ""))

    def check(self) -> None:
        """Raise RewardArmError if nothing listens at the URL (cheap: a TCP connect, no scoring)."""
        _, host, port, _ = self._address
        try:
            socket.create_connection((host, port), timeout=self.timeout).close()
        except OSError as e:
            raise RewardArmError(f"arm {self.name!r}: reward server {self.url} is not reachable: {e}") from e

    def _request(self, data: bytes, seconds: float) -> tuple[int, str, bytes]:
        """One POST, finished within `seconds`: a watchdog shuts the socket when they have passed."""
        scheme, host, port, path = self._address
        per_operation = min(self.timeout, seconds)
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=per_operation, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=per_operation)
        lock, expired = threading.Lock(), threading.Event()

        def expire():
            with lock:
                expired.set()
                if conn.sock is not None:  # shutdown wakes a recv blocked in the other thread
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(seconds, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()  # bounded by the per-operation timeout (the watchdog has no socket yet)
            with lock:
                if expired.is_set():
                    raise TimeoutError("deadline passed while connecting")
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            answer = conn.getresponse()
            status, reason, body = answer.status, answer.reason, answer.read()
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise TimeoutError("deadline passed before the answer was complete") from e
            raise
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():  # a close-delimited body may end "cleanly" when the watchdog shut the socket
            raise TimeoutError("deadline passed before the answer was complete")
        return status, reason, body

    def _post(self, payload: dict, end: float, deadline: float) -> dict:
        data = json.dumps(payload).encode()
        attempts, cause, out_of_time = 0, "none", False
        for attempt in range(self.retries + 1):
            pause = min(0.2 * 2 ** (attempt - 1), 2.0) if attempt else 0.0
            if time.monotonic() + pause >= end:
                out_of_time = True
                break
            time.sleep(pause)
            remaining = end - time.monotonic()
            if remaining <= 0:
                out_of_time = True
                break
            attempts += 1
            try:
                status, reason, body = self._request(data, remaining)
            except (OSError, http.client.HTTPException) as e:  # TimeoutError and ConnectionError are OSErrors
                cause = f"{type(e).__name__}: {_one_line(e)}"
                continue
            if status >= 500:
                cause = f"HTTP {status} {reason}"
                continue
            if not 200 <= status < 300:  # the request itself is wrong: retrying cannot help
                raise RewardArmError(f"arm {self.name!r}: {self.url} answered HTTP {status} {reason}")
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RewardArmError(f"arm {self.name!r}: {self.url} answered invalid JSON: {_one_line(e)}") from e
        if out_of_time or time.monotonic() >= end:
            raise RewardArmError(
                f"arm {self.name!r}: {self.url} gave no answer within the {deadline:g} s deadline "
                f"({attempts} attempt{'s' * (attempts != 1)}, last error: {cause})"
            )
        raise RewardArmError(f"arm {self.name!r}: {self.url} failed after {attempts} attempts, last error: {cause}")

    def _score(self, prompts, responses, labels):
        starts = range(0, len(prompts), self.batch_size)
        deadline = self.deadline if self.deadline is not None else self.timeout * (self.retries + 1) * len(starts)
        end = time.monotonic() + deadline  # one deadline for the whole call, shared by its requests
        rewards: list = []
        for i in starts:
            chunk_prompts = prompts[i : i + self.batch_size]
            chunk_responses = responses[i : i + self.batch_size]
            answer = self._post(
                {
                    "query": [p + r for p, r in zip(chunk_prompts, chunk_responses)],
                    "prompts": chunk_prompts,
                    "labels": None if labels is None else labels[i : i + self.batch_size],
                },
                end,
                deadline,
            )
            if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
                raise RewardArmError(f"arm {self.name!r}: {self.url} answered without a 'rewards' list")
            chunk = answer["rewards"]
            if len(chunk) != len(chunk_prompts):
                raise RewardArmError(
                    f"arm {self.name!r}: {self.url} returned {len(chunk)} rewards for {len(chunk_prompts)} samples"
                )
            rewards.extend(chunk)  # checked with every other arm's scores in RewardArm.score
        return rewards


class NoisyArm(RewardArm):
    """Adds N(0, sigma^2) noise to another arm's scores, or (replace=True / arm=None) is pure noise.

    RM-pass accounting, the same in every command: a pure-noise arm stands for a broken reward server
    (called and paid for, its answer garbage), so it costs 1 pass per sample like any single RM, and a
    K-arm ensemble that includes it costs K passes per sample. A NoisyArm wrapping an arm costs what
    the wrapped arm costs. `passes_per_sample` overrides either (e.g. 0 for a free stand-in).
    """

    def __init__(
        self,
        arm: RewardArm | None = None,
        sigma: float = 1.0,
        replace: bool = False,
        seed: int = 0,
        name: str | None = None,
        passes_per_sample: int | None = None,
    ):
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"NoisyArm sigma must be a finite number >= 0, got {sigma!r}")
        if passes_per_sample is not None and (
            isinstance(passes_per_sample, bool) or not isinstance(passes_per_sample, numbers.Integral) or passes_per_sample < 0
        ):
            raise ValueError(f"NoisyArm passes_per_sample must be an integer >= 0, got {passes_per_sample!r}")
        self.arm = None if replace else arm
        self.sigma = float(sigma)
        self.generator = torch.Generator().manual_seed(seed)
        if passes_per_sample is None:
            passes_per_sample = self.arm.passes_per_sample if self.arm is not None else 1
        self.passes_per_sample = int(passes_per_sample)
        self.name = name or ("noise" if self.arm is None else f"{self.arm.name}+noise")

    def _score(self, prompts, responses, labels):
        # Score first: if the wrapped arm fails, no noise is drawn and the generator stays in step.
        base = torch.zeros(len(prompts)) if self.arm is None else self.arm.score(prompts, responses, labels)
        return base + torch.randn(len(prompts), generator=self.generator) * self.sigma

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        try:  # on a scratch generator first: a bad state leaves this arm's generator untouched
            torch.Generator().set_state(state["generator"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"arm {self.name!r}: not a NoisyArm state ({type(e).__name__}: {_one_line(e)})") from e
        self.generator.set_state(state["generator"])


class ScoreNormalizer:
    """Running per-arm mean/std so arms on different scales can share a batch.

    Exact running statistics (Welford/Chan merge, unbiased std) by default; with `momentum` an
    exponential moving average where momentum is the weight kept by the old statistics (e.g. 0.99),
    which follows arms whose scale drifts as the policy trains. update() and load_state_dict() check
    everything first: when they raise, the statistics are as they were.
    """

    def __init__(self, num_arms: int, momentum: float | None = None):
        if isinstance(num_arms, bool) or not isinstance(num_arms, numbers.Integral) or num_arms < 1:
            raise ValueError(f"ScoreNormalizer num_arms must be an integer >= 1, got {num_arms!r}")
        if momentum is not None and not 0.0 < momentum < 1.0:  # NaN fails this too
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        self.num_arms = int(num_arms)
        self.momentum = momentum
        self.count = torch.zeros(num_arms, dtype=torch.long)
        self.mean = torch.zeros(num_arms, dtype=torch.float64)
        self.var = torch.zeros(num_arms, dtype=torch.float64)

    def _arm(self, arm_index) -> int:
        # operator.index-like: ints and integer tensors, not bools or floats; -1 must not mean the last arm.
        if isinstance(arm_index, bool) or not isinstance(arm_index, (numbers.Integral, torch.Tensor)):
            raise ValueError(f"ScoreNormalizer: arm index must be an integer, got {arm_index!r}")
        if isinstance(arm_index, torch.Tensor) and (arm_index.numel() != 1 or arm_index.is_floating_point()):
            raise ValueError(f"ScoreNormalizer: arm index must be one integer, got {arm_index!r}")
        k = int(arm_index)
        if not 0 <= k < self.num_arms:
            raise ValueError(f"ScoreNormalizer: arm index {k} is out of range for {self.num_arms} arms")
        return k

    def update(self, arm_index: int, scores: torch.Tensor) -> None:
        k = self._arm(arm_index)
        try:
            x = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"ScoreNormalizer.update: scores for arm {k} are not numbers: {_one_line(e)}") from e
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"ScoreNormalizer.update: non-finite scores for arm {k}")
        n_old, n_new = int(self.count[k]), x.numel()
        mean_old, mean_new = self.mean[k].item(), x.mean().item()
        var_new = x.var().item() if n_new > 1 else 0.0
        delta = mean_new - mean_old
        if n_old == 0:
            mean, var = mean_new, var_new
        elif self.momentum is None:
            # Chan et al. merge of two (count, mean, sum of squared deviations) summaries.
            n = n_old + n_new
            m2 = self.var[k].item() * (n_old - 1) + ((x - mean_new) ** 2).sum().item()
            m2 += delta**2 * n_old * n_new / n
            mean, var = mean_old + delta * n_new / n, m2 / (n - 1)
        else:
            # Variance of the mixture (old weight m, new weight 1 - m), including the shift in means.
            m = self.momentum
            mean = mean_old + (1 - m) * delta
            var = m * self.var[k].item() + (1 - m) * var_new + m * (1 - m) * delta**2
        if not (math.isfinite(mean) and math.isfinite(var)):  # finite scores near 1e308 can still overflow
            raise ValueError(f"ScoreNormalizer.update: scores for arm {k} overflow the running statistics")
        self.count[k] += n_new
        self.mean[k] = mean
        self.var[k] = var

    def normalize(self, arm_index: int, scores: torch.Tensor) -> torch.Tensor:
        k = self._arm(arm_index)
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if self.count[k] < 2:  # no spread known yet
            return scores
        std = max(self.var[k].sqrt().item(), 1e-6)
        return ((scores.double() - self.mean[k]) / std).to(scores.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state: dict) -> None:
        try:
            count = torch.as_tensor(state["count"], dtype=torch.long).clone()
            mean = torch.as_tensor(state["mean"], dtype=torch.float64).clone()
            var = torch.as_tensor(state["var"], dtype=torch.float64).clone()
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"not a ScoreNormalizer state ({type(e).__name__}: {_one_line(e)})") from e
        for what, value in (("count", count), ("mean", mean), ("var", var)):
            if value.shape != (self.num_arms,):
                raise ValueError(f"normalizer state {what} has shape {tuple(value.shape)}, expected {self.num_arms} arms")
        if (count < 0).any() or not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or (var < 0).any():
            raise ValueError("normalizer state has negative counts or variances, or non-finite values")
        self.count, self.mean, self.var = count, mean, var


_FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_SPEC_FORMS = "an http(s) URL, module:function, a local model directory, implicit:<dir>[@<ref_dir>] or noise[:sigma]"


def _model_dir(path: str, spec: str) -> str:
    """A spec's local model directory, with ~ expanded; a ValueError naming the path if there is none."""
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise ValueError(
            f"reward-model spec {spec!r}: path {path!r} does not exist "
            "(hub ids are not downloaded: pass a local model directory)"
        )
    if not os.path.isdir(expanded):
        raise ValueError(f"reward-model spec {spec!r}: {path!r} is a file, not a model directory")
    return expanded


def _import_function(spec: str) -> Callable:
    """module:function, looked up in the current working directory first, then on sys.path.

    The console script `laser-rl` does not put the working directory on sys.path the way `python -m`
    (the OpenRLHF launcher) does, so it is added for this lookup only and removed after.
    """
    module_name, function_name = spec.split(":")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module file written a moment ago must be found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"reward-model spec {spec!r}: no module {module_name!r} in the current directory ({cwd}) "
                "or on the Python path"
            ) from e
        raise ValueError(f"reward-model spec {spec!r}: module {module_name!r} failed to import: {_one_line(e)}") from e
    except Exception as e:  # any error raised by the user's module, in one line
        raise ValueError(
            f"reward-model spec {spec!r}: module {module_name!r} failed to import: {type(e).__name__}: {_one_line(e)}"
        ) from e
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    if not hasattr(module, function_name):
        where = getattr(module, "__file__", None) or module_name
        raise ValueError(f"reward-model spec {spec!r}: module {module_name!r} ({where}) has no function {function_name!r}")
    fn = getattr(module, function_name)
    if not callable(fn):
        raise ValueError(f"reward-model spec {spec!r} names a {type(fn).__name__}, not a function")
    return fn


def make_arm(spec, **kwargs) -> RewardArm:
    """Build an arm from a RewardArm, a callable, or a string spec; kwargs go to the arm's class.

    String specs: an http(s) URL (RemoteArm), noise[:sigma] (a pure-noise NoisyArm), implicit:<dir> or
    implicit:<dir>@<ref_dir> (ImplicitRewardArm), a local directory (SequenceClassifierArm, may be
    given with ~), or module:function (RuleArm; the module is looked up in the current working
    directory first, in every command). Every error is one ValueError line naming the spec: a path
    that does not exist says "does not exist" with the path.
    """
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
            raise ValueError(f"bad noise spec {spec!r}: expected noise or noise:<sigma> with a finite sigma >= 0") from e
    if spec.startswith("implicit:"):
        path = spec.removeprefix("implicit:")
        model, at, ref = path.rpartition("@")
        if at and not os.path.isdir(os.path.expanduser(path)):  # implicit:<dir>@<ref_dir>: DPO reward vs. its reference
            model_dir, ref_dir = _model_dir(model, spec), _model_dir(ref, spec)
            return ImplicitRewardArm(model_dir, ref_model=ref_dir, **{"mode": "dpo", **kwargs})
        return ImplicitRewardArm(_model_dir(path, spec), **{"mode": "likelihood", **kwargs})
    # A directory wins over module:function, since a directory name may contain ':'.
    if os.path.isdir(os.path.expanduser(spec)):
        return SequenceClassifierArm(os.path.expanduser(spec), **kwargs)
    if "/" in spec or os.sep in spec or spec.startswith((".", "~")):  # meant as a path (or a hub id)
        _model_dir(spec, spec)  # raises: does not exist / is a file
    if _FUNCTION_SPEC.fullmatch(spec):
        return RuleArm(_import_function(spec), **kwargs)
    raise ValueError(f"unknown reward-model spec {spec!r}: no directory of that name exists, and it is not {_SPEC_FORMS}")
