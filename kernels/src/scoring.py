"""Fused LinUCB / linear-Thompson scoring: means, widths and the chosen arm for B contexts and K arms.

For every context x (a row of X [B, d]) and arm k:
    mean[b, k]  = x . theta_k
    width[b, k] = sqrt(x^T A_k^-1 x)
    arm[b]      = argmax_k mean + coef * width            (LinUCB, coef = alpha)
                  argmax_k mean + coef * width * noise    (Thompson, coef = v, noise ~ N(0, 1) [B, K])

The work is one matrix product, X [B, d] @ [A_1^-1 | ... | A_K^-1] [d, K*d], whose B x K x d result is only ever
needed through its row-wise dot with x. `_score_partials_kernel` tiles that product like a matmul and, in its
epilogue, multiplies the accumulator tile by the matching X tile and sums the row: each program writes one float per
(row, arm) for its d-column tile (plus the same tile's share of x . theta_k), never the product. A second, tiny launch
(`_score_select_kernel`) adds the column tiles' partials in a fixed order (so results are deterministic), takes the
square root and the argmax over arms, and writes means, widths, arms and the chosen arm's width. Two launches rather
than one because the argmax needs every column tile of every arm, which live in different programs; the partials are
d / BLOCK_N floats per (row, arm), a few MB at B = 4096, d = 4096, K = 8, against the product's 512 MB.

Contexts may be bf16/fp16 hidden states: they are upcast to float32 as they are loaded; every sum is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import rows_times_inverse
from .utils import block, check_device, check_state, interpret_mode

# Fixed when this module is imported, like the decorated kernels below (triton reads TRITON_INTERPRET then).
INTERPRETED = interpret_mode()

# tf32 tensor cores for the d x d products: ~8x the float32 FMA rate on an H100, ~3e-4 relative error on the widths
# (they only rank arms; nothing is accumulated from them). "ieee" gives float32 FMA results, "tf32x3" near-float32
# accuracy on the tensor cores at ~3x the tf32 cost.
SCORE_PRECISION = "tf32"

_CONTEXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _score_partials_kernel(
    X_ptr,  # [B, d] contexts, float32 / bf16 / fp16, any strides
    A_ptr,  # [K, d, d] float32 A_k^-1, contiguous, symmetric
    T_ptr,  # [K, d] float32 theta, contiguous
    P_ptr,  # [2, NT, B, K] float32 out: per column tile, partial means (0) and partial x^T A^-1 x (1)
    B,
    D,
    K,
    stride_xb,
    stride_xd,
    B_BUCKET,  # autotune key only (next power of two of B)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = (B + BLOCK_M - 1) // BLOCK_M
    nt = (D + BLOCK_N - 1) // BLOCK_N  # column tiles per arm; a tile never straddles two arms
    num_n = K * nt
    # Grouped order: GROUP_M row tiles sweep the same column panels together, so each A_k^-1 panel is read from
    # device memory about once per group and from L2 by the others.
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    arm = pid_n // nt
    tn = pid_n % nt

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < B
    n_mask = rn < D
    a_base = A_ptr + arm.to(tl.int64) * D * D
    acc = rows_times_inverse(
        X_ptr, stride_xb, stride_xd, a_base, rm, rn, m_mask, n_mask, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION
    )

    # Epilogue: (x A^-1)[:, n-tile] . x[n-tile], and the same tile's share of x . theta, in exact float32.
    x_n = tl.load(
        X_ptr + rm[:, None] * stride_xb + rn[None, :] * stride_xd,
        mask=m_mask[:, None] & n_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    theta = tl.load(T_ptr + arm * D + rn, mask=n_mask, other=0.0)
    quad = tl.sum(acc * x_n, axis=1)
    mean = tl.sum(x_n * theta[None, :], axis=1)
    out = tn * B * K + rm * K + arm  # < 2^31 for any realistic B, K, d: int32 is enough
    tl.store(P_ptr + out, mean, mask=m_mask)
    tl.store(P_ptr + nt * B * K + out, quad, mask=m_mask)


@triton.jit
def _score_select_kernel(
    P_ptr,  # [2, NT, B, K] partials from _score_partials_kernel
    N_ptr,  # [B, K] float32 standard-normal noise (read only when HAS_NOISE)
    mean_ptr,  # [B, K] float32 out
    width_ptr,  # [B, K] float32 out
    arm_ptr,  # [B] int64 out
    chosen_ptr,  # [B] float32 out: width of the chosen arm
    B,
    K,
    NT,
    coef,
    HAS_NOISE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    ra = tl.arange(0, BLOCK_A)
    b_mask = rb < B
    a_mask = ra < K
    mask = b_mask[:, None] & a_mask[None, :]
    off = rb[:, None] * K + ra[None, :]

    mean = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    quad = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    quad_base = P_ptr + NT * B * K
    for t in range(0, NT):  # a fixed order: the same sums, bit for bit, on every run
        mean += tl.load(P_ptr + t * B * K + off, mask=mask, other=0.0)
        quad += tl.load(quad_base + t * B * K + off, mask=mask, other=0.0)
    # Rounding can push a tiny quadratic form below zero; the torch reference clamps the same way.
    width = tl.sqrt_rn(tl.maximum(quad, 0.0))
    if HAS_NOISE:
        noise = tl.load(N_ptr + off, mask=mask, other=0.0)
        score = mean + coef * width * noise
    else:
        score = mean + coef * width
    score = tl.where(mask, score, -float("inf"))
    arm = tl.argmax(score, axis=1, tie_break_left=True)  # first maximum, as torch.argmax
    chosen = tl.sum(tl.where(ra[None, :] == arm[:, None], width, 0.0), axis=1)

    tl.store(mean_ptr + off, mean, mask=mask)
    tl.store(width_ptr + off, width, mask=mask)
    tl.store(arm_ptr + rb, arm.to(tl.int64), mask=b_mask)
    tl.store(chosen_ptr + rb, chosen, mask=b_mask)


def _tuned_partials_kernel():
    """The partials kernel autotuned over row-tile shapes on CUDA (built lazily: autotuning needs a GPU)."""
    global _TUNED
    if _TUNED is None:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            # None of these spills registers on sm_90 (triton 3.9's resource report), for float32 or bf16 contexts.
            for bm, bk, w, s in ((128, 32, 8, 3), (128, 32, 8, 4), (64, 32, 8, 3), (64, 32, 4, 4), (128, 64, 8, 2))
        ]
        _TUNED = triton.autotune(configs=configs, key=["D", "K", "B_BUCKET", "BLOCK_N", "PRECISION"])(
            _score_partials_kernel
        )
    return _TUNED


_TUNED = None
# Below this many (row, arm, column) triples a launch takes microseconds and autotuning it is not worth its time.
_AUTOTUNE_MIN_WORK = 256 * 4 * 1024


def score_select(
    X: torch.Tensor,
    theta: torch.Tensor,
    A_inv: torch.Tensor,
    coef: float = 0.0,
    noise: torch.Tensor | None = None,
    *,
    precision: str = SCORE_PRECISION,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means [B, K], widths [B, K], chosen arms [B] (int64) and the chosen arms' widths [B], in two launches.

    coef: alpha for LinUCB (score = mean + alpha * width), v for Thompson (score = mean + v * width * noise);
    coef = 0 ranks by the mean alone. noise: [B, K] standard-normal draws for Thompson, None for LinUCB.
    out: optional preallocated (mean, width, arms, chosen) to write into (the tests poison them first).
    """
    K, d = check_state(theta, A_inv)
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[1] != d or X.shape[0] == 0:
        raise ValueError(f"expected contexts [B, {d}] with B >= 1, got {getattr(X, 'shape', type(X))}")
    if X.dtype not in _CONTEXT_DTYPES:
        raise ValueError(f"contexts must be float32, bfloat16 or float16, got {X.dtype}")
    tensors = [X, theta, A_inv]
    if noise is not None:
        if noise.shape != (X.shape[0], K):
            raise ValueError(f"noise must be [B, K] = {(X.shape[0], K)}, got {tuple(noise.shape)}")
        noise = noise.to(torch.float32).contiguous()
        tensors.append(noise)
    check_device(*tensors, interpreted=INTERPRETED)
    B, dev = X.shape[0], X.device

    nt_block = block(d, 16, 32) if INTERPRETED else block(d, 16, 128)
    nt = triton.cdiv(d, nt_block)
    partials = torch.empty((2, nt, B, K), device=dev, dtype=torch.float32)
    args = (X, A_inv, theta, partials, B, d, K, X.stride(0), X.stride(1), triton.next_power_of_2(B))
    if INTERPRETED or B * K * d < _AUTOTUNE_MIN_WORK:
        # Small problems (and the interpreter, which runs every program in numpy): fixed tiles sized to the problem,
        # so ragged edges get exercised and nothing is benchmarked or compiled per configuration.
        # Under the interpreter, 16-row tiles in groups of 2 so the tests' batch sizes cover partial groups too.
        bm, bk, group = (16, block(d, 16, 32), 2) if INTERPRETED else (block(B, 16, 64), 32, 8)
        grid = (triton.cdiv(B, bm) * K * nt,)
        _score_partials_kernel[grid](
            *args, BLOCK_M=bm, BLOCK_N=nt_block, BLOCK_K=bk, GROUP_M=group, PRECISION=precision,
            **({} if INTERPRETED else {"num_warps": 4, "num_stages": 3}),
        )
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]) * K * nt,)  # noqa: E731
        _tuned_partials_kernel()[grid](*args, BLOCK_N=nt_block, PRECISION=precision)

    if out is None:
        out = (
            torch.empty((B, K), device=dev, dtype=torch.float32),
            torch.empty((B, K), device=dev, dtype=torch.float32),
            torch.empty((B,), device=dev, dtype=torch.int64),
            torch.empty((B,), device=dev, dtype=torch.float32),
        )
    mean, width, arms, chosen = out
    block_b = 64 if not INTERPRETED else block(B, 16, 32)
    _score_select_kernel[(triton.cdiv(B, block_b),)](
        partials,
        noise if noise is not None else partials,  # never read without noise
        mean,
        width,
        arms,
        chosen,
        B,
        K,
        nt,
        float(coef),
        HAS_NOISE=noise is not None,
        BLOCK_B=block_b,
        BLOCK_A=triton.next_power_of_2(K),
    )
    return mean, width, arms, chosen
