"""Shared by the kernel tests (tests/test_kernels_*.py, one file per kernel, Liger-style): where the kernels run,
float64 references, and the child process that runs them under Triton's interpreter on a CPU machine.

With CUDA the kernels run compiled, and the tf32 paths get the looser bound. Without CUDA they run under Triton's
interpreter (numpy float32 arithmetic) on CPU tensors. Triton reads TRITON_INTERPRET when it decorates a function,
its own standard library (tl.zeros, tl.sum, ...) included, so the variable must be set before triton is first
imported, and the test session imports triton early (transformers does, from conftest). Setting it for the whole
session would change every other test's triton, so instead each kernel test file has one test that reruns that file
in a child process started with TRITON_INTERPRET=1 (`run_in_interpreter_child`), and its kernel tests skip in the
parent with a reason that says so (`pytest -rs` shows it). Running a file with the variable already set (as the
child does) runs them in-process.

Every check draws fresh random data (never zeros), poisons outputs with NaN first, and measures the norm-wise
relative error ||out - ref|| / ||ref|| against float64 closed forms computed from the same float32 inputs.

tests/ is not a package (the openrlhf wheel owns a top-level `tests`), so the test files import this module by
putting their own folder on sys.path.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from laser_rl.kernels import interpret_mode

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
F32_TOL = 1e-4  # float32 arithmetic (the interpreter; "ieee" and "tf32x3" on a GPU)
TF32_TOL = 1e-3  # tf32 tensor cores
BANDIT_SCORE_TOL = TF32_TOL if ON_CUDA else F32_TOL  # the bandits score in tf32 (SCORE_PRECISION) on a GPU
SCORE_PRECISIONS = ["ieee", "tf32"] if ON_CUDA else ["ieee"]  # the interpreter ignores the precision
UPDATE_PRECISIONS = ["tf32x3", "ieee"] if ON_CUDA else ["tf32x3"]
REPO = Path(__file__).resolve().parents[1]


def _interpreter_in_process() -> bool:
    """Whether triton in this process interprets: its standard library was decorated with TRITON_INTERPRET set,
    or triton is not imported yet and the variable is set for the whole process."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return interpret_mode()
    return type(lang.standard.zeros).__name__ == "InterpretedFunction"


# "cuda": compiled kernels; "interpreter": interpreted, in this process; "child": rerun the file in a child.
MODE = "cuda" if ON_CUDA else "interpreter" if _interpreter_in_process() else "child"
# The skip reason of every kernel test in the parent process of a CPU run.
IN_CHILD = (
    "interpreted in a child process started with TRITON_INTERPRET=1 (this file's test_*_in_interpreter_child): "
    "triton reads the variable when it is imported, and this session imported it already"
)


@pytest.fixture(scope="module")
def kern():
    """The Triton modules (laser_rl.kernels.scoring / .update), where they can run in this process."""
    if MODE == "child":
        pytest.skip(IN_CHILD)
    pytest.importorskip("triton")
    return SimpleNamespace(scoring=importlib.import_module("laser_rl.kernels.scoring"),
                           update=importlib.import_module("laser_rl.kernels.update"))


def run_in_interpreter_child(test_file: str, deselect: str = "") -> str:
    """Run test_file's tests under the interpreter in a fresh process that sets TRITON_INTERPRET=1 first. Nothing may
    fail or skip there: every kernel test must have run. Returns pytest's summary line."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    keep = "not in_interpreter_child" + (f" and not ({deselect})" if deselect else "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve()), "-k", keep],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in summary and " failed" not in summary and "skipped" not in summary, summary
    print(f"interpreter child: {summary}")
    return summary


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
