"""Fused routed experts (DeepSeekMoE) forward/backward in Triton: grouped GEMMs over sorted tokens.

Shape legend: N tokens, D hidden, K experts per token, A = N·K assignments (token, expert),
E experts, F expert intermediate size, P padded sorted rows (each expert's rows padded to BLOCK_M),
Mb = P / BLOCK_M row blocks.

Formula (per token n, the same as `RoutedExperts.forward`, the reference):
    out_n = Σ_k keep_nk · w_nk · Wd[e_nk] · (silu(Wg[e_nk]·x_n) ⊙ (Wu[e_nk]·x_n))
with Wg, Wu [E, F, D], Wd [E, D, F], w [N, K] fp32 gate weights, keep [N, K] the capacity mask
(all True when dropless; a dropped assignment contributes nothing and gets no gradient).

Forward, three launches after a metadata step that sorts assignments by expert without a host sync:
  1. `_moe_gate_up_kernel`: per (row block of one expert, F block) gather x rows by token (the
     permutation is fused into the load), two GEMMs sharing the x tile, SwiGLU in registers;
     writes h [P, F] and (training) the pre-activations g, u [P, 2F].
  2. `_moe_down_kernel`: h @ Wd[e]ᵀ, rows scattered back to assignment order y [A, D].
  3. `_moe_combine_kernel`: out_n = Σ_k keep·w·y (fp32 sum, one rounding): the weighted un-permute.
Backward, four grouped GEMMs and the combine (no atomics):
  `_moe_hidden_grad_kernel`       z = dout[token] @ Wd[e] with the SwiGLU backward in its epilogue:
                                  dh = w·z → dg, du [P, 2F]; dw_a = Σ_f z_f·h_f (gate-weight gradient,
                                  per F block); hw = w·h [P, F] for the next GEMM
  `_moe_down_weight_grad_kernel`  dWd[e] = Σ_rows dout[token]ᵀ (w·h)  (w moved from dy onto h, so both
                                  operands go to the tensor cores as loaded)
  `_moe_gate_up_weight_grad_kernel` [dWg; dWu][e] = Σ_rows [dg, du]ᵀ x[token] (one GEMM over 2F)
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
def _moe_hidden_grad_kernel(dout_ptr, wd_ptr, gu_ptr, w_ptr, row_ptr, block_expert_ptr, dgu_ptr, hw_ptr, dw_part_ptr,
                            n_mb, D, F, K, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """The down projection's data gradient with the SwiGLU backward in its epilogue:
    z = dout[token] @ Wd[e]; dw_a += Σ_f z·h; dh = w·z → dg, du; also stores hw = w·h for dWd."""
    n_f = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, n_f, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    valid_M = row_M >= 0
    token_M = tl.where(valid_M, row_M // K, 0)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_K = tl.arange(0, BLOCK_K)
    dout_ptrs_MK = dout_ptr + token_M[:, None] * D + d_K[None, :]
    wd_ptrs_KN = wd_ptr + e * D * F + d_K[:, None] * F + f_N[None, :]
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # z = dout @ Wd[e], unweighted
    for d0 in range(0, D, BLOCK_K):
        if EVEN_K:
            dout_MK = tl.load(dout_ptrs_MK, mask=valid_M[:, None], other=0.0)
            wd_KN = tl.load(wd_ptrs_KN, mask=f_N[None, :] < F, other=0.0)
        else:
            k_ok_K = d0 + d_K < D
            dout_MK = tl.load(dout_ptrs_MK, mask=valid_M[:, None] & k_ok_K[None, :], other=0.0)
            wd_KN = tl.load(wd_ptrs_KN, mask=k_ok_K[:, None] & (f_N[None, :] < F), other=0.0)
        acc_MN = tl.dot(dout_MK, wd_KN, acc_MN, input_precision=PRECISION)
        dout_ptrs_MK += BLOCK_K
        wd_ptrs_KN += BLOCK_K * F
    mask_MN = valid_M[:, None] & (f_N[None, :] < F)
    gu_offs_MN = p_M[:, None] * (2 * F) + f_N[None, :]
    g_MN = tl.load(gu_ptr + gu_offs_MN, mask=mask_MN, other=0.0).to(tl.float32)
    u_MN = tl.load(gu_ptr + gu_offs_MN + F, mask=mask_MN, other=0.0).to(tl.float32)
    w_M = tl.load(w_ptr + row_M, mask=valid_M, other=0.0).to(tl.float32)
    sig_MN = tl.sigmoid(g_MN)
    silu_MN = g_MN * sig_MN
    h_MN = (silu_MN * u_MN).to(dgu_ptr.dtype.element_ty).to(tl.float32)  # h as the forward rounded it
    tl.store(dw_part_ptr + p_M * n_f + pid_n, tl.sum(acc_MN * h_MN, axis=1))
    dh_MN = acc_MN * w_M[:, None]
    dg_MN = dh_MN * u_MN * sig_MN * (1.0 + g_MN * (1.0 - sig_MN))
    du_MN = dh_MN * silu_MN
    # Padding rows get zeros (not left unwritten): the input-gradient GEMM reads whole row blocks.
    f_ok_MN = f_N[None, :] < F
    tl.store(dgu_ptr + gu_offs_MN, dg_MN.to(dgu_ptr.dtype.element_ty), mask=f_ok_MN)
    tl.store(dgu_ptr + gu_offs_MN + F, du_MN.to(dgu_ptr.dtype.element_ty), mask=f_ok_MN)
    tl.store(hw_ptr + p_M[:, None] * F + f_N[None, :], (h_MN * w_M[:, None]).to(hw_ptr.dtype.element_ty),
             mask=f_ok_MN)


@triton.jit
def _moe_down_weight_grad_kernel(dout_ptr, hw_ptr, row_ptr, expert_start_ptr, expert_count_ptr, dwd_ptr,
                                 D, F, K, PRECISION: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_A: tl.constexpr):
    """dWd[e] [D, F] = Σ over the expert's rows of dout[token]ᵀ ⊗ (w·h): a GEMM over the expert's
    contiguous row run, both operands read straight into shared memory (no register-side scaling).
    Programs are expert-major, so the ones in flight share one expert's rows in L2."""
    n_d, n_f = tl.cdiv(D, BLOCK_D), tl.cdiv(F, BLOCK_F)
    pid = tl.program_id(0)
    e = (pid // (n_d * n_f)).to(tl.int64)
    d_D = (pid % (n_d * n_f)) // n_f * BLOCK_D + tl.arange(0, BLOCK_D)
    f_F = (pid % n_f) * BLOCK_F + tl.arange(0, BLOCK_F)
    start = tl.load(expert_start_ptr + e)
    count = tl.load(expert_count_ptr + e)
    acc_DF = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
    for a0 in range(0, count, BLOCK_A):
        j_A = a0 + tl.arange(0, BLOCK_A)
        valid_A = j_A < count
        p_A = (start + j_A).to(tl.int64)
        row_A = tl.load(row_ptr + p_A, mask=valid_A, other=0).to(tl.int64)
        dout_AD = tl.load(dout_ptr + (row_A // K)[:, None] * D + d_D[None, :],
                          mask=valid_A[:, None] & (d_D[None, :] < D), other=0.0)
        hw_AF = tl.load(hw_ptr + p_A[:, None] * F + f_F[None, :], mask=valid_A[:, None] & (f_F[None, :] < F),
                        other=0.0)
        acc_DF = tl.dot(tl.trans(dout_AD), hw_AF, acc_DF, input_precision=PRECISION)
    tl.store(dwd_ptr + e * D * F + d_D[:, None] * F + f_F[None, :], acc_DF.to(dwd_ptr.dtype.element_ty),
             mask=(d_D[:, None] < D) & (f_F[None, :] < F))


@triton.jit
def _moe_gate_up_weight_grad_kernel(x_ptr, dgu_ptr, row_ptr, expert_start_ptr, expert_count_ptr, dwg_ptr, dwu_ptr,
                                    D, F, K, PRECISION: tl.constexpr,
                                    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr):
    """[dWg; dWu][e] [2F, D] = Σ_rows [dg, du]ᵀ ⊗ x[token]: one GEMM over the 2F columns of dgu (rows
    f < F land in dWg, the rest in dWu), so each program holds a single accumulator.
    Expert-major programs, as in the down-weight gradient."""
    n_f, n_d = tl.cdiv(2 * F, BLOCK_F), tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    e = (pid // (n_f * n_d)).to(tl.int64)
    f_F = (pid % (n_f * n_d)) // n_d * BLOCK_F + tl.arange(0, BLOCK_F)  # over [0, 2F)
    d_D = (pid % n_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(expert_start_ptr + e)
    count = tl.load(expert_count_ptr + e)
    acc_FD = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    for a0 in range(0, count, BLOCK_A):
        j_A = a0 + tl.arange(0, BLOCK_A)
        valid_A = j_A < count
        p_A = (start + j_A).to(tl.int64)
        row_A = tl.load(row_ptr + p_A, mask=valid_A, other=0).to(tl.int64)
        x_AD = tl.load(x_ptr + (row_A // K)[:, None] * D + d_D[None, :],
                       mask=valid_A[:, None] & (d_D[None, :] < D), other=0.0)
        dgu_AF = tl.load(dgu_ptr + p_A[:, None] * (2 * F) + f_F[None, :],
                         mask=valid_A[:, None] & (f_F[None, :] < 2 * F), other=0.0)
        acc_FD = tl.dot(tl.trans(dgu_AF), x_AD, acc_FD, input_precision=PRECISION)
    is_g_F = f_F < F
    out_F = tl.where(is_g_F, dwg_ptr + e * F * D + f_F * D, dwu_ptr + e * F * D + (f_F - F) * D)
    tl.store(out_F[:, None] + d_D[None, :], acc_FD.to(dwg_ptr.dtype.element_ty),
             mask=(f_F[:, None] < 2 * F) & (d_D[None, :] < D))


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
    hidden_grad: Tile  # dout @ Wd + SwiGLU backward, over F
    input_grad: Tile  # [dg, du] @ [Wg; Wu], over D
    down_wgrad: Tile  # dWd [D, F] per expert (m over D, n over F, k over rows)
    gate_up_wgrad: Tile  # [dWg; dWu] [2F, D] per expert (m over 2F, n over D, k over rows)

    def fit(self, D: int, F: int) -> MoETiles:
        """Narrow the column tiles to small dimensions (power-of-two tiles, at least 16)."""
        def clamp(t: Tile, m_dim: int | None, n_dim: int) -> Tile:
            m = t.m if m_dim is None else min(t.m, max(16, next_pow2(m_dim)))
            return replace(t, m=m, n=min(t.n, max(16, next_pow2(n_dim))))

        return replace(self, gate_up=clamp(self.gate_up, None, F), down=clamp(self.down, None, D),
                       hidden_grad=clamp(self.hidden_grad, None, F), input_grad=clamp(self.input_grad, None, D),
                       down_wgrad=clamp(self.down_wgrad, D, F), gate_up_wgrad=clamp(self.gate_up_wgrad, 2 * F, D))


def default_tiles(D: int, F: int, dtype: torch.dtype) -> MoETiles:
    """Tiles per backend and dtype. The 16-bit GPU tiles were picked by a sweep on an H100 at
    V2-Lite shapes (benchmarks/README.md, Kernels); fp32 keeps small tiles (4-byte operands)."""
    if interpreting():  # one program at a time: the biggest tiles that stay cheap in numpy
        t = Tile(32, 128, 128, 4, 1)
        tiles = MoETiles(32, 8, t, t, t, t, Tile(128, 128, 64, 4, 1), Tile(128, 128, 64, 4, 1))
    elif dtype == torch.float32:
        t = Tile(64, 64, 32, 4, 2)
        tiles = MoETiles(64, 8, t, t, t, t, Tile(64, 64, 32, 4, 2), Tile(64, 64, 32, 4, 2))
    else:
        tiles = _TUNED_16BIT
    return tiles.fit(D, F)


_TUNED_16BIT = MoETiles(
    block_m=128, group_m=8,
    gate_up=Tile(128, 128, 64, 8, 4), down=Tile(128, 128, 64, 8, 4),
    hidden_grad=Tile(128, 64, 64, 8, 4), input_grad=Tile(128, 128, 64, 8, 3),
    down_wgrad=Tile(128, 128, 32, 8, 5), gate_up_wgrad=Tile(128, 128, 32, 8, 5))


@triton.jit
def _moe_route_count_kernel(expert_ptr, keep_ptr, count_ptr, pad_start_ptr, block_expert_ptr, A, E, n_mb,
                            HAS_KEEP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_MB: tl.constexpr):
    """One program: per-expert counts (dropped assignments go to bin E), each expert's first padded row,
    and the expert of every row block (−1 past the last expert's run)."""
    counts_E = tl.zeros([BLOCK_E], dtype=tl.int32)
    for a0 in range(0, A, BLOCK_A):
        a_A = a0 + tl.arange(0, BLOCK_A)
        e_A = tl.load(expert_ptr + a_A, mask=a_A < A, other=E).to(tl.int32)
        if HAS_KEEP:
            e_A = tl.where(tl.load(keep_ptr + a_A, mask=a_A < A, other=0) != 0, e_A, E)
        counts_E += tl.histogram(e_A, BLOCK_E)
    e_E = tl.arange(0, BLOCK_E)
    counts_E = tl.where(e_E < E, counts_E, 0)
    padded_E = (counts_E + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end_E = tl.cumsum(padded_E, 0)
    tl.store(count_ptr + e_E, counts_E, mask=e_E < E)
    tl.store(pad_start_ptr + e_E, pad_end_E - padded_E, mask=e_E < E)
    for j0 in range(0, n_mb, BLOCK_MB):
        j_J = j0 + tl.arange(0, BLOCK_MB)
        # searchsorted(pad_end, j·BLOCK_M, right=True): the experts whose run ends at or before the block
        ended_JE = (pad_end_E[None, :] <= (j_J * BLOCK_M)[:, None]) & (e_E[None, :] < E)
        expert_J = tl.sum(ended_JE.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + j_J, tl.where(expert_J < E, expert_J, -1), mask=j_J < n_mb)


@triton.jit
def _moe_route_scatter_kernel(expert_ptr, keep_ptr, count_ptr, pad_start_ptr, row_ptr, A, E, P,
                              HAS_KEEP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program e < E: write the assignment index of each of expert e's rows in assignment order (a stable
    sort by expert), then −1 over its padding. Program E: −1 over the rows past the last run."""
    e = tl.program_id(0)
    if e < E:
        pad_start = tl.load(pad_start_ptr + e)
        count = tl.load(count_ptr + e)
        base = pad_start
        for a0 in range(0, A, BLOCK_A):
            a_A = a0 + tl.arange(0, BLOCK_A)
            e_A = tl.load(expert_ptr + a_A, mask=a_A < A, other=-1).to(tl.int32)
            if HAS_KEEP:
                e_A = tl.where(tl.load(keep_ptr + a_A, mask=a_A < A, other=0) != 0, e_A, -1)
            hit_A = (e_A == e).to(tl.int32)
            tl.store(row_ptr + base + tl.cumsum(hit_A, 0) - 1, a_A, mask=hit_A != 0)
            base += tl.sum(hit_A, axis=0)
        r_M = count + tl.arange(0, BLOCK_M)
        tl.store(row_ptr + pad_start + r_M, tl.full([BLOCK_M], -1, tl.int32),
                 mask=r_M < (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        last_count = tl.load(count_ptr + E - 1)
        total = tl.load(pad_start_ptr + E - 1) + (last_count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        for r0 in range(total, P, BLOCK_A):
            r_A = r0 + tl.arange(0, BLOCK_A)
            tl.store(row_ptr + r_A, tl.full([BLOCK_A], -1, tl.int32), mask=r_A < P)


def route_metadata(expert_ids_NK: torch.Tensor, keep_NK: torch.Tensor | None, num_experts: int, block_m: int):
    """Sort assignments by expert, each expert's run padded to a multiple of block_m: two launches, no
    host sync (`_moe_route_count_kernel`, `_moe_route_scatter_kernel`).

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
    row_P = torch.empty(P, dtype=torch.int32, device=device)
    block_expert_Mb = torch.empty(n_mb, dtype=torch.int32, device=device)
    count_E = torch.empty(E, dtype=torch.int32, device=device)
    pad_start_E = torch.empty(E, dtype=torch.int32, device=device)
    BLOCK_A = 1024 if interpreting() else 2048
    _moe_route_count_kernel[(1,)](expert_A, keep_A, count_E, pad_start_E, block_expert_Mb, A, E, n_mb,
                                  HAS_KEEP=keep_NK is not None, BLOCK_A=BLOCK_A, BLOCK_E=next_pow2(E + 1),
                                  BLOCK_M=block_m, BLOCK_MB=64, num_warps=4)
    _moe_route_scatter_kernel[(E + 1,)](expert_A, keep_A, count_E, pad_start_E, row_P, A, E, P,
                                        HAS_KEEP=keep_NK is not None, BLOCK_A=BLOCK_A, BLOCK_M=block_m,
                                        num_warps=4)
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
    grid_f = triton.cdiv(F, tiles.hidden_grad.n)
    dgu_P2F = torch.empty_like(gu_P2F)
    hw_PF = torch.empty(P, F, dtype=x_ND.dtype, device=x_ND.device)
    dw_part_PB = torch.zeros(P, grid_f, dtype=torch.float32, device=x_ND.device)
    dwg_EFD, dwu_EFD = torch.empty_like(w_gate_EFD), torch.empty_like(w_up_EFD)
    dwd_EDF = torch.empty_like(w_down_EDF)
    dxa_AD = torch.empty(N * K, D, dtype=x_ND.dtype, device=x_ND.device)
    if n_mb and N:
        t = tiles.hidden_grad
        _launch(_moe_hidden_grad_kernel, t, n_mb * grid_f,
                dout_ND, w_down_EDF, gu_P2F, weights_A, row_P, block_expert_Mb, dgu_P2F, hw_PF, dw_part_PB,
                n_mb, D, F, K, PRECISION=prec, EVEN_K=D % t.k == 0, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k,
                GROUP_M=GM)
    else:
        hw_PF.zero_()
        dgu_P2F.zero_()
    t = tiles.down_wgrad
    _launch(_moe_down_weight_grad_kernel, t, E * triton.cdiv(D, t.m) * triton.cdiv(F, t.n),
            dout_ND, hw_PF, row_P, pad_start_E, count_E, dwd_EDF, D, F, K, PRECISION=prec,
            BLOCK_D=t.m, BLOCK_F=t.n, BLOCK_A=t.k)
    t = tiles.gate_up_wgrad
    _launch(_moe_gate_up_weight_grad_kernel, t, E * triton.cdiv(2 * F, t.m) * triton.cdiv(D, t.n),
            x_ND, dgu_P2F, row_P, pad_start_E, count_E, dwg_EFD, dwu_EFD, D, F, K, PRECISION=prec,
            BLOCK_F=t.m, BLOCK_D=t.n, BLOCK_A=t.k)
    if n_mb and N:
        t = tiles.input_grad
        _launch(_moe_input_grad_kernel, t, n_mb * triton.cdiv(D, t.n),
                dgu_P2F, w_gate_EFD, w_up_EFD, row_P, block_expert_Mb, dxa_AD, n_mb, D, F, PRECISION=prec,
                EVEN_K=F % t.k == 0, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)
    dx_ND = _combine(dxa_AD, None, keep_A, N, K, x_ND.dtype)
    # Gate-weight gradient: sum the per-F-block partials, then scatter padded rows back to assignments.
    dweights_A = torch.zeros(N * K + 1, dtype=torch.float32, device=x_ND.device)
    dweights_A[torch.where(row_P >= 0, row_P.long(), N * K)] = dw_part_PB.sum(1)
    return dx_ND, dwg_EFD, dwu_EFD, dwd_EDF, dweights_A[: N * K]


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
