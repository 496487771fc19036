"""Reward arms on tiny local models and a real local HTTP server."""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from laser_rl.arms import (
    ImplicitRewardArm,
    NoisyArm,
    RemoteArm,
    RewardArm,
    RewardArmError,
    RuleArm,
    ScoreNormalizer,
    SequenceClassifierArm,
    make_arm,
)

PROMPTS = ["What is 2 + 3?", "Write a short happy poem about the sea.", "Is Tom an animal?"]
RESPONSES = [" The answer is 5.", " The sun and the sea, happy.", " Yes."]


def _tiny_llama(model_cls, tokenizer, seed: int):
    """A tiny Llama sized to `tokenizer` (the conftest builders are not importable under importlib mode)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    return model_cls(config).eval()


@torch.no_grad()
def _classifier_logit(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits[0, 0].item()


# --- SequenceClassifierArm -------------------------------------------------------------------


def test_classifier_matches_hand_computation_and_batching(reward_model, tokenizer):
    arm = SequenceClassifierArm(reward_model, tokenizer, batch_size=16)
    batched = arm.score(PROMPTS, RESPONSES)
    assert batched.dtype == torch.float32 and batched.shape == (3,)
    # Texts have different lengths, so the batch is padded; each sample must score as if alone.
    alone = torch.cat([arm.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    by_hand = _classifier_logit(reward_model, tokenizer, PROMPTS[1] + RESPONSES[1])
    assert batched[1].item() == pytest.approx(by_hand, abs=1e-5)
    assert arm.score([], []).shape == (0,)
    with pytest.raises(ValueError):
        arm.score(PROMPTS, RESPONSES[:2])


def test_classifier_without_pad_token_and_with_chat_template(reward_model, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    model = copy.deepcopy(reward_model)  # the arm points the model's pad_token_id at eos
    arm = SequenceClassifierArm(model, tok, batch_size=2)
    assert tok.pad_token == tok.eos_token  # pads with eos when the tokenizer has no pad token
    scores = arm.score(PROMPTS, RESPONSES)
    expected = [_classifier_logit(model, tok, f"<user>{p}<assistant>{r}") for p, r in zip(PROMPTS, RESPONSES)]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_classifier_with_its_own_tokenizer(char_tokenizer, tokenizer):
    # The RM reads characters while the policy (BPE) would not: text in, the RM's own ids inside.
    char_rm = _tiny_llama(LlamaForSequenceClassification, char_tokenizer, seed=3)
    arm = SequenceClassifierArm(char_rm, char_tokenizer)
    assert char_tokenizer(PROMPTS[0])["input_ids"] != tokenizer(PROMPTS[0])["input_ids"]
    scores = arm.score(PROMPTS, RESPONSES)
    expected = [_classifier_logit(char_rm, char_tokenizer, p + r) for p, r in zip(PROMPTS, RESPONSES)]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_classifier_loaded_from_path(reward_model, tokenizer, tmp_path):
    path = tmp_path / "my-rm"
    reward_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    arm = make_arm(str(path))
    assert isinstance(arm, SequenceClassifierArm) and arm.name == "my-rm"
    expected = SequenceClassifierArm(reward_model, tokenizer).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(arm.score(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="missing-rm"):
        SequenceClassifierArm(str(tmp_path / "missing-rm"))


# --- ImplicitRewardArm -----------------------------------------------------------------------


@torch.no_grad()
def _response_logps(model, tokenizer, prompt: str, response: str) -> torch.Tensor:
    """Log-probs of the response tokens, by hand: one unpadded sequence."""
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(prompt + response, return_tensors="pt")["input_ids"]
    assert ids[0, :n_prompt].tolist() == tokenizer(prompt)["input_ids"]  # the boundary does not merge
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[n_prompt - 1 :]


def test_implicit_likelihood_matches_hand_computation(causal_lm, tokenizer):
    arm = ImplicitRewardArm(causal_lm, tokenizer, mode="likelihood", batch_size=8)
    assert arm.passes_per_sample == 1
    scores = arm.score(PROMPTS, RESPONSES)
    for i in range(len(PROMPTS)):
        expected = _response_logps(causal_lm, tokenizer, PROMPTS[i], RESPONSES[i]).mean().item()
        assert scores[i].item() == pytest.approx(expected, abs=1e-4)
    alone = torch.cat([arm.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)


def test_implicit_dpo(causal_lm, tokenizer):
    with pytest.raises(ValueError, match="ref_model"):
        ImplicitRewardArm(causal_lm, tokenizer, mode="dpo")
    same = ImplicitRewardArm(causal_lm, tokenizer, ref_model=causal_lm, beta=0.1)
    assert same.passes_per_sample == 2
    torch.testing.assert_close(same.score(PROMPTS, RESPONSES), torch.zeros(3))

    ref = _tiny_llama(LlamaForCausalLM, tokenizer, seed=5)
    arm = ImplicitRewardArm(causal_lm, tokenizer, ref_model=ref, beta=0.5, batch_size=2)
    scores = arm.score(PROMPTS, RESPONSES)
    for i in range(len(PROMPTS)):
        policy = _response_logps(causal_lm, tokenizer, PROMPTS[i], RESPONSES[i]).sum()
        reference = _response_logps(ref, tokenizer, PROMPTS[i], RESPONSES[i]).sum()
        assert scores[i].item() == pytest.approx(0.5 * (policy - reference).item(), abs=1e-4)
    assert scores.abs().min() > 0


def test_implicit_from_path(causal_lm, tokenizer, tmp_path):
    causal_lm.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    arm = make_arm(f"implicit:{tmp_path / 'policy'}")
    assert isinstance(arm, ImplicitRewardArm) and arm.mode == "likelihood" and arm.name == "policy"
    expected = ImplicitRewardArm(causal_lm, tokenizer, mode="likelihood").score(PROMPTS, RESPONSES)
    torch.testing.assert_close(arm.score(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=1e-5)


def test_implicit_dpo_from_paths(causal_lm, reference_lm, tokenizer, tmp_path):
    for name, model in (("dpo-model", causal_lm), ("sft-ref", reference_lm)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    arm = make_arm(f"implicit:{tmp_path / 'dpo-model'}@{tmp_path / 'sft-ref'}", beta=0.5)
    assert isinstance(arm, ImplicitRewardArm) and arm.mode == "dpo" and arm.passes_per_sample == 2
    expected = ImplicitRewardArm(causal_lm, tokenizer, ref_model=reference_lm, beta=0.5).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(arm.score(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.zeros_like(expected))  # two different models: a real margin
    with pytest.raises(ValueError, match="no-such-ref"):
        make_arm(f"implicit:{tmp_path / 'dpo-model'}@{tmp_path / 'no-such-ref'}")


@torch.no_grad()
def test_long_inputs_lose_the_prompt_start_not_the_response(reward_model, causal_lm, tokenizer):
    prompt, response = "Once upon a time " * 40 + PROMPTS[0], RESPONSES[0]
    full_ids = tokenizer(prompt + response)["input_ids"]
    n_response = len(full_ids) - len(tokenizer(prompt)["input_ids"])
    max_length = n_response + 6
    assert len(full_ids) > 3 * max_length
    kept = full_ids[-max_length:]  # what survives: the prompt's last tokens, then the whole response
    ids = torch.tensor([kept])

    classifier = SequenceClassifierArm(reward_model, tokenizer, max_length=max_length)
    assert classifier.score([prompt], [response]).item() == pytest.approx(reward_model(input_ids=ids).logits[0, 0].item(), abs=1e-5)

    implicit = ImplicitRewardArm(causal_lm, tokenizer, mode="likelihood", max_length=max_length)
    logps = torch.log_softmax(causal_lm(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert implicit.score([prompt], [response]).item() == pytest.approx(logps[-n_response:].mean().item(), abs=1e-4)
    assert tokenizer.truncation_side == "right"  # the shared tokenizer's own setting is restored


# --- RuleArm ---------------------------------------------------------------------------------


def exact_answer(prompts, responses, labels):
    return [float(r.strip().rstrip(".").split()[-1] == str(y)) for r, y in zip(responses, labels)]


def test_rule_arm_with_labels():
    arm = RuleArm(exact_answer)
    assert arm.name == "exact_answer" and arm.passes_per_sample == 1
    scores = arm.score(["What is 2 + 3?"] * 3, ["The answer is 5.", "It is 6", "5"], labels=[5, 5, 5])
    assert scores.tolist() == [1.0, 0.0, 1.0] and scores.dtype == torch.float32
    with pytest.raises(ValueError, match="labels"):
        arm.score(["a", "b"], ["c", "d"], labels=[1])


def test_rule_arm_errors():
    with pytest.raises(RewardArmError, match="short"):
        RuleArm(lambda p, r, y: [1.0], name="short").score(["a", "b"], ["c", "d"])
    with pytest.raises(RewardArmError, match="bad"):
        RuleArm(lambda p, r, y: ["x", None], name="bad").score(["a", "b"], ["c", "d"])

    def broken(prompts, responses, labels):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):  # propagates untouched: the selector wraps it
        RuleArm(broken).score(["a"], ["b"])


# --- RemoteArm -------------------------------------------------------------------------------


@contextlib.contextmanager
def _serve(respond):
    """Run a real HTTP server on 127.0.0.1; respond(payload) -> (status, body dict). Yields (url, requests)."""
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(payload)
            status, body = respond(payload)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/get_reward", requests
    finally:
        server.shutdown()
        server.server_close()


def test_remote_arm_scores():
    def lengths(payload):  # serve_rm also answers "scores"; only "rewards" counts
        return 200, {"rewards": [float(len(q)) for q in payload["query"]], "scores": [0] * len(payload["query"])}

    with _serve(lengths) as (url, requests):
        arm = RemoteArm(url, timeout=5.0, batch_size=2)
        arm.check()
        scores = arm.score(PROMPTS, RESPONSES, labels=["5", "poem", "yes"])
    assert scores.tolist() == [float(len(p + r)) for p, r in zip(PROMPTS, RESPONSES)]
    assert len(requests) == 2  # batch_size 2 over 3 samples
    assert requests[0] == {"query": [PROMPTS[0] + RESPONSES[0], PROMPTS[1] + RESPONSES[1]],
                           "prompts": PROMPTS[:2], "labels": ["5", "poem"]}
    assert arm.name == url.split("/")[2]


def test_remote_arm_server_error_is_retried():
    with _serve(lambda p: (500, {"error": "oops"})) as (url, requests):
        with pytest.raises(RewardArmError, match="3 attempts") as info:
            RemoteArm(url, timeout=1.0, retries=2).score(PROMPTS, RESPONSES)
    assert "3 attempts" in str(info.value) and "500" in str(info.value) and url in str(info.value)
    assert len(requests) == 3


def test_remote_arm_timeout_is_bounded():
    def slow(payload):
        time.sleep(1.5)
        return 200, {"rewards": [0.0] * len(payload["query"])}

    timeout, retries = 0.3, 2
    with _serve(slow) as (url, _):
        start = time.monotonic()
        # Default deadline: timeout * (retries + 1) for the one request; the backoff sleeps count against it.
        with pytest.raises(RewardArmError, match=r"within the 0.9 s deadline \(\d attempt"):
            RemoteArm(url, timeout=timeout, retries=retries).score(PROMPTS, RESPONSES)
        assert time.monotonic() - start < timeout * (retries + 1) + 1.0


def test_remote_arm_wrong_answers_are_not_retried():
    with _serve(lambda p: (200, {"rewards": [1.0]})) as (url, requests):
        with pytest.raises(RewardArmError, match="1 rewards for 3 samples"):
            RemoteArm(url, timeout=5.0).score(PROMPTS, RESPONSES)
    assert len(requests) == 1
    with _serve(lambda p: (200, {"scores": [1.0, 2.0, 3.0]})) as (url, _):
        with pytest.raises(RewardArmError, match="rewards"):
            RemoteArm(url, timeout=5.0).score(PROMPTS, RESPONSES)
    with _serve(lambda p: (200, {"rewards": [1.0, "x", 3.0]})) as (url, _):
        with pytest.raises(RewardArmError, match="sample 1"):
            RemoteArm(url, timeout=5.0).score(PROMPTS, RESPONSES)


def test_remote_arm_server_down():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    arm = RemoteArm(f"http://127.0.0.1:{port}/get_reward", timeout=0.5, retries=1)
    with pytest.raises(RewardArmError, match="not reachable"):
        arm.check()
    with pytest.raises(RewardArmError, match="2 attempts"):
        arm.score(PROMPTS, RESPONSES)


# --- NoisyArm and ScoreNormalizer ------------------------------------------------------------


def test_noisy_arm_seeded_and_restorable():
    pure = NoisyArm(sigma=0.3, seed=7)
    assert pure.name == "noise" and pure.passes_per_sample == 1  # a broken RM server: called and paid for
    first = pure.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(first, torch.randn(3, generator=torch.Generator().manual_seed(7)) * 0.3)
    torch.testing.assert_close(NoisyArm(sigma=0.3, seed=7).score(PROMPTS, RESPONSES), first)
    assert not torch.equal(NoisyArm(sigma=0.3, seed=8).score(PROMPTS, RESPONSES), first)

    state = pure.state_dict()
    upcoming = pure.score(PROMPTS, RESPONSES)
    restored = NoisyArm(sigma=0.3, seed=123)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.score(PROMPTS, RESPONSES), upcoming)


def test_noisy_arm_wraps_or_replaces():
    base = RuleArm(lambda p, r, y: [10.0] * len(p), name="ten")
    noisy = NoisyArm(base, sigma=1.0, seed=0)
    assert noisy.name == "ten+noise" and noisy.passes_per_sample == 1
    expected = 10.0 + torch.randn(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy.score(PROMPTS, RESPONSES), expected)

    def never(prompts, responses, labels):
        raise AssertionError("replace mode must not run the wrapped arm")

    replaced = NoisyArm(RuleArm(never), sigma=1.0, replace=True, seed=0)
    assert replaced.passes_per_sample == 1  # pure noise, charged like one RM
    torch.testing.assert_close(replaced.score(PROMPTS, RESPONSES), expected - 10.0)


def test_score_normalizer_matches_torch():
    torch.manual_seed(0)
    norm = ScoreNormalizer(num_arms=2)
    x = torch.tensor([3.0])
    norm.update(0, x)
    torch.testing.assert_close(norm.normalize(0, x), x)  # identity until 2 samples are seen
    seen = {0: [x], 1: []}
    for step in range(4):
        for arm, scale in ((0, 1.0), (1, 100.0)):
            batch = torch.randn(5 + step) * scale + scale
            norm.update(arm, batch)
            seen[arm].append(batch)
    probe = torch.tensor([0.0, 1.0, 250.0])
    for arm in (0, 1):
        data = torch.cat(seen[arm]).double()
        assert norm.mean[arm].item() == pytest.approx(data.mean().item(), rel=1e-9)
        assert norm.var[arm].sqrt().item() == pytest.approx(data.std().item(), rel=1e-9)
        expected = ((probe.double() - data.mean()) / data.std()).float()
        torch.testing.assert_close(norm.normalize(arm, probe), expected)

    restored = ScoreNormalizer(num_arms=2)
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored.normalize(1, probe), norm.normalize(1, probe))
    with pytest.raises(ValueError):
        ScoreNormalizer(num_arms=3).load_state_dict(norm.state_dict())
    with pytest.raises(ValueError, match="non-finite"):
        norm.update(0, torch.tensor([float("nan")]))


def test_score_normalizer_ema():
    norm = ScoreNormalizer(num_arms=1, momentum=0.9)
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([10.0, 14.0])
    norm.update(0, a)
    norm.update(0, b)
    assert norm.mean[0].item() == pytest.approx(0.9 * 1.0 + 0.1 * 12.0)
    # Mixture variance: weighted variances plus the spread between the two means.
    assert norm.var[0].item() == pytest.approx(0.9 * a.var().item() + 0.1 * b.var().item() + 0.9 * 0.1 * 11.0**2)


# --- make_arm --------------------------------------------------------------------------------


def test_make_arm_specs(tmp_path, monkeypatch):
    arm = NoisyArm()
    assert make_arm(arm) is arm
    assert isinstance(make_arm(exact_answer), RuleArm)
    remote = make_arm("http://127.0.0.1:8000/get_reward", timeout=2.0)
    assert isinstance(remote, RemoteArm) and remote.name == "127.0.0.1:8000" and remote.timeout == 2.0
    assert isinstance(make_arm("https://rm.example.org/score"), RemoteArm)
    assert make_arm("noise").sigma == 1.0 and make_arm("noise:0.3").sigma == pytest.approx(0.3)
    assert make_arm("noise:0.3", seed=4).name == "noise"

    (tmp_path / "my_laser_rewards.py").write_text(
        "def exact(prompts, responses, labels):\n"
        "    return [float(r == y) for r, y in zip(responses, labels)]\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rule = make_arm("my_laser_rewards:exact")
    assert isinstance(rule, RuleArm) and rule.name == "exact"
    assert rule.score(["q", "q"], ["5", "6"], labels=["5", "5"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("noise:loud", "noise"),
        ("no_such_module_xyz:reward", "no_such_module_xyz:reward"),
        ("json:no_such_function", "json:no_such_function"),
        ("json:__name__", "not a function"),
        ("implicit:/no/such/dir", "/no/such/dir"),
        ("/no/such/model/dir", "path '/no/such/model/dir' does not exist"),
        ("HuggingFaceH4/zephyr-7b-alpha", "'HuggingFaceH4/zephyr-7b-alpha' does not exist"),
        ("no_such_dir_or_spec", "unknown reward-model spec"),
        (42, "unknown reward-model spec"),
    ],
)
def test_make_arm_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        make_arm(spec)


def test_every_arm_is_a_reward_arm():
    arm_types = (SequenceClassifierArm, ImplicitRewardArm, RuleArm, RemoteArm, NoisyArm)
    assert all(issubclass(c, RewardArm) for c in arm_types)
    assert issubclass(RewardArmError, ValueError)
