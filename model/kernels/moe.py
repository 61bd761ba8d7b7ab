"""Fused routed experts (DeepSeekMoE) forward/backward in Triton: grouped GEMMs over sorted tokens.

Shape legend: N tokens, D hidden, K experts per token, A = N·K assignments (token, expert),
E experts, F expert intermediate size, P padded sorted rows (each expert's rows padded to BLOCK_M),
Mb = P / BLOCK_M row blocks.

Formula (per token n, the same as `RoutedExperts.forward`, the reference):
    out_n = Σ_k keep_nk · w_nk · Wd[e_nk] · (silu(Wg[e_nk]·x_n) ⊙ (Wu[e_nk]·x_n))
with Wg, Wu [E, F, D], Wd [E, D, F], w [N, K] fp32 gate weights, keep [N, K] the capacity mask
(all True when dropless; a dropped assignment contributes nothing and gets no gradient).

Forward, three launches after a metadata step that sorts assignments by expert without a host sync
(`route_metadata`: per-chunk histograms, offsets, a parallel stable scatter):
  1. `_moe_gate_up_kernel`: per (row block of one expert, F block) gather x rows by token (the
     permutation is fused into the load), two GEMMs sharing the x tile, SwiGLU in registers;
     writes h [P, F] and (training) the pre-activations g, u [P, 2F].
  2. `_moe_down_kernel`: h @ Wd[e]ᵀ, rows scattered back to assignment order y [A, D].
  3. `_moe_combine_kernel`: out_n = Σ_k keep·w·y (fp32 sum, one rounding): the weighted un-permute.
Backward, no atomics:
  `_moe_gather_rows_kernel`       x and dout in padded-row order [P, D] (zeros on padding rows)
  `_moe_hidden_grad_kernel`       z = dout_p @ Wd[e] [P, F] (unweighted)
  `_moe_swiglu_bwd_kernel`        dh = w·z → dg, du [P, 2F]; hw = w·h [P, F]; dw_a = Σ_f z_f·h_f
  `_moe_weight_grad_kernel` ×2    dWd[e] = Σ_rows dout_pᵀ (w·h)_p and [dWg; dWu][e] = Σ_rows [dg, du]ᵀ x_p:
                                  GEMMs over each expert's contiguous run of padded rows (w moved from dy
                                  onto h, so both operands go to the tensor cores as loaded)
  `_moe_input_grad_kernel`        dx_a = dg_a @ Wg[e] + du_a @ Wu[e], then the combine kernel sums
                                  each token's K rows (no weights) into dx [N, D].
The row-block GEMMs run GROUP_M row blocks over all column tiles at a time (L2 reuse of the rows and
of each expert's weights); the weight-gradient GEMMs are expert-major over the expert's contiguous
row run. Tile sizes: `MoETiles` (per dtype; the 16-bit ones tuned on an H100).
Empty experts cost one early-exiting program per block; no Python loop over experts anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._util import check_inputs, dot_precision, interpreting, next_pow2


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _row_block_tile(pid, n_mb, n_n, GROUP_M: tl.constexpr):
    """Program id → (row block, column tile), GROUP_M row blocks at a time across every column tile, so
    the programs in flight share their A rows and each expert's weight slices in L2."""
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_mb - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _moe_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, row_ptr, block_expert_ptr, h_ptr, gu_ptr, n_mb, D, F, K,
                        STORE_GU: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """h = silu(x Wgᵀ) ⊙ (x Wuᵀ) for one row block of one expert; x rows gathered by token on load."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(F, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M)
    valid_M = row_M >= 0
    token_M = tl.where(valid_M, row_M // K, 0).to(tl.int64)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_K = tl.arange(0, BLOCK_K)
    x_ptrs_MK = x_ptr + token_M[:, None] * D + d_K[None, :]
    w_offs_KN = e * F * D + f_N[None, :] * D + d_K[:, None]
    wg_ptrs_KN, wu_ptrs_KN = wg_ptr + w_offs_KN, wu_ptr + w_offs_KN
    acc_g_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        if EVEN_K:
            x_MK = tl.load(x_ptrs_MK, mask=valid_M[:, None], other=0.0)
            wg_KN = tl.load(wg_ptrs_KN, mask=f_N[None, :] < F, other=0.0)
            wu_KN = tl.load(wu_ptrs_KN, mask=f_N[None, :] < F, other=0.0)
        else:
            k_ok_K = d0 + d_K < D
            x_MK = tl.load(x_ptrs_MK, mask=valid_M[:, None] & k_ok_K[None, :], other=0.0)
            wg_KN = tl.load(wg_ptrs_KN, mask=k_ok_K[:, None] & (f_N[None, :] < F), other=0.0)
            wu_KN = tl.load(wu_ptrs_KN, mask=k_ok_K[:, None] & (f_N[None, :] < F), other=0.0)
        acc_g_MN = tl.dot(x_MK, wg_KN, acc_g_MN, input_precision=PRECISION)
        acc_u_MN = tl.dot(x_MK, wu_KN, acc_u_MN, input_precision=PRECISION)
        x_ptrs_MK += BLOCK_K
        wg_ptrs_KN += BLOCK_K
        wu_ptrs_KN += BLOCK_K
    # Round the GEMM outputs to the activation dtype first, as the reference's bmm does.
    g_MN = acc_g_MN.to(h_ptr.dtype.element_ty)
    u_MN = acc_u_MN.to(h_ptr.dtype.element_ty)
    g32_MN = g_MN.to(tl.float32)
    h_MN = g32_MN * tl.sigmoid(g32_MN) * u_MN.to(tl.float32)
    out_mask_MN = f_N[None, :] < F
    tl.store(h_ptr + p_M[:, None] * F + f_N[None, :], h_MN.to(h_ptr.dtype.element_ty), mask=out_mask_MN)
    if STORE_GU:
        gu_offs_MN = p_M[:, None] * (2 * F) + f_N[None, :]
        tl.store(gu_ptr + gu_offs_MN, g_MN, mask=out_mask_MN)
        tl.store(gu_ptr + gu_offs_MN + F, u_MN, mask=out_mask_MN)


@triton.jit
def _moe_down_kernel(h_ptr, wd_ptr, row_ptr, block_expert_ptr, y_ptr, n_mb, D, F,
                     PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y_a = h_p Wd[e]ᵀ, each row scattered to its assignment a (un-permute fused into the store)."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(D, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    d_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_K = tl.arange(0, BLOCK_K)
    h_ptrs_MK = h_ptr + p_M[:, None] * F + f_K[None, :]
    wd_ptrs_KN = wd_ptr + e * D * F + d_N[None, :] * F + f_K[:, None]
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_K):
        if EVEN_K:
            h_MK = tl.load(h_ptrs_MK)
            wd_KN = tl.load(wd_ptrs_KN, mask=d_N[None, :] < D, other=0.0)
        else:
            k_ok_K = f0 + f_K < F
            h_MK = tl.load(h_ptrs_MK, mask=k_ok_K[None, :], other=0.0)
            wd_KN = tl.load(wd_ptrs_KN, mask=k_ok_K[:, None] & (d_N[None, :] < D), other=0.0)
        acc_MN = tl.dot(h_MK, wd_KN, acc_MN, input_precision=PRECISION)
        h_ptrs_MK += BLOCK_K
        wd_ptrs_KN += BLOCK_K
    tl.store(y_ptr + row_M[:, None] * D + d_N[None, :], acc_MN.to(y_ptr.dtype.element_ty),
             mask=(row_M[:, None] >= 0) & (d_N[None, :] < D))


@triton.jit
def _moe_combine_kernel(y_ptr, w_ptr, keep_ptr, out_ptr, N, D, K, HAS_WEIGHTS: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = Σ_k keep[n,k] · (w[n,k] ·) y[n·K + k], summed in fp32."""
    n_T = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc_TD = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        a_T = n_T * K + k
        keep_T = tl.load(keep_ptr + a_T, mask=n_T < N, other=0) != 0
        y_TD = tl.load(y_ptr + a_T[:, None] * D + d_D[None, :], mask=keep_T[:, None] & (d_D[None, :] < D),
                       other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y_TD = y_TD * tl.load(w_ptr + a_T, mask=keep_T, other=0.0).to(tl.float32)[:, None]
        acc_TD += y_TD
    tl.store(out_ptr + n_T[:, None] * D + d_D[None, :], acc_TD.to(out_ptr.dtype.element_ty),
             mask=(n_T[:, None] < N) & (d_D[None, :] < D))


@triton.jit
def _moe_gather_rows_kernel(src_ptr, row_ptr, block_expert_ptr, dst_ptr, D, K,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[p] = src[token of row p] for the padded rows of one row block, zeros on its padding rows:
    the permuted copy that lets the weight-gradient GEMMs stream their operands contiguously."""
    pid_m = tl.program_id(0)
    if tl.load(block_expert_ptr + pid_m) < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M)
    valid_M = row_M >= 0
    token_M = tl.where(valid_M, row_M // K, 0).to(tl.int64)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    vals_MD = tl.load(src_ptr + token_M[:, None] * D + d_D[None, :], mask=valid_M[:, None] & (d_D[None, :] < D),
                      other=0.0)
    tl.store(dst_ptr + p_M[:, None] * D + d_D[None, :], vals_MD, mask=d_D[None, :] < D)


@triton.jit
def _moe_hidden_grad_kernel(dout_ptr, wd_ptr, block_expert_ptr, z_ptr, n_mb, D, F, PRECISION: tl.constexpr,
                            EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """z_p = dout_p @ Wd[e] [P, F] over the permuted dout rows (unweighted; `_moe_swiglu_bwd_kernel`
    applies w and the SwiGLU backward). A plain GEMM: the SwiGLU epilogue in this kernel needed ~250
    registers per thread, which forced 64-column tiles whose operand traffic bound it (ncu: L2-bound at
    ~200 TFLOP/s on an H100); the separate elementwise pass costs one extra round trip of z."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(F, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_K = tl.arange(0, BLOCK_K)
    dout_ptrs_MK = dout_ptr + p_M[:, None] * D + d_K[None, :]
    wd_ptrs_KN = wd_ptr + e * D * F + d_K[:, None] * F + f_N[None, :]
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        if EVEN_K:
            dout_MK = tl.load(dout_ptrs_MK)
            wd_KN = tl.load(wd_ptrs_KN, mask=f_N[None, :] < F, other=0.0)
        else:
            k_ok_K = d0 + d_K < D
            dout_MK = tl.load(dout_ptrs_MK, mask=k_ok_K[None, :], other=0.0)
            wd_KN = tl.load(wd_ptrs_KN, mask=k_ok_K[:, None] & (f_N[None, :] < F), other=0.0)
        acc_MN = tl.dot(dout_MK, wd_KN, acc_MN, input_precision=PRECISION)
        dout_ptrs_MK += BLOCK_K
        wd_ptrs_KN += BLOCK_K * F
    tl.store(z_ptr + p_M[:, None] * F + f_N[None, :], acc_MN.to(z_ptr.dtype.element_ty), mask=f_N[None, :] < F)


@triton.jit
def _moe_swiglu_bwd_kernel(z_ptr, gu_ptr, w_ptr, row_ptr, block_expert_ptr, dgu_ptr, hw_ptr, dw_ptr, F,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """SwiGLU backward for BLOCK_R padded rows: dh = w·z → dg = dh·u·σ'(g)-term, du = dh·silu(g);
    hw = w·h (the down-weight gradient's operand, so that GEMM needs no register-side scaling) and the
    gate-weight gradient dw_a = Σ_f z_f·h_f, stored at the row's assignment. Padding rows get zeros
    (z, g and u are zero there), which the weight-gradient GEMMs rely on."""
    p0 = tl.program_id(0) * BLOCK_R
    if tl.load(block_expert_ptr + p0 // BLOCK_M) < 0:
        return
    p_R = (p0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_R = tl.load(row_ptr + p_R)
    valid_R = row_R >= 0
    w_R = tl.load(w_ptr + row_R, mask=valid_R, other=0.0).to(tl.float32)
    dw_R = tl.zeros([BLOCK_R], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f_F = f0 + tl.arange(0, BLOCK_F)
        mask_RF = f_F[None, :] < F
        z_RF = tl.load(z_ptr + p_R[:, None] * F + f_F[None, :], mask=mask_RF, other=0.0).to(tl.float32)
        gu_offs_RF = p_R[:, None] * (2 * F) + f_F[None, :]
        g_RF = tl.load(gu_ptr + gu_offs_RF, mask=mask_RF, other=0.0).to(tl.float32)
        u_RF = tl.load(gu_ptr + gu_offs_RF + F, mask=mask_RF, other=0.0).to(tl.float32)
        sig_RF = tl.sigmoid(g_RF)
        silu_RF = g_RF * sig_RF
        h_RF = (silu_RF * u_RF).to(dgu_ptr.dtype.element_ty).to(tl.float32)  # h as the forward rounded it
        dw_R += tl.sum(z_RF * h_RF, axis=1)
        dh_RF = z_RF * w_R[:, None]
        tl.store(dgu_ptr + gu_offs_RF, (dh_RF * u_RF * sig_RF * (1.0 + g_RF * (1.0 - sig_RF))).to(dgu_ptr.dtype.element_ty),
                 mask=mask_RF)
        tl.store(dgu_ptr + gu_offs_RF + F, (dh_RF * silu_RF).to(dgu_ptr.dtype.element_ty), mask=mask_RF)
        tl.store(hw_ptr + p_R[:, None] * F + f_F[None, :], (h_RF * w_R[:, None]).to(hw_ptr.dtype.element_ty),
                 mask=mask_RF)
    tl.store(dw_ptr + row_R, dw_R, mask=valid_R)


@triton.jit
def _moe_weight_grad_kernel(a_ptr, b_ptr, expert_start_ptr, expert_count_ptr, c_lo_ptr, c_hi_ptr, DI, DJ, DI_LO,
                            PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_A: tl.constexpr):
    """C[e] [DI, DJ] = Σ over expert e's padded rows p of A[p]ᵀ ⊗ B[p], with A [P, DI] and B [P, DJ] in
    padded-row order. Output rows i < DI_LO land in c_lo [E, DI_LO, DJ], the rest in c_hi [E, DI − DI_LO, DJ]
    (dWg and dWu from one GEMM over 2F).
        dWd:        A = dout permuted [P, D], B = w·h [P, F]          → C = dWd [D, F]
        [dWg; dWu]: A = [dg, du] [P, 2F],    B = x permuted [P, D]     → C [2F, D]
    Both operands are contiguous row runs: no per-step index loads, whose latency the short reduction
    (~A/E rows per expert) cannot hide. The last step may run past the expert's rows into its padding
    rows, which are zero in every operand (BLOCK_A divides the row-block size), so no row masks.
    Programs are expert-major, so the ones in flight share one expert's rows in L2. (Several column tiles
    per program with `tl.range(..., flatten=True)`, to overlap one tile's epilogue with the next tile's
    loads, ran 5x slower on an H100 with Triton 3.6.)"""
    n_i, n_j = tl.cdiv(DI, BLOCK_I), tl.cdiv(DJ, BLOCK_J)
    pid = tl.program_id(0)
    e = (pid // (n_i * n_j)).to(tl.int64)
    i_I = (pid % (n_i * n_j)) // n_j * BLOCK_I + tl.arange(0, BLOCK_I)
    j_J = (pid % n_j) * BLOCK_J + tl.arange(0, BLOCK_J)
    start = tl.load(expert_start_ptr + e).to(tl.int64)
    count = tl.load(expert_count_ptr + e)
    r_A = tl.arange(0, BLOCK_A)
    a_ptrs_AI = a_ptr + (start + r_A)[:, None] * DI + i_I[None, :]
    b_ptrs_AJ = b_ptr + (start + r_A)[:, None] * DJ + j_J[None, :]
    acc_IJ = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for _ in range(0, count, BLOCK_A):
        a_AI = tl.load(a_ptrs_AI, mask=i_I[None, :] < DI, other=0.0)
        b_AJ = tl.load(b_ptrs_AJ, mask=j_J[None, :] < DJ, other=0.0)
        acc_IJ = tl.dot(tl.trans(a_AI), b_AJ, acc_IJ, input_precision=PRECISION)
        a_ptrs_AI += BLOCK_A * DI
        b_ptrs_AJ += BLOCK_A * DJ
    lo_I = i_I < DI_LO
    out_I = tl.where(lo_I, c_lo_ptr + (e * DI_LO + i_I) * DJ, c_hi_ptr + (e * (DI - DI_LO) + i_I - DI_LO) * DJ)
    tl.store(out_I[:, None] + j_J[None, :], acc_IJ.to(c_lo_ptr.dtype.element_ty),
             mask=(i_I[:, None] < DI) & (j_J[None, :] < DJ))


@triton.jit
def _moe_input_grad_kernel(dgu_ptr, wg_ptr, wu_ptr, row_ptr, block_expert_ptr, dxa_ptr, n_mb, D, F,
                           PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    """dx_a [A, D] = dg_a @ Wg[e] + du_a @ Wu[e], stored in assignment order."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(D, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    d_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_K = tl.arange(0, BLOCK_K)
    dg_ptrs_MK = dgu_ptr + p_M[:, None] * (2 * F) + f_K[None, :]
    w_offs_KN = e * F * D + f_K[:, None] * D + d_N[None, :]
    wg_ptrs_KN, wu_ptrs_KN = wg_ptr + w_offs_KN, wu_ptr + w_offs_KN
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_K):
        if EVEN_K:
            dg_MK = tl.load(dg_ptrs_MK)
            du_MK = tl.load(dg_ptrs_MK + F)
            wg_KN = tl.load(wg_ptrs_KN, mask=d_N[None, :] < D, other=0.0)
            wu_KN = tl.load(wu_ptrs_KN, mask=d_N[None, :] < D, other=0.0)
        else:
            k_ok_K = f0 + f_K < F
            dg_MK = tl.load(dg_ptrs_MK, mask=k_ok_K[None, :], other=0.0)
            du_MK = tl.load(dg_ptrs_MK + F, mask=k_ok_K[None, :], other=0.0)
            wg_KN = tl.load(wg_ptrs_KN, mask=k_ok_K[:, None] & (d_N[None, :] < D), other=0.0)
            wu_KN = tl.load(wu_ptrs_KN, mask=k_ok_K[:, None] & (d_N[None, :] < D), other=0.0)
        acc_MN = tl.dot(dg_MK, wg_KN, acc_MN, input_precision=PRECISION)
        acc_MN = tl.dot(du_MK, wu_KN, acc_MN, input_precision=PRECISION)
        dg_ptrs_MK += BLOCK_K
        wg_ptrs_KN += BLOCK_K * D
        wu_ptrs_KN += BLOCK_K * D
    tl.store(dxa_ptr + row_M[:, None] * D + d_N[None, :], acc_MN.to(dxa_ptr.dtype.element_ty),
             mask=(row_M[:, None] >= 0) & (d_N[None, :] < D))


# ------------------------------------------------------------------------------------ host functions
@dataclass(frozen=True)
class Tile:
    """One kernel's launch shape."""

    m: int  # rows per program (row-block GEMMs: must equal MoETiles.block_m; weight grads: output rows)
    n: int  # output columns per program
    k: int  # reduction step (D or F for the row-block GEMMs, the expert's rows for the weight grads)
    warps: int  # num_warps
    stages: int  # num_stages (software pipelining depth)


@dataclass(frozen=True)
class MoETiles:
    """Tile sizes of every launch. block_m fixes the per-expert row padding, so the row-block GEMMs share it."""

    block_m: int  # rows per row block = per-expert padding multiple
    group_m: int  # row blocks scheduled together over all column tiles (L2 reuse of rows and weights)
    gate_up: Tile  # x @ [Wg, Wu]ᵀ + SwiGLU, over F
    down: Tile  # h @ Wdᵀ, over D
    hidden_grad: Tile  # z = dout @ Wd, over F
    input_grad: Tile  # [dg, du] @ [Wg; Wu], over D
    down_wgrad: Tile  # dWd [D, F] per expert (m over D, n over F, k over rows: must divide block_m)
    gate_up_wgrad: Tile  # [dWg; dWu] [2F, D] per expert (m over 2F, n over D, k over rows: divides block_m)
    swiglu_bwd: Tile  # elementwise SwiGLU backward (m rows per program: divides block_m; n columns per step)

    def fit(self, D: int, F: int) -> MoETiles:
        """Narrow the column tiles to small dimensions (power-of-two tiles, at least 16)."""
        def clamp(t: Tile, m_dim: int | None, n_dim: int) -> Tile:
            m = t.m if m_dim is None else min(t.m, max(16, next_pow2(m_dim)))
            return replace(t, m=m, n=min(t.n, max(16, next_pow2(n_dim))))

        return replace(self, gate_up=clamp(self.gate_up, None, F), down=clamp(self.down, None, D),
                       hidden_grad=clamp(self.hidden_grad, None, F), input_grad=clamp(self.input_grad, None, D),
                       down_wgrad=clamp(self.down_wgrad, D, F), gate_up_wgrad=clamp(self.gate_up_wgrad, 2 * F, D),
                       swiglu_bwd=clamp(self.swiglu_bwd, None, F))

    def __post_init__(self):
        for name in ("down_wgrad", "gate_up_wgrad"):
            if self.block_m % getattr(self, name).k:
                raise ValueError(f"MoETiles.{name}.k must divide block_m={self.block_m} (the last reduction step "
                                 "may only run into the expert's own zero padding rows)")
        if self.block_m % self.swiglu_bwd.m:
            raise ValueError(f"MoETiles.swiglu_bwd.m must divide block_m={self.block_m}")


def default_tiles(D: int, F: int, dtype: torch.dtype) -> MoETiles:
    """Tiles per backend and dtype. The 16-bit GPU tiles were picked by a sweep on an H100 at
    V2-Lite shapes (benchmarks/README.md, Kernels); fp32 keeps small tiles (4-byte operands)."""
    if interpreting():  # one program at a time: the biggest tiles that stay cheap in numpy
        t = Tile(32, 128, 128, 4, 1)
        tiles = MoETiles(32, 8, t, t, t, t, Tile(128, 128, 32, 4, 1), Tile(128, 128, 32, 4, 1), Tile(32, 128, 0, 4, 1))
    elif dtype == torch.float32:
        t = Tile(64, 64, 32, 4, 2)
        tiles = MoETiles(64, 8, t, t, t, t, Tile(64, 64, 32, 4, 2), Tile(64, 64, 32, 4, 2), Tile(16, 64, 0, 4, 1))
    else:
        tiles = _TUNED_16BIT
    return tiles.fit(D, F)


_TUNED_16BIT = MoETiles(
    block_m=128, group_m=8,
    gate_up=Tile(128, 128, 64, 8, 4), down=Tile(128, 256, 64, 8, 4),
    hidden_grad=Tile(128, 256, 64, 8, 4), input_grad=Tile(128, 256, 32, 8, 3),
    down_wgrad=Tile(256, 128, 32, 16, 5), gate_up_wgrad=Tile(128, 256, 32, 8, 5),
    swiglu_bwd=Tile(8, 256, 0, 4, 1))


@triton.jit
def _moe_route_hist_kernel(expert_ptr, keep_ptr, hist_ptr, A, E, HAS_KEEP: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program c: hist[c, e] = number of kept assignments of chunk c (CHUNK consecutive assignments) routed
    to expert e."""
    c = tl.program_id(0)
    a_A = c * CHUNK + tl.arange(0, CHUNK)
    e_A = tl.load(expert_ptr + a_A, mask=a_A < A, other=E).to(tl.int32)
    if HAS_KEEP:
        e_A = tl.where(tl.load(keep_ptr + a_A, mask=a_A < A, other=0) != 0, e_A, E)
    e_E = tl.arange(0, BLOCK_E)
    tl.store(hist_ptr + c * E + e_E, tl.histogram(e_A, BLOCK_E), mask=e_E < E)


@triton.jit
def _moe_route_offsets_kernel(hist_ptr, chunk_base_ptr, count_ptr, pad_start_ptr, block_expert_ptr, n_chunks, E, n_mb,
                              BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_MB: tl.constexpr):
    """One program: per-expert counts, each expert's first padded row, the first row of each (chunk, expert)
    (chunk_base = pad_start[e] + rows of e in earlier chunks: a stable sort by expert) and the expert of
    every row block (−1 past the last expert's run)."""
    e_E = tl.arange(0, BLOCK_E)
    counts_E = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, n_chunks, BLOCK_C):
        c_C = c0 + tl.arange(0, BLOCK_C)
        counts_E += tl.sum(tl.load(hist_ptr + c_C[:, None] * E + e_E[None, :],
                                   mask=(c_C[:, None] < n_chunks) & (e_E[None, :] < E), other=0), axis=0)
    padded_E = (counts_E + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end_E = tl.cumsum(padded_E, 0)
    pad_start_E = pad_end_E - padded_E
    tl.store(count_ptr + e_E, counts_E, mask=e_E < E)
    tl.store(pad_start_ptr + e_E, pad_start_E, mask=e_E < E)
    base_E = pad_start_E
    for c0 in range(0, n_chunks, BLOCK_C):
        c_C = c0 + tl.arange(0, BLOCK_C)
        mask_CE = (c_C[:, None] < n_chunks) & (e_E[None, :] < E)
        hist_CE = tl.load(hist_ptr + c_C[:, None] * E + e_E[None, :], mask=mask_CE, other=0)
        incl_CE = tl.cumsum(hist_CE, 0)
        tl.store(chunk_base_ptr + c_C[:, None] * E + e_E[None, :], base_E[None, :] + incl_CE - hist_CE, mask=mask_CE)
        base_E += tl.sum(hist_CE, axis=0)
    for j0 in range(0, n_mb, BLOCK_MB):
        j_J = j0 + tl.arange(0, BLOCK_MB)
        # searchsorted(pad_end, j·BLOCK_M, right=True): the experts whose run ends at or before the block
        ended_JE = (pad_end_E[None, :] <= (j_J * BLOCK_M)[:, None]) & (e_E[None, :] < E)
        expert_J = tl.sum(ended_JE.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + j_J, tl.where(expert_J < E, expert_J, -1), mask=j_J < n_mb)


@triton.jit
def _moe_route_scatter_kernel(expert_ptr, keep_ptr, chunk_base_ptr, row_ptr, A, E, HAS_KEEP: tl.constexpr,
                              CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program c: row[chunk_base[c, e] + rank] = a for each kept assignment a of chunk c, rank = how many
    earlier assignments of the chunk went to the same expert (one-hot prefix sums over SUB at a time)."""
    c = tl.program_id(0)
    e_E = tl.arange(0, BLOCK_E)
    base_E = tl.load(chunk_base_ptr + c * E + e_E, mask=e_E < E, other=0)
    for s0 in range(0, CHUNK, SUB):
        a_S = c * CHUNK + s0 + tl.arange(0, SUB)
        e_S = tl.load(expert_ptr + a_S, mask=a_S < A, other=E).to(tl.int32)
        if HAS_KEEP:
            e_S = tl.where(tl.load(keep_ptr + a_S, mask=a_S < A, other=0) != 0, e_S, E)
        hit_SE = (e_S[:, None] == e_E[None, :]).to(tl.int32)
        slot_S = tl.sum(hit_SE * (base_E[None, :] + tl.cumsum(hit_SE, 0) - 1), axis=1)
        tl.store(row_ptr + slot_S, a_S, mask=e_S < E)
        base_E += tl.sum(hit_SE, axis=0)


def route_metadata(expert_ids_NK: torch.Tensor, keep_NK: torch.Tensor | None, num_experts: int, block_m: int):
    """Sort assignments by expert (stable), each expert's run padded to a multiple of block_m, without a
    host sync: per-chunk histograms, one small program for the offsets, a parallel scatter.

    Returns row_P [P] int32 (assignment index n·K + k of each padded row, −1 for padding),
    block_expert_Mb [P/block_m] int32 (the expert of each row block, −1 for unused blocks),
    pad_start_E, count_E [E] int32 (each expert's first padded row and its number of rows),
    keep_A [A] int8.
    """
    N, K = expert_ids_NK.shape
    A, E, device = N * K, num_experts, expert_ids_NK.device
    expert_A = expert_ids_NK.reshape(-1).contiguous()
    keep_A = (keep_NK.reshape(-1).to(torch.int8) if keep_NK is not None
              else torch.ones(A, dtype=torch.int8, device=device))
    P = triton.cdiv(A + E * (block_m - 1), block_m) * block_m  # bound on Σ padded counts
    n_mb = P // block_m
    CHUNK = 1024
    n_chunks = max(triton.cdiv(A, CHUNK), 1)
    BLOCK_E = next_pow2(E + 1)  # + the bin of dropped assignments
    row_P = torch.full((P,), -1, dtype=torch.int32, device=device)
    block_expert_Mb = torch.empty(n_mb, dtype=torch.int32, device=device)
    count_E = torch.empty(E, dtype=torch.int32, device=device)
    pad_start_E = torch.empty(E, dtype=torch.int32, device=device)
    hist_CE = torch.empty(n_chunks, E, dtype=torch.int32, device=device)
    chunk_base_CE = torch.empty(n_chunks, E, dtype=torch.int32, device=device)
    has_keep = keep_NK is not None
    _moe_route_hist_kernel[(n_chunks,)](expert_A, keep_A, hist_CE, A, E, HAS_KEEP=has_keep, CHUNK=CHUNK,
                                        BLOCK_E=BLOCK_E, num_warps=4)
    _moe_route_offsets_kernel[(1,)](hist_CE, chunk_base_CE, count_E, pad_start_E, block_expert_Mb, n_chunks, E, n_mb,
                                    BLOCK_C=32, BLOCK_E=BLOCK_E, BLOCK_M=block_m, BLOCK_MB=64, num_warps=4)
    _moe_route_scatter_kernel[(n_chunks,)](expert_A, keep_A, chunk_base_CE, row_P, A, E, HAS_KEEP=has_keep,
                                           CHUNK=CHUNK, SUB=128, BLOCK_E=BLOCK_E, num_warps=4)
    return row_P, block_expert_Mb, pad_start_E, count_E, keep_A


def _combine(y_AD: torch.Tensor, weights_A: torch.Tensor | None, keep_A: torch.Tensor, N: int, K: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    D = y_AD.shape[1]
    out_ND = torch.empty(N, D, dtype=out_dtype, device=y_AD.device)
    if N == 0:
        return out_ND
    BLOCK_D = min(next_pow2(D), 1024 if interpreting() else 256)
    BLOCK_T = 64 if interpreting() else 4
    grid = (triton.cdiv(N, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _moe_combine_kernel[grid](y_AD, weights_A if weights_A is not None else y_AD, keep_A, out_ND, N, D, K,
                              HAS_WEIGHTS=weights_A is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4)
    return out_ND


def _check(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK):
    check_inputs("moe_experts", x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, weights_NK)
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    if w_gate_EFD.shape != (E, F, D) or w_up_EFD.shape != (E, F, D) or w_down_EDF.shape != (E, D, F):
        raise ValueError(f"moe_experts: weights {tuple(w_gate_EFD.shape)}, {tuple(w_up_EFD.shape)}, "
                         f"{tuple(w_down_EDF.shape)} do not fit x [N, {D}]")
    if len({x_ND.dtype, w_gate_EFD.dtype, w_up_EFD.dtype, w_down_EDF.dtype}) != 1:
        raise TypeError("moe_experts: x and the expert weights must share a dtype")
    if expert_ids_NK.shape[0] != N or weights_NK.shape != expert_ids_NK.shape:
        raise ValueError(f"moe_experts: expert_ids {tuple(expert_ids_NK.shape)} / weights "
                         f"{tuple(weights_NK.shape)} do not fit N={N}")
    if keep_NK is not None and (keep_NK.shape != expert_ids_NK.shape or keep_NK.dtype != torch.bool):
        raise ValueError("moe_experts: keep mask must be bool and shaped like expert_ids")


def _launch(kernel, tile: Tile, n_programs: int, *args, **meta):
    kernel[(n_programs,)](*args, num_warps=tile.warps, num_stages=tile.stages, **meta)


def moe_experts_fwd(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK=None,
                    save_for_backward: bool = False, tiles: MoETiles | None = None):
    """Host forward. Returns out [N, D] and, when `save_for_backward`, the tensors backward needs."""
    _check(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK)
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    K = expert_ids_NK.shape[1]
    x_ND = x_ND.contiguous()
    w_gate_EFD, w_up_EFD, w_down_EDF = w_gate_EFD.contiguous(), w_up_EFD.contiguous(), w_down_EDF.contiguous()
    tiles = tiles or default_tiles(D, F, x_ND.dtype)
    BM = tiles.block_m
    row_P, block_expert_Mb, pad_start_E, count_E, keep_A = route_metadata(expert_ids_NK, keep_NK, E, BM)
    P = row_P.numel()
    weights_A = weights_NK.reshape(-1).float().contiguous()
    h_PF = torch.empty(P, F, dtype=x_ND.dtype, device=x_ND.device)
    gu_P2F = torch.empty(P, 2 * F, dtype=x_ND.dtype, device=x_ND.device) if save_for_backward else h_PF
    y_AD = torch.empty(N * K, D, dtype=x_ND.dtype, device=x_ND.device)
    prec = dot_precision(x_ND.dtype)
    n_mb = P // BM
    if n_mb and N:
        t = tiles.gate_up
        _launch(_moe_gate_up_kernel, t, n_mb * triton.cdiv(F, t.n),
                x_ND, w_gate_EFD, w_up_EFD, row_P, block_expert_Mb, h_PF, gu_P2F, n_mb, D, F, K,
                STORE_GU=save_for_backward, PRECISION=prec, EVEN_K=D % t.k == 0,
                BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
        t = tiles.down
        _launch(_moe_down_kernel, t, n_mb * triton.cdiv(D, t.n),
                h_PF, w_down_EDF, row_P, block_expert_Mb, y_AD, n_mb, D, F, PRECISION=prec, EVEN_K=F % t.k == 0,
                BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
    out_ND = _combine(y_AD, weights_A, keep_A, N, K, x_ND.dtype)
    saved = (row_P, block_expert_Mb, pad_start_E, count_E, keep_A, weights_A, gu_P2F) if save_for_backward else None
    return out_ND, saved


def _gather_rows(src_ND: torch.Tensor, row_P: torch.Tensor, block_expert_Mb: torch.Tensor, K: int,
                 block_m: int) -> torch.Tensor:
    """src rows in padded-row order [P, D], zeros on padding rows (rows of unused blocks left unwritten)."""
    D = src_ND.shape[1]
    dst_PD = torch.empty(row_P.numel(), D, dtype=src_ND.dtype, device=src_ND.device)
    BLOCK_D = min(next_pow2(D), 256 if not interpreting() else 1024)
    if dst_PD.numel():
        _moe_gather_rows_kernel[(block_expert_Mb.numel(), triton.cdiv(D, BLOCK_D))](
            src_ND, row_P, block_expert_Mb, dst_PD, D, K, BLOCK_M=block_m, BLOCK_D=BLOCK_D, num_warps=8)
    return dst_PD


def _weight_grad(tile: Tile, a_PI, b_PJ, pad_start_E, count_E, c_lo, c_hi, I_lo: int, prec: str):
    E = count_E.numel()
    DI, DJ = a_PI.shape[1], b_PJ.shape[1]
    _launch(_moe_weight_grad_kernel, tile, E * triton.cdiv(DI, tile.m) * triton.cdiv(DJ, tile.n),
            a_PI, b_PJ, pad_start_E, count_E, c_lo, c_hi, DI, DJ, I_lo, PRECISION=prec,
            BLOCK_I=tile.m, BLOCK_J=tile.n, BLOCK_A=tile.k)


def moe_experts_bwd(dout_ND, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, K, saved, tiles: MoETiles | None = None):
    """Host backward: (dx [N, D], dWg, dWu, dWd, dweights_A [A] fp32). `tiles` must be the forward's."""
    row_P, block_expert_Mb, pad_start_E, count_E, keep_A, weights_A, gu_P2F = saved
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    P = row_P.numel()
    tiles = tiles or default_tiles(D, F, x_ND.dtype)
    BM, GM = tiles.block_m, tiles.group_m
    prec = dot_precision(x_ND.dtype)
    dout_ND = dout_ND.contiguous()
    w_gate_EFD, w_up_EFD, w_down_EDF = w_gate_EFD.contiguous(), w_up_EFD.contiguous(), w_down_EDF.contiguous()
    n_mb = P // BM
    dtype, device = x_ND.dtype, x_ND.device
    # x and dout in padded-row order: the weight-gradient GEMMs then stream contiguous row runs.
    x_PD = _gather_rows(x_ND, row_P, block_expert_Mb, K, BM)
    dout_PD = _gather_rows(dout_ND, row_P, block_expert_Mb, K, BM)
    z_PF = torch.empty(P, F, dtype=dtype, device=device)
    dgu_P2F = torch.empty_like(gu_P2F)
    hw_PF = torch.empty(P, F, dtype=dtype, device=device)
    dweights_A = torch.zeros(N * K, dtype=torch.float32, device=device)
    dwg_EFD, dwu_EFD = torch.empty_like(w_gate_EFD), torch.empty_like(w_up_EFD)
    dwd_EDF = torch.empty_like(w_down_EDF)
    dxa_AD = torch.empty(N * K, D, dtype=dtype, device=device)
    if n_mb and N:
        t = tiles.hidden_grad
        _launch(_moe_hidden_grad_kernel, t, n_mb * triton.cdiv(F, t.n),
                dout_PD, w_down_EDF, block_expert_Mb, z_PF, n_mb, D, F, PRECISION=prec, EVEN_K=D % t.k == 0,
                BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)
        t = tiles.swiglu_bwd
        _launch(_moe_swiglu_bwd_kernel, t, P // t.m, z_PF, gu_P2F, weights_A, row_P, block_expert_Mb, dgu_P2F, hw_PF,
                dweights_A, F, BLOCK_M=BM, BLOCK_R=t.m, BLOCK_F=t.n)
    _weight_grad(tiles.down_wgrad, dout_PD, hw_PF, pad_start_E, count_E, dwd_EDF, dwd_EDF, D, prec)
    _weight_grad(tiles.gate_up_wgrad, dgu_P2F, x_PD, pad_start_E, count_E, dwg_EFD, dwu_EFD, F, prec)
    if n_mb and N:
        t = tiles.input_grad
        _launch(_moe_input_grad_kernel, t, n_mb * triton.cdiv(D, t.n),
                dgu_P2F, w_gate_EFD, w_up_EFD, row_P, block_expert_Mb, dxa_AD, n_mb, D, F, PRECISION=prec,
                EVEN_K=F % t.k == 0, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)
    dx_ND = _combine(dxa_AD, None, keep_A, N, K, x_ND.dtype)
    return dx_ND, dwg_EFD, dwu_EFD, dwd_EDF, dweights_A


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK):
        needs_grad = any(ctx.needs_input_grad)
        out_ND, saved = moe_experts_fwd(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK,
                                        keep_NK, save_for_backward=needs_grad)
        if needs_grad:
            ctx.save_for_backward(x_ND.contiguous(), w_gate_EFD, w_up_EFD, w_down_EDF, *saved)
            ctx.K = expert_ids_NK.shape[1]
            ctx.weights_dtype = weights_NK.dtype
        return out_ND

    @staticmethod
    def backward(ctx, dout_ND):
        x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, *saved = ctx.saved_tensors
        dx, dwg, dwu, dwd, dweights_A = moe_experts_bwd(dout_ND, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, ctx.K,
                                                        saved)
        dweights_NK = dweights_A.view(-1, ctx.K).to(ctx.weights_dtype)
        return dx, dwg, dwu, dwd, None, dweights_NK, None


def moe_experts(x_ND: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                keep_NK: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k keep·w·SwiGLU expert e_nk of x_n (see the module docstring); differentiable in x, the three
    weight stacks and weights_NK."""
    return MoEExpertsFunction.apply(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK)
