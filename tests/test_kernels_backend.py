"""The linear bandits' backend seam (LinearBandit(backend="auto" | "triton" | "torch")): the Triton pair picked once
in __init__ gives what the torch pair gives, through whole select/update rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package: see kernels_common's docstring
from kernels_common import (  # noqa: E402
    BANDIT_SCORE_TOL, DEVICE, F32_TOL, MODE, kern, rel, run_in_interpreter_child,
)

import laser_rl.bandits as bandits  # noqa: E402
from laser_rl.bandits import LinearThompson, LinUCB  # noqa: E402
from laser_rl.kernels import linear_update_torch, score_select_torch  # noqa: E402

__all__ = ["kern"]  # a fixture


@pytest.mark.skipif(MODE != "child", reason="the kernel tests run in this process (CUDA, or TRITON_INTERPRET=1 already)")
def test_backend_in_interpreter_child():
    """This file's kernel tests under the interpreter, in a fresh process that sets TRITON_INTERPRET=1 first."""
    run_in_interpreter_child(__file__)


def test_backend_argument_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        LinUCB(3, 8, backend="cuda")
    assert not LinUCB(3, 8, backend="torch").use_triton
    assert not LinUCB(3, 8, backend="auto").use_triton  # CPU tensors: the torch reference
    if bandits._triton_installed():
        with pytest.raises(ValueError, match="float32"):
            LinUCB(3, 8, backend="triton", dtype=torch.float64)
        if MODE == "child":  # triton compiled (not interpreted) in this process: CPU tensors cannot run the kernels
            with pytest.raises(ValueError, match="TRITON_INTERPRET"):
                LinUCB(3, 8, backend="triton", device="cpu")
    monkeypatch.setattr(bandits, "_triton_installed", lambda: False)
    with pytest.raises(ValueError, match="needs triton"):
        LinUCB(3, 8, backend="triton")
    assert not LinUCB(3, 8, backend="auto", device=DEVICE).use_triton  # auto falls back quietly


def test_backend_pair_is_picked_once_in_init(kern):
    """The seam: a bandit holds one (score_select, linear_update) pair, and select/update have one code path; the
    Triton pair is the one laser_rl.kernels.backend registered."""
    torch_bandit = LinUCB(3, 8, backend="torch")
    assert torch_bandit._score_select is score_select_torch and torch_bandit._linear_update is linear_update_torch
    triton_bandit = LinUCB(3, 8, backend="triton", device=DEVICE)
    assert triton_bandit._score_select is kern.scoring.score_select
    assert triton_bandit._linear_update is kern.update.linear_update


def test_auto_on_cpu_is_bit_identical_to_torch():
    gen = torch.Generator().manual_seed(0)
    a, t = LinUCB(3, 12, alpha=0.2, backend="auto"), LinUCB(3, 12, alpha=0.2, backend="torch")
    for _ in range(4):
        X = torch.randn(10, 12, generator=gen)
        assert torch.equal(a.select(X), t.select(X))
        arms, r = torch.randint(3, (10,), generator=gen), torch.rand(10, generator=gen) - 0.5
        a.update(X, arms, r)
        t.update(X, arms, r)
    for name, value in t._tensors().items():
        assert torch.equal(a._tensors()[name], value)


def closed_form(X_all: list[torch.Tensor], arms_all: list[torch.Tensor], r_all: list[torch.Tensor], K: int, d: int):
    """float64 ridge statistics from every row seen so far: A, A^-1, b, theta per arm."""
    X, arms, r = torch.cat(X_all).double(), torch.cat(arms_all), torch.cat(r_all).double()
    A = torch.eye(d, dtype=torch.float64).repeat(K, 1, 1)
    b = torch.zeros(K, d, dtype=torch.float64)
    for k in range(K):
        A[k] += X[arms == k].T @ X[arms == k]
        b[k] += X[arms == k].T @ r[arms == k]
    A_inv = torch.linalg.inv(A)
    return A, A_inv, b, torch.einsum("kij,kj->ki", A_inv, b)


