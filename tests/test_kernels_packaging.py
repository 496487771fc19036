"""laser_rl.kernels as a package: mapped from kernels/src, imports that run one way (kernels -> core), every kernel
compiled for sm_90 here (no GPU needed), and the benchmark harness dry run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package: see kernels_common's docstring
from kernels_common import F32_TOL, MODE, REPO  # noqa: E402


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


def test_imports_run_one_way_kernels_to_core():
    """bandits never imports laser_rl.kernels (the Triton backend registers itself with the core when a bandit loads
    it by name), so the core imports without triton and there is no cycle; kernels imports the core."""
    code = (
        "import sys, laser_rl.bandits as b; assert 'laser_rl.kernels' not in sys.modules, 'bandits imported kernels'; "
        "b.LinUCB(2, 3, backend='torch'); assert 'laser_rl.kernels' not in sys.modules; "
        "import laser_rl.kernels.reference as r; assert r.linear_update_torch is b.linear_update_torch; "
        "assert 'triton' not in b._BACKENDS and 'triton' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


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
