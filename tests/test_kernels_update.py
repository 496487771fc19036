"""laser_rl.kernels.linear_update (kernels/src/update.py) against float64: A, A^-1 (Woodbury or exact refresh), b and
theta for every arm in a few launches, and the torch reference with the same contract."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package: see kernels_common's docstring
from kernels_common import (  # noqa: E402
    DEVICE, F32_TOL, MODE, ON_CUDA, UPDATE_PRECISIONS, expected_update, kern, random_state, rel,
    run_in_interpreter_child, to_device32,
)

from laser_rl.kernels import linear_update_torch  # noqa: E402

__all__ = ["kern"]  # a fixture


@pytest.mark.skipif(MODE != "child", reason="the kernel tests run in this process (CUDA, or TRITON_INTERPRET=1 already)")
def test_update_in_interpreter_child():
    """This file's kernel tests under the interpreter, in a fresh process that sets TRITON_INTERPRET=1 first."""
    run_in_interpreter_child(__file__, deselect="global_tf32")


# (B, d, K, arms drawn from, arms flagged for an exact refresh)
UPDATE_CASES = [
    (1, 5, 2, [1], []),
    (6, 17, 3, [0, 2], []),  # arm 1 gets nothing
    (37, 100, 3, [0, 1, 2], [1]),  # arm 1 refreshed exactly
    (64, 128, 4, [0, 2, 3], [3]),  # arm 1 empty, arm 3 refreshed
    (40, 16, 3, [0], []),  # m >= d: the bandit would refresh; the kernel's Woodbury must still be exact
    (48, 24, 4, [0] * 12 + [1, 3], []),  # uneven arms: the small factors go arm by arm instead of padded
]


@pytest.mark.parametrize("precision", UPDATE_PRECISIONS)
@pytest.mark.parametrize("B,d,K,used,refreshed", UPDATE_CASES)
def test_linear_update_matches_float64(kern, B, d, K, used, refreshed, precision):
    gen = torch.Generator().manual_seed(B * 1000 + d * 10 + K)
    s64 = random_state(K, d, gen)
    X = torch.randn(B, d, generator=gen, dtype=torch.float64)
    arms = torch.tensor(used)[torch.randint(len(used), (B,), generator=gen)]
    rewards = torch.rand(B, generator=gen, dtype=torch.float64) - 0.5
    refresh = torch.zeros(K, dtype=torch.bool)
    refresh[refreshed] = True
    touched = torch.bincount(arms, minlength=K) > 0

    s32 = to_device32(s64)
    A_new, Ainv_new, b_new, theta_new = expected_update(s32, X.float(), arms, rewards.float(), refresh)
    X32, r32 = X.float(), rewards.float()
    for impl in ("triton", "torch"):
        st = {name: t.clone() for name, t in s32.items()}
        st["theta"][touched] = float("nan")  # output-only for touched arms: an unwritten element stays NaN
        args = (X32.to(DEVICE), arms.to(DEVICE), r32.to(DEVICE), refresh.to(DEVICE))
        if impl == "triton":
            exact, repaired = kern.update.linear_update(
                st["A"], st["A_inv"], st["b"], st["theta"], *args, precision=precision
            )
        else:
            exact, repaired = linear_update_torch(st["A"], st["A_inv"], st["b"], st["theta"], *args)
        assert torch.equal(exact.cpu(), refresh & touched), f"{impl} reports {exact.tolist()} as refreshed"
        assert not repaired.any(), f"{impl} reports repairs {repaired.tolist()} of a healthy state"
        errs = {}
        for name, ref in (("A", A_new), ("A_inv", Ainv_new), ("b", b_new), ("theta", theta_new)):
            err = errs[name] = rel(st[name][touched], ref[touched])
            assert err <= F32_TOL, f"{impl} {name}: relative error {err:.2e}"
            # arms without a row are untouched, bit for bit
            assert torch.equal(st[name][~touched], s32[name][~touched]), f"{impl} changed {name} of an idle arm"
        errors = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
        print(f"update {MODE} {impl} B={B} d={d} K={K} {precision}: {errors}")


def test_linear_update_autotuned_launches(kern, monkeypatch):
    """The launches that large problems take on a GPU (both kernels autotuned over tile shapes; the in-place one
    with A, A^-1 and b restored after each trial) give the closed form at a small shape, every config tried.
    Under the interpreter the trials are timed by a stand-in that prefers the last config."""
    update = kern.update
    monkeypatch.setattr(update, "_AUTOTUNE_MIN_WORK", 0)
    monkeypatch.setattr(update, "_TUNED", {})
    trials = {}
    for name in ("project", "apply"):
        tuner = update._tuned(name)
        if MODE != "cuda":
            def bench(call, quantiles, name=name):
                call()
                trials[name] = trials.get(name, 0) + 1
                return [1.0 / trials[name]] * len(quantiles)

            tuner.__dict__["do_bench"] = bench  # a cached_property: the instance attribute wins
    K, d, B = 3, 70, 30
    gen = torch.Generator().manual_seed(12)
    s32 = to_device32(random_state(K, d, gen))
    X, r = torch.randn(B, d, generator=gen), torch.rand(B, generator=gen) - 0.5
    arms = torch.randint(K, (B,), generator=gen)
    refresh = torch.zeros(K, dtype=torch.bool)
    expected = expected_update(s32, X, arms, r, refresh)
    for step in range(2):  # the second call reuses the tuned configs
        st = {name: t.clone() for name, t in s32.items()}
        update.linear_update(st["A"], st["A_inv"], st["b"], st["theta"], X.to(DEVICE), arms.to(DEVICE),
                             r.to(DEVICE), refresh.to(DEVICE))
        for name, ref in zip(("A", "A_inv", "b", "theta"), expected):
            assert rel(st[name], ref) <= F32_TOL, f"call {step}: {name}"
    if MODE != "cuda":
        assert trials == {name: len(update._tuned(name).configs) for name in ("project", "apply")}


