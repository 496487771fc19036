import pytest
import torch

from laser_rl.bandits import (
    BANDITS,
    UCB1,
    Exp3,
    FixedArm,
    LinearEpsilonGreedy,
    LinearThompson,
    LinUCB,
    RandomArm,
    RoundRobin,
    make_bandit,
    woodbury_update,
)
from laser_rl.synthetic import ClusteredRewardProblem


def closed_form(A_list, b_list, X, alpha):
    """float64 LinUCB with explicit inverses, the textbook way."""
    means, widths = [], []
    for A, b in zip(A_list, b_list):
        A_inv = torch.linalg.inv(A)
        means.append(X @ (A_inv @ b))
        widths.append(((X @ A_inv) * X).sum(1).sqrt())
    mean, width = torch.stack(means, 1), torch.stack(widths, 1)
    return mean, width, (mean + alpha * width).argmax(1)


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_linucb_matches_closed_form_after_10000_updates(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    K, d, alpha, lam = 4, 12, 0.7, 1.5
    bandit = LinUCB(K, d, alpha=alpha, lam=lam, dtype=dtype, refresh_every=100)
    A = [lam * torch.eye(d, dtype=torch.float64) for _ in range(K)]
    b = [torch.zeros(d, dtype=torch.float64) for _ in range(K)]
    rows = 0
    while rows < 10_000:
        m = int(torch.randint(1, 9, (1,), generator=gen))  # m = 1 is Sherman-Morrison, m > 1 Woodbury
        X = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
        arms = torch.randint(K, (m,), generator=gen)
        r = torch.randn(m, generator=gen, dtype=torch.float64)
        bandit.update(X.to(dtype), arms, r.to(dtype))
        for i in range(m):
            A[arms[i]] += torch.outer(X[i], X[i])
            b[arms[i]] += r[i] * X[i]
        rows += m
    assert int(bandit.counts.sum()) == rows
    Xq = torch.randn(64, d, generator=gen, dtype=torch.float64)
    mean_ref, width_ref, arms_ref = closed_form(A, b, Xq, alpha)
    mean, width = bandit.scores(Xq.to(dtype))
    assert rel_err(mean, mean_ref) <= tol
    assert rel_err(width, width_ref) <= tol
    assert torch.equal(bandit.select(Xq.to(dtype)), arms_ref)


def test_woodbury_equals_inverse_for_many_ranks():
    gen = torch.Generator().manual_seed(1)
    d = 10
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    A = M @ M.T + torch.eye(d, dtype=torch.float64)
    for m in (1, 2, 5, 9):
        X = torch.randn(m, d, generator=gen, dtype=torch.float64)
        expected = torch.linalg.inv(A + X.T @ X)
        A_inv = torch.linalg.inv(A)
        assert woodbury_update(A_inv, X)
        assert torch.allclose(A_inv, expected, rtol=1e-9, atol=1e-12)


def test_drifted_inverse_falls_back_to_an_exact_refresh():
    """An A^-1 that drifted indefinite makes Woodbury's small Cholesky fail: woodbury_update leaves it untouched and
    says so, and the bandit's update recomputes that arm's inverse from A instead of raising mid-update."""
    gen = torch.Generator().manual_seed(4)
    d = 6
    X = torch.randn(3, d, generator=gen, dtype=torch.float64)
    bad = -torch.eye(d, dtype=torch.float64)  # I + X A^-1 X^T = I - X X^T is not positive definite
    assert not woodbury_update(bad, X) and torch.equal(bad, -torch.eye(d, dtype=torch.float64))

    bandit = LinUCB(2, d, dtype=torch.float64, refresh_every=100)
    bandit.A_inv[1] = -torch.eye(d, dtype=torch.float64)
    arms, rewards = torch.tensor([0, 1, 1]), torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    bandit.update(X, arms, rewards)
    A1 = torch.eye(d, dtype=torch.float64) + X[1:].T @ X[1:]
    assert torch.allclose(bandit.A_inv[1], torch.linalg.inv(A1), atol=1e-10)
    assert torch.allclose(bandit.theta[1], torch.linalg.solve(A1, X[1:].T @ rewards[1:]), atol=1e-10)
    assert bandit.updates_since_refresh.tolist() == [1, 0]  # arm 0 took Woodbury, arm 1 was refreshed


def test_large_batch_and_refresh_paths_agree_with_closed_form():
    """A batch with more rows than dimensions takes the exact-inverse path; it must agree too."""
    gen = torch.Generator().manual_seed(2)
    K, d = 2, 6
    bandit = LinUCB(K, d, dtype=torch.float64, refresh_every=3)
    A = [torch.eye(d, dtype=torch.float64) for _ in range(K)]
    b = [torch.zeros(d, dtype=torch.float64) for _ in range(K)]
    for m in (20, 1, 2, 3, 30, 1):
        X = torch.randn(m, d, generator=gen, dtype=torch.float64)
        arms, r = torch.randint(K, (m,), generator=gen), torch.randn(m, generator=gen, dtype=torch.float64)
        bandit.update(X, arms, r)
        for k in range(K):
            A[k] += X[arms == k].T @ X[arms == k]
            b[k] += X[arms == k].T @ r[arms == k]
    Xq = torch.randn(8, d, generator=gen, dtype=torch.float64)
    mean_ref, width_ref, _ = closed_form(A, b, Xq, 0.1)
    mean, width = bandit.scores(Xq)
    assert rel_err(mean, mean_ref) < 1e-10 and rel_err(width, width_ref) < 1e-10


def test_discount_matches_closed_form():
    gen = torch.Generator().manual_seed(3)
    K, d, lam, gamma = 3, 5, 2.0, 0.9
    bandit = LinUCB(K, d, lam=lam, discount=gamma, dtype=torch.float64)
    A = [lam * torch.eye(d, dtype=torch.float64) for _ in range(K)]
    b = [torch.zeros(d, dtype=torch.float64) for _ in range(K)]
    for _ in range(30):
        X = torch.randn(4, d, generator=gen, dtype=torch.float64)
        arms, r = torch.randint(K, (4,), generator=gen), torch.randn(4, generator=gen, dtype=torch.float64)
        bandit.update(X, arms, r)
        for k in range(K):  # old statistics decay; the ridge stays lam
            A[k] = gamma * A[k] + (1 - gamma) * lam * torch.eye(d, dtype=torch.float64) + X[arms == k].T @ X[arms == k]
            b[k] = gamma * b[k] + X[arms == k].T @ r[arms == k]
    Xq = torch.randn(6, d, generator=gen, dtype=torch.float64)
    mean_ref, width_ref, _ = closed_form(A, b, Xq, 0.1)
    mean, width = bandit.scores(Xq)
    assert rel_err(mean, mean_ref) < 1e-10 and rel_err(width, width_ref) < 1e-10


def run_synthetic(bandit, steps=80, batch=32, per_batch=False, seed=0):
    """Feed the bandit centered rewards from the clustered problem; return choices after warm-up."""
    problem = ClusteredRewardProblem(seed=seed)
    chosen, clusters = [], []
    for t in range(steps):
        X, c = problem.contexts(batch)
        X = X.float()
        if per_batch:
            arms = bandit.select(X.mean(0, keepdim=True)).expand(batch)
        else:
            arms = bandit.select(X)
        r = problem.rewards(X.double(), arms).clamp(0, 1).float()
        r = r - 0.5 if bandit.centered_rewards else r
        if per_batch:
            bandit.update(X.mean(0, keepdim=True), arms[:1], r.mean().reshape(1))
        else:
            bandit.update(X, arms, r)
        if t >= 20:
            chosen.append(arms.clone())
            clusters.append(c)
    return torch.cat(chosen), torch.cat(clusters)


@pytest.mark.parametrize("name", ["linucb", "thompson", "epsilon_greedy"])
def test_contextual_bandits_learn_each_clusters_best_arm(name):
    arms, clusters = run_synthetic(make_bandit(name, 4, 16, seed=0))
    best_rate = (arms == clusters).float().mean().item()
    noise_rate = (arms == 3).float().mean().item()
    assert best_rate >= (0.9 if name != "epsilon_greedy" else 0.85), best_rate  # epsilon explores 10% by design
    assert noise_rate <= 0.05, noise_rate


def test_per_batch_selection_is_worse_on_mixed_batches():
    per_prompt, c1 = run_synthetic(LinUCB(4, 16, seed=0))
    per_batch, c2 = run_synthetic(LinUCB(4, 16, seed=0), per_batch=True)
    assert (per_prompt == c1).float().mean() - (per_batch == c2).float().mean() > 0.4


def test_exp3_and_ucb1_find_the_best_arm_without_context():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([0.2, 0.5, 0.8, 0.3])
    for bandit in (Exp3(4, gamma=0.1, seed=0), UCB1(4, seed=0)):
        X = torch.zeros(16, 1)
        for _ in range(300):
            arms = bandit.select(X)
            r = (means[arms] + 0.1 * torch.randn(16, generator=gen)).clamp(0, 1)
            bandit.update(X, arms, r)
        assert (bandit.select(torch.zeros(200, 1)) == 2).float().mean() > 0.8, type(bandit).__name__


def test_baselines():
    X = torch.zeros(10, 3)
    assert torch.equal(FixedArm(4, arm=2).select(X), torch.full((10,), 2))
    rr = RoundRobin(3)
    assert [int(rr.select(X)[0]) for _ in range(5)] == [0, 1, 2, 0, 1]
    counts = torch.bincount(RandomArm(4, seed=0).select(torch.zeros(4000, 1)), minlength=4)
    assert counts.min() > 900
    assert not RandomArm.learns and not RoundRobin.learns and LinUCB.learns


@pytest.mark.parametrize("name", sorted(BANDITS))
def test_state_dict_restores_future_choices(name):
    gen = torch.Generator().manual_seed(5)
    dim = 6 if name in ("linucb", "thompson", "epsilon_greedy") else None
    make = lambda: make_bandit(name, 3, dim, seed=11)  # noqa: E731
    a = make()
    for _ in range(5):
        X = torch.randn(8, 6, generator=gen)
        arms = a.select(X)
        a.update(X, arms, torch.rand(8, generator=gen))
    b = make()
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        X = torch.randn(8, 6, generator=gen)
        arms_a, arms_b = a.select(X), b.select(X)
        assert torch.equal(arms_a, arms_b)
        r = torch.rand(8, generator=gen)
        a.update(X, arms_a, r)
        b.update(X, arms_b, r)


@pytest.mark.parametrize("name", ["linucb", "epsilon_greedy"])
def test_ties_at_the_prior_are_broken_at_random(name):
    X = torch.nn.functional.normalize(torch.randn(400, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    first = make_bandit(name, 4, 6, seed=3, **({"epsilon": 0.0} if name == "epsilon_greedy" else {})).select(X)
    assert torch.bincount(first, minlength=4).min() > 60  # not every prompt on arm 0
    again = make_bandit(name, 4, 6, seed=3, **({"epsilon": 0.0} if name == "epsilon_greedy" else {})).select(X)
    assert torch.equal(first, again)  # the tie-break is seeded
    # Once arm 2 has learned a high reward, its rows are no longer tied and the choice is deterministic.
    bandit = LinUCB(4, 6, alpha=0.0, seed=3)
    X = X.abs() + 0.1  # positive contexts: arm 2's learned mean is positive on every row, the others' 0
    bandit.update(X[:50], torch.full((50,), 2), torch.ones(50))
    state = bandit.generator.get_state()
    assert torch.equal(bandit.select(X[50:100]), torch.full((50,), 2))
    assert torch.equal(bandit.generator.get_state(), state)  # no tie, no draw


def test_same_seed_same_choices_different_seed_differs():
    X = torch.randn(64, 4)
    assert torch.equal(LinearThompson(4, 4, seed=1).select(X), LinearThompson(4, 4, seed=1).select(X))
    assert not torch.equal(RandomArm(4, seed=1).select(X), RandomArm(4, seed=2).select(X))


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="at least 2 arms"):
        LinUCB(1, 4)
    with pytest.raises(ValueError, match="unknown bandit"):
        make_bandit("best", 3, 4)
    bandit = LinUCB(3, 4)
    with pytest.raises(ValueError, match="dimension mismatch.*dim=4, got 5"):
        bandit.select(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="empty batch"):
        bandit.select(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        bandit.update(torch.ones(2, 4), torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or inf"):
        bandit.select(torch.full((2, 4), float("inf")))
    with pytest.raises(ValueError, match="arm indices"):
        bandit.update(torch.ones(2, 4), torch.tensor([0, 3]), torch.ones(2))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Exp3(3).update(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([2.0]))
    # a rejected update leaves the state finite and unchanged
    assert torch.isfinite(bandit.A_inv).all() and int(bandit.counts.sum()) == 0


def test_runs_on_float32_hidden_states_in_bf16():
    bandit = LinUCB(3, 8)
    X = torch.randn(5, 8).bfloat16()
    arms = bandit.select(X)
    bandit.update(X, arms, torch.rand(5))
    assert torch.isfinite(bandit.theta).all() and bandit.theta.dtype == torch.float32
