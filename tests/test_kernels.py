"""The Triton kernels of laser_rl.kernels against float64 references, and the bandits' backend switch.

With CUDA the kernels run compiled, and the tf32 paths get the looser bound. Without CUDA they run under Triton's
interpreter (numpy float32 arithmetic) on CPU tensors. Triton reads TRITON_INTERPRET when it decorates a function,
its own standard library (tl.zeros, tl.sum, ...) included, so the variable must be set before triton is first
imported, and the test session imports triton early (transformers does, from conftest). Setting it for the whole
session would change every other test's triton, so instead one test here reruns this module in a child process
started with TRITON_INTERPRET=1, and the kernel tests skip in the parent. Running this module with the variable
already set (as the child does) runs them in-process.

Every check draws fresh random data (never zeros), poisons outputs with NaN first, and measures the norm-wise
relative error ||out - ref|| / ||ref|| against float64 closed forms computed from the same float32 inputs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from laser_rl.bandits import LinearThompson, LinUCB
from laser_rl.kernels import interpret_mode, linear_update_torch, score_select_torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
F32_TOL = 1e-4  # float32 arithmetic (the interpreter; "ieee" and "tf32x3" on a GPU)
TF32_TOL = 1e-3  # tf32 tensor cores
BANDIT_SCORE_TOL = TF32_TOL if ON_CUDA else F32_TOL  # the bandits score in tf32 (SCORE_PRECISION) on a GPU
SCORE_PRECISIONS = ["ieee", "tf32"] if ON_CUDA else ["ieee"]  # the interpreter ignores the precision
UPDATE_PRECISIONS = ["tf32x3", "ieee"] if ON_CUDA else ["tf32x3"]


def _interpreter_in_process() -> bool:
    """Whether triton in this process interprets: its standard library was decorated with TRITON_INTERPRET set,
    or triton is not imported yet and the variable is set for the whole process."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return interpret_mode()
    return type(lang.standard.zeros).__name__ == "InterpretedFunction"


# "cuda": compiled kernels; "interpreter": interpreted, in this process; "child": rerun this module in a child.
MODE = "cuda" if ON_CUDA else "interpreter" if _interpreter_in_process() else "child"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kern():
    """The Triton modules (laser_rl.kernels.scoring / .update), where they can run in this process."""
    if MODE == "child":
        pytest.skip("runs in a child process under TRITON_INTERPRET=1 (test_kernels_in_interpreter_child)")
    pytest.importorskip("triton")
    return SimpleNamespace(scoring=importlib.import_module("laser_rl.kernels.scoring"),
                           update=importlib.import_module("laser_rl.kernels.update"))


@pytest.mark.skipif(MODE != "child", reason="the kernel tests run in this process")
def test_kernels_in_interpreter_child():
    """This module's kernel tests under the interpreter, in a fresh process that sets TRITON_INTERPRET=1 first."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
         # the sm_90 compile and harness tests run in this process; tf32 exists on CUDA only
         "-k", "not interpreter_child and not compiles_for_sm90 and not harness and not global_tf32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Nothing may skip in the child: every kernel test must have run there.
    assert " passed" in summary and " failed" not in summary and "skipped" not in summary, summary
    print(f"interpreter child: {summary}")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN (an unwritten, poisoned element) gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def random_state(K: int, d: int, gen: torch.Generator, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """A consistent ridge state in float64: A = lam I + Z^T Z with a different amount of data per arm."""
    A = lam * torch.eye(d, dtype=torch.float64).repeat(K, 1, 1)
    b = torch.zeros(K, d, dtype=torch.float64)
    for k in range(K):
        n = int(torch.randint(1, 2 * d, (1,), generator=gen))
        Z = torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.25
        A[k] += Z.T @ Z
        b[k] = Z.T @ torch.randn(n, generator=gen, dtype=torch.float64)
    A_inv = torch.linalg.inv(A)
    A_inv = (A_inv + A_inv.transpose(1, 2)) / 2
    return {"A": A, "A_inv": A_inv, "b": b, "theta": torch.einsum("kij,kj->ki", A_inv, b)}


def to_device32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(DEVICE, torch.float32).contiguous() for name, t in state.items()}


# =================================================================================================
# Packaging: laser_rl.kernels comes from kernels/src, and no top-level `kernels` package is created
# =================================================================================================


def test_kernels_package_is_mapped_not_top_level():
    import laser_rl.kernels as kernels_pkg

    assert Path(kernels_pkg.__file__).resolve() == REPO / "kernels" / "src" / "__init__.py"
    # `import kernels` must never find our folder as a regular package (it would shadow the PyPI package
    # `kernels` that transformers and bitsandbytes import): at most a PEP 420 namespace portion, which loses to
    # any installed package and which transformers treats as absent.
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert spec.origin is None or not Path(spec.origin).resolve().is_relative_to(REPO / "kernels")
    assert kernels_pkg.score_select_torch is not None and kernels_pkg.linear_update_torch is not None


def test_every_subpackage_is_listed_in_pyproject():
    """pyproject lists laser_rl's packages by hand (packages.find cannot see the mapped kernels/src): a subpackage
    missing there would be left out of wheels."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "laser_rl").rglob("__init__.py")
    }
    assert on_disk | {"laser_rl.kernels"} <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"


