"""Feedback signals and quantile normalization, checked against numbers worked out by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch

from laser_rl.feedback import (
    FEEDBACK_SIGNALS,
    LABEL_FREE,
    ConsensusEstimator,
    QuantileNormalizer,
    consensus_agreement,
    majority_agreement,
    majority_labels,
    one_factor_loadings,
    standardize_groups,
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
    assert {name: signal.fn for name, signal in FEEDBACK_SIGNALS.items()} == {
        "pair_loss": pair_loss,
        "progress": progress,
        "verifier": verifier_agreement,
        "spread": score_spread,
        "majority": majority_agreement,
        "consensus": consensus_agreement,
    }
    assert "verifier" not in LABEL_FREE and {"consensus", "majority", "pair_loss"} <= set(LABEL_FREE)


def test_verifier_agreement_partial_labels_form_no_pairs():
    scores = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.1, 0.8, 0.3, 0.4]])
    # Row 0: sample 3 unlabeled; pairs (0,1) win, (2,1) win -> 1.0. Row 1: no labels at all -> NaN.
    correct = torch.tensor([[1.0, 0.0, 1.0, NAN], [NAN, NAN, NAN, NAN]])
    close(verifier_agreement(scores, correct), [1.0, NAN])
    with pytest.raises(ValueError, match="boolean"):
        verifier_agreement(scores, torch.tensor([[0.5, 0.0, 1.0, NAN], [NAN] * 4]))


# ----- majority ---------------------------------------------------------------------------------
def test_majority_labels_and_agreement_match_labels_when_the_majority_is_right():
    answers = [["4", "4", "5", None], ["yes", "no", "yes", "no"], ["7", "7", "7", "7"]]
    labels = majority_labels(answers)
    close(labels[0], [1.0, 1.0, 0.0, 0.0])  # None never agrees with the majority
    assert torch.isnan(labels[1]).all()  # tied top answers: no pseudo-label
    close(labels[2], [1.0, 1.0, 1.0, 1.0])
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [1.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    # Where the majority ("4") is the true answer, the pseudo-labels equal the labels: same agreement.
    true = torch.tensor([[True, True, False, False]])
    close(majority_agreement(scores[:1], answers[:1]), verifier_agreement(scores[:1], true).tolist())
    close(majority_agreement(scores, answers), [1.0, NAN, NAN])  # all-agree row: no mixed pair
    close(majority_labels([["a", "a", "b", "c"]], min_share=0.75)[0], [NAN] * 4)
    with pytest.raises(ValueError, match="same n"):
        majority_labels([["a", "b"], ["a"]])
    with pytest.raises(ValueError, match="grouped"):
        majority_agreement(scores, answers[:2])


# ----- consensus --------------------------------------------------------------------------------
def _pool(prompts=48, n=8, seed=0):
    """Hand-built RMs around a latent truth: accurate, noisy, pure noise, and anti-correlated."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(prompts, n, generator=g)
    accurate = truth + 0.3 * torch.randn(prompts, n, generator=g)
    noisy = truth + 1.0 * torch.randn(prompts, n, generator=g)
    noise = torch.randn(prompts, n, generator=g)
    anti = -truth + 0.5 * torch.randn(prompts, n, generator=g)
    return torch.stack([accurate, noisy, noise, anti], dim=1), truth


def test_consensus_ranks_the_accurate_rm_first_and_the_anticorrelated_last():
    scores, truth = _pool()
    z, varies = standardize_groups(scores)
    loadings = one_factor_loadings(z, varies)
    assert loadings[0] > loadings[1] > abs(loadings[2]) and loadings[3] < -0.5
    rewards = consensus_agreement(scores, loadings).mean(0)
    assert rewards[0] > rewards[1] > rewards[2] > rewards[3]
    assert rewards[2] == pytest.approx(0.5, abs=0.08) and rewards[3] < 0.2
    # The truth estimate is better than any single RM: it agrees with the latent truth more than the accurate RM does.
    from laser_rl.feedback import agreement_with_truth, consensus_truth
    est = agreement_with_truth(consensus_truth(z, loadings), truth).mean()
    assert est >= agreement_with_truth(scores[:, 0], truth).mean() - 0.01


def test_consensus_is_robust_to_one_wild_rm_and_blind_rms_abstain():
    scores, _ = _pool(seed=1)
    scores[:, 2] *= 1e6  # one RM on a wild scale: z-scores make scale irrelevant
    blind = torch.zeros(scores.shape[0], 1, scores.shape[2])  # constant scores: cannot rank
    rewards = consensus_agreement(torch.cat([scores, blind], 1), one_factor_loadings(*standardize_groups(torch.cat([scores, blind], 1))))
    assert rewards[:, 4].eq(0.5).all()  # a blind RM ties every pair
    assert rewards.mean(0)[0] == rewards.mean(0).max()


