"""Decoupled RoPE for MLA: interleaved (GPT-J, adjacent pairs) rotation with YaRN frequencies.

Shape legend: B batch, T tokens, H heads, R rope dim (qk_rope_head_dim), R2 = R/2 frequency pairs.

YaRN (arXiv 2309.00071, as DeepSeek-V2 uses it): frequencies whose wavelength fits many times into
the original context keep their value ("extrapolation"), long-wavelength ones are divided by
`factor` ("interpolation"), with a linear ramp in between set by beta_fast / beta_slow. cos/sin are
scaled by mscale(factor, mscale)/mscale(factor, mscale_all_dim) (1 for the published configs); the
mscale_all_dim² correction of the softmax temperature lives in `DeepseekV2Config.softmax_scale`.
"""

from __future__ import annotations

import math

import torch

from .config import DeepseekV2Config, yarn_mscale


def rope_inv_freq(config: DeepseekV2Config) -> tuple[torch.Tensor, float]:
    """Return (inv_freq_R2 in fp32, cos/sin scale) for the config's rope_parameters."""
    rope = config.rope_parameters or {}
    dim = config.qk_rope_head_dim
    base = float(rope.get("rope_theta", 10000.0))
    exponents_R2 = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    freq_extra_R2 = 1.0 / base**exponents_R2
    if rope.get("rope_type", "default") != "yarn":
        return freq_extra_R2.float(), 1.0

    factor = float(rope["factor"])
    original_len = rope["original_max_position_embeddings"]
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension index whose wavelength completes `num_rotations` turns over original_len.
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_R2 = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate_R2 = 1.0 - ramp_R2  # 1 = keep the original frequency
    inv_freq_R2 = freq_extra_R2 / factor * (1 - extrapolate_R2) + freq_extra_R2 * extrapolate_R2
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if rope.get("attention_factor") is not None:
        cos_scale = float(rope["attention_factor"])
    elif mscale and mscale_all:
        cos_scale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        cos_scale = yarn_mscale(factor)
    return inv_freq_R2.float(), cos_scale


def rope_cos_sin(inv_freq_R2: torch.Tensor, cos_scale: float, position_ids_BT: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, R2] for the given positions (computed in fp32, cast to `dtype`)."""
    angles_BTR2 = position_ids_BT[..., None].float() * inv_freq_R2.to(position_ids_BT.device)
    return (angles_BTR2.cos() * cos_scale).to(dtype), (angles_BTR2.sin() * cos_scale).to(dtype)


def apply_rope_interleaved(x_BHTR: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of frequency i.

    out[2i] = x[2i]·cos − x[2i+1]·sin ;  out[2i+1] = x[2i]·sin + x[2i+1]·cos.  Computed in fp32.
    x may have any head count (H=1 for the shared k_pe).
    """
    x_pairs = x_BHTR.float().unflatten(-1, (-1, 2))  # [B, H, T, R2, 2]
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    cos = cos_BTR2.float()[:, None]  # [B, 1, T, R2]
    sin = sin_BTR2.float()[:, None]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(x_BHTR.dtype)


def rope_function(kernels: str):
    """The rotation for a compute path: the reference above, or the Triton kernel (kernels="triton")."""
    if kernels == "triton":
        from .kernels.rope import apply_rope_interleaved_triton

        return apply_rope_interleaved_triton
    return apply_rope_interleaved
