"""Reliability contracts of the bandits (issue 14): a call that raises changes nothing, non-finite numbers never
reach the statistics, and float32 LinUCB survives contexts that used to kill it mid-run.

Every error case compares the bandit's full state (every tensor, the counters, the random generator, the round-robin
turn) before and after the rejected call.
"""

from __future__ import annotations

import pytest
import torch

import laser_rl.bandits as bandits
from laser_rl.bandits import BANDITS, LinearBandit, LinUCB, RoundRobin, make_bandit, spd_inverse

CONTEXTUAL = ("linucb", "thompson", "epsilon_greedy")
K, D = 3, 6


def snapshot(bandit) -> dict:
    """Everything a call could change: the learned tensors, counters and the generator's state."""
    state = {name: t.clone() for name, t in bandit._tensors().items()}
    state["num_updates"] = bandit.num_updates
    state["generator"] = bandit.generator.get_state().clone()
    return state


def assert_unchanged(before: dict, bandit) -> None:
    after = snapshot(bandit)
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), f"{type(bandit).__name__}: {name} changed by a rejected call"
        else:
            assert value == after[name], f"{type(bandit).__name__}: {name} changed by a rejected call"


def trained(name: str, **kwargs):
    """A bandit with a few updates behind it, so its state is not the prior."""
    bandit = make_bandit(name, K, D if name in CONTEXTUAL else None, seed=7, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        X = torch.randn(5, D, generator=gen)
        arms = bandit.select(X)
        rewards = torch.rand(5, generator=gen)
        bandit.update(X, arms, rewards - 0.5 if bandit.centered_rewards else rewards)
    return bandit


NAN, INF = float("nan"), float("inf")
BAD_SELECTS = {
    "nan context": lambda: torch.tensor([[0.1] * D, [NAN] * D]),
    "inf context": lambda: torch.full((2, D), -INF),
    "1-D contexts": lambda: torch.ones(D),
    "empty batch": lambda: torch.zeros(0, D),
    "wrong dim": lambda: torch.ones(2, D + 1),
    "complex contexts": lambda: torch.ones(2, D, dtype=torch.complex64),
}
BAD_UPDATES = {
    "nan context": (lambda: torch.tensor([[NAN] * D, [0.1] * D]), [0, 1], [0.2, 0.3], "NaN or inf"),
    "inf reward": (lambda: torch.ones(2, D), [0, 1], [0.2, INF], "NaN or inf"),
    "nan reward": (lambda: torch.ones(2, D), [0, 1], [NAN, 0.2], "NaN or inf"),
    "arm out of range": (lambda: torch.ones(2, D), [0, K], [0.2, 0.3], "arm indices"),
    "negative arm": (lambda: torch.ones(2, D), [-1, 0], [0.2, 0.3], "arm indices"),
    "float arms": (lambda: torch.ones(2, D), torch.tensor([0.0, 1.7]), [0.2, 0.3], "integers"),
    "too few rewards": (lambda: torch.ones(2, D), [0, 1], [0.2], "one arm and one reward"),
    "wrong dim": (lambda: torch.ones(2, D + 1), [0, 1], [0.2, 0.3], "dimension mismatch"),
}


def cases(table: dict) -> list[tuple[str, str]]:
    """(bandit, case) pairs; non-contextual bandits take contexts of any width (they only use the batch size)."""
    return [(name, case) for name in sorted(BANDITS) for case in sorted(table) if case != "wrong dim" or name in CONTEXTUAL]


@pytest.mark.parametrize("name,case", cases(BAD_SELECTS))
def test_rejected_select_changes_nothing(name, case):
    bandit = trained(name)
    before = snapshot(bandit)
    with pytest.raises(ValueError):
        bandit.select(BAD_SELECTS[case]())
    assert_unchanged(before, bandit)


def test_round_robin_keeps_its_turn_when_select_is_rejected():
    rr = RoundRobin(3)
    assert int(rr.select(torch.zeros(2, 4))[0]) == 0
    with pytest.raises(ValueError, match="NaN or inf"):
        rr.select(torch.full((2, 4), NAN))
    assert int(rr.select(torch.zeros(2, 4))[0]) == 1  # the rejected batch did not use up arm 1's turn


@pytest.mark.parametrize("name,case", cases(BAD_UPDATES))
def test_rejected_update_changes_nothing(name, case):
    bandit = trained(name)
    make_x, arms, rewards, message = BAD_UPDATES[case]
    before = snapshot(bandit)
    with pytest.raises(ValueError, match=message):
        bandit.update(make_x(), torch.as_tensor(arms), torch.as_tensor(rewards))
    assert_unchanged(before, bandit)


def test_exp3_rejects_rewards_outside_unit_interval_before_changing_anything():
    bandit = trained("exp3")
    before = snapshot(bandit)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        bandit.update(torch.zeros(2, 1), torch.tensor([0, 1]), torch.tensor([0.5, 1.5]))
    assert_unchanged(before, bandit)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": NAN}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"alpha": None}, "alpha"), ({"lam": NAN}, "lam"),
        ({"lam": INF}, "lam"), ({"lam": 0.0}, "lam"),
        ({"discount": NAN}, "discount"), ({"max_norm": INF}, "max_norm"), ({"refresh_every": 0}, "refresh_every"),
        ({"dtype": torch.bfloat16}, "float32 or float64"),
    ],
)
def test_linucb_settings_reject_nan_and_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinUCB(K, D, **kwargs)