def test_consensus_prefers_an_exact_checker_to_a_good_continuous_rm():
    """A 0/1 checker that is always right ties every pair of equally correct samples; those ties are no
    preference. Counting them as half an error would rank it below continuous RMs whose own tastes fill the
    truth estimate within a correctness class (the demo's calculator against minilm, issue 12)."""
    g = torch.Generator().manual_seed(4)
    prompts, n = 48, 8
    correct = (torch.rand(prompts, n, generator=g) < 0.7).float()
    correct[:, 0], correct[:, 1] = 1.0, 0.0  # every prompt has both kinds
    checker = correct.clone()
    # Errors independent of each other (the factor model's assumption; RMs sharing a taste would outvote it).
    good = correct + 0.4 * torch.randn(prompts, n, generator=g)
    other = correct + 0.4 * torch.randn(prompts, n, generator=g)
    noise = torch.randn(prompts, n, generator=g)
    scores = torch.stack([checker, good, other, noise], dim=1)
    rewards = consensus_agreement(scores, one_factor_loadings(*standardize_groups(scores))).mean(0)
    assert rewards[0] > 0.99 and rewards[0] > rewards[1:].max() + 0.03  # with ties as half errors: 0.955 < 0.960
    assert verifier_agreement(good, correct).mean() < 0.97  # the continuous RMs really are worse judges


def test_consensus_picks_the_accurate_rm_on_a_domain_where_another_is_anticorrelated():
    """Domain A: RMs 0 and 1 both good. Domain B: RM 1 is anti-correlated (hackable), RM 0 still good."""
    a, _ = _pool(prompts=32, seed=2)
    b, _ = _pool(prompts=32, seed=3)
    a = a[:, [0, 0, 1, 2]].clone(); a[:, 1] = a[:, 0] + 0.4 * torch.randn_like(a[:, 0])
    b = b[:, [0, 3, 1, 2]]  # RM 1 = the anti-correlated one on domain B
    estimator = ConsensusEstimator(4)
    rewards_a, _, window = estimator.rewards(a)
    estimator.commit(window)
    rewards_b, loadings, _ = estimator.rewards(b)
    assert rewards_b.mean(0)[0] > 0.8 and rewards_b.mean(0)[1] < 0.3
    assert rewards_a.mean(0)[1] > 0.75  # RM 1 is rewarded where it is good


def test_consensus_estimator_validates_and_round_trips():
    estimator = ConsensusEstimator(4, window=3)
    scores, _ = _pool(prompts=5)
    _, _, window = estimator.rewards(scores)
    estimator.commit(window)
    assert len(estimator.z) == 3  # the window keeps the last 3 audited prompts
    clone = ConsensusEstimator(4, window=3)
    clone.load_state_dict(estimator.state_dict())
    torch.testing.assert_close(clone.loadings(), estimator.loadings())
    with pytest.raises(ValueError, match="window"):
        ConsensusEstimator(4, window=5).load_state_dict(estimator.state_dict())
    with pytest.raises(ValueError, match="NaN"):
        estimator.rewards(torch.full((1, 4, 3), NAN))
    with pytest.raises(ValueError, match="3 reward models, this estimator 4"):
        estimator.rewards(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="at least 2"):
        ConsensusEstimator(1)


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


def test_disattenuated_consensus_estimates_each_rms_correlation_with_the_truth():
    scores, _ = _pool(prompts=400, seed=4)
    loadings = one_factor_loadings(*standardize_groups(scores))
    got = consensus_agreement(scores, loadings, method="disattenuated").nanmean(0)
    # accurate: 1 / sqrt(1 + 0.3^2), noisy: 1 / sqrt(2), noise: 0, anti: -1 / sqrt(1 + 0.5^2) (population values;
    # within-prompt z-scores over n = 8 samples shrink them a little)
    expected = torch.tensor([1 / math.sqrt(1.09), 1 / math.sqrt(2.0), 0.0, -1 / math.sqrt(1.25)])
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0)
    loo = consensus_agreement(scores, loadings, method="leave_one_out").mean(0)
    assert loo[0] > loo[1] > loo[2] > loo[3]
    with pytest.raises(ValueError, match="unknown consensus method"):
        consensus_agreement(scores, loadings, method="vibes")
