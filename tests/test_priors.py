import pytest
import torch

from laser_rl import RewardSelector
from laser_rl.arms import RuleArm
from laser_rl.bandits import UCB1, Exp3, LinearThompson, LinUCB
from laser_rl.context import ContextEncoder
from laser_rl.priors import (
    preference_rewards,
    prior_accuracy_table,
    prior_rows,
    warm_start_bandit,
    warm_start_from_preferences,
    warm_start_selector,
)
from laser_rl.synthetic import ClusteredRewardProblem

LONGER = RuleArm(lambda p, r, l: [float(len(x)) for x in r], name="longer")
SHORTER = RuleArm(lambda p, r, l: [-float(len(x)) for x in r], name="shorter")
YES = RuleArm(lambda p, r, l: [float("yes" in x) for x in r], name="yes")


def test_preference_rewards_per_example_and_arm():
    rewards = preference_rewards([LONGER, SHORTER, YES], ["q1", "q2", "q3"], ["yes!", "a", "bb"], ["no", "bbb", "cc"])
    # example 0: chosen longer and says yes; example 1: chosen shorter; example 2: equal length, no yes
    assert rewards.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.5, 0.5, 0.5]]
    with pytest.raises(ValueError, match="as many"):
        preference_rewards([LONGER], ["q"], ["a", "b"], ["c"])


def _data(N=12, d=5, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randint(0, 3, (N, K), generator=g).float() / 2  # {0, 0.5, 1}


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_warm_started_statistics_equal_a_bandit_updated_on_the_same_data(cls):
    X, R = _data()
    warm, updated = cls(3, 5), cls(3, 5)
    warm_start_bandit(warm, X, R)
    # The same data, fed by hand: every example gives each arm one row with its centered reward.
    rows = torch.cat([X[i : i + 1] for i in range(len(X)) for _ in range(3)])
    arms = torch.tensor([k for _ in range(len(X)) for k in range(3)])
    rewards = torch.tensor([float(R[i, k]) - 0.5 for i in range(len(X)) for k in range(3)])
    updated.update(rows, arms, rewards)
    for name, t in warm._tensors().items():
        assert torch.equal(t, updated._tensors()[name]), name
    # And both equal the ridge statistics written out: A_k = I + X^T X, b_k = X^T (r_k - 0.5).
    for k in range(3):
        torch.testing.assert_close(warm.A[k], torch.eye(5) + X.T @ X)
        torch.testing.assert_close(warm.b[k], X.T @ (R[:, k] - 0.5))
        torch.testing.assert_close(warm.A_inv[k], torch.linalg.inv(warm.A[k]), atol=1e-5, rtol=1e-5)
    assert warm.counts.tolist() == [12, 12, 12]


def test_warm_start_ucb1_weight_and_errors():
    X, R = _data()
    ucb = UCB1(3)
    warm_start_bandit(ucb, X, R)
    assert ucb.counts.tolist() == [12.0] * 3 and torch.allclose(ucb.sums, R.sum(0).double())
    heavy = LinUCB(3, 5)
    warm_start_bandit(heavy, X, R, weight=2.0)
    torch.testing.assert_close(heavy.A[0], torch.eye(5) + 2 * X.T @ X)
    torch.testing.assert_close(heavy.b[1], 2 * X.T @ (R[:, 1] - 0.5))
    with pytest.raises(ValueError, match="Exp3"):
        warm_start_bandit(Exp3(3), X, R)
    with pytest.raises(ValueError, match="only defined for linear"):
        warm_start_bandit(UCB1(3), X, R, weight=2.0)
    with pytest.raises(ValueError, match="columns"):
        warm_start_bandit(LinUCB(2, 5), X, R)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prior_rows(LinUCB(3, 5), X, R * 3)
    with pytest.raises(ValueError, match="no bandit"):
        warm_start_selector(RewardSelector([LONGER, SHORTER], baseline="mean"), X, R[:, :2])
    with pytest.raises(ValueError, match="ignores feedback"):
        warm_start_selector(RewardSelector([LONGER, SHORTER], baseline="random"), X, R[:, :2])


def test_warm_start_lowers_early_regret_on_the_synthetic_problem():
    def early_regret(warm: bool, seed: int, steps: int = 20) -> float:
        problem = ClusteredRewardProblem(seed=seed)
        arms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=f"arm{k}") for k in range(problem.num_arms)]
        selector = RewardSelector(arms, context_dim=problem.dim, seed=seed)
        if warm:
            labeled = ClusteredRewardProblem(seed=seed)
            labeled.generator.manual_seed(1000 + seed)
            X, _ = labeled.contexts(64)
            prefers = torch.bernoulli(labeled.expected_rewards(X).clamp(0, 1), generator=labeled.generator)
            warm_start_selector(selector, X.float(), prefers.float())
        total = 0.0
        for _ in range(steps):
            X, _ = problem.contexts(32)
            chosen = selector.select(X.float())
            selector.feedback(X.float(), chosen, raw_rewards=problem.rewards(X, chosen))
            total += float(problem.regret(X, chosen).sum())
        return total

    cold = sum(early_regret(False, s) for s in range(2))
    warm = sum(early_regret(True, s) for s in range(2))
    assert warm < cold / 3, (cold, warm)


def test_warm_start_from_preferences_uses_policy_contexts(tokenizer, causal_lm):
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selector = RewardSelector([LONGER, SHORTER, YES], context_dim=encoder.dim, bandit="thompson")
    examples = [
        {"prompt": "Is Tom an animal?", "chosen": "yes", "rejected": "no", "domain": "logic"},
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "It is 6", "domain": "math"},
    ]
    rewards = warm_start_from_preferences(selector, examples, causal_lm, tokenizer, encoder)
    assert rewards.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.5]]
    assert selector.bandit.counts.tolist() == [2, 2, 2]
    table = prior_accuracy_table(rewards, selector.names, [e["domain"] for e in examples])
    assert "logic" in table and "math" in table


def test_warm_start_contexts_are_the_ones_sampling_gives_the_policy(tokenizer, causal_lm):
    """The prior's contexts live where the online ones will: the sampling prefill's (laser_rl.lm). The ridge
    statistics were pinned before laser_rl.lm replaced the context path (commit 8ce3136): unchanged."""
    from laser_rl.lm import sample

    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selector = RewardSelector([LONGER, YES], context_dim=encoder.dim)
    examples = [
        {"prompt": "Is Tom an animal?", "chosen": "yes", "rejected": "no"},
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "It is 6"},
    ]
    rewards = warm_start_from_preferences(selector, examples, causal_lm, tokenizer, encoder)
    X = encoder(sample(causal_lm, tokenizer, [e["prompt"] for e in examples], 1, 2).context_hidden)
    torch.testing.assert_close(selector.bandit.b, (X.T @ (rewards - 0.5)).T, atol=1e-5, rtol=0)  # b_k = sum_i (r_ik - 0.5) x_i
    assert selector.bandit.b.sum(dim=1).tolist() == pytest.approx([-0.470383, -0.737374], abs=1e-5)