def test_other_knobs_reject_nan():
    with pytest.raises(ValueError, match="v must"):
        make_bandit("thompson", K, D, v=NAN)
    with pytest.raises(ValueError, match="epsilon"):
        make_bandit("epsilon_greedy", K, D, epsilon=NAN)
    with pytest.raises(ValueError, match="gamma"):
        make_bandit("exp3", K, None, gamma=NAN)
    with pytest.raises(ValueError, match="c must"):
        make_bandit("ucb1", K, None, c=NAN)
    with pytest.raises(ValueError, match="discount"):
        make_bandit("ucb1", K, None, discount=NAN)


# ----- load_state_dict: every entry checked before anything is copied ---------------------------------------------


def corrupt(state: dict, name: str) -> dict:
    """A copy of a state_dict() with one defect."""
    state = dict(state)
    tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor) and k != "generator"]
    if name == "kind":
        state["kind"] = "Nope"
    elif name == "num_arms":
        state["num_arms"] += 1
    elif name == "missing tensor" and tensors:
        del state[tensors[0]]
    elif name == "wrong shape" and tensors:
        state[tensors[-1]] = torch.zeros(7, 7, 7)
    elif name == "nan tensor" and any(state[k].is_floating_point() for k in tensors):
        first = next(k for k in tensors if state[k].is_floating_point())
        state[first] = torch.full_like(state[first], NAN)
    elif name == "generator":
        state["generator"] = torch.zeros(3, dtype=torch.uint8)
    elif name == "num_updates":
        state["num_updates"] = -2
    else:
        return None
    return state


DEFECTS = ["kind", "num_arms", "missing tensor", "wrong shape", "nan tensor", "generator", "num_updates"]
# the defects each bandit's state can have (random and fixed keep no tensors; round-robin no float one)
LOAD_CASES = [(name, defect) for name in sorted(BANDITS) for defect in DEFECTS if corrupt(trained(name).state_dict(), defect)]


@pytest.mark.parametrize("name,defect", LOAD_CASES)
def test_rejected_load_changes_nothing(name, defect):
    source, target = trained(name), make_bandit(name, K, D if name in CONTEXTUAL else None, seed=3)
    state = corrupt(source.state_dict(), defect)
    before = snapshot(target)
    with pytest.raises(ValueError):
        target.load_state_dict(state)
    assert_unchanged(before, target)
    target.load_state_dict(source.state_dict())  # the intact state still loads, and gives the source's state
    assert_unchanged(snapshot(source), target)


@pytest.mark.parametrize("setting,value", [("lam", 2.0), ("dim", D + 1)])
def test_linear_state_from_other_lam_or_dim_is_rejected(setting, value):
    source = trained("linucb")
    state = source.state_dict()
    assert state["lam"] == 1.0 and state["dim"] == D
    kwargs = {"lam": value} if setting == "lam" else {}
    target = LinUCB(K, value if setting == "dim" else D, **kwargs)
    before = snapshot(target)
    with pytest.raises(ValueError, match=setting):
        target.load_state_dict(state)
    assert_unchanged(before, target)


