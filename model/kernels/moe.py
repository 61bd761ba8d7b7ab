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
Backward (dy_a = w_a · dout_{token(a)} is formed on load, never stored):
  `_moe_down_weight_grad_kernel`  dWd[e] = Σ_a dy_aᵀ h_a          (h recomputed from g, u)
  `_moe_hidden_grad_kernel`       dh = w·(dout @ Wd[e]); dg, du by the SwiGLU derivative;
                                  dw_a = Σ_f (dout @ Wd[e])_f · h_f  (gate-weight gradient, per F block)
  `_moe_gate_up_weight_grad_kernel` dWg[e] = Σ_a dg_aᵀ x_a, dWu[e] = Σ_a du_aᵀ x_a
  `_moe_input_grad_kernel`        dx_a = dg_a @ Wg[e] + du_a @ Wu[e], then the combine kernel sums
                                  each token's K rows (no weights) into dx [N, D].
Empty experts cost one early-exiting program per block; no Python loop over experts anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_inputs, dot_precision, interpreting, next_pow2


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _moe_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, row_ptr, block_expert_ptr, h_ptr, gu_ptr, D, F, K,
                        STORE_GU: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    token_M = tl.where(row_M >= 0, row_M // K, 0)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_K = tl.arange(0, BLOCK_K)
    acc_g_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = e * F * D
    for d0 in range(0, D, BLOCK_K):
        dk_K = d0 + d_K
        x_MK = tl.load(x_ptr + token_M[:, None] * D + dk_K[None, :],
                       mask=(row_M[:, None] >= 0) & (dk_K[None, :] < D), other=0.0)
        w_mask_KN = (dk_K[:, None] < D) & (f_N[None, :] < F)
        w_offs_KN = w_base + f_N[None, :] * D + dk_K[:, None]
        wg_KN = tl.load(wg_ptr + w_offs_KN, mask=w_mask_KN, other=0.0)
        wu_KN = tl.load(wu_ptr + w_offs_KN, mask=w_mask_KN, other=0.0)
        acc_g_MN = tl.dot(x_MK, wg_KN, acc_g_MN, input_precision=PRECISION)
        acc_u_MN = tl.dot(x_MK, wu_KN, acc_u_MN, input_precision=PRECISION)
    # Round the GEMM outputs to the activation dtype first, as the reference's bmm does.
    g_MN = acc_g_MN.to(h_ptr.dtype.element_ty)
    u_MN = acc_u_MN.to(h_ptr.dtype.element_ty)
    g32_MN = g_MN.to(tl.float32)
    h_MN = g32_MN * tl.sigmoid(g32_MN) * u_MN.to(tl.float32)
    out_mask_MN = f_N[None, :] < F
    tl.store(h_ptr + p_M[:, None].to(tl.int64) * F + f_N[None, :], h_MN.to(h_ptr.dtype.element_ty), mask=out_mask_MN)
    if STORE_GU:
        gu_offs_MN = p_M[:, None].to(tl.int64) * (2 * F) + f_N[None, :]
        tl.store(gu_ptr + gu_offs_MN, g_MN, mask=out_mask_MN)
        tl.store(gu_ptr + gu_offs_MN + F, u_MN, mask=out_mask_MN)


@triton.jit
def _moe_down_kernel(h_ptr, wd_ptr, row_ptr, block_expert_ptr, y_ptr, D, F, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    d_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_K = tl.arange(0, BLOCK_K)
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_K):
        fk_K = f0 + f_K
        h_MK = tl.load(h_ptr + p_M[:, None] * F + fk_K[None, :], mask=fk_K[None, :] < F, other=0.0)
        wd_KN = tl.load(wd_ptr + e * D * F + d_N[None, :] * F + fk_K[:, None],
                        mask=(fk_K[:, None] < F) & (d_N[None, :] < D), other=0.0)
        acc_MN = tl.dot(h_MK, wd_KN, acc_MN, input_precision=PRECISION)
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
def _moe_hidden_grad_kernel(dout_ptr, wd_ptr, gu_ptr, w_ptr, row_ptr, block_expert_ptr, dgu_ptr, dw_part_ptr,
                            D, F, K, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    valid_M = row_M >= 0
    token_M = tl.where(valid_M, row_M // K, 0)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_K = tl.arange(0, BLOCK_K)
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # (dout @ Wd[e]), unweighted
    for d0 in range(0, D, BLOCK_K):
        dk_K = d0 + d_K
        dout_MK = tl.load(dout_ptr + token_M[:, None] * D + dk_K[None, :],
                          mask=valid_M[:, None] & (dk_K[None, :] < D), other=0.0)
        wd_KN = tl.load(wd_ptr + e * D * F + dk_K[:, None] * F + f_N[None, :],
                        mask=(dk_K[:, None] < D) & (f_N[None, :] < F), other=0.0)
        acc_MN = tl.dot(dout_MK, wd_KN, acc_MN, input_precision=PRECISION)
    mask_MN = valid_M[:, None] & (f_N[None, :] < F)
    gu_offs_MN = p_M[:, None] * (2 * F) + f_N[None, :]
    g_MN = tl.load(gu_ptr + gu_offs_MN, mask=mask_MN, other=0.0).to(tl.float32)
    u_MN = tl.load(gu_ptr + gu_offs_MN + F, mask=mask_MN, other=0.0).to(tl.float32)
    w_M = tl.load(w_ptr + row_M, mask=valid_M, other=0.0).to(tl.float32)
    sig_MN = tl.sigmoid(g_MN)
    silu_MN = g_MN * sig_MN
    h_MN = (silu_MN * u_MN).to(dgu_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_part_ptr + p_M * tl.num_programs(1) + pid_n, tl.sum(acc_MN * h_MN, axis=1))
    dh_MN = acc_MN * w_M[:, None]
    dg_MN = dh_MN * u_MN * sig_MN * (1.0 + g_MN * (1.0 - sig_MN))
    du_MN = dh_MN * silu_MN
    # Padding rows get zeros (not left unwritten): the input-gradient GEMM reads whole row blocks.
    tl.store(dgu_ptr + gu_offs_MN, dg_MN.to(dgu_ptr.dtype.element_ty), mask=f_N[None, :] < F)
    tl.store(dgu_ptr + gu_offs_MN + F, du_MN.to(dgu_ptr.dtype.element_ty), mask=f_N[None, :] < F)


@triton.jit
def _moe_down_weight_grad_kernel(dout_ptr, gu_ptr, w_ptr, row_ptr, expert_start_ptr, expert_count_ptr, dwd_ptr,
                                 D, F, K, PRECISION: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_A: tl.constexpr):
    """dWd[e] [D, F] = Σ over the expert's rows of (w · dout[token])ᵀ ⊗ h."""
    e = tl.program_id(0).to(tl.int64)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    f_F = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    start = tl.load(expert_start_ptr + e)
    count = tl.load(expert_count_ptr + e)
    acc_DF = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
    for a0 in range(0, count, BLOCK_A):
        j_A = a0 + tl.arange(0, BLOCK_A)
        valid_A = j_A < count
        p_A = (start + j_A).to(tl.int64)
        row_A = tl.load(row_ptr + p_A, mask=valid_A, other=0).to(tl.int64)
        w_A = tl.load(w_ptr + row_A, mask=valid_A, other=0.0).to(tl.float32)
        dout_AD = tl.load(dout_ptr + (row_A // K)[:, None] * D + d_D[None, :],
                          mask=valid_A[:, None] & (d_D[None, :] < D), other=0.0).to(tl.float32)
        dy_AD = (dout_AD * w_A[:, None]).to(dwd_ptr.dtype.element_ty)
        gu_mask_AF = valid_A[:, None] & (f_F[None, :] < F)
        gu_offs_AF = p_A[:, None] * (2 * F) + f_F[None, :]
        g_AF = tl.load(gu_ptr + gu_offs_AF, mask=gu_mask_AF, other=0.0).to(tl.float32)
        u_AF = tl.load(gu_ptr + gu_offs_AF + F, mask=gu_mask_AF, other=0.0).to(tl.float32)
        h_AF = (g_AF * tl.sigmoid(g_AF) * u_AF).to(dwd_ptr.dtype.element_ty)
        acc_DF = tl.dot(tl.trans(dy_AD), h_AF, acc_DF, input_precision=PRECISION)
    tl.store(dwd_ptr + e * D * F + d_D[:, None] * F + f_F[None, :], acc_DF.to(dwd_ptr.dtype.element_ty),
             mask=(d_D[:, None] < D) & (f_F[None, :] < F))


@triton.jit
def _moe_gate_up_weight_grad_kernel(x_ptr, dgu_ptr, row_ptr, expert_start_ptr, expert_count_ptr, dwg_ptr, dwu_ptr,
                                    D, F, K, PRECISION: tl.constexpr,
                                    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr):
    """dWg[e] [F, D] = Σ_rows dgᵀ ⊗ x[token];  dWu[e] likewise with du."""
    e = tl.program_id(0).to(tl.int64)
    f_F = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    d_D = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(expert_start_ptr + e)
    count = tl.load(expert_count_ptr + e)
    acc_g_FD = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    acc_u_FD = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    for a0 in range(0, count, BLOCK_A):
        j_A = a0 + tl.arange(0, BLOCK_A)
        valid_A = j_A < count
        p_A = (start + j_A).to(tl.int64)
        row_A = tl.load(row_ptr + p_A, mask=valid_A, other=0).to(tl.int64)
        x_AD = tl.load(x_ptr + (row_A // K)[:, None] * D + d_D[None, :],
                       mask=valid_A[:, None] & (d_D[None, :] < D), other=0.0)
        gu_mask_AF = valid_A[:, None] & (f_F[None, :] < F)
        gu_offs_AF = p_A[:, None] * (2 * F) + f_F[None, :]
        dg_AF = tl.load(dgu_ptr + gu_offs_AF, mask=gu_mask_AF, other=0.0)
        du_AF = tl.load(dgu_ptr + gu_offs_AF + F, mask=gu_mask_AF, other=0.0)
        acc_g_FD = tl.dot(tl.trans(dg_AF), x_AD, acc_g_FD, input_precision=PRECISION)
        acc_u_FD = tl.dot(tl.trans(du_AF), x_AD, acc_u_FD, input_precision=PRECISION)
    offs_FD = e * F * D + f_F[:, None] * D + d_D[None, :]
    mask_FD = (f_F[:, None] < F) & (d_D[None, :] < D)
    tl.store(dwg_ptr + offs_FD, acc_g_FD.to(dwg_ptr.dtype.element_ty), mask=mask_FD)
    tl.store(dwu_ptr + offs_FD, acc_u_FD.to(dwu_ptr.dtype.element_ty), mask=mask_FD)


@triton.jit
def _moe_input_grad_kernel(dgu_ptr, wg_ptr, wu_ptr, row_ptr, block_expert_ptr, dxa_ptr, D, F,
                           PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx_a [A, D] = dg_a @ Wg[e] + du_a @ Wu[e], stored in assignment order."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    p_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    d_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_K = tl.arange(0, BLOCK_K)
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_K):
        fk_K = f0 + f_K
        gu_offs_MK = p_M[:, None] * (2 * F) + fk_K[None, :]
        dg_MK = tl.load(dgu_ptr + gu_offs_MK, mask=fk_K[None, :] < F, other=0.0)
        du_MK = tl.load(dgu_ptr + gu_offs_MK + F, mask=fk_K[None, :] < F, other=0.0)
        w_offs_KN = e * F * D + fk_K[:, None] * D + d_N[None, :]
        w_mask_KN = (fk_K[:, None] < F) & (d_N[None, :] < D)
        acc_MN = tl.dot(dg_MK, tl.load(wg_ptr + w_offs_KN, mask=w_mask_KN, other=0.0), acc_MN,
                        input_precision=PRECISION)
        acc_MN = tl.dot(du_MK, tl.load(wu_ptr + w_offs_KN, mask=w_mask_KN, other=0.0), acc_MN,
                        input_precision=PRECISION)
    tl.store(dxa_ptr + row_M[:, None] * D + d_N[None, :], acc_MN.to(dxa_ptr.dtype.element_ty),
             mask=(row_M[:, None] >= 0) & (d_N[None, :] < D))


# ------------------------------------------------------------------------------------ host functions
class _Blocks:
    """Tile sizes. BLOCK_M fixes the per-expert row padding, so it is shared by every launch."""

    def __init__(self, D: int, F: int, dtype: torch.dtype):
        if interpreting():  # one program at a time: the biggest tiles that stay cheap in numpy
            self.M, self.N, self.K, self.A = 32, min(128, next_pow2(max(F, 16))), 128, 64
            self.warps, self.stages = 4, 1
        else:
            big = dtype != torch.float32
            self.M, self.N, self.K, self.A = 64, 128, 64 if big else 32, 64 if big else 32
            self.warps, self.stages = 8 if big else 4, 4 if big else 2
        self.N_D = min(self.N, max(16, next_pow2(D)))
        self.N_F = min(self.N, max(16, next_pow2(F)))


def route_metadata(expert_ids_NK: torch.Tensor, keep_NK: torch.Tensor | None, num_experts: int, block_m: int):
    """Sort assignments by expert, each expert's run padded to a multiple of block_m (no host sync).

    Returns row_P [P] int32 (assignment index n·K + k of each padded row, −1 for padding),
    block_expert_Mb [P/block_m] int32 (the expert of each row block, −1 for unused blocks),
    pad_start_E, count_E [E] int32 (each expert's first padded row and its number of rows),
    keep_A [A] int8.
    """
    N, K = expert_ids_NK.shape
    A, E, device = N * K, num_experts, expert_ids_NK.device
    expert_A = expert_ids_NK.reshape(-1).long()
    keep_A = keep_NK.reshape(-1) if keep_NK is not None else torch.ones(A, dtype=torch.bool, device=device)
    expert_A = torch.where(keep_A, expert_A, E)  # dropped assignments sort last, into no expert
    order_A = torch.argsort(expert_A, stable=True)
    expert_sorted_A = expert_A[order_A]
    count_E = torch.bincount(expert_A, minlength=E + 1)[:E]
    padded_E = (count_E + block_m - 1) // block_m * block_m
    pad_end_E = torch.cumsum(padded_E, 0)
    pad_start_E = pad_end_E - padded_E
    start_E = torch.cumsum(count_E, 0) - count_E
    P = triton.cdiv(A + E * (block_m - 1), block_m) * block_m  # bound on Σ padded counts
    kept_A = expert_sorted_A < E
    e_A = expert_sorted_A.clamp(max=E - 1)
    pos_A = torch.where(kept_A, pad_start_E[e_A] + torch.arange(A, device=device) - start_E[e_A], P)
    row_P = torch.full((P + 1,), -1, dtype=torch.int32, device=device)
    row_P[pos_A] = order_A.to(torch.int32)
    row_P = row_P[:P]
    block_start_Mb = torch.arange(0, P, block_m, device=device)
    block_expert_Mb = torch.searchsorted(pad_end_E, block_start_Mb, right=True)
    block_expert_Mb = torch.where(block_expert_Mb < E, block_expert_Mb, -1).to(torch.int32)
    return row_P, block_expert_Mb, pad_start_E.to(torch.int32), count_E.to(torch.int32), keep_A.to(torch.int8)


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


def moe_experts_fwd(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK=None,
                    save_for_backward: bool = False):
    """Host forward. Returns out [N, D] and, when `save_for_backward`, the tensors backward needs."""
    _check(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, expert_ids_NK, weights_NK, keep_NK)
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    K = expert_ids_NK.shape[1]
    x_ND = x_ND.contiguous()
    blk = _Blocks(D, F, x_ND.dtype)
    row_P, block_expert_Mb, pad_start_E, count_E, keep_A = route_metadata(expert_ids_NK, keep_NK, E, blk.M)
    P = row_P.numel()
    weights_A = weights_NK.reshape(-1).float().contiguous()
    h_PF = torch.empty(P, F, dtype=x_ND.dtype, device=x_ND.device)
    gu_P2F = torch.empty(P, 2 * F, dtype=x_ND.dtype, device=x_ND.device) if save_for_backward else h_PF
    y_AD = torch.empty(N * K, D, dtype=x_ND.dtype, device=x_ND.device)
    prec = dot_precision(x_ND.dtype)
    n_mb = P // blk.M
    if n_mb and N:
        _moe_gate_up_kernel[(n_mb, triton.cdiv(F, blk.N_F))](
            x_ND, w_gate_EFD, w_up_EFD, row_P, block_expert_Mb, h_PF, gu_P2F, D, F, K,
            STORE_GU=save_for_backward, PRECISION=prec, BLOCK_M=blk.M, BLOCK_N=blk.N_F, BLOCK_K=blk.K,
            num_warps=blk.warps, num_stages=blk.stages)
        _moe_down_kernel[(n_mb, triton.cdiv(D, blk.N_D))](
            h_PF, w_down_EDF, row_P, block_expert_Mb, y_AD, D, F, PRECISION=prec,
            BLOCK_M=blk.M, BLOCK_N=blk.N_D, BLOCK_K=blk.K, num_warps=blk.warps, num_stages=blk.stages)
    out_ND = _combine(y_AD, weights_A, keep_A, N, K, x_ND.dtype)
    saved = (row_P, block_expert_Mb, pad_start_E, count_E, keep_A, weights_A, gu_P2F) if save_for_backward else None
    return out_ND, saved


def moe_experts_bwd(dout_ND, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, K, saved):
    """Host backward: (dx [N, D], dWg, dWu, dWd, dweights_A [A] fp32)."""
    row_P, block_expert_Mb, pad_start_E, count_E, keep_A, weights_A, gu_P2F = saved
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    P = row_P.numel()
    blk = _Blocks(D, F, x_ND.dtype)
    prec = dot_precision(x_ND.dtype)
    dout_ND = dout_ND.contiguous()
    n_mb = P // blk.M
    grid_f = triton.cdiv(F, blk.N_F)
    dgu_P2F = torch.empty_like(gu_P2F)
    dw_part_PB = torch.zeros(P, grid_f, dtype=torch.float32, device=x_ND.device)
    dwg_EFD, dwu_EFD = torch.empty_like(w_gate_EFD), torch.empty_like(w_up_EFD)
    dwd_EDF = torch.empty_like(w_down_EDF)
    dxa_AD = torch.empty(N * K, D, dtype=x_ND.dtype, device=x_ND.device)
    common = dict(PRECISION=prec, num_warps=blk.warps, num_stages=blk.stages)
    _moe_down_weight_grad_kernel[(E, triton.cdiv(D, blk.N_D), grid_f)](
        dout_ND, gu_P2F, weights_A, row_P, pad_start_E, count_E, dwd_EDF, D, F, K,
        BLOCK_D=blk.N_D, BLOCK_F=blk.N_F, BLOCK_A=blk.A, **common)
    if n_mb and N:
        _moe_hidden_grad_kernel[(n_mb, grid_f)](
            dout_ND, w_down_EDF, gu_P2F, weights_A, row_P, block_expert_Mb, dgu_P2F, dw_part_PB, D, F, K,
            BLOCK_M=blk.M, BLOCK_N=blk.N_F, BLOCK_K=blk.K, **common)
    _moe_gate_up_weight_grad_kernel[(E, grid_f, triton.cdiv(D, blk.N_D))](
        x_ND, dgu_P2F, row_P, pad_start_E, count_E, dwg_EFD, dwu_EFD, D, F, K,
        BLOCK_F=blk.N_F, BLOCK_D=blk.N_D, BLOCK_A=blk.A, **common)
    if n_mb and N:
        _moe_input_grad_kernel[(n_mb, triton.cdiv(D, blk.N_D))](
            dgu_P2F, w_gate_EFD, w_up_EFD, row_P, block_expert_Mb, dxa_AD, D, F,
            BLOCK_M=blk.M, BLOCK_N=blk.N_D, BLOCK_K=blk.K, **common)
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
