"""laser_rl.lm: the one sampler, log-prob and context path, checked against Hugging Face and plain forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from laser_rl import lm
from laser_rl.context import prompt_hidden_states

PROMPTS = ["What is 2 + 3?", "Hi", "All cats are animals. Tom is a cat. Is Tom an animal?"]


def _generate(model, tokenizer, prompts, n, max_new_tokens, **kw):
    """Hugging Face generate on left-padded prompts: the reference sampler (what the paper modes used before lm)."""
    ids, mask = lm.pad(lm.encode_prompts(tokenizer, prompts)[0], tokenizer.pad_token_id, "left")
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("top_p, top_k, temperature", [(1.0, 0, 0.8), (0.7, 0, 1.0), (1.0, 7, 1.3)])
def test_sample_draws_the_same_tokens_as_hf_generate(tokenizer, causal_lm, top_p, top_k, temperature):
    torch.manual_seed(3)
    rollout = lm.sample(causal_lm, tokenizer, PROMPTS, 4, 9, temperature, top_p=top_p, top_k=top_k)
    torch.manual_seed(3)
    expected = _generate(causal_lm, tokenizer, PROMPTS, 4, 9, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    assert torch.equal(rollout.response_ids, expected)
    # Prompt-major, responses decoded up to and including the first eos (special tokens dropped).
    assert len(rollout.responses) == 12 and rollout.n == 4 and rollout.prompts == PROMPTS
    row = 5
    assert rollout.responses[row] == tokenizer.decode(rollout.response_tokens(row), skip_special_tokens=True)
    assert rollout.grouped()[1][1] == rollout.responses[row]


def test_chunked_sampling_equals_generate_chunk_by_chunk(tokenizer, causal_lm):
    torch.manual_seed(0)
    rollout = lm.sample(causal_lm, tokenizer, PROMPTS, 2, 6, 1.0, batch_size=2)
    torch.manual_seed(0)
    chunks = [_generate(causal_lm, tokenizer, PROMPTS[:2], 2, 6, do_sample=True, top_k=0), _generate(causal_lm, tokenizer, PROMPTS[2:], 2, 6, do_sample=True, top_k=0)]
    for got, want in zip((rollout.response_ids[:4], rollout.response_ids[4:]), chunks):
        assert torch.equal(got[:, : want.shape[1]], want)
        assert (got[:, want.shape[1] :] == tokenizer.pad_token_id).all()  # the shorter chunk is padded
    assert rollout.context_hidden.shape == (3, 32)


def test_greedy_is_hf_greedy_repeated_n_times(tokenizer, causal_lm):
    for greedy in (dict(do_sample=False), dict(temperature=0.0)):
        rollout = lm.sample(causal_lm, tokenizer, PROMPTS, 3, 5, **greedy)
        expected = _generate(causal_lm, tokenizer, PROMPTS, 1, 5, do_sample=False)
        assert torch.equal(rollout.response_ids, expected.repeat_interleave(3, dim=0))


def test_top_p_warper_equals_hugging_face():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        got = lm._warp(logits, 1.0, 0, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(TopPLogitsWarper(top_p)(None, logits)))


def test_sampling_prefill_gives_the_contexts(tokenizer, causal_lm):
    torch.manual_seed(0)
    rollout = lm.sample(causal_lm, tokenizer, PROMPTS, 2, 4)
    # The warm start's contexts (no sampling) and the plain-forward contexts are the sampling prefill's.
    torch.testing.assert_close(lm.prompt_contexts(causal_lm, tokenizer, PROMPTS), rollout.context_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(prompt_hidden_states(causal_lm, tokenizer, PROMPTS), rollout.context_hidden, atol=1e-5, rtol=0)
    assert lm.prompt_contexts(causal_lm, tokenizer, PROMPTS, encoder=lambda h: h[:, :3] * 2).shape == (3, 3)


def _by_hand(model, tokenizer, prompt: str, response_tokens: list[int]) -> torch.Tensor:
    """Token log-probs of a response after its prompt: one unpadded forward, log_softmax, gather."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + response_tokens])
    logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)
    return logp[-len(response_tokens) :]


