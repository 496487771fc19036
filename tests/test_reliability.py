"""The selector's contracts: a call that raises changes nothing, bad numbers never reach the bandit,
checkpoints fail with one clear error, and several threads may call one selector."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from laser_rl.arms import RewardArmError, RuleArm
from laser_rl.selector import RewardSelector


def rule_rms(k=3):
    return [RuleArm(lambda p, r, l, i=i: [float(len(x) + i) for x in r], name=f"rm{i}") for i in range(k)]


def snapshot(sel: RewardSelector):
    """Every piece of state, flattened to comparable leaves."""
    leaves = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            leaves.append(x.detach().clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                leaves.append(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            leaves.append(len(x))
            for v in x:
                walk(v)
        else:
            leaves.append(x)

    walk(sel.state_dict())
    walk({k: v for k, v in sel._stats.items() if k not in ("score_sum", "score_count")})
    walk(dict(sel._stats["score_sum"]))
    walk(dict(sel._stats["score_count"]))
    return leaves


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
        else:
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))


def trained_selector(feedback="spread", **kwargs):
    sel = RewardSelector(rule_rms(), context_dim=4, feedback=feedback, reward_warmup=1, **kwargs)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        X = torch.randn(5, 4, generator=g)
        arms = sel.select(X)
        scores = sel.score(["p"] * 10, [f"r{i}" * (i % 3 + 1) for i in range(10)], arms.repeat_interleave(2))
        sel.feedback(X, arms, scores=scores.view(5, 2), correct=torch.tensor([[True, False]] * 5))
    return sel


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda s: s.feedback(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), scores=torch.rand(2, 2)), "dimension"),
        (lambda s: s.feedback(torch.full((2, 4), math.nan), torch.zeros(2, dtype=torch.long), scores=torch.rand(2, 2)), "NaN or inf"),
        (lambda s: s.feedback(torch.zeros(2, 4), torch.tensor([0, 3]), scores=torch.rand(2, 2)), "arm indices"),
        (lambda s: s.feedback(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), scores=torch.rand(3, 2)), "rows"),
        (lambda s: s.feedback(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), vibes=torch.rand(2, 2)), "unknown feedback inputs"),
        (lambda s: s.feedback(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), "missing"),
        (lambda s: s.select(torch.full((2, 4), math.inf)), "NaN or inf"),
        (lambda s: s.select(torch.zeros(2, 3)), "dimension"),
        (lambda s: s.score(["p"] * 2, ["a", "b"], torch.tensor([0, 5])), "arm indices"),
        (lambda s: s.score(["p"] * 2, ["a", "b"], torch.tensor([0.0, 1.0])), "integer"),
    ],
)
def test_a_call_that_raises_changes_nothing(call, error):
    sel = trained_selector()
    before = snapshot(sel)
    with pytest.raises(ValueError, match=error):
        call(sel)
    assert_same(before, snapshot(sel))


def test_failing_rm_counts_nothing_and_a_retry_counts_once():
    calls = {"n": 0}

    def flaky(p, r, l):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("server hiccup")
        return [1.0] * len(r)

    sel = RewardSelector([RuleArm(lambda p, r, l: [0.5] * len(r), name="ok"), RuleArm(flaky, name="flaky")], baseline="mean")
    before = snapshot(sel)
    with pytest.raises(RewardArmError, match="'flaky'"):
        sel.score(["p"] * 3, ["a", "b", "c"], torch.full((3,), -1))
    assert_same(before, snapshot(sel))
    sel.score(["p"] * 3, ["a", "b", "c"], torch.full((3,), -1))
    assert sel.metrics()["laser/rm_passes"] == 6  # 2 RMs x 3 samples, counted once


def test_infinite_raw_rewards_and_scores_never_reach_the_bandit():
    sel = RewardSelector(rule_rms(2), context_dim=2, reward_warmup=1)
    X = torch.eye(2)
    arms = sel.select(X)
    sel.feedback(X, arms, raw_rewards=torch.tensor([math.inf, -math.inf]))
    assert int(sel.bandit.counts.sum()) == 0
    assert sel.metrics()["laser/feedback_skipped"] == 2
    inf_rm = RuleArm(lambda p, r, l: [math.inf, -math.inf, 1.0], name="inf")
    lenient = RewardSelector([inf_rm], baseline="single", skip_invalid=True)
    rewards = lenient.score(["p"] * 3, ["a", "b", "c"], torch.zeros(3, dtype=torch.long))
    assert torch.isnan(rewards[:2]).all() and rewards[2] == 1.0  # the docstring's promise: NaN, never +-inf
    assert lenient.metrics()["laser/invalid_samples"] == 2


def test_a_rule_returning_a_dict_is_an_error_not_its_keys():
    sel = RewardSelector([RuleArm(lambda p, r, l: {0.1: "a", 0.2: "b"}, name="dicty")], baseline="single")
    with pytest.raises(RewardArmError, match="dicty"):
        sel.score(["p", "p"], ["a", "b"], torch.zeros(2, dtype=torch.long))


def test_load_refuses_other_settings_before_touching_anything(tmp_path):
    sel = trained_selector()
    path = str(tmp_path / "sel.pt")
    sel.save(path)
    for kwargs, what in [({"reward_window": 64}, "reward_window"), ({"lam": 2.0}, "lam")]:
        other = RewardSelector(rule_rms(), context_dim=4, feedback="spread", reward_warmup=1, **kwargs)
        before = snapshot(other)
        with pytest.raises(ValueError, match=f"{path}.*{what}"):
            other.load(path)
        assert_same(before, snapshot(other))
    with pytest.raises(ValueError, match="context_dim"):
        RewardSelector(rule_rms(), context_dim=5, feedback="spread").load(path)
    with pytest.raises(ValueError, match="bandit"):
        RewardSelector(rule_rms(), context_dim=4, bandit="thompson", feedback="spread").load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_malformed_checkpoints_give_one_error_naming_the_path(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # truncated real checkpoint
        trained_selector().save(str(path))
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    sel = trained_selector()
    before = snapshot(sel)
    with pytest.raises(ValueError, match=str(path)):
        sel.load(str(path))
    assert_same(before, snapshot(sel))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sel.load(str(tmp_path / "missing.pt"))


def test_foreign_and_code_running_checkpoints_are_refused(tmp_path):
    torch.save({"something": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt.*arm_names"):
        trained_selector().load(str(tmp_path / "foreign.pt"))

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"arm_names": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):  # weights_only=True: nothing is executed
        trained_selector().load(str(tmp_path / "evil.pt"))


def test_save_is_atomic_and_keeps_the_previous_file_on_a_crash(tmp_path, monkeypatch):
    sel = trained_selector()
    path = str(tmp_path / "sel.pt")
    sel.save(path)
    good = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        sel.save(path)
    assert open(path, "rb").read() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sel.pt"]  # no temporary file left behind


def test_concurrent_calls_equal_the_same_updates_one_after_another():
    d, threads, rounds = 8, 4, 25
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, d, generator=g, dtype=torch.float64), torch.rand(6, generator=g)) for _ in range(threads * rounds)]
    # Raw rewards; consensus would pair each score() with the last select(), one batch in flight at a time.
    shared = RewardSelector(rule_rms(), context_dim=d, bandit_kwargs={"dtype": torch.float32}, reward_warmup=1,
                            feedback="pair_loss")
    chosen = [None] * len(batches)

    def worker(t):
        for i in range(t, len(batches), threads):
            X, r = batches[i]
            arms = shared.select(X.float())
            shared.score(["p"] * 6, ["x"] * 6, arms)
            chosen[i] = arms
            shared.feedback(X.float(), arms, raw_rewards=r)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    # A and b are sums over the updates: equal to the same (context, arm) rows applied one after another.
    bandit = shared.bandit
    A = torch.eye(d, dtype=torch.float64).repeat(3, 1, 1)
    for (X, _), arms in zip(batches, chosen):
        for x, k in zip(X, arms.tolist()):
            A[k] += torch.outer(x.float().double(), x.float().double())
    torch.testing.assert_close(bandit.A.double(), A, rtol=1e-4, atol=1e-3)
    eye = torch.eye(d).expand(3, d, d)
    assert (bandit.A_inv.double() @ bandit.A.double() - eye.double()).abs().max() < 1e-3
    assert shared.steps == len(batches)
