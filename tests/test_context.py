"""Contexts: pooling over real tokens only, padding/batching invariance, and the fixed context encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from laser_rl.context import ContextEncoder, pool_hidden_states, prompt_hidden_states

PROMPTS = [
    "What is 2 + 3?",
    "The quick brown fox jumps over the lazy dog.",
    "Yes",
    "Anna has 3 apples and buys 4 more. How many apples?",
    "Write a short happy poem about the sea.",
]


def _with_padding_side(tokenizer, side: str):
    # A copy, so the session-wide fixture keeps its own padding side for other tests.
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = side
    return tok


# ----- pool_hidden_states -----------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_pooling_picks_last_real_token(tokenizer, side):
    tok = _with_padding_side(tokenizer, side)
    batch = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS[:3]]
    T = mask.shape[1]
    assert min(lengths) < T  # the batch really is padded
    hidden = torch.randn(3, T, 8)
    pooled = pool_hidden_states(hidden, mask, "last")
    for i, n in enumerate(lengths):
        expected_idx = n - 1 if side == "right" else T - 1
        assert mask[i, expected_idx] == 1
        torch.testing.assert_close(pooled[i], hidden[i, expected_idx])


def test_last_pooling_holes_in_mask_use_last_one():
    # Index of the last 1, not sum(mask) - 1 (which would be 1 here).
    mask = torch.tensor([[1, 0, 1, 0]])
    hidden = torch.arange(4.0).view(1, 4, 1)
    assert pool_hidden_states(hidden, mask, "last").item() == 2.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_pooling_excludes_padding(tokenizer, side):
    tok = _with_padding_side(tokenizer, side)
    mask = tok(PROMPTS[:3], return_tensors="pt", padding=True)["attention_mask"]
    hidden = torch.randn(3, mask.shape[1], 8)
    hidden[mask == 0] = 1e6  # padding must not leak into the mean
    pooled = pool_hidden_states(hidden, mask, "mean")
    for i in range(3):
        manual = hidden[i][mask[i].bool()].mean(dim=0)
        torch.testing.assert_close(pooled[i], manual)


def test_mean_pooling_ignores_nan_in_padding():
    hidden = torch.tensor([[[1.0], [3.0], [float("nan")]]])
    assert pool_hidden_states(hidden, torch.tensor([[1, 1, 0]]), "mean").item() == 2.0


def test_pooling_returns_float32_and_validates():
    hidden = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    mask = torch.ones(2, 3, dtype=torch.long)
    assert pool_hidden_states(hidden, mask).dtype == torch.float32
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, mask, "max")
    with pytest.raises(ValueError, match="no tokens"):
        pool_hidden_states(hidden, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        pool_hidden_states(hidden, torch.ones(2, 4))


# ----- prompt_hidden_states ---------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_prompt_hidden_states_independent_of_batching_and_padding(tokenizer, causal_lm, pooling):
    one = prompt_hidden_states(causal_lm, tokenizer, PROMPTS, pooling=pooling, batch_size=1)
    assert one.shape == (len(PROMPTS), causal_lm.config.hidden_size)
    assert one.dtype == torch.float32 and one.device.type == "cpu"
    three = prompt_hidden_states(causal_lm, tokenizer, PROMPTS, pooling=pooling, batch_size=3)
    torch.testing.assert_close(three, one, atol=1e-5, rtol=0)
    for side in ("left", "right"):
        tok = _with_padding_side(tokenizer, side)
        padded = prompt_hidden_states(causal_lm, tok, PROMPTS, pooling=pooling, batch_size=len(PROMPTS))
        torch.testing.assert_close(padded, one, atol=1e-5, rtol=0)


def test_prompt_hidden_states_matches_plain_forward(tokenizer, causal_lm):
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = causal_lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    got = prompt_hidden_states(causal_lm, tokenizer, [PROMPTS[1]])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_prompt_hidden_states_rejects_empty(tokenizer, causal_lm):
    with pytest.raises(ValueError, match="empty"):
        prompt_hidden_states(causal_lm, tokenizer, [])


def test_prompt_hidden_states_restores_training_mode(tokenizer, causal_lm):
    causal_lm.train()
    try:
        prompt_hidden_states(causal_lm, tokenizer, PROMPTS[:1])
        assert causal_lm.training
    finally:
        causal_lm.eval()


# ----- ContextEncoder ---------------------------------------------------------------------------
def test_encoder_projection_fixed_by_seed():
    x = torch.randn(4, 32)
    a, b = ContextEncoder(32, proj_dim=8, seed=3), ContextEncoder(32, proj_dim=8, seed=3)
    c = ContextEncoder(32, proj_dim=8, seed=4)
    assert a.dim == 9
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    torch.testing.assert_close(a(x), a(x))  # fixed forever, not redrawn per call


def test_encoder_state_dict_preserves_projection():
    x = torch.randn(4, 32)
    a = ContextEncoder(32, proj_dim=8, seed=3)
    restored = ContextEncoder(32, proj_dim=8, seed=99)
    restored.load_state_dict(a.state_dict())
    torch.testing.assert_close(restored(x), a(x))
    with pytest.raises(ValueError, match="proj_dim"):
        ContextEncoder(32, proj_dim=16).load_state_dict(a.state_dict())


def test_encoder_projection_scale():
    # Gaussian / sqrt(proj_dim): squared norms are preserved on average (Johnson-Lindenstrauss).
    enc = ContextEncoder(64, proj_dim=512, normalize=False, bias=False, seed=0)
    x = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    assert abs(enc(x).norm(dim=-1).pow(2).mean().item() - 1.0) < 0.15


def test_encoder_normalizes_then_appends_bias():
    enc = ContextEncoder(32, proj_dim=8)
    out = enc(torch.randn(5, 32) * 7)
    assert out.shape == (5, 9) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :-1].norm(dim=-1), torch.ones(5))
    assert torch.equal(out[:, -1], torch.ones(5))


def test_encoder_without_projection_or_bias():
    x = torch.randn(3, 6)
    enc = ContextEncoder(6, normalize=False, bias=False)
    assert enc.dim == 6
    torch.testing.assert_close(enc(x), x)
    enc = ContextEncoder(6, bias=True)
    assert enc.dim == 7
    torch.testing.assert_close(enc(x)[:, :-1], x / x.norm(dim=-1, keepdim=True))


def test_encoder_zero_row_stays_finite():
    out = ContextEncoder(4)(torch.zeros(1, 4))
    assert torch.isfinite(out).all()


def test_encoder_accepts_bf16_and_checks_dim():
    enc = ContextEncoder(32, proj_dim=8)
    x = torch.randn(2, 32)
    out = enc(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, enc(x), atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match=r"32.*16"):
        enc(torch.randn(2, 16))


def test_encoder_end_to_end(tokenizer, causal_lm):
    hidden = prompt_hidden_states(causal_lm, tokenizer, PROMPTS[:2])
    enc = ContextEncoder(causal_lm.config.hidden_size, proj_dim=16)
    assert enc(hidden).shape == (2, enc.dim)


def test_left_padding_with_absolute_positions(tokenizer):
    # GPT-2 adds learned absolute position embeddings: counting left pads as positions would shift every
    # real token, so this checks that position ids come from the attention mask.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    one = prompt_hidden_states(model, tokenizer, PROMPTS, batch_size=1)
    left = prompt_hidden_states(model, _with_padding_side(tokenizer, "left"), PROMPTS, batch_size=len(PROMPTS))
    torch.testing.assert_close(left, one, atol=1e-5, rtol=0)