# =================================================================================================
# Compiled for Hopper on this machine: catches what only the GPU compiler rejects, without a GPU
# =================================================================================================

SM90_KERNELS = {
    # kernel: (module, pointer/int signature, constexprs, num_warps), as the wrappers launch them on CUDA
    "_score_partials_kernel": (
        "scoring",
        {"X_ptr": "*bf16", "A_ptr": "*fp32", "T_ptr": "*fp32", "P_ptr": "*fp32", "B": "i32", "D": "i32", "K": "i32",
         "stride_xb": "i32", "stride_xd": "i32", "B_BUCKET": "i32"},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "PRECISION": "tf32"},
        8,
    ),
    "_score_select_kernel": (
        "scoring",
        {"P_ptr": "*fp32", "N_ptr": "*fp32", "mean_ptr": "*fp32", "width_ptr": "*fp32", "arm_ptr": "*i64",
         "chosen_ptr": "*fp32", "B": "i32", "K": "i32", "NT": "i32", "coef": "fp32"},
        {"HAS_NOISE": True, "BLOCK_B": 64, "BLOCK_A": 8},
        4,
    ),
    "_project_kernel": (
        "update",
        {"X_ptr": "*fp32", "A_ptr": "*fp32", "U_ptr": "*fp32", "OFF_ptr": "*i32", "WOOD_ptr": "*i32", "D": "i32",
         "K": "i32", "M_BUCKET": "i32"},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "PRECISION": "tf32x3"},
        8,
    ),
    "_apply_kernel": (
        "update",
        {"A_ptr": "*fp32", "Ainv_ptr": "*fp32", "B_ptr": "*fp32", "Xt_ptr": "*fp32", "Wt_ptr": "*fp32",
         "R_ptr": "*fp32", "OFF_ptr": "*i32", "WOOD_ptr": "*i32", "D": "i32", "NR": "i32", "M_BUCKET": "i32"},
        {"BLOCK": 64, "BLOCK_R": 64, "PRECISION": "tf32x3"},
        4,
    ),
    "_theta_kernel": (
        "update",
        {"Ainv_ptr": "*fp32", "B_ptr": "*fp32", "T_ptr": "*fp32", "OFF_ptr": "*i32", "D": "i32"},
        {"BLOCK": 16, "BLOCK_J": 256},
        4,
    ),
}


@pytest.mark.parametrize("name", sorted(SM90_KERNELS))
def test_kernel_compiles_for_sm90(name):
    """Each kernel compiles for an H100/H200 (sm_90) here, and the d x d products use wgmma, through triton's own
    compiler and bundled ptxas. Skips where triton's compile API or its NVIDIA backend is not as expected."""
    if MODE == "interpreter":
        pytest.skip("the kernels are interpreted in this process")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"triton {triton.__version__} has another compile API: {exc}")
    module, signature, constexprs, warps = SM90_KERNELS[name]
    fn = getattr(importlib.import_module(f"laser_rl.kernels.{module}"), name)
    src = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
    except (TypeError, KeyError, FileNotFoundError) as exc:  # signature format drift or no ptxas: not a kernel bug
        pytest.skip(f"cannot compile for sm_90 here ({type(exc).__name__}: {exc})")
    if "PRECISION" in constexprs:
        assert "warp_group_dot" in compiled.asm["ttgir"], f"{name} does not use wgmma on sm_90"


