"""laser_rl.kernels.score_select (kernels/src/scoring.py) against float64: means, widths and the fused argmax."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package: see kernels_common's docstring
from kernels_common import (  # noqa: E402
    DEVICE, F32_TOL, MODE, SCORE_PRECISIONS, TF32_TOL, kern, random_state, rel, run_in_interpreter_child, to_device32,
)

from laser_rl.kernels import score_select_torch  # noqa: E402

__all__ = ["kern"]  # a fixture


@pytest.mark.skipif(MODE != "child", reason="the kernel tests run in this process (CUDA, or TRITON_INTERPRET=1 already)")
def test_scoring_in_interpreter_child():
    """This file's kernel tests under the interpreter, in a fresh process that sets TRITON_INTERPRET=1 first."""
    run_in_interpreter_child(__file__)


SCORE_SHAPES = [(1, 1, 2), (5, 17, 2), (7, 33, 1), (37, 100, 3), (64, 128, 4)]  # (B, d, K); most don't divide blocks


@pytest.mark.parametrize("precision", SCORE_PRECISIONS)
@pytest.mark.parametrize("mode", ["mean", "ucb", "thompson"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,d,K", SCORE_SHAPES)
def test_score_select_matches_float64(kern, B, d, K, x_dtype, mode, precision):
    gen = torch.Generator().manual_seed(B * 1000 + d * 10 + K)
    state = to_device32(random_state(K, d, gen))
    X = torch.randn(B, d, generator=gen).to(DEVICE, x_dtype)
    coef = {"mean": 0.0, "ucb": 0.3, "thompson": 0.5}[mode]
    noise = torch.randn(B, K, generator=gen).to(DEVICE) if mode == "thompson" else None

    out = (
        torch.full((B, K), float("nan"), device=DEVICE),
        torch.full((B, K), float("nan"), device=DEVICE),
        torch.full((B,), -1, dtype=torch.long, device=DEVICE),
        torch.full((B,), float("nan"), device=DEVICE),
    )
    mean, width, arms, chosen = kern.scoring.score_select(
        X, state["theta"], state["A_inv"], coef, noise, precision=precision, out=out
    )
    assert mean is out[0] and arms is out[2]

    # float64 reference from the very same (float32 / bf16-rounded) inputs
    X64, T64, Ai64 = X.double().cpu(), state["theta"].double().cpu(), state["A_inv"].double().cpu()
    mean64 = X64 @ T64.T
    width64 = torch.einsum("bi,kij,bj->bk", X64, Ai64, X64).clamp_min(0).sqrt()
    score64 = mean64 + coef * width64 * (noise.double().cpu() if noise is not None else 1.0)

    tol = TF32_TOL if precision == "tf32" else F32_TOL
    err_mean, err_width = rel(mean, mean64), rel(width, width64)
    print(f"score {MODE} B={B} d={d} K={K} {x_dtype} {mode} {precision}: mean {err_mean:.1e} width {err_width:.1e}")
    assert err_mean <= F32_TOL  # the means never go through the tensor cores
    assert err_width <= tol
    arms = arms.cpu()
    assert ((arms >= 0) & (arms < K)).all()
    # The chosen arm maximizes the exact score up to the kernel's rounding; where the float64 margin is clear of
    # that rounding, it is exactly the float64 argmax.
    scale = mean64.abs().amax(1) + coef * (width64 * (noise.double().cpu().abs() if noise is not None else 1)).amax(1)
    slack = 10 * tol * scale
    picked = score64.gather(1, arms[:, None]).squeeze(1)
    assert (picked >= score64.amax(1) - slack).all()
    top2 = score64.topk(min(2, K), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > slack) if K > 1 else torch.ones(B, dtype=torch.bool)
    assert torch.equal(arms[clear], score64.argmax(1)[clear])
    assert torch.equal(chosen.cpu(), width.cpu().gather(1, arms[:, None]).squeeze(1))

    # The torch reference computes the same function.
    ref = score_select_torch(X, state["theta"], state["A_inv"], coef, noise)
    assert rel(ref[0], mean64) <= F32_TOL and rel(ref[1], width64) <= F32_TOL


def test_score_select_rejects_bad_inputs(kern):
    theta, A_inv = torch.zeros(2, 4, device=DEVICE), torch.eye(4, device=DEVICE).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="contexts"):
        kern.scoring.score_select(torch.randn(3, 5, device=DEVICE), theta, A_inv)
    with pytest.raises(ValueError, match="float32"):
        kern.scoring.score_select(torch.randn(3, 4, device=DEVICE), theta.double(), A_inv)
    with pytest.raises(ValueError, match="noise"):
        kern.scoring.score_select(torch.randn(3, 4, device=DEVICE), theta, A_inv, 1.0, torch.randn(3, 3, device=DEVICE))