def test_response_logprobs_equal_a_plain_forward_for_any_rows(tokenizer, causal_lm):
    torch.manual_seed(1)
    rollout = lm.sample(causal_lm, tokenizer, PROMPTS, 3, 7, 1.0)
    rows = torch.tensor([7, 0, 2, 8])  # any order, uneven per prompt, prompt 1 absent
    with torch.no_grad():
        got = lm.response_logprobs(causal_lm, rollout, rows)
        seq, lengths = lm.sequence_logprobs(causal_lm, rollout, rows)
        for i, row in enumerate(rows.tolist()):
            tokens = rollout.response_tokens(row)
            expected = _by_hand(causal_lm, tokenizer, PROMPTS[row // 3], tokens)
            torch.testing.assert_close(got[i, : len(tokens)], expected, atol=1e-5, rtol=0)
            assert seq[i].item() == pytest.approx(expected.sum().item(), abs=1e-4)
            assert lengths[i].item() == len(tokens)
        # A sequence gets the same log-prob alone as in any batch.
        alone = torch.cat([lm.sequence_logprobs(causal_lm, rollout, [r])[0] for r in rows.tolist()])
    torch.testing.assert_close(seq, alone, atol=1e-5, rtol=0)


def test_log_probs_carry_gradients_for_training(tokenizer, causal_lm):
    model = copy.deepcopy(causal_lm)
    torch.manual_seed(2)
    rollout = lm.sample(model, tokenizer, PROMPTS[:2], 2, 5, 1.0)
    seq, _ = lm.sequence_logprobs(model, rollout, torch.tensor([0, 3]))
    seq.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_rollout_from_texts_scores_given_responses(tokenizer, causal_lm):
    rollout = lm.Rollout.from_texts(tokenizer, PROMPTS[:2], [[" The answer is 5.", " 5"], [" yes", " no, that is wrong"]])
    assert rollout.flat() == ([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [" The answer is 5.", " 5", " yes", " no, that is wrong"])
    with torch.no_grad():
        seq, lengths = lm.sequence_logprobs(causal_lm, rollout)
        tokens = tokenizer(" no, that is wrong", add_special_tokens=False)["input_ids"]
        assert seq[3].item() == pytest.approx(_by_hand(causal_lm, tokenizer, PROMPTS[1], tokens).sum().item(), abs=1e-4)
    assert lengths[3].item() == len(tokens)
    with pytest.raises(ValueError, match="n >= 1"):
        lm.Rollout.from_texts(tokenizer, PROMPTS[:2], [["a", "b"], ["c"]])


def test_long_prompts_are_cut_in_the_middle_and_counted(tokenizer, causal_lm):
    long = "The quick brown fox jumps over the lazy dog. " * 40
    with pytest.warns(UserWarning, match="1 of 2 prompts exceeded 30 tokens"):
        ids, kept, truncated = lm.encode_prompts(tokenizer, [long, "short"], max_tokens=30)
    assert truncated == 1 and len(ids[0]) <= 30 and kept[1] == "short"
    assert kept[0].startswith("The quick") and kept[0].rstrip().endswith("dog.")  # cut in the middle
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="truncated in the middle"):
        rollout = lm.sample(causal_lm, tokenizer, [long, "short"], 2, 4, max_prompt_tokens=30)
    assert rollout.num_truncated == 1 and rollout.prompts[0] == kept[0] and rollout.prompt_ids.shape[1] <= 30


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<eos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
    ids, _, _ = lm.encode_prompts(chat, ["Hi"])
    assert chat.decode(ids[0]) == "<eos>Hi A:" and lm.chat_text(chat, "Hi") == "<eos>Hi A:"
    assert lm.encode_prompts(chat, ["Hi"], chat=False)[0] == [tokenizer("Hi")["input_ids"]]
    with pytest.raises(ValueError, match="no chat template"):
        lm.encode_prompts(tokenizer, ["Hi"], chat=True)


def test_hidden_size_reads_a_model_or_its_config(causal_lm):
    assert lm.hidden_size(causal_lm) == 32 and lm.hidden_size(causal_lm.config) == 32
    with pytest.raises(ValueError, match="hidden size"):
        lm.hidden_size(torch.nn.Linear(2, 2))


def test_bad_arguments_raise_and_the_model_keeps_its_mode(tokenizer, causal_lm):
    model = copy.deepcopy(causal_lm).train()
    for kwargs in (dict(n=0), dict(n=2, top_p=0.0), dict(n=2, temperature=-1.0), dict(n=2, batch_size=0)):
        with pytest.raises(ValueError):
            lm.sample(model, tokenizer, PROMPTS, **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="no prompts"):
        lm.sample(model, tokenizer, [], 2)
    lm.sample(model, tokenizer, PROMPTS[:1], 2, 3)
    lm.prompt_contexts(model, tokenizer, PROMPTS[:1])
    assert model.training  # sampled and encoded in eval mode, then restored
    rollout = lm.sample(causal_lm, tokenizer, PROMPTS[:1], 2, 3)
    with pytest.raises(ValueError, match="rows"):
        lm.response_logprobs(causal_lm, rollout, torch.tensor([2]))
