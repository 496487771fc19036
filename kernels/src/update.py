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
  2. torch: the small m_k x m_k Cholesky of I + U_k X_k^T and the triangular solve W_k = L_k^-1 U_k (O(m^2 d + m^3),
     small next to the d x d work; torch's solvers are robust), batched over the arms with padding when that is
     cheap (`_woodbury_factors`), never syncing with the host;
  3. `_apply_kernel`: per (arm, tile (i, j) with j <= i), one program adds X_k^T X_k to its tile of A_k and another
     subtracts W_k^T W_k from its tile of A_k^-1, each writing the tile and its mirror (both corrections are
     symmetric); the A programs of the first column tile also add X_k^T r_k to b_k. (A variant that also formed
     theta from each new row panel of A^-1 kept two accumulators and a panel loop live and spilled registers on
     sm_90, so theta has its own pass.)
  4. `_theta_kernel`: theta_k = A_k^-1 b_k for every arm with rows (a batched matrix-vector product).
After step 4, in one pass, arms due for an exact refresh get their inverse (and theta) from torch's Cholesky of A, and
so do arms whose Woodbury factor was not positive definite (a drifted A^-1). The update reads A^-1 two and a half times
(steps 1, 3, 4) and half of A, and writes each once: about 20 K d^2 bytes for K touched arms.

All arithmetic is float32; contexts may be bf16/fp16 (upcast once, when the rows are sorted by arm).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from laser_rl.bandits import spd_inverse

from .tiles import rows_times_inverse
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
    M_BUCKET,  # autotune key only (next power of two of the largest arm's row count)
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
        m_mask = rm < hi
        n_mask = rn < D
        a_base = A_ptr + arm.to(tl.int64) * D * D
        acc = rows_times_inverse(X_ptr, D, 1, a_base, rm, rn, m_mask, n_mask, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
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
    M_BUCKET,  # autotune key only (next power of two of the largest arm's row count)
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program axis 0 is (arm, matrix): even programs add X^T X to A (and X^T r to b), odd ones subtract W^T W from
    # A^-1. One accumulator per program keeps registers low enough for several blocks per SM: with both in one
    # program (219 registers, one block per SM) it dominated the update's profile (benchmarks/README.md).
    arm = tl.program_id(0) // 2
    second = tl.program_id(0) % 2
    # Both corrections are symmetric: axis 1 numbers the tiles (i, j) with j <= i only, row after row
    # (t = i (i + 1) / 2 + j). Each program reads its tile once and writes it and its mirror (j, i): half the
    # products and three quarters of the state traffic of a full grid, and A, A^-1 stay exactly symmetric.
    t = tl.program_id(1)
    pid_i = ((tl.sqrt(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
    pid_i = tl.where(pid_i * (pid_i + 1) // 2 > t, pid_i - 1, pid_i)  # float rounding, either way
    pid_i = tl.where((pid_i + 1) * (pid_i + 2) // 2 <= t, pid_i + 1, pid_i)
    pid_j = t - pid_i * (pid_i + 1) // 2
    lo = tl.load(OFF_ptr + arm)
    hi = tl.load(OFF_ptr + arm + 1)
    touched = hi > lo  # arms without a row this batch: nothing is read or written
    if second == 1:
        touched = touched & (tl.load(WOOD_ptr + arm) != 0)
    if touched:
        ri = pid_i * BLOCK + tl.arange(0, BLOCK)
        rj = pid_j * BLOCK + tl.arange(0, BLOCK)
        i_mask = ri < D
        j_mask = rj < D
        # The arm's offset once, in 64 bits, on the base pointers; the tile offsets stay 32-bit (fewer registers).
        M_arm = tl.where(second == 0, A_ptr, Ainv_ptr) + arm.to(tl.int64) * D * D
        P_ptr = tl.where(second == 0, Xt_ptr, Wt_ptr)  # A += X^T X, A^-1 -= W^T W
        sign = tl.where(second == 0, 1.0, -1.0)
        # Transposed layouts: both dot operands are contiguous along the reduction (row) axis.
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # (P^T P)[i-tile, j-tile]
        for r0 in range(lo, hi, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_mask = rr[None, :] < hi
            p_i = tl.load(P_ptr + ri[:, None] * NR + rr[None, :], mask=i_mask[:, None] & r_mask, other=0.0)
            p_j = tl.load(P_ptr + rj[:, None] * NR + rr[None, :], mask=j_mask[:, None] & r_mask, other=0.0)
            acc = tl.dot(p_i, tl.trans(p_j), acc, input_precision=PRECISION)
        tile = ri[:, None] * D + rj[None, :]
        mask = i_mask[:, None] & j_mask[None, :]
        new = tl.load(M_arm + tile, mask=mask, other=0.0) + sign * acc
        tl.store(M_arm + tile, new, mask=mask)
        if pid_i != pid_j:
            tl.store(M_arm + rj[:, None] * D + ri[None, :], tl.trans(new), mask=j_mask[:, None] & i_mask[None, :])
        if (pid_j == 0) & (second == 0):  # one program per row tile adds (X^T r)[i-tile] to b: no other touches it
            xr = tl.zeros((BLOCK,), dtype=tl.float32)
            for r0 in range(lo, hi, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_mask = rr < hi
                x_i = tl.load(Xt_ptr + ri[:, None] * NR + rr[None, :], mask=i_mask[:, None] & r_mask[None, :], other=0.0)
                xr += tl.sum(x_i * tl.load(R_ptr + rr, mask=r_mask, other=0.0)[None, :], axis=1)
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


def _tuned(name: str) -> triton.runtime.Autotuner:
    """`_project_kernel` or `_apply_kernel` autotuned over tile shapes on CUDA (built lazily: autotuning needs a GPU).

    The key buckets the largest arm's row count, so one bandit's steps share one tuning. `_apply_kernel` updates
    its state in place: the autotuner restores A, A^-1 and b after each trial.
    """
    if name not in _TUNED:
        if name == "project":
            configs = [
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in ((64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 4, 4))
            ]
            _TUNED[name] = triton.autotune(configs, key=["D", "M_BUCKET", "PRECISION"])(_project_kernel)
        else:
            configs = [
                triton.Config({"BLOCK": bt, "BLOCK_R": br}, num_warps=w, num_stages=st)
                # (64, 64, 4, 2) first: the best tiles of the last GPU sweep (benchmarks/README.md, "tile sweep").
                for bt, br, w, st in ((64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 2))
            ]
            _TUNED[name] = triton.autotune(
                configs, key=["D", "M_BUCKET", "PRECISION"], restore_value=["A_ptr", "Ainv_ptr", "B_ptr"]
            )(_apply_kernel)
    return _TUNED[name]


_TUNED: dict[str, triton.runtime.Autotuner] = {}
# Below this many multiply-adds (rows x d x d) a launch takes microseconds and autotuning it is not worth its time.
# The interpreter gets fixed small tiles (its tests lower this bound to run the autotuned launches too).
_AUTOTUNE_MIN_WORK = math.inf if INTERPRETED else 256 * 1024 * 1024


def _woodbury_factors(
    U: torch.Tensor, Xs: torch.Tensor, offsets: torch.Tensor, wood: torch.Tensor, counts: list[int], starts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """W_k = L_k^-1 U_k with L_k L_k^T = I + U_k X_k^T for every Woodbury arm, without a host sync: offsets and wood
    on the device; on the host, counts (rows of each Woodbury arm, 0 for the others) and starts (first sorted row).

    Returns W^T [d, NR] (columns of other arms unwritten) and [K] bool: arms whose factor was not positive definite
    (their inverse has drifted; the caller recomputes it). When padding every Woodbury arm to the largest one at most
    doubles the O(m^2 d) work, they go through one padded batched Cholesky and triangular solve (one small solve is
    a few launches of ~50 us on a GPU); otherwise arm by arm.

    In float64: torch's float32 products follow its global tf32 switch, and in tf32 the cancellation in
    I + X A^-1 X^T (whose second term is ~d times the first while A^-1 is near its prior) would reach the state.
    This is O(m^2 d) work, small next to the O(m d^2) kernels on GPUs with float64 throughput (A100, H100, H200).
    """
    nr, d, K, dev = Xs.shape[0], Xs.shape[1], len(counts), Xs.device
    W = torch.empty((nr + 1, d), device=dev, dtype=torch.float32)  # row nr: a sink for padding rows
    failed = torch.zeros(K, dtype=torch.bool, device=dev)
    used = [m for m in counts if m]
    m_max = max(used)
    if len(used) * m_max**2 <= 2 * sum(m * m for m in used):
        arm_ids = torch.argsort(wood, descending=True, stable=True)[: len(used)]  # the Woodbury arms, no sync
        slot = torch.arange(m_max, device=dev)
        valid = slot[None, :] < (offsets[arm_ids + 1] - offsets[arm_ids])[:, None]  # [arms, m_max]
        idx = torch.where(valid, offsets[arm_ids, None].long() + slot[None, :], nr)
        gather = idx.clamp_max(nr - 1)
        # U's rows of non-Woodbury arms were never written: where(), not a product with a 0/1 mask.
        Up = torch.where(valid[..., None], U[gather], 0.0).double()
        Xp = torch.where(valid[..., None], Xs[gather], 0.0).double()
        eye = torch.eye(m_max, device=dev, dtype=torch.float64).expand(len(used), m_max, m_max)
        L, info = torch.linalg.cholesky_ex(torch.baddbmm(eye, Up, Xp.transpose(1, 2)))  # padding: identity blocks
        W[idx.flatten()] = torch.linalg.solve_triangular(L, Up, upper=False).reshape(-1, d).float()
        failed[arm_ids] = info != 0
    else:
        for k, (lo, m) in enumerate(zip(starts, counts)):
            if m:
                U_k, X_k = U[lo : lo + m].double(), Xs[lo : lo + m].double()
                eye = torch.eye(m, device=dev, dtype=torch.float64)
                L, info = torch.linalg.cholesky_ex(eye + U_k @ X_k.T)  # _ex: no sync
                W[lo : lo + m] = torch.linalg.solve_triangular(L, U_k, upper=False).float()
                failed[k] = info != 0
    return W[:nr].T.contiguous(), failed


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
    floor: float | None = None,
    precision: str = UPDATE_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the rows X [B, d] (rewards [B]) to the arms `arms` [B]: A, A_inv, b, theta updated in place.

    refresh [K] bool: arms whose inverse is recomputed exactly (Cholesky) instead of by Woodbury; arms without a
    row are untouched whatever their flag. Returns two [K] bool masks: the arms whose inverse was recomputed
    exactly (flagged ones, and those whose Woodbury factor was not positive definite), and the arms that needed a
    repair (a failed Woodbury factor, or an A that `spd_inverse` repaired; floor is its eigenvalue floor). Same
    contract as `linear_update_torch`, except that the state is written as the kernels run: every check comes
    first, and nothing after them raises.
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
    if refresh.shape != (K,):
        raise ValueError(f"refresh must be [K] = [{K}], got {tuple(refresh.shape)}")
    check_device(A, A_inv, b, theta, X, arms, rewards, refresh, interpreted=INTERPRETED)
    nr, dev = X.shape[0], X.device
    if nr == 0:
        return torch.zeros(K, dtype=torch.bool, device=dev), torch.zeros(K, dtype=torch.bool, device=dev)

    # Rows grouped by arm (a stable sort keeps the batch order inside an arm, as the core's boolean mask does).
    arms = arms.long()
    order = torch.argsort(arms, stable=True)
    Xs = X[order].to(torch.float32).contiguous()
    rs = rewards[order].to(torch.float32).contiguous()
    in_range = (arms >= 0) & (arms < K)
    rows = torch.zeros(K, dtype=torch.long, device=dev).index_add_(0, arms.clamp(0, K - 1), in_range.long())
    offsets = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(rows, 0)
    exact = (rows > 0) & refresh.to(torch.bool)
    wood = ((rows > 0) & ~exact).to(torch.int32)
    # The one host sync before the launches: the range check and the per-arm row counts the solves are sized by.
    host = torch.cat([in_range.all().long()[None], rows, wood.long()]).tolist()
    if not host[0]:
        raise ValueError(f"arm indices must lie in [0, {K})")
    rows_host, wood_host = host[1 : K + 1], host[K + 1 :]
    counts = [m if w else 0 for m, w in zip(rows_host, wood_host)]
    starts = [sum(rows_host[:k]) for k in range(K)]
    m_bucket = triton.next_power_of_2(max(rows_host))
    tuned = nr * d * d >= _AUTOTUNE_MIN_WORK

    Wt = torch.empty((d, nr), device=dev, dtype=torch.float32)
    failed = torch.zeros(K, dtype=torch.bool, device=dev)
    if any(counts):
        U = torch.empty_like(Xs)
        args = (Xs, A_inv, U, offsets, wood, d, K, m_bucket)
        if tuned:
            grid = lambda meta: (triton.cdiv(nr, meta["BLOCK_M"]) + K, triton.cdiv(d, meta["BLOCK_N"]))  # noqa: E731
            _tuned("project")[grid](*args, PRECISION=precision)
        else:
            bm, bn, bk = (block(nr, 16, 32), block(d, 16, 32), block(d, 16, 32)) if INTERPRETED else (64, 128, 32)
            # The grid's row-tile count is an upper bound on the per-arm row tiles: each arm may end with a partial one.
            _project_kernel[(triton.cdiv(nr, bm) + K, triton.cdiv(d, bn))](
                *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision,
                **({} if INTERPRETED else {"num_warps": 8, "num_stages": 3}),
            )
        Wt, failed = _woodbury_factors(U, Xs, offsets, wood, counts, starts)

    args = (A, A_inv, b, Xs.T.contiguous(), Wt, rs, offsets, wood, d, nr, m_bucket)
    if tuned:
        grid = lambda meta: (2 * K, triton.cdiv(d, meta["BLOCK"]) * (triton.cdiv(d, meta["BLOCK"]) + 1) // 2)  # noqa: E731
        _tuned("apply")[grid](*args, PRECISION=precision)
    else:
        bt, br = (block(d, 16, 32), 16) if INTERPRETED else (64, 64)
        tiles = triton.cdiv(d, bt)
        _apply_kernel[(2 * K, tiles * (tiles + 1) // 2)](
            *args, BLOCK=bt, BLOCK_R=br, PRECISION=precision, **({} if INTERPRETED else {"num_warps": 4, "num_stages": 2})
        )
    bv, bvj = (block(d, 16, 32), block(d, 16, 32)) if INTERPRETED else (16, 256)
    _theta_kernel[(K, triton.cdiv(d, bv))](A_inv, b, theta, offsets, d, BLOCK=bv, BLOCK_J=bvj, num_warps=4)
    # Inverses recomputed from A (already up to date), in one pass once everything is queued: the core's exact
    # refreshes (rare), and arms whose Woodbury factor was not positive definite (A^-1 drifted indefinite; the
    # core's woodbury_update does the same). Their theta from the kernel above is replaced.
    redo = exact | failed
    exact_host, failed_host = torch.stack([exact, failed]).tolist()  # the one host sync after the launches
    repaired = failed_host
    for k in range(K):
        if exact_host[k] or failed_host[k]:
            A_inv[k], fixed = spd_inverse(A[k], floor)
            theta[k] = A_inv[k] @ b[k]
            repaired[k] = repaired[k] or fixed
    return redo, torch.tensor(repaired, dtype=torch.bool, device=dev)