def test_state_without_the_new_counters_still_loads():
    """Checkpoints saved before `repairs` and `clipped_rows` existed load with both counters at zero."""
    source = trained("linucb")
    source._repairs += 3
    state = {k: v for k, v in source.state_dict().items() if k not in ("repairs", "clipped_rows", "lam", "dim")}
    target = LinUCB(K, D)
    target.load_state_dict(state)
    assert target.repairs == 0 and torch.equal(target.A_inv, source.A_inv)
    full = LinUCB(K, D)
    full.load_state_dict(source.state_dict())
    assert full.repairs == 3


# ----- update stages its work: a failure before the commit leaves the state as it was ------------------------------


def test_failed_inverse_midway_through_an_update_changes_nothing(monkeypatch):
    bandit = trained("linucb", refresh_every=1)  # every arm with rows takes an exact inverse this update
    before = snapshot(bandit)
    calls = []

    def failing(A, floor=None):
        calls.append(1)
        if len(calls) == 2:  # the second arm's inverse fails, after the first arm's was computed
            raise RuntimeError("simulated failure")
        return spd_inverse(A, floor)

    monkeypatch.setattr(bandits, "spd_inverse", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        bandit.update(torch.randn(6, D), torch.tensor([0, 1, 2, 0, 1, 2]), torch.zeros(6))
    assert len(calls) == 2
    assert_unchanged(before, bandit)


# ----- float32 numerics that cannot die mid-run --------------------------------------------------------------------


def stream(kind: str, rows: int, batch: int, d: int, gen: torch.Generator):
    """Batches of contexts: 'large' (norm 3000, full rank, spread over five decades in random directions) or 'lowrank' (rank 2, norm 400)."""
    basis = torch.randn(2, d, generator=gen, dtype=torch.float64)
    spread = torch.logspace(0, -5, d, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]  # not along the axes
    for _ in range(rows // batch):
        if kind == "large":
            X = (torch.randn(batch, d, generator=gen, dtype=torch.float64) * spread) @ rotation
            X = 3000 * X / X.norm(dim=1, keepdim=True)
        else:
            X = torch.randn(batch, 2, generator=gen, dtype=torch.float64) @ basis
            X = 400 * X / X.norm(dim=1, keepdim=True)
        yield X


@pytest.fixture
def one_thread():
    """Tiny matrices: torch's thread pool only adds overhead (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["large", "lowrank"])
def test_float32_linucb_survives_20000_updates_of_large_and_low_rank_contexts(kind, one_thread):
    """The stream that raised _LinAlgError from the periodic refresh: float32 now keeps going, chooses what float64
    chooses on at least 99% of prompts, and counts its repairs."""
    gen = torch.Generator().manual_seed(0)
    d, batch = 8, 50
    f32, f64 = LinUCB(K, d, seed=1), LinUCB(K, d, seed=1, dtype=torch.float64)
    true_theta = torch.randn(K, d, generator=gen, dtype=torch.float64) / 3000
    agree = total = 0
    with pytest.warns(RuntimeWarning, match="float64 from now on"):
        for X in stream(kind, 20_000, batch, d, gen):
            arms = f64.select(X)
            agree += int((f32.select(X.float()) == arms).sum())
            total += len(arms)
            rewards = (X @ true_theta.T).gather(1, arms[:, None]).squeeze(1).clamp(-0.5, 0.5)
            f64.update(X, arms, rewards)
            f32.update(X.float(), arms, rewards.float())  # both learn from the same rows
    assert f32.dtype == torch.float64 and f32.A.dtype == torch.float64  # promoted at its first repair
    print(f"{kind}: float32 agrees with float64 on {agree / total:.4f} of {total} prompts, {f32.repairs} repairs")
    assert total == 20_000 and f32.num_updates == 20_000 // batch
    assert agree / total >= 0.99
    assert f32.repairs > 0 and torch.isfinite(f32.A_inv).all() and torch.isfinite(f32.theta).all()
    assert f32.state_dict()["repairs"] == f32.repairs
    resumed = LinUCB(K, d, seed=1)  # built float32: resumes the promoted state in float64
    resumed.load_state_dict(f32.state_dict())
    assert resumed.dtype == torch.float64 and torch.equal(resumed.select(X.float()), f32.select(X.float()))


@pytest.mark.filterwarnings("ignore:.*float64 from now on:RuntimeWarning")  # a promotion is allowed here
@pytest.mark.parametrize("scale", [1e10, 1e15, 1e20])
def test_huge_finite_contexts_are_scaled_to_max_norm(scale):
    """Rows beyond max_norm are scaled down to it, the same way when choosing and when learning: the statistics stay
    finite and no update raises. Counted in clipped_rows."""
    gen = torch.Generator().manual_seed(2)
    bandit = LinUCB(K, D)
    for step in range(40):
        X = torch.randn(8, D, generator=gen) * (scale if step % 2 else 1.0)
        arms = bandit.select(X)
        bandit.update(X, arms, torch.rand(8, generator=gen) - 0.5)
    assert bandit.clipped_rows == 20 * 8
    for t in bandit._tensors().values():
        assert torch.isfinite(t.float()).all()
    # a clipped row is learned exactly like its scaled-down copy
    X = torch.randn(4, D, generator=gen)
    a, b = LinUCB(K, D), LinUCB(K, D)
    a.update(X * 1e12, torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.3))
    within = X / X.norm(dim=1, keepdim=True) * (1e6 * (1 - 1e-6))  # just inside max_norm after float32 rounding
    b.update(within, torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.3))
    assert torch.allclose(a.A, b.A, rtol=1e-5) and torch.allclose(a.b, b.b, rtol=1e-5)
    assert a.clipped_rows == 4 and b.clipped_rows == 0


def test_integer_contexts_are_taken_as_numbers():
    bandit = LinUCB(K, D, dtype=torch.float64)
    X = torch.arange(2 * D).reshape(2, D)
    bandit.update(X, bandit.select(X), torch.zeros(2))
    assert torch.equal(bandit.counts.sum(), torch.tensor(2)) and bandit.A.dtype == torch.float64


def test_rows_within_max_norm_are_left_bit_for_bit():
    X = torch.randn(5, D) * 1e5  # norms ~2e5 < 1e6
    assert torch.equal(LinUCB(K, D)._clip(X)[0], X)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spd_inverse_repairs_a_matrix_that_rounding_made_indefinite(dtype):
    """A float32 ridge matrix whose ridge was eaten by rounding: plain Cholesky fails, the repair gives a finite,
    symmetric positive definite inverse whose eigenvalues are at most 1 / floor."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(D, 1, generator=gen, dtype=torch.float64)
    A = (1e9 * v @ v.T + torch.eye(D, dtype=torch.float64)).to(dtype)
    A[1, 1] -= 10.0 * float(A[1, 1]) * torch.finfo(dtype).eps + 5.0  # now indefinite in this dtype
    assert int(torch.linalg.cholesky_ex(A).info) != 0
    inverse, repaired = spd_inverse(A, floor=1.0)
    assert repaired and inverse.dtype == dtype and torch.isfinite(inverse).all()
    evals = torch.linalg.eigvalsh(((inverse + inverse.T) / 2).double())
    assert evals.min() > 0 and evals.max() <= 1.0 + 1e-6
    healthy, repaired = spd_inverse(torch.eye(D, dtype=dtype) * 2)
    assert not repaired and torch.allclose(healthy, torch.eye(D, dtype=dtype) / 2)


def test_repairs_are_counted_and_saved():
    bandit = LinUCB(2, 4, dtype=torch.float64)
    bandit.A_inv[1] = -torch.eye(4, dtype=torch.float64)  # drifted indefinite: its Woodbury factor fails
    bandit.update(torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.zeros(3))
    assert bandit.repairs == 1 and bandit.state_dict()["repairs"] == 1
    assert isinstance(bandit, LinearBandit) and torch.allclose(bandit.A_inv[1] @ bandit.A[1], torch.eye(4, dtype=torch.float64))
