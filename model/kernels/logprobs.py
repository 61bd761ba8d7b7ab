"""Fused hidden states → log-prob of given tokens (+ entropy), forward/backward, in Triton.

Shape legend: N tokens, D hidden, V vocab, S vocab splits, Nc rows per backward chunk.

    z_n      = h_n · Wᵀ / τ                           (fp32 accumulation, never stored)
    logp_n   = z_n[y_n] − lse(z_n)
    entropy_n = lse(z_n) − Σ_v softmax(z_n)_v · z_n,v
Backward (p = softmax(z), g_lp / g_ent the incoming gradients):
    dz = g_lp·(onehot(y) − p) − g_ent·p ⊙ (z − (lse − entropy))
    dh = dz · W / τ,   dW = dzᵀ · h / τ

Forward (`_logprobs_fwd_kernel`): the lm_head GEMM, an online log-sum-exp, the running Σ p·z for the
entropy and the target-logit pick are fused over vocab tiles; the grid is (row blocks, S vocab
splits) so that short batches still fill the GPU, and the S partial (max, sum, Σp·z, target) are
merged on the host ([S, N] floats). Nothing of size [N, V] is written.
Backward (`_logprobs_dz_kernel`): per chunk of Nc rows, z is recomputed tile by tile and dz written
for that chunk only ([Nc, V] in the input dtype, Nc ≈ N/8 by default, so at most 1/8 of the
logits' bytes); two cuBLAS GEMMs then give dh for the chunk and accumulate dW. Keeping the two
gradient GEMMs in cuBLAS avoids atomics on dW and an [N, D] accumulator per vocab tile.
Targets must lie in [0, V) (as for the reference's gather). Reference:
`model.logprobs.token_logprobs_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_inputs, dot_precision, interpreting

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max, so empty tiles never make inf − inf


@triton.jit
def _logprobs_fwd_kernel(h_ptr, w_ptr, y_ptr, m_ptr, l_ptr, s_ptr, zt_ptr, N, V, D, v_per_split, inv_temp,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_m, split = tl.program_id(0), tl.program_id(1)
    n_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok_M = n_M < N
    y_M = tl.load(y_ptr + n_M, mask=row_ok_M, other=-1)
    k_K = tl.arange(0, BLOCK_K)
    m_M = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    zt_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        v_V = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok_V = v_V < v_end
        acc_MV = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            d_K = d0 + k_K
            h_MK = tl.load(h_ptr + n_M[:, None] * D + d_K[None, :], mask=row_ok_M[:, None] & (d_K[None, :] < D),
                           other=0.0)
            w_KV = tl.load(w_ptr + v_V[None, :] * D + d_K[:, None], mask=v_ok_V[None, :] & (d_K[:, None] < D),
                           other=0.0)
            acc_MV = tl.dot(h_MK, w_KV, acc_MV, input_precision=PRECISION)
        z_MV = acc_MV * inv_temp
        z_masked_MV = tl.where(v_ok_V[None, :], z_MV, float("-inf"))
        m_new_M = tl.maximum(m_M, tl.max(z_masked_MV, axis=1))
        alpha_M = tl.exp(m_M - m_new_M)
        p_MV = tl.exp(z_masked_MV - m_new_M[:, None])
        l_M = l_M * alpha_M + tl.sum(p_MV, axis=1)
        s_M = s_M * alpha_M + tl.sum(tl.where(v_ok_V[None, :], p_MV * z_MV, 0.0), axis=1)
        zt_M += tl.sum(tl.where((v_V[None, :] == y_M[:, None]) & v_ok_V[None, :], z_MV, 0.0), axis=1)
        m_M = m_new_M
    out_offs_M = split * N + n_M
    tl.store(m_ptr + out_offs_M, m_M, mask=row_ok_M)
    tl.store(l_ptr + out_offs_M, l_M, mask=row_ok_M)
    tl.store(s_ptr + out_offs_M, s_M, mask=row_ok_M)
    tl.store(zt_ptr + out_offs_M, zt_M, mask=row_ok_M)


@triton.jit
def _logprobs_dz_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V, D, inv_temp,
                        HAS_ENT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz/τ for rows [0, N) of a chunk, written [N, V] in h's dtype."""
    pid_m, pid_v = tl.program_id(0), tl.program_id(1)
    n_M = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok_M = n_M < N
    v_V = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_ok_V = v_V < V
    k_K = tl.arange(0, BLOCK_K)
    acc_MV = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d_K = d0 + k_K
        h_MK = tl.load(h_ptr + n_M[:, None] * D + d_K[None, :], mask=row_ok_M[:, None] & (d_K[None, :] < D),
                       other=0.0)
        w_KV = tl.load(w_ptr + v_V[None, :] * D + d_K[:, None], mask=v_ok_V[None, :] & (d_K[:, None] < D),
                       other=0.0)
        acc_MV = tl.dot(h_MK, w_KV, acc_MV, input_precision=PRECISION)
    z_MV = acc_MV * inv_temp
    lse_M = tl.load(lse_ptr + n_M, mask=row_ok_M, other=0.0)
    glp_M = tl.load(glp_ptr + n_M, mask=row_ok_M, other=0.0)
    y_M = tl.load(y_ptr + n_M, mask=row_ok_M, other=-1)
    p_MV = tl.exp(z_MV - lse_M[:, None])
    dz_MV = glp_M[:, None] * (tl.where(v_V[None, :] == y_M[:, None], 1.0, 0.0) - p_MV)
    if HAS_ENT:
        ent_M = tl.load(ent_ptr + n_M, mask=row_ok_M, other=0.0)
        gent_M = tl.load(gent_ptr + n_M, mask=row_ok_M, other=0.0)
        dz_MV -= gent_M[:, None] * p_MV * (z_MV - (lse_M - ent_M)[:, None])
    tl.store(dz_ptr + n_M[:, None] * V + v_V[None, :], (dz_MV * inv_temp).to(dz_ptr.dtype.element_ty),
             mask=row_ok_M[:, None] & v_ok_V[None, :])


