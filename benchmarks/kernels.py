"""Triton kernels (laser_rl.kernels) against the torch reference, with the card's own ceilings measured in the same run.

For B in {256, 1024, 4096}, d in {1024, 4096, 8192}, K in {4, 8} (default grid), on one CUDA GPU:
  scoring        score_select (means, widths, fused UCB argmax; tf32) vs score_select_torch in float32 and in tf32
  update         linear_update (Woodbury for every arm; tf32x3) vs linear_update_torch (the core's per-arm loop)
  select+update  LinUCB(backend="triton") vs LinUCB(backend="torch"): one select and one update of a B-prompt batch
Median times from triton.testing.do_bench (CUDA events, L2 flushed between runs), achieved TFLOP/s and GB/s (fewest
bytes: every input read once, every output written once) as a share of two ceilings measured first on the same card:
an 8192^3 float32 matmul with tf32 allowed (and without, for reference) and a 2 GiB device-to-device copy (bytes
read + written). Each shape is also checked: triton against torch, relative error of the widths and of A^-1.

    python benchmarks/kernels.py                       # the full grid, markdown tables on stdout
    python benchmarks/kernels.py --quick               # B=1024, d=4096, K=8 only (the targets' shape)
    python benchmarks/kernels.py --md out.md --json out.json
    python benchmarks/kernels.py --cpu-dry-run         # no GPU: tiny shapes under TRITON_INTERPRET=1, to check
                                                       # the harness itself (the numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import torch

TARGET_SCORE = (4096, 4096, 8)  # scoring: >= 50% of the measured tf32 matmul rate
TARGET_STEP = (1024, 4096, 8)  # select + update: < 5 ms and >= 3x the torch reference
DEV = "cuda"  # "cpu" only for --cpu-dry-run


@contextmanager
def tf32(enabled: bool):
    """torch's float32 matmuls on tf32 tensor cores (enabled) or in full float32 (torch's default)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() over CUDA-event-timed runs, after warm-up, L2 flushed between runs."""
    if DEV == "cpu":  # --cpu-dry-run: a wall clock, once warm
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[1]
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def ceilings() -> dict[str, float]:
    """The card's measured rates: tf32 and float32 matmul (TFLOP/s), device-to-device copy (GB/s, read + write)."""
    n = 8192 if DEV == "cuda" else 256
    a, b = torch.randn(n, n, device=DEV), torch.randn(n, n, device=DEV)  # random data, never zeros
    out = {}
    with tf32(True):
        out["tf32_tflops"] = 2 * n**3 / bench(lambda: a @ b) / 1e9
    with tf32(False):
        out["fp32_tflops"] = 2 * n**3 / bench(lambda: a @ b) / 1e9
    a = b = None  # free before the copy
    src = torch.randn(2**29 if DEV == "cuda" else 2**20, device=DEV)  # 2 GiB
    dst = torch.empty_like(src)
    out["copy_gbs"] = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e6
    src = dst = None
    empty_cache()
    return out


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def random_state(K: int, d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A symmetric positive definite A^-1 per arm (scaled identity plus a random rank-64 term), built on the GPU."""
    A_inv = torch.empty(K, d, d, device=DEV)
    for k in range(K):
        Z = torch.randn(64, d, device=DEV, generator=gen) / d
        A_inv[k] = torch.eye(d, device=DEV) / (1.0 + k) + Z.T @ Z
    return {
        "A": torch.eye(d, device=DEV).repeat(K, 1, 1),
        "A_inv": A_inv,
        "b": torch.randn(K, d, device=DEV, generator=gen),
        "theta": torch.randn(K, d, device=DEV, generator=gen) / d**0.5,
    }


def random_batch(B: int, d: int, K: int):
    """The state, contexts, arms, rewards and an all-False refresh mask that every timing at (B, d, K) uses."""
    gen = torch.Generator(device=DEV).manual_seed(B + d + K)
    state = random_state(K, d, gen)
    X = torch.randn(B, d, device=DEV, generator=gen)
    arms = torch.randint(K, (B,), device=DEV, generator=gen)
    rewards = torch.rand(B, device=DEV, generator=gen) - 0.5
    return state, X, arms, rewards, torch.zeros(K, dtype=torch.bool, device=DEV)


def run_shape(B: int, d: int, K: int, ceil: dict[str, float], update_precision: str) -> dict[str, float]:
    from laser_rl.bandits import LinUCB
    from laser_rl.kernels import linear_update_torch, score_select_torch
    from laser_rl.kernels.scoring import score_select
    from laser_rl.kernels.update import linear_update

    r: dict[str, float] = {"B": B, "d": d, "K": K}
    state, X, arms, rewards, no_refresh = random_batch(B, d, K)

    # ----- scoring ---------------------------------------------------------------------------------
    alpha = 0.1
    tri = score_select(X, state["theta"], state["A_inv"], alpha)
    with tf32(False):
        ref = score_select_torch(X, state["theta"], state["A_inv"], alpha)
    r["score_err_width"] = rel(tri[1], ref[1])
    r["score_arm_agree"] = float((tri[2] == ref[2]).float().mean())
    r["score_ms"] = bench(lambda: score_select(X, state["theta"], state["A_inv"], alpha))
    from laser_rl.kernels import scoring

    # the autotuner's pick for this shape (it records the config of its latest call)
    cfg = getattr(scoring._TUNED, "best_config", None) if B * K * d >= scoring._AUTOTUNE_MIN_WORK else None
    r["score_config"] = (
        f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}" if cfg else "fixed"
    )
    Xb = X.bfloat16()  # hidden states as a policy hands them over: half the context bytes
    r["score_bf16_ms"] = bench(lambda: score_select(Xb, state["theta"], state["A_inv"], alpha))
    with tf32(False):
        r["score_torch_ms"] = bench(lambda: score_select_torch(X, state["theta"], state["A_inv"], alpha))
    with tf32(True):
        r["score_torch_tf32_ms"] = bench(lambda: score_select_torch(X, state["theta"], state["A_inv"], alpha))
    flops = 2 * B * K * d * d + 4 * B * K * d
    nbytes = 4 * (K * d * d + B * d + K * d + 2 * B * K + 2 * B) + 8 * B
    r["score_tflops"] = flops / r["score_ms"] / 1e9
    r["score_pct_tf32"] = 100 * r["score_tflops"] / ceil["tf32_tflops"]
    r["score_gbs"] = nbytes / r["score_ms"] / 1e6
    r["score_pct_copy"] = 100 * r["score_gbs"] / ceil["copy_gbs"]
    tri = ref = None

    # ----- update (in place; repeated calls keep the state SPD: each only adds data) ---------------
    s_tri = {n: t.clone() for n, t in state.items()}
    s_ref = {n: t.clone() for n, t in state.items()}
    linear_update(*s_tri.values(), X, arms, rewards, no_refresh, precision=update_precision)
    with tf32(False):
        linear_update_torch(*s_ref.values(), X, arms, rewards, no_refresh)
    r["update_err_Ainv"] = rel(s_tri["A_inv"], s_ref["A_inv"])
    r["update_err_theta"] = rel(s_tri["theta"], s_ref["theta"])
    r["update_ms"] = bench(
        lambda: linear_update(*s_tri.values(), X, arms, rewards, no_refresh, precision=update_precision)
    )
    with tf32(False):
        r["update_torch_ms"] = bench(lambda: linear_update_torch(*s_ref.values(), X, arms, rewards, no_refresh))
    from laser_rl.kernels import update as update_module

    r["update_config"] = " ".join(  # the autotuner's picks for this shape, where it ran
        f"{name} " + "x".join(str(v) for v in tuner.best_config.kwargs.values())
        + f" w{tuner.best_config.num_warps} s{tuner.best_config.num_stages}"
        for name, tuner in sorted(update_module._TUNED.items()) if getattr(tuner, "best_config", None)
    ) or "fixed"
    m = torch.bincount(arms, minlength=K).double()
    # Work done: X A^-1 (2 B d^2), the symmetric corrections of A and A^-1 (one triangle each: B d^2 + B d^2),
    # theta (2 K d^2) and the small factors (~3 m^2 d per arm). Fewest bytes: A^-1 read by the projection, half
    # of it by the corrections and all of it for theta, written once; half of A read and all of it written.
    flops = 4 * B * d * d + 2 * K * d * d + 3 * float((m**2).sum()) * d
    nbytes = 4 * (5 * K * d * d + 2 * K * d + B * d + B) + 8 * B
    r["update_tflops"] = flops / r["update_ms"] / 1e9
    r["update_gbs"] = nbytes / r["update_ms"] / 1e6
    r["update_pct_copy"] = 100 * r["update_gbs"] / ceil["copy_gbs"]
    s_tri = s_ref = state = None  # free the d x d states before the bandits allocate theirs
    empty_cache()

    # ----- one bandit step: select B prompts, update with their B rewards ---------------------------
    # refresh_every is raised so the median shows the Woodbury step; arms with m >= d still refresh exactly.
    for backend in ("triton", "torch"):
        bandit = LinUCB(K, d, alpha=alpha, refresh_every=10**9, backend=backend, device=DEV)

        def step(bandit=bandit):
            chosen = bandit.select(X)
            bandit.update(X, chosen, rewards)

        with tf32(False):
            step()  # warm-up outside the timer (compilation, autotuning)
            r[f"step_{backend}_ms"] = bench(step, rep_ms=200)
        # The bandit's choices set the update's shape (rows per arm): the largest arm's share of the last batch.
        r[f"step_{backend}_top_arm"] = float(torch.bincount(bandit.select(X), minlength=K).max()) / B
        bandit = None
        empty_cache()
    return r


def kernel_report() -> str:
    """Registers, spills and shared memory of every compiled variant (as loaded on this card), for tuning."""
    from laser_rl.kernels import scoring, update

    lines = []
    for fn in (scoring._score_partials_kernel, scoring._score_select_kernel, update._project_kernel,
               update._apply_kernel, update._theta_kernel):
        try:  # triton internals: JITFunction.device_caches[device] = (kernel cache, ...)
            for caches in fn.device_caches.values():
                for k in caches[0].values():
                    k._init_handles()
                    lines.append(f"{fn.__name__}: regs {k.n_regs}, spills {k.n_spills}, shared {k.metadata.shared} B, "
                                 f"warps {k.metadata.num_warps}, stages {k.metadata.num_stages}")
        except Exception as exc:  # noqa: BLE001 - a report, never a failure
            lines.append(f"{fn.__name__}: no resource report ({type(exc).__name__}: {exc})")
    return "\n".join(sorted(set(lines)))


def table(rows: list[dict], ceil: dict, card: str, update_precision: str) -> str:
    f = lambda v, p=2: f"{v:.{p}f}"  # noqa: E731
    lines = [
        f"Card: {card}. Ceilings measured in this run: tf32 matmul {ceil['tf32_tflops']:.0f} TFLOP/s, float32 matmul "
        f"{ceil['fp32_tflops']:.0f} TFLOP/s, device-to-device copy {ceil['copy_gbs']:.0f} GB/s (read + write).",
        "",
        "Scoring (score_select, tf32, UCB argmax fused) vs score_select_torch:",
        "",
        "| B | d | K | triton ms | bf16 X ms | torch fp32 ms | torch tf32 ms | speedup fp32 | speedup tf32 "
        "| TFLOP/s | % tf32 | GB/s | % copy | width err | arms agree | tiles (M x K) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['d']} | {r['K']} | {f(r['score_ms'], 3)} | {f(r['score_bf16_ms'], 3)} | "
            f"{f(r['score_torch_ms'], 3)} | {f(r['score_torch_tf32_ms'], 3)} | "
            f"{f(r['score_torch_ms'] / r['score_ms'], 1)}x | {f(r['score_torch_tf32_ms'] / r['score_ms'], 1)}x | "
            f"{f(r['score_tflops'], 0)} | {f(r['score_pct_tf32'], 0)}% | {f(r['score_gbs'], 0)} | "
            f"{f(r['score_pct_copy'], 0)}% | {r['score_err_width']:.1e} | {f(r['score_arm_agree'], 3)} | "
            f"{r['score_config']} |"
        )
    lines += [
        "",
        f"Update (linear_update, {update_precision}, all arms per launch) vs linear_update_torch (the core's loop):",
        "",
        "| B | d | K | triton ms | torch ms | speedup | TFLOP/s | GB/s | % copy | A^-1 err | theta err | tiles |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['d']} | {r['K']} | {f(r['update_ms'], 3)} | {f(r['update_torch_ms'], 3)} | "
            f"{f(r['update_torch_ms'] / r['update_ms'], 1)}x | {f(r['update_tflops'], 0)} | {f(r['update_gbs'], 0)} | "
            f"{f(r['update_pct_copy'], 0)}% | {r['update_err_Ainv']:.1e} | {r['update_err_theta']:.1e} | "
            f"{r['update_config']} |"
        )
    lines += [
        "",
        "One LinUCB step (select B prompts + update with their rewards), backend='triton' vs backend='torch':",
        "",
        "| B | d | K | triton ms | torch ms | speedup | largest arm's share (triton / torch) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['d']} | {r['K']} | {f(r['step_triton_ms'], 3)} | {f(r['step_torch_ms'], 3)} | "
            f"{f(r['step_torch_ms'] / r['step_triton_ms'], 1)}x | {f(r['step_triton_top_arm'])} / "
            f"{f(r['step_torch_top_arm'])} |"
        )
    by_shape = {(r["B"], r["d"], r["K"]): r for r in rows}
    lines.append("")
    if TARGET_SCORE in by_shape:
        r = by_shape[TARGET_SCORE]
        ok = r["score_pct_tf32"] >= 50
        lines.append(
            f"Target, scoring B, d, K = {TARGET_SCORE} at >= 50% of the tf32 matmul rate: {r['score_pct_tf32']:.0f}% "
            f"{'MET' if ok else 'MISSED'}"
        )
    if TARGET_STEP in by_shape:
        r = by_shape[TARGET_STEP]
        speedup = r["step_torch_ms"] / r["step_triton_ms"]
        ok = r["step_triton_ms"] < 5 and speedup >= 3
        lines.append(
            f"Target, select + update B, d, K = {TARGET_STEP} in < 5 ms and >= 3x torch: {r['step_triton_ms']:.2f} ms, "
            f"{speedup:.1f}x {'MET' if ok else 'MISSED'}"
        )
    return "\n".join(lines)


def profile_update(B: int, d: int, K: int, update_precision: str, path: str | None) -> None:
    """Where the time goes at one shape: torch.profiler's table of GPU kernels and host ops for linear_update
    (Triton and torch) and for one whole LinUCB step (select + update) on the Triton backend."""
    from torch.profiler import ProfilerActivity, profile

    from laser_rl.bandits import LinUCB
    from laser_rl.kernels import linear_update_torch
    from laser_rl.kernels.update import linear_update

    state, X, arms, rewards, no_refresh = random_batch(B, d, K)
    ref = {n: t.clone() for n, t in state.items()}
    bandit = LinUCB(K, d, alpha=0.1, refresh_every=10**9, backend="triton", device=DEV)
    for name, fn in (
        ("linear_update (triton)", lambda: linear_update(*state.values(), X, arms, rewards, no_refresh, precision=update_precision)),
        ("linear_update_torch", lambda: linear_update_torch(*ref.values(), X, arms, rewards, no_refresh)),
        ("LinUCB step (triton): select + update", lambda: bandit.update(X, bandit.select(X), rewards)),
    ):
        with tf32(False):
            fn()
            fn()  # compiled and warm
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
        text = f"== {name}, B={B} d={d} K={K}, 5 calls\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
        print(text, flush=True)
        if path:
            with open(path, "a") as fh:
                fh.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--arms", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--quick", action="store_true", help="only B=1024, d=4096, K=8")
    parser.add_argument("--update-precision", default="tf32x3", choices=["tf32x3", "ieee", "tf32"])
    parser.add_argument("--profile", metavar="FILE", nargs="?", const="", default=None,
                        help="instead of the tables: profile linear_update at the step target's shape (to FILE too)")
    parser.add_argument("--md", help="also write the tables to this markdown file")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cpu_dry_run:  # exercise every code path on tiny shapes; triton must read this before its import
        global DEV, TARGET_SCORE, TARGET_STEP
        os.environ["TRITON_INTERPRET"] = "1"
        DEV, TARGET_SCORE, TARGET_STEP = "cpu", (32, 48, 2), (16, 48, 2)
        args.batches, args.dims, args.arms = [16, 32], [48], [2]
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/kernels.py times the Triton kernels on a CUDA GPU, and this machine has none. On the CPU "
            "the kernels only run under TRITON_INTERPRET=1, for correctness: pytest tests/test_kernels_*.py"
        )
    try:
        import triton
    except ImportError:
        sys.exit("benchmarks/kernels.py needs triton: pip install -e '.[kernels]'")

    if DEV == "cuda":
        card = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        print(f"{card}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    else:
        card = "CPU dry run under the Triton interpreter (not a measurement)"
    ceil = ceilings()
    print(f"ceilings: {json.dumps({k: round(v, 1) for k, v in ceil.items()})}", flush=True)

    if args.profile is not None:
        if DEV != "cuda":
            sys.exit("--profile needs a CUDA GPU")
        profile_update(*TARGET_STEP, args.update_precision, args.profile or None)
        return
    grid = [(B, d, K) for d in args.dims for K in args.arms for B in args.batches]
    # The targets' shapes first, so a run cut short by a time limit still has them.
    shapes = [TARGET_STEP] if args.quick else [s for s in (TARGET_STEP, TARGET_SCORE) if s in grid]
    shapes += [s for s in grid if s not in shapes and not args.quick]
    rows = []
    for B, d, K in shapes:
        start = time.perf_counter()
        r = run_shape(B, d, K, ceil, args.update_precision)
        rows.append(r)
        print(f"B={B} d={d} K={K}: score {r['score_ms']:.3f} ms ({r['score_pct_tf32']:.0f}% tf32, width err "
              f"{r['score_err_width']:.1e}), update {r['update_ms']:.3f} ms (A^-1 err {r['update_err_Ainv']:.1e}), "
              f"step {r['step_triton_ms']:.3f} vs {r['step_torch_ms']:.3f} ms torch "
              f"[{time.perf_counter() - start:.0f}s]", flush=True)
        text = table(sorted(rows, key=lambda r: (r["d"], r["K"], r["B"])), ceil, card, args.update_precision)
        # Written after every shape: a run stopped by a time limit keeps what it measured.
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(text + "\n")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"card": card, "ceilings": ceil, "update_precision": args.update_precision, "rows": rows},
                          fh, indent=1)
    if DEV == "cuda":
        print("\nCompiled kernels:\n" + kernel_report())
    print("\n" + text)


if __name__ == "__main__":
    main()
