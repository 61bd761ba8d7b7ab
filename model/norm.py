"""RMSNorm as DeepSeek-V2 uses it (hidden states, the KV latent and the query latent).

y = w ⊙ (x / sqrt(mean(x²) + eps)), the statistics in fp32, the normalised value cast back to the
input dtype before the weight multiply (the order transformers and vLLM use, so bf16 results match).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, kernels: str = "torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels  # "torch": the reference below; "triton": model.kernels.rmsnorm (one fused pass)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            from .kernels.rmsnorm import rms_norm

            return rms_norm(x_ND, self.weight, self.eps)
        x32_ND = x_ND.float()
        normed_ND = x32_ND * torch.rsqrt(x32_ND.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed_ND.to(x_ND.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
