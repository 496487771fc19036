"""Batched ridge-statistics update for every arm of a disjoint linear bandit (LinUCB / linear Thompson).

For each arm k with the rows X_k [m_k, d] and rewards r_k assigned to it in this batch:
    A_k     += X_k^T X_k
    b_k     += X_k^T r_k
    A_k^-1  <- (A_k + X_k^T X_k)^-1 = A_k^-1 - W_k^T W_k      (Woodbury, rank m_k)
    theta_k  = A_k^-1 b_k
with W_k = L_k^-1 X_k A_k^-1 and L_k L_k^T = I + X_k A_k^-1 X_k^T, exactly as the core's `woodbury_update`. Arms
flagged in `refresh` (the core's periodic exact refresh, or m_k >= d) get A_k and b_k updated here and an exact
inverse through a Cholesky factor afterwards. Arms with no row are not touched at all.

Four steps; the O(m d^2) and O(d^2) work is in Triton, each kernel covering every arm in one launch:
  1. `_project_kernel`: U = X_k A_k^-1 for the rows of every Woodbury arm (a grouped matmul over rows sorted by arm);
  2. torch, per arm: the small m_k x m_k Cholesky of I + U_k X_k^T and the triangular solve W_k = L_k^-1 U_k
     (O(m^2 d + m^3), small next to the d x d work, and torch's solvers are robust);
  3. `_apply_kernel`: per (arm, d-tile, d-tile), one program adds X_k^T X_k to its tile of A_k and another subtracts
     W_k^T W_k from its tile of A_k^-1; the A programs of the first column tile also add X_k^T r_k to b_k. (A variant that also
     formed theta from each new row panel of A^-1 kept two accumulators and a panel loop live and spilled registers
     on sm_90, so theta has its own pass.)
  4. `_theta_kernel`: theta_k = A_k^-1 b_k for every arm with rows (a batched matrix-vector product).
Arms due for an exact refresh get their inverse from torch's Cholesky between steps 3 and 4. The update reads A^-1
three times (steps 1, 3, 4) and A once, and writes each once: about 24 K d^2 bytes for K touched arms.

All arithmetic is float32; contexts may be bf16/fp16 (upcast once, when the rows are sorted by arm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import block, check_device, check_state, interpret_mode

INTERPRETED = interpret_mode()

# The update is accumulated forever (A is never rebuilt from data, A^-1 only at refreshes), so its products keep
# near-float32 accuracy: "tf32x3" runs them on the tensor cores as three tf32 products. "ieee" is exact float32 FMA
# (slower), "tf32" would let ~3e-4 relative error per update into the state.
UPDATE_PRECISION = "tf32x3"


@triton.jit
def _project_kernel(
    X_ptr,  # [NR, d] float32 rows sorted by arm, contiguous
    A_ptr,  # [K, d, d] float32 A_k^-1, contiguous, symmetric
    U_ptr,  # [NR, d] float32 out: X_k A_k^-1 for rows of Woodbury arms (other rows left unwritten)
    OFF_ptr,  # [K + 1] int32: arm k owns sorted rows OFF[k] .. OFF[k+1]-1
    WOOD_ptr,  # [K] int32: 1 where arm k takes the Woodbury path
    D,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Row tiles are numbered arm after arm over the Woodbury arms; find this program's arm and first row with a
    # scan over the K offsets (K scalar loads) rather than a schedule built on the host.
    arm = pid_t * 0 - 1
    row0 = pid_t * 0
    hi = pid_t * 0
    start = pid_t * 0
    for k in range(0, K):
        lo_k = tl.load(OFF_ptr + k)
        hi_k = tl.load(OFF_ptr + k + 1)
        tiles = tl.where(tl.load(WOOD_ptr + k) != 0, (hi_k - lo_k + BLOCK_M - 1) // BLOCK_M, 0)
        hit = (pid_t >= start) & (pid_t < start + tiles)
        arm = tl.where(hit, k, arm)
        row0 = tl.where(hit, lo_k + (pid_t - start) * BLOCK_M, row0)
        hi = tl.where(hit, hi_k, hi)
        start += tiles
    if arm >= 0:  # the grid is an upper bound on the tile count
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < hi
        n_mask = rn < D
        a_base = A_ptr + arm.to(tl.int64) * D * D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < D
            x = tl.load(X_ptr + rm[:, None] * D + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # Symmetric A^-1: read the [k, n] tile as rows n, columns k (contiguous along the reduction axis).
            a_t = tl.load(a_base + rn[:, None] * D + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a_t), acc, input_precision=PRECISION)
        tl.store(U_ptr + rm[:, None] * D + rn[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _apply_kernel(
    A_ptr,  # [K, d, d] float32 A, updated in place
    Ainv_ptr,  # [K, d, d] float32 A^-1, updated in place for Woodbury arms
    B_ptr,  # [K, d] float32 b, updated in place
    Xt_ptr,  # [d, NR] float32 contexts, transposed: column r is sorted row r
    Wt_ptr,  # [d, NR] float32 W, transposed (columns of Woodbury arms only)
    R_ptr,  # [NR] float32 rewards, sorted
    OFF_ptr,  # [K + 1] int32 row offsets per arm
    WOOD_ptr,  # [K] int32 Woodbury flags
    D,
    NR,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program axis 0 is (arm, matrix): even programs add X^T X to A (and X^T r to b), odd ones subtract W^T W from
    # A^-1. One accumulator per program keeps registers low enough for several blocks per SM: with both in one
    # program (219 registers, one block per SM) this kernel took 80% of the update on an H200.
    arm = tl.program_id(0) // 2
    second = tl.program_id(0) % 2
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    lo = tl.load(OFF_ptr + arm)
    hi = tl.load(OFF_ptr + arm + 1)
    if hi > lo:  # arms without a row this batch: nothing is read or written
        ri = pid_i * BLOCK + tl.arange(0, BLOCK)
        rj = pid_j * BLOCK + tl.arange(0, BLOCK)
        i_mask = ri < D
        j_mask = rj < D
        # The arm's offset once, in 64 bits, on the base pointers; the tile offsets stay 32-bit (fewer registers).
        A_arm = A_ptr + arm.to(tl.int64) * D * D
        Ainv_arm = Ainv_ptr + arm.to(tl.int64) * D * D
        tile = ri[:, None] * D + rj[None, :]
        mask = i_mask[:, None] & j_mask[None, :]
        # Transposed layouts: both dot operands are contiguous along the reduction (row) axis.
        if second == 0:
            xx = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # (X^T X)[i-tile, j-tile]
            for r0 in range(lo, hi, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_mask = rr[None, :] < hi
                x_i = tl.load(Xt_ptr + ri[:, None] * NR + rr[None, :], mask=i_mask[:, None] & r_mask, other=0.0)
                x_j = tl.load(Xt_ptr + rj[:, None] * NR + rr[None, :], mask=j_mask[:, None] & r_mask, other=0.0)
                xx = tl.dot(x_i, tl.trans(x_j), xx, input_precision=PRECISION)
            tl.store(A_arm + tile, tl.load(A_arm + tile, mask=mask, other=0.0) + xx, mask=mask)
        elif tl.load(WOOD_ptr + arm) != 0:
            ww = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # (W^T W)[i-tile, j-tile]
            for r0 in range(lo, hi, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_mask = rr[None, :] < hi
                w_i = tl.load(Wt_ptr + ri[:, None] * NR + rr[None, :], mask=i_mask[:, None] & r_mask, other=0.0)
                w_j = tl.load(Wt_ptr + rj[:, None] * NR + rr[None, :], mask=j_mask[:, None] & r_mask, other=0.0)
                ww = tl.dot(w_i, tl.trans(w_j), ww, input_precision=PRECISION)
            tl.store(Ainv_arm + tile, tl.load(Ainv_arm + tile, mask=mask, other=0.0) - ww, mask=mask)
        if (pid_j == 0) & (second == 0):  # one program per row tile adds (X^T r)[i-tile] to b: no other touches it
            xr = tl.zeros((BLOCK,), dtype=tl.float32)
            for r0 in range(lo, hi, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_mask = rr < hi
                ir_mask = i_mask[:, None] & r_mask[None, :]
                x_i = tl.load(Xt_ptr + ri[:, None] * NR + rr[None, :], mask=ir_mask, other=0.0)
                rew = tl.load(R_ptr + rr, mask=r_mask, other=0.0)
                xr += tl.sum(x_i * rew[None, :], axis=1)
            tl.store(B_ptr + arm * D + ri, tl.load(B_ptr + arm * D + ri, mask=i_mask, other=0.0) + xr, mask=i_mask)


@triton.jit
def _theta_kernel(
    Ainv_ptr,  # [K, d, d] float32 A^-1 (already updated)
    B_ptr,  # [K, d] float32 b (already updated)
    T_ptr,  # [K, d] float32 out: theta = A^-1 b, rows of arms with data
    OFF_ptr,  # [K + 1] int32 row offsets per arm
    D,
    BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    arm = tl.program_id(0)
    pid_i = tl.program_id(1)
    if tl.load(OFF_ptr + arm + 1) > tl.load(OFF_ptr + arm):  # untouched arms keep their theta, bit for bit
        ri = pid_i * BLOCK + tl.arange(0, BLOCK)
        i_mask = ri < D
        Ainv_arm = Ainv_ptr + arm.to(tl.int64) * D * D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j0 in range(0, D, BLOCK_J):
            rj = j0 + tl.arange(0, BLOCK_J)
            j_mask = rj < D
            a = tl.load(Ainv_arm + ri[:, None] * D + rj[None, :], mask=i_mask[:, None] & j_mask[None, :], other=0.0)
            acc += tl.sum(a * tl.load(B_ptr + arm * D + rj, mask=j_mask, other=0.0)[None, :], axis=1)
        tl.store(T_ptr + arm * D + ri, acc, mask=i_mask)


def linear_update(
    A: torch.Tensor,
    A_inv: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    X: torch.Tensor,
    arms: torch.Tensor,
    rewards: torch.Tensor,
    refresh: torch.Tensor,
    *,
    precision: str = UPDATE_PRECISION,
) -> None:
    """Add the rows X [B, d] (rewards [B]) to the arms `arms` [B]: A, A_inv, b, theta updated in place.

    refresh [K] bool: arms whose inverse is recomputed exactly (Cholesky) instead of by Woodbury; arms without a
    row are untouched whatever their flag. Same contract as `linear_update_torch`.
    """
    K, d = check_state(theta, A_inv)
    for name, t, shape in (("A", A, (K, d, d)), ("b", b, (K, d))):
        if t.shape != shape or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if X.dim() != 2 or X.shape[1] != d or arms.shape != (X.shape[0],) or rewards.shape != (X.shape[0],):
        raise ValueError(
            f"expected X [B, {d}], arms [B], rewards [B], got {tuple(X.shape)}, {tuple(arms.shape)}, "
            f"{tuple(rewards.shape)}"
        )
    check_device(A, A_inv, b, theta, X, arms, rewards, refresh, interpreted=INTERPRETED)
    nr, dev = X.shape[0], X.device

    # Rows grouped by arm (a stable sort keeps the batch order inside an arm, as the core's boolean mask does).
    order = torch.argsort(arms, stable=True)
    Xs = X[order].to(torch.float32).contiguous()
    rs = rewards[order].to(torch.float32).contiguous()
    rows = torch.bincount(arms, minlength=K)
    if rows.numel() != K or (arms.numel() and int(arms.min()) < 0):
        raise ValueError(f"arm indices must lie in [0, {K})")
    offsets = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(rows, 0)
    wood = ((rows > 0) & ~refresh.to(torch.bool)).to(torch.int32)
    # One host sync for the per-arm solves, as the core's arms.unique().tolist().
    off_host, wood_host, rows_host = offsets.tolist(), wood.tolist(), rows.tolist()

    if INTERPRETED:
        bm, bn, bk, warps, stages = block(nr, 16, 32), block(d, 16, 32), block(d, 16, 32), 4, 1
        bt, br, bv, bvj = block(d, 16, 32), 16, block(d, 16, 32), block(d, 16, 32)
        apply_warps, apply_stages = 4, 1
    else:
        bm, bn, bk, warps, stages = 64, 128, 32, 8, 3
        # _apply_kernel's tiles, from a sweep on an H200 at B = 1024, d = 4096, K = 8: 64 x 64 tiles, 64 rows per
        # step, 4 warps, 2 stages took 2.9 ms; the first choice (64 x 64, 32 rows, 8 warps, 3 stages) took 9.7 ms.
        bt, br, apply_warps, apply_stages, bv, bvj = 64, 64, 4, 2, 16, 256

    Wt = torch.empty((d, nr), device=dev, dtype=torch.float32)
    if any(wood_host):
        U = torch.empty_like(Xs)
        grid = (triton.cdiv(nr, bm) + K, triton.cdiv(d, bn))  # an upper bound on the per-arm row tiles
        _project_kernel[grid](
            Xs, A_inv, U, offsets, wood, d, K,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, num_warps=warps, num_stages=stages,
        )
        for k in range(K):
            if wood_host[k]:
                lo, hi = off_host[k], off_host[k + 1]
                U_k = U[lo:hi]
                S = torch.eye(hi - lo, device=dev, dtype=torch.float32) + U_k @ Xs[lo:hi].T
                L = torch.linalg.cholesky(S)
                Wt[:, lo:hi] = torch.linalg.solve_triangular(L, U_k, upper=False).T

    _apply_kernel[(2 * K, triton.cdiv(d, bt), triton.cdiv(d, bt))](
        A, A_inv, b, Xs.T.contiguous(), Wt, rs, offsets, wood, d, nr,
        BLOCK=bt, BLOCK_R=br, PRECISION=precision, num_warps=apply_warps, num_stages=apply_stages,
    )
    for k in range(K):  # the core's exact refreshes (rare): A and b are already up to date
        if rows_host[k] and not wood_host[k]:
            A_inv[k] = torch.cholesky_inverse(torch.linalg.cholesky(A[k]))
    _theta_kernel[(K, triton.cdiv(d, bv))](A_inv, b, theta, offsets, d, BLOCK=bv, BLOCK_J=bvj, num_warps=4)