# =================================================================================================
# Scoring: means, widths and the fused argmax
# =================================================================================================

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


# =================================================================================================
# Update: A, A^-1 (Woodbury or exact refresh), b and theta for every arm in one launch
# =================================================================================================

# (B, d, K, arms drawn from, arms flagged for an exact refresh)
UPDATE_CASES = [
    (1, 5, 2, [1], []),
    (6, 17, 3, [0, 2], []),  # arm 1 gets nothing
    (37, 100, 3, [0, 1, 2], [1]),  # arm 1 refreshed exactly
    (64, 128, 4, [0, 2, 3], [3]),  # arm 1 empty, arm 3 refreshed
    (40, 16, 3, [0], []),  # m >= d: the bandit would refresh; the kernel's Woodbury must still be exact
    (48, 24, 4, [0] * 12 + [1, 3], []),  # uneven arms: the small factors go arm by arm instead of padded
]


def expected_update(s32: dict, X32: torch.Tensor, arms: torch.Tensor, r32: torch.Tensor, refresh: torch.Tensor):
    """The float64 closed form of linear_update from float32 state and inputs: A, A^-1, b, theta (on the CPU)."""
    K = s32["A"].shape[0]
    A_new = s32["A"].double().cpu().clone()
    b_new = s32["b"].double().cpu().clone()
    for k in range(K):
        rows = arms == k
        A_new[k] += X32[rows].double().T @ X32[rows].double()
        b_new[k] += X32[rows].double().T @ r32[rows].double()
    # Woodbury continues from the stored float32 inverse; its exact continuation is (A_inv^-1 + X^T X)^-1.
    Ainv_new = torch.linalg.inv(torch.linalg.inv(s32["A_inv"].double().cpu()) + (A_new - s32["A"].double().cpu()))
    Ainv_new[refresh] = torch.linalg.inv(A_new[refresh])
    return A_new, Ainv_new, b_new, torch.einsum("kij,kj->ki", Ainv_new, b_new)


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
            exact = kern.update.linear_update(st["A"], st["A_inv"], st["b"], st["theta"], *args, precision=precision)
        else:
            exact = linear_update_torch(st["A"], st["A_inv"], st["b"], st["theta"], *args)
        assert torch.equal(exact.cpu(), refresh & touched), f"{impl} reports {exact.tolist()} as refreshed"
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
        exact = update(st["A"], st["A_inv"], st["b"], st["theta"], *args)
        assert exact.tolist() == [False, True, False], impl
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


def test_benchmark_harness_dry_run(tmp_path):
    """benchmarks/kernels.py end to end (every timing, error check, table and target line) on tiny shapes under the
    interpreter: GPU time is rare and short, so the harness must not meet its first bug there."""
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--cpu-dry-run", "--json", str(out)],
        cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Target, select + update" in proc.stdout and "| largest arm's share" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for r in rows:
        assert r["score_err_width"] <= F32_TOL and r["update_err_Ainv"] <= F32_TOL and r["update_err_theta"] <= F32_TOL
        assert r["score_arm_agree"] == 1.0 and 0 < r["step_triton_top_arm"] <= 1


# =================================================================================================
# The bandits' backend switch
# =================================================================================================


def test_backend_argument_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        LinUCB(3, 8, backend="cuda")
    assert not LinUCB(3, 8, backend="torch").use_triton
    assert not LinUCB(3, 8, backend="auto").use_triton  # CPU tensors: the torch reference
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            LinUCB(3, 8, backend="triton", device="cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match="float32"):
            LinUCB(3, 8, backend="triton", dtype=torch.float64)
    import laser_rl.bandits as bandits

    real = bandits.find_spec
    monkeypatch.setattr(bandits, "find_spec", lambda name: None if name == "triton" else real(name))
    with pytest.raises(ValueError, match="needs triton"):
        LinUCB(3, 8, backend="triton")
    assert not LinUCB(3, 8, backend="auto", device=DEVICE).use_triton  # auto falls back quietly


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
