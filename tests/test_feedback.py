"""Feedback signals and quantile normalization, checked against numbers worked out by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch

from laser_rl.feedback import (
    FEEDBACK_SIGNALS,
    QuantileNormalizer,
    pair_loss,
    pair_loss_terms,
    progress,
    score_spread,
    verifier_agreement,
)

NAN = float("nan")


def softplus(x: float) -> float:
    """-log sigmoid(-x) written out: -log sigmoid(m) = log(1 + exp(-m))."""
    return math.log1p(math.exp(x))


def close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), equal_nan=True)


# ----- pair_loss --------------------------------------------------------------------------------
def test_pair_loss_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    policy = torch.tensor([[-5.0, -3.0, -4.0]])
    ref = torch.tensor([[-4.5, -3.5, -4.0]])
    lengths = torch.tensor([[5, 6, 4]])
    # best = sample 1 (0.9), worst = sample 0 (0.1)
    # margin = (-3.0 - -3.5) - (-5.0 - -4.5) = 0.5 + 0.5 = 1.0
    # dpo = -log sigmoid(0.1 * 1.0) = log(1 + e^-0.1); nll = 3.0 / 6 tokens = 0.5
    dpo = math.log(1 + math.exp(-0.1))
    close(pair_loss(scores, policy, ref, lengths, beta=0.1), [-(dpo + 0.5)])
    close(pair_loss(scores, policy, ref, lengths, beta=0.1, nll_weight=0.0), [-dpo])
    # beta = 2: dpo = log(1 + e^-2); nll_weight = 0.5 halves the NLL.
    close(pair_loss(scores, policy, ref, lengths, beta=2.0, nll_weight=0.5), [-(math.log(1 + math.exp(-2.0)) + 0.25)])
    loss, best, worst = pair_loss_terms(scores, policy, ref, lengths)
    close(loss, [dpo + 0.5])
    assert best.tolist() == [1] and worst.tolist() == [0]


def test_pair_loss_negative_margin_is_penalized():
    # The policy prefers the RM's worst sample relative to the reference: margin = (-6 - -5) - (-2 - -4) = -3.
    scores = torch.tensor([[0.8, 0.2]])
    policy, ref, lengths = torch.tensor([[-6.0, -2.0]]), torch.tensor([[-5.0, -4.0]]), torch.tensor([[3, 3]])
    dpo = softplus(0.1 * 3.0)  # -log sigmoid(-0.3)
    close(pair_loss(scores, policy, ref, lengths), [-(dpo + 2.0)])


def test_pair_loss_ties_and_several_prompts():
    scores = torch.tensor([[0.7, 0.2, 0.7], [0.3, 0.3, 0.3]])
    policy = torch.tensor([[-2.0, -4.0, -1.0], [-6.0, -2.0, -3.0]])
    ref = torch.tensor([[-3.0, -3.0, -3.0], [-5.0, -5.0, -5.0]])
    lengths = torch.tensor([[4, 2, 2], [3, 1, 1]])
    loss, best, worst = pair_loss_terms(scores, policy, ref, lengths)
    # Row 0: tie for best goes to the lowest index 0; worst = 1. margin = (-2 - -3) - (-4 - -3) = 2.
    # Row 1: all tie -> best = worst = 0: margin 0, dpo = log 2; nll = 6 / 3 = 2.
    assert best.tolist() == [0, 0] and worst.tolist() == [1, 0]
    expected = [math.log(1 + math.exp(-0.2)) + 2.0 / 4, math.log(2.0) + 2.0]
    close(loss, expected)
    close(pair_loss(scores, policy, ref, lengths), [-e for e in expected])
    assert torch.isfinite(loss).all()  # a constant RM still gets feedback


def test_pair_loss_validates():
    ok = torch.zeros(2, 3)
    lengths = torch.ones(2, 3)
    with pytest.raises(ValueError, match="n >= 2"):
        pair_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="shape"):
        pair_loss(ok, torch.zeros(2, 4), ok, lengths)
    with pytest.raises(ValueError, match="empty"):
        pair_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(0, 3))
    with pytest.raises(ValueError, match=r"\[prompts, samples\]"):
        pair_loss(torch.zeros(3), ok, ok, lengths)
    with pytest.raises(ValueError, match="response_lengths"):
        pair_loss(ok, ok, ok, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        pair_loss(torch.tensor([[0.0, NAN, 1.0], [0.0, 0.0, 0.0]]), ok, ok, lengths)


def test_pair_loss_accepts_bf16():
    scores = torch.tensor([[0.1, 0.9]], dtype=torch.bfloat16)
    logps = torch.tensor([[-2.0, -1.0]])
    out = pair_loss(scores, logps.bfloat16(), logps, torch.tensor([[2, 2]]))
    assert out.dtype == torch.float32
    close(out, [-(math.log(2.0) + 0.5)])


# ----- progress ---------------------------------------------------------------------------------
def test_progress():
    close(progress(torch.tensor([1.0, 0.5, NAN]), torch.tensor([0.4, 0.7, 0.1])), [0.6, -0.2, NAN])
    with pytest.raises(ValueError, match="shape"):
        progress(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="non-empty"):
        progress(torch.zeros(0), torch.zeros(0))


# ----- verifier_agreement -----------------------------------------------------------------------
def test_verifier_agreement_hand_computed():
    scores = torch.tensor([[0.9, 0.2, 0.5, 0.5], [0.1, 0.8, 0.3, 0.4], [0.3, 0.1, 0.2, 0.0]])
    correct = torch.tensor([[True, False, True, False], [True, False, False, False], [True, True, True, True]])
    # Row 0: correct {0, 2} vs wrong {1, 3}: (0,1) 0.9>0.2 -> 1, (0,3) 0.9>0.5 -> 1, (2,1) 0.5>0.2 -> 1,
    #        (2,3) tie -> 0.5: 3.5 / 4.
    # Row 1: correct {0} vs wrong {1, 2, 3}: 0.1 loses to all three -> 0.
    # Row 2: no wrong sample, no mixed pair -> NaN.
    close(verifier_agreement(scores, correct), [0.875, 0.0, NAN])


def test_verifier_agreement_accepts_01_labels_and_validates():
    close(verifier_agreement(torch.tensor([[0.2, 0.1, 0.3]]), torch.tensor([[1, 0, 0]])), [0.5])  # 1 win, 1 loss
    with pytest.raises(ValueError, match="boolean"):
        verifier_agreement(torch.zeros(1, 3), torch.tensor([[2, 0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        verifier_agreement(torch.zeros(1, 3), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="n >= 2"):
        verifier_agreement(torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool))


# ----- score_spread -----------------------------------------------------------------------------
def test_score_spread():
    # Row 0: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> population std sqrt(5 / 4).
    close(score_spread(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])), [math.sqrt(1.25), 0.0])
    with pytest.raises(ValueError, match="n >= 2"):
        score_spread(torch.zeros(3, 1))


def test_signal_registry():
    assert FEEDBACK_SIGNALS == {
        "pair_loss": pair_loss,
        "progress": progress,
        "verifier": verifier_agreement,
        "spread": score_spread,
    }


# ----- QuantileNormalizer -----------------------------------------------------------------------
def test_quantile_normalizer_hand_computed_window():
    norm = QuantileNormalizer(num_arms=2, window=5, warmup=1)
    # History [0, 1, 2, 3, 4] (the first batch is normalized too). Linear-interpolated percentiles:
    # q20 at position 0.2 * 4 = 0.8 -> 0.8; q80 at 3.2 -> 3.2; width 2.4.
    out = norm(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1, 0]))
    close(out, [0.0, 0.2 / 2.4, 1.2 / 2.4, 2.2 / 2.4, 1.0])
    # Window slides: [1, 2, 3, 4, 10]; q20 = 1 + 0.8 * 1 = 1.8, q80 = 4 + 0.2 * 6 = 5.2.
    close(norm(torch.tensor([10.0]), torch.tensor([1])), [1.0])
    # Appended before normalizing: [2, 3, 4, 10, 3] sorted [2, 3, 3, 4, 10]; q20 = 2 + 0.8 * 1 = 2.8, q80 = 5.2.
    close(norm(torch.tensor([3.0]), torch.tensor([0])), [0.2 / 2.4])
    # [3, 4, 10, 3, 3.5] sorted [3, 3, 3.5, 4, 10]: q20 = 3, q80 = 5.2. NaN stays NaN and is not stored.
    close(norm(torch.tensor([3.5, NAN]), torch.tensor([0, 1])), [0.5 / 2.2, NAN])
    assert norm.histories[0].tolist() == [3.0, 4.0, 10.0, 3.0, 3.5]


def test_quantile_normalizer_warmup_returns_half():
    norm = QuantileNormalizer(num_arms=2, warmup=4)
    close(norm(torch.tensor([1.0, 5.0, NAN]), torch.tensor([0, 1, 0])), [0.5, 0.5, NAN])  # 2 values < 4
    # History [1, 5, 2, 9]: q20 at 0.6 -> 1.6, q80 at 2.4 -> sorted [1, 2, 5, 9] -> 5 + 0.4 * 4 = 6.6.
    close(norm(torch.tensor([2.0, 9.0]), torch.tensor([1, 1])), [0.4 / 5.0, 1.0])


def test_quantile_normalizer_equal_quantiles_give_half():
    norm = QuantileNormalizer(num_arms=1, warmup=2)
    out = norm(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0]), torch.zeros(8, dtype=torch.long))
    # Sorted history has 1.0 at both the 20th and 80th percentile: no width, uninformative 0.5, no div by 0.
    assert torch.isfinite(out).all()
    close(out, [0.5] * 8)


def test_quantile_normalizer_per_arm_vs_pooled():
    raw = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    arms = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # Per arm: each history is a shift of [0, 1, 2, 3]: q20 = 0.6, q80 = 2.4 above its own base.
    per_arm = QuantileNormalizer(2, per_arm=True, warmup=1)(raw, arms)
    per_arm_expected = [0.0, 0.4 / 1.8, 1.4 / 1.8, 1.0]
    close(per_arm, per_arm_expected * 2)
    # Pooled: sorted [0, 1, 2, 3, 10, 11, 12, 13]; q20 at 1.4 -> 1.4, q80 at 5.6 -> 11.6; width 10.2.
    pooled = QuantileNormalizer(2, warmup=1)(raw, arms)
    close(pooled, [0.0, 0.0, 0.6 / 10.2, 1.6 / 10.2, 8.6 / 10.2, 9.6 / 10.2, 1.0, 1.0])
    # Pooling keeps arm 1's higher level visible to the bandit; per-arm histories erase it.
    assert pooled[arms == 1].mean() > pooled[arms == 0].mean()
    torch.testing.assert_close(per_arm[arms == 1], per_arm[arms == 0])


def test_quantile_normalizer_per_arm_warmup_is_per_history():
    norm = QuantileNormalizer(2, per_arm=True, warmup=2)
    close(norm(torch.tensor([0.0, 1.0, 7.0]), torch.tensor([0, 0, 1])), [0.0, 1.0, 0.5])  # arm 1 still warming up


def test_quantile_normalizer_state_dict_round_trip():
    torch.manual_seed(0)
    norm = QuantileNormalizer(3, window=16, per_arm=True, warmup=3)
    for _ in range(5):
        norm(torch.randn(6), torch.randint(3, (6,)))
    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    restored = QuantileNormalizer(3, window=16, per_arm=True, warmup=3)
    restored.load_state_dict(torch.load(buffer))
    for _ in range(3):
        raw, arms = torch.randn(6), torch.randint(3, (6,))
        assert torch.equal(restored(raw, arms), norm(raw, arms))
    with pytest.raises(ValueError, match="per_arm"):
        QuantileNormalizer(3, window=16, warmup=3).load_state_dict(norm.state_dict())


def test_quantile_normalizer_validates():
    with pytest.raises(ValueError, match="quantiles"):
        QuantileNormalizer(2, quantiles=(0.8, 0.2))
    with pytest.raises(ValueError, match="warmup"):
        QuantileNormalizer(2, window=4, warmup=8)
    norm = QuantileNormalizer(2)
    with pytest.raises(ValueError, match="arms"):
        norm(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        norm(torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-empty"):
        norm(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert all(h.numel() == 0 for h in norm.histories)  # failed calls leave no trace