@pytest.mark.parametrize("used", [[0, 1, 2], [0] * 10 + [1, 2]], ids=["padded", "arm-by-arm"])
def test_linear_update_recovers_a_drifted_inverse(kern, used):
    """An arm whose A^-1 drifted indefinite fails Woodbury's small Cholesky: both implementations recompute that
    arm's inverse from A (no exception mid-update, no NaN left in the state) and report it as refreshed."""
    K, d, B = 3, 20, 24
    gen = torch.Generator().manual_seed(11)
    s32 = to_device32(random_state(K, d, gen))
    s32["A_inv"][1] = -torch.eye(d, device=DEVICE)  # I + X A^-1 X^T = I - X X^T: not positive definite
    X = torch.randn(B, d, generator=gen)
    arms = torch.tensor(used)[torch.randint(len(used), (B,), generator=gen)]
    arms[:2] = 1
    r = torch.rand(B, generator=gen) - 0.5
    # what an exact refresh of arm 1 (and Woodbury elsewhere) gives
    expected = expected_update(s32, X, arms, r, torch.tensor([False, True, False]))
    args = (X.to(DEVICE), arms.to(DEVICE), r.to(DEVICE), torch.zeros(K, dtype=torch.bool, device=DEVICE))
    for impl in ("triton", "torch"):
        st = {name: t.clone() for name, t in s32.items()}
        update = kern.update.linear_update if impl == "triton" else linear_update_torch
        exact, repaired = update(st["A"], st["A_inv"], st["b"], st["theta"], *args)
        assert exact.tolist() == [False, True, False], impl
        assert repaired.tolist() == [False, True, False], impl  # counted as a repair, not a scheduled refresh
        for name, ref in zip(("A", "A_inv", "b", "theta"), expected):
            assert rel(st[name], ref) <= F32_TOL, f"{impl} {name}"


@pytest.mark.skipif(not ON_CUDA, reason="tf32 is a CUDA matmul mode")
def test_linear_update_ignores_global_tf32(kern, monkeypatch):
    """A training script's torch.backends.cuda.matmul.allow_tf32 = True must not reach the bandit state: the kernels
    set their own precision and the small factors run in float64. Near the prior (A = I), I + X A^-1 X^T is mostly
    its second term, the case where a tf32 product would lose the identity."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    K, d, B = 2, 128, 64
    gen = torch.Generator().manual_seed(13)
    eye = torch.eye(d).repeat(K, 1, 1)
    s32 = to_device32({"A": eye, "A_inv": eye.clone(), "b": torch.zeros(K, d), "theta": torch.zeros(K, d)})
    X, r = torch.randn(B, d, generator=gen), torch.rand(B, generator=gen) - 0.5
    arms, refresh = torch.randint(K, (B,), generator=gen), torch.zeros(K, dtype=torch.bool)
    expected = expected_update(s32, X, arms, r, refresh)
    st = {name: t.clone() for name, t in s32.items()}
    kern.update.linear_update(st["A"], st["A_inv"], st["b"], st["theta"], X.to(DEVICE), arms.to(DEVICE),
                              r.to(DEVICE), refresh.to(DEVICE))
    for name, ref in zip(("A", "A_inv", "b", "theta"), expected):
        assert rel(st[name], ref) <= F32_TOL, name


def test_linear_update_accepts_bf16_contexts(kern):
    gen = torch.Generator().manual_seed(3)
    s32 = to_device32(random_state(2, 24, gen))
    X = torch.randn(9, 24, generator=gen).to(DEVICE, torch.bfloat16)
    arms = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1], device=DEVICE)
    r = torch.rand(9, generator=gen).to(DEVICE)
    refresh = torch.zeros(2, dtype=torch.bool, device=DEVICE)
    st = {n: t.clone() for n, t in s32.items()}
    ref = {n: t.clone() for n, t in s32.items()}
    kern.update.linear_update(st["A"], st["A_inv"], st["b"], st["theta"], X, arms, r, refresh)
    kern.update.linear_update(ref["A"], ref["A_inv"], ref["b"], ref["theta"], X.float(), arms, r, refresh)
    for name in st:
        assert torch.equal(st[name], ref[name])  # upcast on the way in: the same float32 computation