def _blocks(dtype: torch.dtype):
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_V=128, BLOCK_K=128), dict(num_warps=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32), dict(num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64), dict(num_warps=8, num_stages=3)


def logprobs_fwd(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, temperature: float):
    """Host forward: (logp [N], entropy [N], lse [N]), all fp32."""
    check_inputs("token_logprobs", h_ND, w_VD)
    N, D = h_ND.shape
    V = w_VD.shape[0]
    if w_VD.shape != (V, D) or h_ND.dtype != w_VD.dtype or y_N.shape != (N,):
        raise ValueError(f"token_logprobs: hidden {tuple(h_ND.shape)} {h_ND.dtype}, lm_head {tuple(w_VD.shape)} "
                         f"{w_VD.dtype}, targets {tuple(y_N.shape)} do not fit")
    blocks, launch = _blocks(h_ND.dtype)
    n_row_blocks = triton.cdiv(N, blocks["BLOCK_M"])
    n_v_tiles = triton.cdiv(V, blocks["BLOCK_V"])
    if interpreting():
        n_splits = min(2, n_v_tiles)  # still exercises the split merge
    else:
        sms = torch.cuda.get_device_properties(h_ND.device).multi_processor_count
        n_splits = max(1, min(n_v_tiles, triton.cdiv(2 * sms, n_row_blocks)))
    v_per_split = triton.cdiv(n_v_tiles, n_splits) * blocks["BLOCK_V"]
    n_splits = triton.cdiv(V, v_per_split)
    part_SN = torch.empty(4, n_splits, N, dtype=torch.float32, device=h_ND.device)
    m_SN, l_SN, s_SN, zt_SN = part_SN.unbind(0)
    _logprobs_fwd_kernel[(n_row_blocks, n_splits)](
        h_ND, w_VD, y_N, m_SN, l_SN, s_SN, zt_SN, N, V, D, v_per_split, 1.0 / temperature,
        PRECISION=dot_precision(h_ND.dtype), **blocks, **launch)
    m_N = m_SN.amax(0)
    scale_SN = torch.exp(m_SN - m_N)
    l_N = (l_SN * scale_SN).sum(0)
    lse_N = m_N + torch.log(l_N)
    entropy_N = lse_N - (s_SN * scale_SN).sum(0) / l_N
    logp_N = zt_SN.sum(0) - lse_N
    return logp_N, entropy_N, lse_N