@pytest.mark.parametrize("bandit_cls", [LinUCB, LinearThompson])
def test_many_updates_stay_close_to_closed_form(kern, bandit_cls):
    """16 select/update rounds on the Triton backend track the float64 closed form, with periodic refreshes, and
    choose what the torch backend chooses on the same data."""
    K, d, rounds, every = 3, 40, 16, 5
    gen = torch.Generator().manual_seed(1)
    tri = bandit_cls(K, d, refresh_every=every, seed=5, backend="triton", device=DEVICE)
    ref = bandit_cls(K, d, refresh_every=every, seed=5, backend="torch", device=DEVICE)
    assert tri.use_triton and not ref.use_triton
    true_theta = torch.randn(K, d, generator=gen) / d**0.5
    seen: tuple[list, list, list] = ([], [], [])
    worst, refreshes = 0.0, 0
    for t in range(rounds):
        B = int(torch.randint(1, 17, (1,), generator=gen))
        X = torch.randn(B, d, generator=gen)
        # The torch bandit's exact scores, Thompson's draws included (replayed from its generator).
        replay = torch.Generator().set_state(ref.generator.get_state())
        arms_tri, arms_ref = tri.select(X.to(DEVICE)).cpu(), ref.select(X.to(DEVICE)).cpu()
        mean, width = (s.cpu() for s in ref.scores(X.to(DEVICE)))
        if isinstance(ref, LinUCB):
            score = mean + ref.alpha * width
        else:
            score = mean + ref.v * width * torch.randn(mean.shape, generator=replay, dtype=torch.float64).float()
        top2 = score.topk(2, dim=1).values
        clear = top2[:, 0] - top2[:, 1] > 10 * BANDIT_SCORE_TOL * score.abs().amax(1).clamp_min(1e-3)
        assert torch.equal(arms_tri[clear], arms_ref[clear])
        same = arms_tri == arms_ref
        assert rel(tri.last_width[same], ref.last_width[same]) <= BANDIT_SCORE_TOL
        arms = arms_ref if t % 5 else torch.zeros(B, dtype=torch.long)  # some rounds leave arms idle
        r = (X @ true_theta.T).gather(1, arms[:, None]).squeeze(1) + 0.1 * torch.randn(B, generator=gen)
        for lst, v in zip(seen, (X, arms, r)):
            lst.append(v)
        tri.update(X.to(DEVICE), arms.to(DEVICE), r.to(DEVICE))
        ref.update(X.to(DEVICE), arms.to(DEVICE), r.to(DEVICE))
        A, A_inv, b, theta = closed_form(*seen, K, d)
        for name, exact in (("A", A), ("A_inv", A_inv), ("b", b), ("theta", theta)):
            err = rel(getattr(tri, name), exact)
            worst = max(worst, err)
            assert err <= F32_TOL, f"round {t}: {name} relative error {err:.2e}"
        assert torch.equal(tri.counts, ref.counts)
        assert torch.equal(tri.updates_since_refresh, ref.updates_since_refresh)
        refreshes += int((tri.updates_since_refresh == 0).sum())
    print(f"{bandit_cls.__name__} {MODE}: worst relative error over {rounds} rounds {worst:.1e}, {refreshes} refreshes")
    assert refreshes > 0 and tri.num_updates == rounds


def test_triton_backend_with_bf16_contexts_and_discount(kern):
    """bf16 hidden states select like their float32 values; with a discount the update keeps the torch path."""
    gen = torch.Generator().manual_seed(2)
    tri = LinUCB(2, 24, alpha=0.5, discount=0.9, backend="triton", device=DEVICE)
    ref = LinUCB(2, 24, alpha=0.5, discount=0.9, backend="torch", device=DEVICE)
    for _ in range(3):
        X = torch.randn(16, 24, generator=gen).to(DEVICE, torch.bfloat16)
        arms = tri.select(X)
        mean, width = ref.scores(X.float())
        assert rel(tri.scores(X)[0], mean) <= F32_TOL and rel(tri.scores(X)[1], width) <= BANDIT_SCORE_TOL
        r = torch.rand(16, generator=gen).to(DEVICE)
        tri.update(X, arms, r)
        ref.update(X.float(), arms, r)
        assert rel(tri.A_inv, ref.A_inv) <= F32_TOL and rel(tri.theta, ref.theta) <= F32_TOL
