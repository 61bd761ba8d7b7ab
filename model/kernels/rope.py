"""Interleaved (GPT-J, adjacent-pair) RoPE forward/backward in Triton.

Shape legend: B batch, H heads (1 for the shared k_pe), T tokens, R rope dim, R2 = R/2 pairs.

Forward:  out[2i]   = x[2i]·cos_i − x[2i+1]·sin_i
          out[2i+1] = x[2i]·sin_i + x[2i+1]·cos_i          in fp32, stored in x's dtype
Backward: the transpose of that rotation, i.e. the same kernel with sin negated.
cos/sin [B, T, R2] come from `model.rope.rope_cos_sin` (YaRN frequencies and scale folded in);
they are position tables, not trained, so they get no gradient. Fused: the even/odd split, the
rotation and the interleave are one pass; each program loads its tokens' cos/sin once and reuses them
for every head. x may be a strided view (q_pe is a slice of the query projection): strides are
passed through, so no copy is made. Reference: `model.rope.apply_rope_interleaved`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_inputs, interpreting, next_pow2


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, R2,
                 sx_b, sx_h, sx_t, sc_b, sc_t, so_b, so_h, so_t, sin_sign,
                 BLOCK_T: tl.constexpr, BLOCK_R2: tl.constexpr):
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    b = tl.program_id(0) // n_t_blocks
    t_T = (tl.program_id(0) % n_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    i_R2 = tl.arange(0, BLOCK_R2)
    mask_TR2 = (t_T[:, None] < T) & (i_R2[None, :] < R2)
    cs_offs_TR2 = b * sc_b + t_T[:, None] * sc_t + i_R2[None, :]
    cos_TR2 = tl.load(cos_ptr + cs_offs_TR2, mask=mask_TR2, other=0.0).to(tl.float32)
    sin_TR2 = tl.load(sin_ptr + cs_offs_TR2, mask=mask_TR2, other=0.0).to(tl.float32) * sin_sign
    for h in range(H):
        x_offs_TR2 = b * sx_b + h * sx_h + t_T[:, None] * sx_t + 2 * i_R2[None, :]
        even_TR2 = tl.load(x_ptr + x_offs_TR2, mask=mask_TR2, other=0.0).to(tl.float32)
        odd_TR2 = tl.load(x_ptr + x_offs_TR2 + 1, mask=mask_TR2, other=0.0).to(tl.float32)
        o_offs_TR2 = b * so_b + h * so_h + t_T[:, None] * so_t + 2 * i_R2[None, :]
        tl.store(out_ptr + o_offs_TR2, (even_TR2 * cos_TR2 - odd_TR2 * sin_TR2).to(out_ptr.dtype.element_ty),
                 mask=mask_TR2)
        tl.store(out_ptr + o_offs_TR2 + 1, (even_TR2 * sin_TR2 + odd_TR2 * cos_TR2).to(out_ptr.dtype.element_ty),
                 mask=mask_TR2)


def rope_rotate(x_BHTR: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor,
                inverse: bool = False) -> torch.Tensor:
    """Host function: rotate x by the angles of cos/sin (or by their negatives when `inverse`)."""
    check_inputs("rope", x_BHTR, cos_BTR2, sin_BTR2)
    B, H, T, R = x_BHTR.shape
    if R % 2:
        raise ValueError(f"rope: rope dim {R} must be even")
    if cos_BTR2.shape[-2:] != (T, R // 2) or sin_BTR2.shape != cos_BTR2.shape or cos_BTR2.shape[0] not in (1, B):
        raise ValueError(f"rope: cos/sin of shape {tuple(cos_BTR2.shape)} do not fit x {tuple(x_BHTR.shape)}")
    if x_BHTR.stride(-1) != 1:
        x_BHTR = x_BHTR.contiguous()
    cos_BTR2 = cos_BTR2.expand(B, T, R // 2)
    sin_BTR2 = sin_BTR2.expand(B, T, R // 2)
    if cos_BTR2.stride(-1) != 1 or sin_BTR2.stride() != cos_BTR2.stride():
        cos_BTR2, sin_BTR2 = cos_BTR2.contiguous(), sin_BTR2.contiguous()
    out_BHTR = torch.empty(B, H, T, R, dtype=x_BHTR.dtype, device=x_BHTR.device)
    if out_BHTR.numel() == 0:
        return out_BHTR
    BLOCK_T = min(next_pow2(T), 64 if interpreting() else 16)
    grid = (B * triton.cdiv(T, BLOCK_T),)
    _rope_kernel[grid](x_BHTR, cos_BTR2, sin_BTR2, out_BHTR, H, T, R // 2,
                       x_BHTR.stride(0), x_BHTR.stride(1), x_BHTR.stride(2),
                       cos_BTR2.stride(0), cos_BTR2.stride(1),
                       out_BHTR.stride(0), out_BHTR.stride(1), out_BHTR.stride(2),
                       -1.0 if inverse else 1.0, BLOCK_T=BLOCK_T, BLOCK_R2=next_pow2(R // 2), num_warps=4)
    return out_BHTR


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BHTR, cos_BTR2, sin_BTR2):
        if cos_BTR2.requires_grad or sin_BTR2.requires_grad:
            raise ValueError("rope kernel: cos/sin are position tables and get no gradient; "
                             "use kernels='torch' to differentiate through them")
        ctx.save_for_backward(cos_BTR2, sin_BTR2)
        return rope_rotate(x_BHTR, cos_BTR2, sin_BTR2)

    @staticmethod
    def backward(ctx, grad_BHTR):
        cos_BTR2, sin_BTR2 = ctx.saved_tensors
        return rope_rotate(grad_BHTR, cos_BTR2, sin_BTR2, inverse=True), None, None


def apply_rope_interleaved_triton(x_BHTR: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor) -> torch.Tensor:
    """Drop-in for `model.rope.apply_rope_interleaved`."""
    return RopeFunction.apply(x_BHTR, cos_BTR2, sin_BTR2)