def logprobs_bwd(h_ND, w_VD, y_N, lse_N, entropy_N, grad_logp_N, grad_entropy_N, temperature: float,
                 chunk_rows: int | None = None):
    """Host backward: (dh [N, D], dW [V, D]) in the input dtype."""
    N, D = h_ND.shape
    V = w_VD.shape[0]
    blocks, launch = _blocks(h_ND.dtype)
    if chunk_rows is None:  # dz buffer ≤ 1/8 of the [N, V] logits, but not so small the GEMMs starve
        chunk_rows = min(N, max(128, triton.cdiv(triton.cdiv(N, 8), 128) * 128))
    dh_ND = torch.empty_like(h_ND)
    dw_VD = torch.zeros_like(w_VD)
    dz_CV = torch.empty(min(chunk_rows, N), V, dtype=h_ND.dtype, device=h_ND.device)
    has_ent = grad_entropy_N is not None
    for c0 in range(0, N, chunk_rows):
        c1 = min(N, c0 + chunk_rows)
        rows = c1 - c0
        dz = dz_CV[:rows]
        grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(V, blocks["BLOCK_V"]))
        _logprobs_dz_kernel[grid](
            h_ND[c0:c1], w_VD, y_N[c0:c1], lse_N[c0:c1], entropy_N[c0:c1], grad_logp_N[c0:c1],
            grad_entropy_N[c0:c1] if has_ent else grad_logp_N[c0:c1], dz, rows, V, D, 1.0 / temperature,
            HAS_ENT=has_ent, PRECISION=dot_precision(h_ND.dtype), **blocks, **launch)
        torch.mm(dz, w_VD, out=dh_ND[c0:c1])
        dw_VD.addmm_(dz.T, h_ND[c0:c1])
    return dh_ND, dw_VD


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N, temperature, chunk_rows):
        logp_N, entropy_N, lse_N = logprobs_fwd(h_ND, w_VD, y_N, temperature)
        ctx.set_materialize_grads(False)  # an unused entropy output then costs nothing in backward
        ctx.save_for_backward(h_ND, w_VD, y_N, lse_N, entropy_N)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        h_ND, w_VD, y_N, lse_N, entropy_N = ctx.saved_tensors
        if grad_logp_N is None:
            grad_logp_N = torch.zeros_like(lse_N)
        dh_ND, dw_VD = logprobs_bwd(h_ND, w_VD, y_N, lse_N, entropy_N, grad_logp_N.float().contiguous(),
                                    grad_entropy_N.float().contiguous() if grad_entropy_N is not None else None,
                                    ctx.temperature, ctx.chunk_rows)
        return (dh_ND if ctx.needs_input_grad[0] else None, dw_VD if ctx.needs_input_grad[1] else None,
                None, None, None)


def fused_token_logprobs(hidden_ND: torch.Tensor, lm_head_VD: torch.Tensor, targets_N: torch.Tensor,
                         temperature: float = 1.0, with_entropy: bool = False,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs fp32, entropy fp32 or None), shaped like targets; hidden may carry leading dims.
    Same contract as `model.logprobs.token_logprobs_reference`."""
    lead = targets_N.shape
    h_ND = hidden_ND.reshape(-1, hidden_ND.shape[-1]).contiguous()
    y_N = targets_N.reshape(-1).contiguous()
    if y_N.numel() == 0:
        empty = h_ND.new_zeros(0, dtype=torch.float32).reshape(lead)
        return empty, (empty if with_entropy else None)
    logp_N, entropy_N = TokenLogprobsFunction.apply(h_ND, lm_head_VD.contiguous(), y_N, float(temperature),
                                                    chunk_rows)
    return logp_N.reshape(lead), (entropy_N.reshape(lead) if with_entropy else None)
