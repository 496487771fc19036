"""Tile loops shared by the Triton kernels (`@triton.jit` helpers, inlined where they are called)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows_times_inverse(
    X_ptr,
    stride_xb,
    stride_xd,
    a_base,  # pointer to one arm's [d, d] A^-1, contiguous, symmetric
    rm,  # [BLOCK_M] row indices into X
    rn,  # [BLOCK_N] column indices into A^-1
    m_mask,
    n_mask,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(X A^-1)[rm, rn] as a float32 [BLOCK_M, BLOCK_N] tile: the matmul loop of the scoring and projection kernels.

    Contexts are upcast as they load (bf16 / fp16 hidden states). A^-1 is symmetric, so its [k, n] tile is read as
    rows n, columns k: contiguous along the reduction axis, the layout float32 tensor-core operands need (no
    transpose through shared memory). Rounding asymmetry in A^-1 is harmless: x^T M x only sees M's symmetric part.
    """
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < D
        x = tl.load(
            X_ptr + rm[:, None] * stride_xb + kk[None, :] * stride_xd,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        a_t = tl.load(a_base + rn[:, None] * D + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(a_t), acc, input_precision=PRECISION)
    return acc
