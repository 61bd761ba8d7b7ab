"""RMSNorm forward/backward in Triton, optionally fused with the residual add.

Shape legend: N rows (all leading dims flattened), D normalised dim, P backward programs.

Forward (per row):   h = x + residual            (only when a residual is given; rounded to x's dtype)
                     rstd = 1 / sqrt(mean(h²) + eps)            fp32
                     y = w ⊙ cast_x(h · rstd)                    the reference's cast order (model/norm.py)
Backward:            n = h · rstd,  dn = dy ⊙ w  (fp32)
                     dh = rstd · (dn − n · mean(dn ⊙ n)) (+ the incoming gradient of h)
                     dw = Σ_rows dy ⊙ cast_x(n)      per-program partial sums [P, D], reduced on the host
Fused: the residual add, the fp32 statistics, the normalise and the weight multiply are one pass over
the row (one read of x (and residual), one write of y (and h)); the backward is one pass per row
plus a [P, D] reduction for dw. Reference: `model.norm.RMSNorm` (kernels="torch").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_inputs, interpreting, next_pow2


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, N, D, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows_M = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_D = tl.arange(0, BLOCK_D)
    mask_MD = (rows_M[:, None] < N) & (cols_D[None, :] < D)
    offs_MD = rows_M[:, None] * D + cols_D[None, :]
    x_MD = tl.load(x_ptr + offs_MD, mask=mask_MD, other=0.0)
    if HAS_RESIDUAL:
        r_MD = tl.load(res_ptr + offs_MD, mask=mask_MD, other=0.0)
        x_MD = (x_MD.to(tl.float32) + r_MD.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + offs_MD, x_MD, mask=mask_MD)
    x32_MD = x_MD.to(tl.float32)
    rstd_M = 1.0 / tl.sqrt(tl.sum(x32_MD * x32_MD, axis=1) / D + eps)
    tl.store(rstd_ptr + rows_M, rstd_M, mask=rows_M < N)
    normed_MD = (x32_MD * rstd_M[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w_D = tl.load(w_ptr + cols_D, mask=cols_D < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_MD, (normed_MD * w_D[None, :]).to(y_ptr.dtype.element_ty), mask=mask_MD)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dh_ptr, dx_ptr, dw_partial_ptr, N, D,
                         HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols_D = tl.arange(0, BLOCK_D)
    w_D = tl.load(w_ptr + cols_D, mask=cols_D < D, other=0.0).to(tl.float32)
    dw_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_M), n_programs):
        rows_M = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_MD = (rows_M[:, None] < N) & (cols_D[None, :] < D)
        offs_MD = rows_M[:, None] * D + cols_D[None, :]
        x_MD = tl.load(x_ptr + offs_MD, mask=mask_MD, other=0.0).to(tl.float32)
        dy_MD = tl.load(dy_ptr + offs_MD, mask=mask_MD, other=0.0).to(tl.float32)
        rstd_M = tl.load(rstd_ptr + rows_M, mask=rows_M < N, other=0.0)
        n_MD = x_MD * rstd_M[:, None]
        dw_D += tl.sum(dy_MD * n_MD.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        dn_MD = dy_MD * w_D[None, :]
        mean_M = tl.sum(dn_MD * n_MD, axis=1) / D
        dx_MD = rstd_M[:, None] * (dn_MD - n_MD * mean_M[:, None])
        if HAS_DH:
            dx_MD += tl.load(dh_ptr + offs_MD, mask=mask_MD, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs_MD, dx_MD.to(dx_ptr.dtype.element_ty), mask=mask_MD)
    tl.store(dw_partial_ptr + pid * D + cols_D, dw_D, mask=cols_D < D)


def _row_block(block_d: int) -> int:
    # The interpreter runs one program at a time: big tiles. On the GPU ~4K elements per program.
    return 64 if interpreting() else max(1, min(16, 4096 // block_d))


def rms_norm_fwd(x_ND: torch.Tensor, w_D: torch.Tensor, eps: float, residual_ND: torch.Tensor | None = None):
    """(y [N, D] in promote(x, w) dtype, h [N, D] or None, rstd [N] fp32). x, residual: [N, D] contiguous."""
    check_inputs("rms_norm", x_ND, w_D)
    N, D = x_ND.shape
    if w_D.shape != (D,):
        raise ValueError(f"rms_norm: weight has shape {tuple(w_D.shape)}, expected ({D},)")
    if residual_ND is not None and (residual_ND.shape != x_ND.shape or residual_ND.dtype != x_ND.dtype):
        raise ValueError("rms_norm: residual must match x in shape and dtype")
    y_ND = torch.empty(N, D, dtype=torch.promote_types(x_ND.dtype, w_D.dtype), device=x_ND.device)
    h_ND = torch.empty_like(x_ND) if residual_ND is not None else None
    rstd_N = torch.empty(N, dtype=torch.float32, device=x_ND.device)
    BLOCK_D = next_pow2(D)
    BLOCK_M = _row_block(BLOCK_D)
    _rms_norm_fwd_kernel[(triton.cdiv(N, BLOCK_M),)](
        x_ND, residual_ND if residual_ND is not None else x_ND, w_D, y_ND, h_ND if h_ND is not None else x_ND,
        rstd_N, N, D, eps, HAS_RESIDUAL=residual_ND is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        num_warps=4 if BLOCK_D <= 1024 else 8)
    return y_ND, h_ND, rstd_N


def rms_norm_bwd(dy_ND, x_ND, w_D, rstd_N, dh_ND=None):
    """(dx [N, D] in x's dtype, dw [D] in w's dtype). x is the normalised input (h when fused)."""
    N, D = x_ND.shape
    BLOCK_D = next_pow2(D)
    BLOCK_M = _row_block(BLOCK_D)
    n_blocks = triton.cdiv(N, BLOCK_M)
    n_programs = max(1, min(n_blocks, 1 if interpreting() else 4 * _sm_count(x_ND.device)))
    dx_ND = torch.empty_like(x_ND)
    dw_partial_PD = torch.empty(n_programs, D, dtype=torch.float32, device=x_ND.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy_ND, x_ND, w_D, rstd_N, dh_ND if dh_ND is not None else dy_ND, dx_ND, dw_partial_PD, N, D,
        HAS_DH=dh_ND is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4 if BLOCK_D <= 1024 else 8)
    return dx_ND, dw_partial_PD.sum(0).to(w_D.dtype)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x (+ residual)); returns y, or (y, h = x + residual) when a residual is given."""

    @staticmethod
    def forward(ctx, x, w, eps, residual):
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1]).contiguous()
        res_ND = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        y_ND, h_ND, rstd_N = rms_norm_fwd(x_ND, w, eps, res_ND)
        ctx.save_for_backward(h_ND if h_ND is not None else x_ND, w, rstd_N)
        ctx.has_residual = residual is not None
        ctx.shape = shape
        if residual is None:
            return y_ND.view(shape)
        return y_ND.view(shape), h_ND.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        x_ND, w_D, rstd_N = ctx.saved_tensors
        D = ctx.shape[-1]
        dh_ND = dh.reshape(-1, D).contiguous() if dh is not None else None
        dx_ND, dw_D = rms_norm_bwd(dy.reshape(-1, D).contiguous(), x_ND, w_D, rstd_N, dh_ND)
        dx = dx_ND.view(ctx.shape)
        return dx, dw_D, None, (dx if ctx.has_residual else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of x (any leading dims). With `residual`: returns (y, x + residual)."""
    return RMSNormFunction.apply(x, weight, eps, residual)
