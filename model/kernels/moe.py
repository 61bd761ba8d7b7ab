"""Fused routed experts (DeepSeekMoE) forward/backward in Triton: grouped GEMMs over sorted tokens.

Shape legend: N tokens, D hidden, K experts per token, A = N·K assignments (token, expert),
E experts, F expert intermediate size, P padded sorted rows (each expert's rows padded to BLOCK_M / 2),
Mb row-block slots (each expert's run cut into BLOCK_M-row blocks, the last one BLOCK_M / 2 rows when
that covers it: the row-block GEMMs run that block with half-height tiles).

Formula (per token n, the same as `RoutedExperts.forward`, the reference):
    out_n = Σ_k keep_nk · w_nk · Wd[e_nk] · (silu(Wg[e_nk]·x_n) ⊙ (Wu[e_nk]·x_n))
with Wg, Wu [E, F, D], Wd [E, D, F], w [N, K] fp32 gate weights, keep [N, K] the capacity mask
(all True when dropless; a dropped assignment contributes nothing and gets no gradient).

Forward, three launches after a metadata step that sorts assignments by expert without a host sync
(`route_metadata`: per-chunk histograms, offsets, a parallel stable scatter beside the row-block table):
  1. `_moe_gate_up_kernel`: per (row block of one expert, F block) gather x rows by token (the
     permutation is fused into the load), two GEMMs sharing the x tile, SwiGLU in registers;
     writes h [P, F] and (training) the pre-activations g, u as planes gu [2, P, F]. On a Hopper GPU with
     `MoETiles.hopper_gate_up`, x gathered into padded-row order first (`_gather_rows`, x alone) and
     moe_hopper/gate_up_proj.py's Gluon kernel instead (TMA tiles of x_PD, g and u from one wgmma: same h, g, u
     to the bit; at N=4096 0.47 ms + 0.05 for the gather against 0.58 in the step)
  2. `_moe_down_kernel`: h @ Wd[e]ᵀ, rows scattered back to assignment order y [A, D]; on a Hopper GPU
     moe_hopper/row_gemm.py's Gluon kernel instead (its input-grad kernel with one K segment and the weight tile
     transposed: same result to the bit, ~10-15% less device time in the step)
  3. `_moe_combine_kernel`: out_n = Σ_k keep·w·y (fp32 sum, one rounding): the weighted un-permute.
Backward, no atomics:
  `_moe_gather_rows_kernel`       x and dout in padded-row order [P, D] (zeros on padding rows), one launch
  `_moe_hidden_grad_kernel`       z = dout_p @ Wd[e] [P, F] (unweighted); on a Hopper GPU with under 1024 rows per
                                  expert moe_hopper/hgrad.py's ping-pong Gluon kernel instead (same rows written,
                                  same result to the bit, ~16% faster at 384 rows per expert)
  `_moe_swiglu_bwd_kernel`        dh = w·z → dg, du [2, P, F]; hw = w·h [P, F]; dw_a = Σ_f z_f·h_f
  `_moe_weight_grad_kernel` ×2    dWd[e] = Σ_rows dout_pᵀ (w·h)_p and dWg[e], dWu[e] = Σ_rows dg_pᵀ x_p,
                                  du_pᵀ x_p: GEMMs over each expert's contiguous run of padded rows (w moved
                                  from dy onto h, so both operands go to the tensor cores as loaded); on a
                                  Hopper GPU moe_hopper/wgrad.py's warp-specialized Gluon kernel instead (same
                                  sums, same result to the bit, ~17% faster at V2-Lite shapes)
  `_moe_input_grad_kernel`        dx_a = dg_a @ Wg[e] + du_a @ Wu[e] (on a Hopper GPU moe_hopper/row_gemm.py's
                                  Gluon kernel instead: ~15% faster, the two K segments summed in another order, so
                                  dx differs in the last bits), then the combine kernel sums each token's K rows
                                  (no weights) into dx [N, D].
The Hopper kernels run where `moe_hopper.usable` (sm_90, 16-bit, a tested Triton) and the shapes fit, unless
`MoETiles.hopper` is False; like the rest of the step they need no host sync.
The row-block GEMMs run GROUP_M row blocks over all column tiles at a time (L2 reuse of the rows and
of each expert's weights); the weight-gradient GEMMs are expert-major over the expert's contiguous
row run. Every operand that is a contiguous tile (all but gate_up's gathered x rows and down's h, whose
pointer loads measured faster) is loaded through host-built TMA descriptors (`TensorDescriptor`, 3-D
[E, ·, ·] for the weights so a tile never reads into the next expert); TMA needs 16-byte row strides, so
D and F must be multiples of 8 (2-byte dtypes) or 4 (fp32). Tile sizes: `MoETiles` (per dtype and, for
the 16-bit ones tuned on an H100, per mean rows per expert). Empty experts cost one early-exiting program per
block; no Python loop over experts anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

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
def _row_block(block_ptr, pid_m, n_mb):
    """Row block pid_m of the table block [3, Mb] (`route_metadata`): (expert or −1 for an unused slot,
    first padded row, rows: BLOCK_M, or BLOCK_M / 2 for an expert's last block when that is all its run needs)."""
    return tl.load(block_ptr + pid_m), tl.load(block_ptr + n_mb + pid_m), tl.load(block_ptr + 2 * n_mb + pid_m)


@triton.jit
def _gate_up_tile(x_ptr, wg_ptr, wu_ptr, row_ptr, h_ptr, gu_ptr, e, p0, pid_n, P, D, F, K,
                  STORE_GU: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gate_up's GEMMs and SwiGLU epilogue for rows p0 .. p0 + BLOCK_M of expert e."""
    p_M = (p0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M)
    valid_M = row_M >= 0
    token_M = tl.where(valid_M, row_M // K, 0).to(tl.int64)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_K = tl.arange(0, BLOCK_K)
    x_ptrs_MK = x_ptr + token_M[:, None] * D + d_K[None, :]
    w_offs_KN = e.to(tl.int64) * F * D + f_N[None, :] * D + d_K[:, None]
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
        gu_offs_MN = p_M[:, None] * F + f_N[None, :]
        tl.store(gu_ptr + gu_offs_MN, g_MN, mask=out_mask_MN)
        tl.store(gu_ptr + P * F + gu_offs_MN, u_MN, mask=out_mask_MN)


@triton.jit
def _moe_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, row_ptr, block_ptr, h_ptr, gu_ptr, n_mb, P, D, F, K,
                        STORE_GU: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """h = silu(x Wgᵀ) ⊙ (x Wuᵀ) for one row block of one expert; x rows gathered by token on load (the one
    GEMM with pointer loads: a Hopper TMA load cannot gather rows). g and u go to the planes gu [2, P, F]."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(F, BLOCK_N), GROUP_M)
    e, p0, rows = _row_block(block_ptr, pid_m, n_mb)
    if e < 0:
        return
    if rows == BLOCK_M:
        _gate_up_tile(x_ptr, wg_ptr, wu_ptr, row_ptr, h_ptr, gu_ptr, e, p0, pid_n, P, D, F, K, STORE_GU, PRECISION,
                      EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _gate_up_tile(x_ptr, wg_ptr, wu_ptr, row_ptr, h_ptr, gu_ptr, e, p0, pid_n, P, D, F, K, STORE_GU, PRECISION,
                      EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K)


@triton.jit
def _down_tile(h_ptr, wd_ptr, row_ptr, y_ptr, e, p0, pid_n, D, F, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """down's GEMM for rows p0 .. p0 + BLOCK_M of expert e, rows scattered to their assignments."""
    p_M = (p0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_M = tl.load(row_ptr + p_M).to(tl.int64)
    d_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_K = tl.arange(0, BLOCK_K)
    h_ptrs_MK = h_ptr + p_M[:, None] * F + f_K[None, :]
    wd_ptrs_KN = wd_ptr + e.to(tl.int64) * D * F + d_N[None, :] * F + f_K[:, None]
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
def _moe_down_kernel(h_ptr, wd_ptr, row_ptr, block_ptr, y_ptr, n_mb, D, F,
                     PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y_a = h_p Wd[e]ᵀ, each row scattered to its assignment a (un-permute fused into the store). Pointer
    loads: TMA measured slower here (H100, N = 4096: 313 vs 298 µs)."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(D, BLOCK_N), GROUP_M)
    e, p0, rows = _row_block(block_ptr, pid_m, n_mb)
    if e < 0:
        return
    if rows == BLOCK_M:
        _down_tile(h_ptr, wd_ptr, row_ptr, y_ptr, e, p0, pid_n, D, F, PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _down_tile(h_ptr, wd_ptr, row_ptr, y_ptr, e, p0, pid_n, D, F, PRECISION, EVEN_K, BLOCK_M // 2, BLOCK_N,
                   BLOCK_K)


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
def _moe_gather_rows_kernel(x_ptr, dout_ptr, row_ptr, used_rows_ptr, x_dst_ptr, dout_dst_ptr, D, K,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[p] = src[token of row p] for BLOCK_R padded rows, zeros on padding rows, for src = x
    (program_id(2) = 0) and src = dout (1), one launch: the permuted copies that let the hidden-grad and
    weight-gradient GEMMs stream their operands contiguously (through TMA). Rows past the experts' runs
    (used_rows) are left unwritten."""
    p0 = tl.program_id(0) * BLOCK_R
    used_rows = tl.load(used_rows_ptr)
    if p0 >= used_rows:
        return
    if tl.program_id(2) == 0:
        src_ptr, dst_ptr = x_ptr, x_dst_ptr
    else:
        src_ptr, dst_ptr = dout_ptr, dout_dst_ptr
    p_R = (p0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    in_R = p_R < used_rows
    row_R = tl.load(row_ptr + p_R, mask=in_R, other=-1)
    valid_R = row_R >= 0
    token_R = tl.where(valid_R, row_R // K, 0).to(tl.int64)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    vals_RD = tl.load(src_ptr + token_R[:, None] * D + d_D[None, :], mask=valid_R[:, None] & (d_D[None, :] < D),
                      other=0.0)
    tl.store(dst_ptr + p_R[:, None] * D + d_D[None, :], vals_RD, mask=in_R[:, None] & (d_D[None, :] < D))


@triton.jit
def _moe_hidden_grad_kernel(dout_desc, wd_desc, block_ptr, z_ptr, n_mb, D, F, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """z_p = dout_p @ Wd[e] [P, F] over the permuted dout rows (unweighted; `_moe_swiglu_bwd_kernel`
    applies w and the SwiGLU backward). Operands through TMA: dout_desc [P, D] (block BLOCK_M × BLOCK_K),
    wd_desc [E, D, F] (block 1 × BLOCK_K × BLOCK_N; TMA zero-fills past D and F, so no masks). A half block
    runs the full-height tile, its store masked to its rows: a half-height branch here measured no faster.
    A plain GEMM: the SwiGLU epilogue in this kernel needed ~250 registers per thread, which forced 64-column
    tiles whose operand traffic bound it (ncu: L2-bound at ~200 TFLOP/s on an H100)."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(F, BLOCK_N), GROUP_M)
    e, p0, rows = _row_block(block_ptr, pid_m, n_mb)
    if e < 0:
        return
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dout_MK = dout_desc.load([p0, d0])
        wd_KN = wd_desc.load([e, d0, pid_n * BLOCK_N]).reshape([BLOCK_K, BLOCK_N])
        acc_MN = tl.dot(dout_MK, wd_KN, acc_MN, input_precision=PRECISION)
    r_M = tl.arange(0, BLOCK_M)
    p_M = (p0 + r_M).to(tl.int64)
    f_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(z_ptr + p_M[:, None] * F + f_N[None, :], acc_MN.to(z_ptr.dtype.element_ty),
             mask=(r_M[:, None] < rows) & (f_N[None, :] < F))


@triton.jit
def _moe_swiglu_bwd_kernel(z_ptr, gu_ptr, w_ptr, row_ptr, used_rows_ptr, dgu_ptr, hw_ptr, dw_ptr, P, F,
                           BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """SwiGLU backward for BLOCK_R padded rows: dh = w·z → dg = dh·u·σ'(g)-term, du = dh·silu(g);
    g, u and dg, du are planes [2, P, F]; hw = w·h (the down-weight gradient's operand, so that GEMM needs
    no register-side scaling) and the gate-weight gradient dw_a = Σ_f z_f·h_f, stored at the row's
    assignment. Padding rows get zeros (z, g and u are zero there), which the weight-gradient GEMMs rely on."""
    p0 = tl.program_id(0) * BLOCK_R
    if p0 >= tl.load(used_rows_ptr):  # BLOCK_R divides every run's padded length
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
        gu_offs_RF = p_R[:, None] * F + f_F[None, :]
        g_RF = tl.load(gu_ptr + gu_offs_RF, mask=mask_RF, other=0.0).to(tl.float32)
        u_RF = tl.load(gu_ptr + P * F + gu_offs_RF, mask=mask_RF, other=0.0).to(tl.float32)
        sig_RF = tl.sigmoid(g_RF)
        silu_RF = g_RF * sig_RF
        h_RF = (silu_RF * u_RF).to(dgu_ptr.dtype.element_ty).to(tl.float32)  # h as the forward rounded it
        dw_R += tl.sum(z_RF * h_RF, axis=1)
        dh_RF = z_RF * w_R[:, None]
        tl.store(dgu_ptr + gu_offs_RF, (dh_RF * u_RF * sig_RF * (1.0 + g_RF * (1.0 - sig_RF))).to(dgu_ptr.dtype.element_ty),
                 mask=mask_RF)
        tl.store(dgu_ptr + P * F + gu_offs_RF, (dh_RF * silu_RF).to(dgu_ptr.dtype.element_ty), mask=mask_RF)
        tl.store(hw_ptr + p_R[:, None] * F + f_F[None, :], (h_RF * w_R[:, None]).to(hw_ptr.dtype.element_ty),
                 mask=mask_RF)
    tl.store(dw_ptr + row_R, dw_R, mask=valid_R)


@triton.jit
def _moe_weight_grad_kernel(a_desc, b_desc, expert_start_ptr, expert_count_ptr, c_ptr, G, E, P, DI, DJ,
                            PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_A: tl.constexpr):
    """C[g, e] [DI, DJ] = Σ over expert e's padded rows p of A[g, p]ᵀ ⊗ B[p], with A [G, P, DI] (G planes
    sharing the B operand, read as [G·P, DI]: a step never leaves its expert's run) and B [P, DJ] in
    padded-row order, C [G, E, DI, DJ]:
        dWd:        G = 1, A = dout permuted [1, P, D], B = w·h [P, F]     → C = dWd [1, E, D, F]
        dWg, dWu:   G = 2, A = [dg; du] [2, P, F],   B = x permuted [P, D] → C = [dWg; dWu] [2, E, F, D]
    Operands through TMA (a_desc block BLOCK_A × BLOCK_I, b_desc BLOCK_A × BLOCK_J; zero fill past
    DI / DJ) from contiguous row runs: no per-step index loads, whose latency the short reduction (~A/E rows
    per expert) cannot hide. The last step may run past the expert's rows into its padding rows, which are
    zero in every operand (BLOCK_A divides block_m / 2, the padding multiple), so no row masks. Programs are
    expert-major, so the ones in flight share one expert's rows in L2. (Several column tiles per program,
    persistent or with `tl.range(..., flatten=True)`, gained nothing on an H100 with Triton 3.6.)"""
    n_i, n_j = tl.cdiv(DI, BLOCK_I), tl.cdiv(DJ, BLOCK_J)
    pid = tl.program_id(0)
    e = pid // (G * n_i * n_j)
    g = pid // (n_i * n_j) % G
    i0 = pid % (n_i * n_j) // n_j * BLOCK_I
    j0 = pid % n_j * BLOCK_J
    start = tl.load(expert_start_ptr + e)
    count = tl.load(expert_count_ptr + e)
    acc_IJ = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for r in range(0, count, BLOCK_A):
        a_AI = a_desc.load([g * P + start + r, i0])
        b_AJ = b_desc.load([start + r, j0])
        acc_IJ = tl.dot(tl.trans(a_AI), b_AJ, acc_IJ, input_precision=PRECISION)
    i_I = i0 + tl.arange(0, BLOCK_I)
    j_J = j0 + tl.arange(0, BLOCK_J)
    c_IJ = c_ptr + ((g * E + e).to(tl.int64) * DI + i_I[:, None]) * DJ + j_J[None, :]
    tl.store(c_IJ, acc_IJ.to(c_ptr.dtype.element_ty), mask=(i_I[:, None] < DI) & (j_J[None, :] < DJ))


@triton.jit
def _moe_input_grad_kernel(dgu_desc, wg_desc, wu_desc, row_ptr, block_ptr, dxa_ptr, n_mb, P, D, F,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx_a [A, D] = dg_a @ Wg[e] + du_a @ Wu[e], stored in assignment order. Operands through TMA:
    dgu_desc = the planes [2, P, F] read as [2P, F] (block BLOCK_M × BLOCK_K; a block's rows past its own
    are only computed, never stored), wg_desc / wu_desc [E, F, D] (block 1 × BLOCK_K × BLOCK_N; zero fill
    past F, so no masks). A half block runs the full-height tile, its store masked to its rows: a half-height
    branch made this kernel 40% slower on an H100 (N = 4096: 817 vs 583 µs)."""
    pid_m, pid_n = _row_block_tile(tl.program_id(0), n_mb, tl.cdiv(D, BLOCK_N), GROUP_M)
    e, p0, rows = _row_block(block_ptr, pid_m, n_mb)
    if e < 0:
        return
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_K):
        dg_MK = dgu_desc.load([p0, f0])
        du_MK = dgu_desc.load([P + p0, f0])
        wg_KN = wg_desc.load([e, f0, pid_n * BLOCK_N]).reshape([BLOCK_K, BLOCK_N])
        wu_KN = wu_desc.load([e, f0, pid_n * BLOCK_N]).reshape([BLOCK_K, BLOCK_N])
        acc_MN = tl.dot(dg_MK, wg_KN, acc_MN, input_precision=PRECISION)
        acc_MN = tl.dot(du_MK, wu_KN, acc_MN, input_precision=PRECISION)
    r_M = tl.arange(0, BLOCK_M)
    in_M = r_M < rows
    row_M = tl.load(row_ptr + p0 + r_M, mask=in_M, other=-1).to(tl.int64)
    d_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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

    block_m: int  # rows per row block (an expert's last block may have block_m / 2: the padding multiple)
    group_m: int  # row blocks scheduled together over all column tiles (L2 reuse of rows and weights)
    gate_up: Tile  # x @ [Wg, Wu]ᵀ + SwiGLU, over F
    down: Tile  # h @ Wdᵀ, over D
    hidden_grad: Tile  # z = dout @ Wd, over F
    input_grad: Tile  # [dg, du] @ [Wg; Wu], over D
    down_wgrad: Tile  # dWd [D, F] per expert (m over D, n over F, k over rows: must divide block_m)
    gate_up_wgrad: Tile  # dWg, dWu [F, D] per expert (m over F, n over D, k over rows: divides block_m)
    swiglu_bwd: Tile  # elementwise SwiGLU backward (m rows per program: divides block_m; n columns per step)
    hopper: bool = True  # moe_hopper's Gluon down, hidden-, input- and weight-grad kernels where usable, fitting
    hopper_gate_up: bool = True  # (with hopper) the Gluon gate_up kernel (after an x gather) where it applies

    def fit(self, D: int, F: int) -> MoETiles:
        """Narrow the column tiles to small dimensions (power-of-two tiles, at least 16)."""
        def clamp(t: Tile, m_dim: int | None, n_dim: int) -> Tile:
            m = t.m if m_dim is None else min(t.m, max(16, next_pow2(m_dim)))
            return replace(t, m=m, n=min(t.n, max(16, next_pow2(n_dim))))

        return replace(self, gate_up=clamp(self.gate_up, None, F), down=clamp(self.down, None, D),
                       hidden_grad=clamp(self.hidden_grad, None, F), input_grad=clamp(self.input_grad, None, D),
                       down_wgrad=clamp(self.down_wgrad, D, F), gate_up_wgrad=clamp(self.gate_up_wgrad, F, D),
                       swiglu_bwd=clamp(self.swiglu_bwd, None, F))

    def __post_init__(self):
        half = self.block_m // 2  # every expert's run is padded to a multiple of this
        for name in ("down_wgrad", "gate_up_wgrad"):
            if half % getattr(self, name).k:
                raise ValueError(f"MoETiles.{name}.k must divide block_m / 2 = {half} (the last reduction step "
                                 "may only run into the expert's own zero padding rows)")
        if half % self.swiglu_bwd.m:
            raise ValueError(f"MoETiles.swiglu_bwd.m must divide block_m / 2 = {half}")


def default_tiles(D: int, F: int, dtype: torch.dtype, rows_per_expert: float) -> MoETiles:
    """Tiles per backend, dtype and mean rows per expert (A/E, the weight-gradient GEMMs' reduction length).
    The 16-bit GPU tiles were picked by sweeps on an H100 at V2-Lite shapes (benchmarks/README.md, Kernels);
    fp32 keeps small tiles (4-byte operands). Built once per distinct answer: the forward and the backward of every
    step ask, and building took ~50 µs of host time, which the N=4096 step on an H100 (near host-bound: 2.3-2.9 ms of
    host time against ~2.7 ms on the GPU) cannot spare."""
    return _default_tiles(D, F, dtype, rows_per_expert < _FEW_ROWS, interpreting())


@cache
def _default_tiles(D: int, F: int, dtype: torch.dtype, few_rows: bool, interpret: bool) -> MoETiles:
    if interpret:  # one program at a time: the biggest tiles that stay cheap in numpy
        t = Tile(32, 128, 128, 4, 1)
        tiles = MoETiles(32, 8, t, t, t, t, Tile(128, 128, 16, 4, 1), Tile(128, 128, 16, 4, 1), Tile(16, 128, 0, 4, 1))
    elif dtype == torch.float32:
        t = Tile(64, 64, 32, 4, 2)
        tiles = MoETiles(64, 8, t, t, t, t, Tile(64, 64, 32, 4, 2), Tile(64, 64, 32, 4, 2), Tile(16, 64, 0, 4, 1))
    else:
        tiles = _TUNED_16BIT_FEW_ROWS if few_rows else _TUNED_16BIT
    return tiles.fit(D, F)


_TUNED_16BIT = MoETiles(
    block_m=128, group_m=8,
    gate_up=Tile(128, 128, 64, 8, 4), down=Tile(128, 256, 64, 8, 4),
    hidden_grad=Tile(128, 256, 64, 8, 3), input_grad=Tile(128, 256, 32, 8, 3),
    down_wgrad=Tile(256, 128, 32, 8, 5), gate_up_wgrad=Tile(128, 256, 32, 8, 5),
    swiglu_bwd=Tile(8, 256, 0, 4, 1))
# Few rows per expert (V2-Lite at N = 4096 / 8192 tokens: ~384 / 768): a weight-gradient tile's reduction is
# only 12-24 steps of 32 rows, so its pipeline fill and epilogue store rival the main loop; 128x128 tiles with
# 4 warps and 4 stages (64 KB of shared memory) fit two programs per SM, one storing while the other computes
# (H100, N = 4096: dWd 383 -> 288 us, dWg+dWu 681 -> 577 us against the 256x128 / 128x256 tiles).
_FEW_ROWS = 1024
_TUNED_16BIT_FEW_ROWS = replace(_TUNED_16BIT, hidden_grad=Tile(128, 256, 64, 8, 4),
                                down_wgrad=Tile(128, 128, 32, 4, 4), gate_up_wgrad=Tile(128, 128, 32, 4, 4))


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
def _moe_route_offsets_kernel(hist_ptr, chunk_base_ptr, count_ptr, pad_start_ptr, row_ptr, used_rows_ptr, n_chunks, E,
                              BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, HALF: tl.constexpr):
    """One program: per-expert counts; each expert's run padded to a multiple of HALF and its first padded row;
    the first row of each (chunk, expert) (chunk_base = pad_start[e] + rows of e in earlier chunks: a stable
    sort by expert); row = −1 on each expert's padding rows; the rows in all runs (used_rows)."""
    e_E = tl.arange(0, BLOCK_E)
    counts_E = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, n_chunks, BLOCK_C):
        c_C = c0 + tl.arange(0, BLOCK_C)
        counts_E += tl.sum(tl.load(hist_ptr + c_C[:, None] * E + e_E[None, :],
                                   mask=(c_C[:, None] < n_chunks) & (e_E[None, :] < E), other=0), axis=0)
    padded_E = (counts_E + HALF - 1) // HALF * HALF
    pad_end_E = tl.cumsum(padded_E, 0)
    pad_start_E = pad_end_E - padded_E
    tl.store(count_ptr + e_E, counts_E, mask=e_E < E)
    tl.store(pad_start_ptr + e_E, pad_start_E, mask=e_E < E)
    tl.store(used_rows_ptr, tl.max(pad_end_E, 0))
    pad_row_EH = (pad_start_E + counts_E)[:, None] + tl.arange(0, HALF)[None, :]
    tl.store(row_ptr + pad_row_EH, tl.full([BLOCK_E, HALF], -1, tl.int32),
             mask=(e_E[:, None] < E) & (pad_row_EH < pad_end_E[:, None]))
    base_E = pad_start_E
    for c0 in range(0, n_chunks, BLOCK_C):
        c_C = c0 + tl.arange(0, BLOCK_C)
        mask_CE = (c_C[:, None] < n_chunks) & (e_E[None, :] < E)
        hist_CE = tl.load(hist_ptr + c_C[:, None] * E + e_E[None, :], mask=mask_CE, other=0)
        incl_CE = tl.cumsum(hist_CE, 0)
        tl.store(chunk_base_ptr + c_C[:, None] * E + e_E[None, :], base_E[None, :] + incl_CE - hist_CE, mask=mask_CE)
        base_E += tl.sum(hist_CE, axis=0)


@triton.jit
def _moe_route_scatter_kernel(expert_ptr, keep_ptr, chunk_base_ptr, count_ptr, row_ptr, block_ptr, A, E, n_chunks,
                              n_mb, HAS_KEEP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_MB: tl.constexpr):
    """Program c < n_chunks: row[chunk_base[c, e] + rank] = a for each kept assignment a of chunk c, rank = how many
    earlier assignments of the chunk went to the same expert (one-hot prefix sums over SUB at a time).
    Program n_chunks + j: row-block slots j·BLOCK_MB .. + BLOCK_MB of the table block [3, Mb]: each expert's run
    (count rows padded to a multiple of BLOCK_M/2) cut into BLOCK_M-row blocks, the last one BLOCK_M/2 rows when
    that covers it (the expert of each block, −1 for unused slots; its first row; its row count)."""
    c = tl.program_id(0)
    e_E = tl.arange(0, BLOCK_E)
    if c < n_chunks:
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
    else:
        HALF: tl.constexpr = BLOCK_M // 2
        counts_E = tl.load(count_ptr + e_E, mask=e_E < E, other=0)
        padded_E = (counts_E + HALF - 1) // HALF * HALF
        pad_end_E = tl.cumsum(padded_E, 0)
        pad_start_E = pad_end_E - padded_E
        blocks_E = (padded_E + BLOCK_M - 1) // BLOCK_M
        block_end_E = tl.cumsum(blocks_E, 0)
        block_start_E = block_end_E - blocks_E
        j_J = (c - n_chunks) * BLOCK_MB + tl.arange(0, BLOCK_MB)
        # searchsorted(block_end, j, right=True): the experts whose blocks end at or before block j
        ended_JE = (block_end_E[None, :] <= j_J[:, None]) & (e_E[None, :] < E)
        expert_J = tl.sum(ended_JE.to(tl.int32), axis=1)
        sel_JE = e_E[None, :] == expert_J[:, None]
        first_J = tl.sum(tl.where(sel_JE, pad_start_E[None, :] + (j_J[:, None] - block_start_E[None, :]) * BLOCK_M, 0),
                         axis=1)
        end_J = tl.sum(tl.where(sel_JE, pad_end_E[None, :], 0), axis=1)
        used_J = expert_J < E
        out_J = j_J < n_mb
        tl.store(block_ptr + j_J, tl.where(used_J, expert_J, -1), mask=out_J)
        tl.store(block_ptr + n_mb + j_J, tl.where(used_J, first_J, 0), mask=out_J)
        tl.store(block_ptr + 2 * n_mb + j_J, tl.where(used_J, tl.minimum(end_J - first_J, BLOCK_M), 0), mask=out_J)


def route_metadata(expert_ids_NK: torch.Tensor, keep_NK: torch.Tensor | None, num_experts: int, block_m: int,
                   chunk: int | None = None):
    """Sort assignments by expert (stable), each expert's run padded to a multiple of block_m / 2 and cut
    into row blocks of block_m rows (the last one block_m / 2 rows when that covers the run: at N = 4096
    V2-Lite tokens that halves the padding, 14% of the rows with block_m-multiple runs), without a host sync:
    per-chunk histograms, one small program for the offsets, then one launch whose programs scatter a chunk's
    rows each or fill a slice of the block table.

    Returns row_P [P] int32 (assignment index n·K + k of each padded row, −1 for padding; rows past
    used_rows are left unwritten: no kernel reads them),
    block_3Mb [3, Mb] int32 (per row-block slot: its expert or −1 for an unused slot, its first row, its rows),
    pad_start_E, count_E [E] int32 (each expert's first padded row and its number of rows),
    keep_A [A] int8, used_rows_1 [1] int32 (the rows in all runs).
    chunk: assignments per histogram / scatter program (a power of two; None: picked from A).
    """
    N, K = expert_ids_NK.shape
    A, E, device = N * K, num_experts, expert_ids_NK.device
    expert_A = expert_ids_NK.reshape(-1).contiguous()
    keep_A = (keep_NK.reshape(-1).to(torch.int8) if keep_NK is not None
              else torch.ones(A, dtype=torch.int8, device=device))
    half = block_m // 2
    P = triton.cdiv(A + E * (half - 1), half) * half  # bound on Σ padded counts
    n_mb = A // block_m + E  # bound on Σ ceil(count / block_m)
    # Assignments per histogram / scatter program (a power of two): ~200 chunks, 256-1024 assignments each. H100,
    # V2-Lite top-6 of 64, all routing kernels: N = 4096 36 -> 15 us (1024 -> 256: the scatter's 24 programs ran
    # 8 steps each), N = 16384 57 -> 28 us (512; 256 doubles the offsets program's serial scan over chunks).
    CHUNK = chunk or min(1024, max(256, next_pow2(triton.cdiv(A, 192))))
    n_chunks = max(triton.cdiv(A, CHUNK), 1)
    BLOCK_E = next_pow2(E + 1)  # + the bin of dropped assignments
    BLOCK_MB = 64
    row_P = torch.empty(P, dtype=torch.int32, device=device)
    block_3Mb = torch.empty(3, n_mb, dtype=torch.int32, device=device)
    count_E = torch.empty(E, dtype=torch.int32, device=device)
    pad_start_E = torch.empty(E, dtype=torch.int32, device=device)
    used_rows_1 = torch.empty(1, dtype=torch.int32, device=device)
    hist_CE = torch.empty(n_chunks, E, dtype=torch.int32, device=device)
    chunk_base_CE = torch.empty(n_chunks, E, dtype=torch.int32, device=device)
    has_keep = keep_NK is not None
    _moe_route_hist_kernel[(n_chunks,)](expert_A, keep_A, hist_CE, A, E, HAS_KEEP=has_keep, CHUNK=CHUNK,
                                        BLOCK_E=BLOCK_E, num_warps=4)
    _moe_route_offsets_kernel[(1,)](hist_CE, chunk_base_CE, count_E, pad_start_E, row_P, used_rows_1, n_chunks, E,
                                    BLOCK_C=32, BLOCK_E=BLOCK_E, HALF=half, num_warps=4)
    _moe_route_scatter_kernel[(n_chunks + triton.cdiv(n_mb, BLOCK_MB),)](
        expert_A, keep_A, chunk_base_CE, count_E, row_P, block_3Mb, A, E, n_chunks, n_mb, HAS_KEEP=has_keep,
        CHUNK=CHUNK, SUB=min(CHUNK, 128), BLOCK_E=BLOCK_E, BLOCK_M=block_m, BLOCK_MB=BLOCK_MB, num_warps=4)
    return row_P, block_3Mb, pad_start_E, count_E, keep_A, used_rows_1


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
    row_elems = 16 // x_ND.element_size()
    if D % row_elems or F % row_elems:
        raise ValueError(f"moe_experts: D={D} and F={F} must be multiples of {row_elems} for {x_ND.dtype} (TMA "
                         "descriptors need 16-byte row strides)")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous, re-allocated if its storage is not 16-byte aligned (TMA's requirement)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def _tma(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of an input tensor (`_aligned`)."""
    return TensorDescriptor.from_tensor(_aligned(t), block)


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
    tiles = tiles or default_tiles(D, F, x_ND.dtype, N * K / E)
    BM = tiles.block_m
    row_P, block_3Mb, pad_start_E, count_E, keep_A, used_rows_1 = route_metadata(expert_ids_NK, keep_NK, E, BM)
    P, n_mb = row_P.numel(), block_3Mb.shape[1]
    weights_A = weights_NK.reshape(-1).float().contiguous()
    h_PF = torch.empty(P, F, dtype=x_ND.dtype, device=x_ND.device)
    gu_2PF = torch.empty(2, P, F, dtype=x_ND.dtype, device=x_ND.device) if save_for_backward else h_PF
    prec = dot_precision(x_ND.dtype)
    if N:
        gate_up_tile = _hopper_gate_up_tile(tiles, x_ND, D, F, N * K / E)
        if gate_up_tile is not None:
            from . import moe_hopper

            # x in padded-row order first (TMA cannot gather rows); y_AD, allocated once x_PD is dropped, can take
            # its memory (A·D ≤ P·D), so the forward's peak memory grows by the padding rows' (P − A)·D at most
            x_PD, _ = _gather_rows(x_ND, None, row_P, used_rows_1, K, BM)
            moe_hopper.gate_up(x_PD, _aligned(w_gate_EFD), _aligned(w_up_EFD), block_3Mb, pad_start_E, count_E, h_PF,
                               gu_2PF if save_for_backward else None, gate_up_tile)
            del x_PD
        else:
            t = tiles.gate_up
            _launch(_moe_gate_up_kernel, t, n_mb * triton.cdiv(F, t.n),
                    x_ND, w_gate_EFD, w_up_EFD, row_P, block_3Mb, h_PF, gu_2PF, n_mb, P, D, F, K,
                    STORE_GU=save_for_backward, PRECISION=prec, EVEN_K=D % t.k == 0,
                    BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
    y_AD = torch.empty(N * K, D, dtype=x_ND.dtype, device=x_ND.device)
    if N:
        down_tile = _hopper_down_tile(tiles, h_PF, D, F, N * K / E)
        if down_tile is not None:
            from . import moe_hopper

            moe_hopper.down_proj(h_PF, _aligned(w_down_EDF), row_P, block_3Mb, pad_start_E, count_E, y_AD, down_tile)
        else:
            t = tiles.down
            _launch(_moe_down_kernel, t, n_mb * triton.cdiv(D, t.n),
                    h_PF, w_down_EDF, row_P, block_3Mb, y_AD, n_mb, D, F, PRECISION=prec, EVEN_K=F % t.k == 0,
                    BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
    out_ND = _combine(y_AD, weights_A, keep_A, N, K, x_ND.dtype)
    saved = ((row_P, block_3Mb, pad_start_E, count_E, keep_A, used_rows_1, weights_A, gu_2PF) if save_for_backward
             else None)
    return out_ND, saved


def _gather_rows(x_ND: torch.Tensor, dout_ND: torch.Tensor | None, row_P: torch.Tensor, used_rows_1: torch.Tensor,
                 K: int, block_r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x and dout rows in padded-row order [P, D], zeros on padding rows (rows past used_rows left unwritten);
    x alone when dout_ND is None."""
    D = x_ND.shape[1]
    x_PD = torch.empty(row_P.numel(), D, dtype=x_ND.dtype, device=x_ND.device)
    dout_PD = torch.empty_like(x_PD) if dout_ND is not None else None
    BLOCK_D = min(next_pow2(D), 256 if not interpreting() else 1024)
    if x_PD.numel():
        planes = 1 if dout_ND is None else 2
        _moe_gather_rows_kernel[(triton.cdiv(row_P.numel(), block_r), triton.cdiv(D, BLOCK_D), planes)](
            x_ND, x_ND if dout_ND is None else dout_ND, row_P, used_rows_1, x_PD, x_PD if dout_PD is None else dout_PD,
            D, K, BLOCK_R=block_r, BLOCK_D=BLOCK_D, num_warps=8)
    return x_PD, dout_PD


def _moe_hopper(tiles: MoETiles, t: torch.Tensor):
    """The moe_hopper module when its Gluon kernels may run on t (`MoETiles.hopper`, a CUDA tensor `usable` accepts:
    Hopper GPU, 16-bit, a tested Triton), else None: moe.py's Triton kernels run."""
    if not (tiles.hopper and t.is_cuda):
        return None
    from . import moe_hopper  # Gluon: imported on a GPU only

    return moe_hopper if moe_hopper.usable(t) else None


def _hopper_down_tile(tiles: MoETiles, h_PF: torch.Tensor, D: int, F: int, rows_per_expert: float):
    """moe_hopper's down-projection launch shape when its kernel applies and the shapes fit, else None."""
    mh = _moe_hopper(tiles, h_PF)
    tile = mh.down_tile(rows_per_expert) if mh else None
    return tile if tile and mh.down_fits(D, F, tiles.block_m, tile) else None


def _hopper_wgrad_tile(tiles: MoETiles, a_GPI: torch.Tensor, DJ: int, rows_per_expert: float):
    """moe_hopper's launch shape for this weight gradient when its kernel applies and the tiles fit, else None."""
    mh = _moe_hopper(tiles, a_GPI)
    tile = mh.wgrad_tile(a_GPI.shape[0], rows_per_expert) if mh else None
    return tile if tile and mh.wgrad_fits(a_GPI.shape[2], DJ, tiles.block_m // 2, tile) else None


def _hopper_hidden_grad(tiles: MoETiles, dout_PD: torch.Tensor, D: int, F: int, rows_per_expert: float) -> bool:
    """moe_hopper's hidden-grad kernel applies (shapes that fit, few enough rows per expert for its 128 × 128
    ping-pong tiles to win), else the Triton kernel runs."""
    mh = _moe_hopper(tiles, dout_PD)
    return bool(mh) and rows_per_expert < mh.HGRAD_FEW_ROWS and mh.hidden_grad_fits(D, F, tiles.block_m)


def _hopper_igrad_tile(tiles: MoETiles, dgu_2PF: torch.Tensor, D: int, F: int, rows_per_expert: float):
    """moe_hopper's input-grad launch shape when its kernel applies and the shapes fit, else None."""
    mh = _moe_hopper(tiles, dgu_2PF)
    tile = mh.igrad_tile(rows_per_expert) if mh else None
    return tile if tile and mh.input_grad_fits(D, F, tiles.block_m, tile) else None


def _hopper_gate_up_tile(tiles: MoETiles, x_ND: torch.Tensor, D: int, F: int, rows_per_expert: float):
    """moe_hopper's gate_up launch shape when `MoETiles.hopper_gate_up` is on, its kernel applies and the shapes fit,
    else None."""
    mh = _moe_hopper(tiles, x_ND) if tiles.hopper_gate_up else None
    tile = mh.gate_up_tile(rows_per_expert) if mh else None
    return tile if tile and mh.gate_up_fits(D, F, tiles.block_m, tile) else None


def _weight_grad(tile: Tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec: str, hopper_tile=None):
    if hopper_tile is not None:
        from . import moe_hopper

        moe_hopper.weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, hopper_tile)
        return
    G, P, DI = a_GPI.shape
    E, DJ = count_E.numel(), b_PJ.shape[1]
    _launch(_moe_weight_grad_kernel, tile, G * E * triton.cdiv(DI, tile.m) * triton.cdiv(DJ, tile.n),
            _tma(a_GPI.view(G * P, DI), [tile.k, tile.m]), _tma(b_PJ, [tile.k, tile.n]), pad_start_E, count_E, c_GEIJ,
            G, E, P, DI, DJ, PRECISION=prec, BLOCK_I=tile.m, BLOCK_J=tile.n, BLOCK_A=tile.k)


def moe_experts_bwd(dout_ND, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, K, saved, tiles: MoETiles | None = None):
    """Host backward: (dx [N, D], dWg, dWu, dWd, dweights_A [A] fp32). `tiles` must be the forward's."""
    row_P, block_3Mb, pad_start_E, count_E, keep_A, used_rows_1, weights_A, gu_2PF = saved
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    P, n_mb = row_P.numel(), block_3Mb.shape[1]
    tiles = tiles or default_tiles(D, F, x_ND.dtype, N * K / E)
    BM, GM = tiles.block_m, tiles.group_m
    prec = dot_precision(x_ND.dtype)
    dout_ND = dout_ND.contiguous()
    w_gate_EFD, w_up_EFD, w_down_EDF = w_gate_EFD.contiguous(), w_up_EFD.contiguous(), w_down_EDF.contiguous()
    dtype, device = x_ND.dtype, x_ND.device
    # x and dout in padded-row order: the hidden-grad and weight-gradient GEMMs then stream contiguous rows.
    x_PD, dout_PD = _gather_rows(x_ND, dout_ND, row_P, used_rows_1, K, BM)
    z_PF = torch.empty(P, F, dtype=dtype, device=device)
    dgu_2PF = torch.empty_like(gu_2PF)
    hw_PF = torch.empty(P, F, dtype=dtype, device=device)
    dweights_A = torch.zeros(N * K, dtype=torch.float32, device=device)
    dwgu_2EFD = torch.empty(2, E, F, D, dtype=dtype, device=device)
    dwd_1EDF = torch.empty(1, E, D, F, dtype=dtype, device=device)
    dxa_AD = torch.empty(N * K, D, dtype=dtype, device=device)
    rows_per_expert = N * K / E
    if N:
        if _hopper_hidden_grad(tiles, dout_PD, D, F, rows_per_expert):
            from . import moe_hopper

            moe_hopper.hidden_grad(dout_PD, _aligned(w_down_EDF), block_3Mb, pad_start_E, count_E, z_PF)
        else:
            t = tiles.hidden_grad
            _launch(_moe_hidden_grad_kernel, t, n_mb * triton.cdiv(F, t.n),
                    _tma(dout_PD, [BM, t.k]), _tma(w_down_EDF, [1, t.k, t.n]), block_3Mb, z_PF, n_mb, D, F,
                    PRECISION=prec, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)
        t = tiles.swiglu_bwd
        _launch(_moe_swiglu_bwd_kernel, t, P // t.m, z_PF, gu_2PF, weights_A, row_P, used_rows_1, dgu_2PF, hw_PF,
                dweights_A, P, F, BLOCK_R=t.m, BLOCK_F=t.n)
    _weight_grad(tiles.down_wgrad, dout_PD[None], hw_PF, pad_start_E, count_E, dwd_1EDF, prec,
                 _hopper_wgrad_tile(tiles, dout_PD[None], F, rows_per_expert))
    _weight_grad(tiles.gate_up_wgrad, dgu_2PF, x_PD, pad_start_E, count_E, dwgu_2EFD, prec,
                 _hopper_wgrad_tile(tiles, dgu_2PF, D, rows_per_expert))
    igrad_tile = _hopper_igrad_tile(tiles, dgu_2PF, D, F, rows_per_expert) if N else None
    if igrad_tile is not None:
        from . import moe_hopper

        moe_hopper.input_grad(dgu_2PF, _aligned(w_gate_EFD), _aligned(w_up_EFD), row_P, block_3Mb, pad_start_E,
                              count_E, dxa_AD, igrad_tile)
    elif N:
        t = tiles.input_grad
        _launch(_moe_input_grad_kernel, t, n_mb * triton.cdiv(D, t.n),
                _tma(dgu_2PF.view(2 * P, F), [BM, t.k]), _tma(w_gate_EFD, [1, t.k, t.n]), _tma(w_up_EFD, [1, t.k, t.n]),
                row_P, block_3Mb, dxa_AD, n_mb, P, D, F, PRECISION=prec, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k,
                GROUP_M=GM)
    dx_ND = _combine(dxa_AD, None, keep_A, N, K, x_ND.dtype)
    return dx_ND, dwgu_2EFD[0], dwgu_2EFD[1], dwd_1EDF[0], dweights_A


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
