"""Log-probabilities of given tokens straight from hidden states, without [tokens, vocab] logits.

Shape legend: N tokens, D hidden, V vocab.

  logp_n = (h_n·W_headᵀ)[y_n] / τ − logsumexp_v((h_n·W_headᵀ)_v / τ)
  entropy_n = logsumexp(z) − Σ_v softmax(z)_v · z_v,  z = h_n·W_headᵀ / τ

Reference path: the tokens are cut into chunks; each chunk's logits are made in fp32, reduced, and
recomputed in backward (activation checkpointing), so peak memory is one chunk's logits. The Triton
kernel (model/kernels) computes the same in one fused pass; `DeepseekV2Config.kernels` picks one.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    z_NV = (h_ND @ w_VD.T).float() / temperature
    lse_N = torch.logsumexp(z_NV, dim=-1)
    logp_N = z_NV.gather(1, y_N[:, None])[:, 0] - lse_N
    if with_entropy:
        entropy_N = lse_N - (z_NV.softmax(-1) * z_NV).sum(-1)
    else:
        entropy_N = torch.zeros_like(lse_N)
    return logp_N, entropy_N


def token_logprobs_reference(hidden_ND: torch.Tensor, lm_head_VD: torch.Tensor, targets_N: torch.Tensor,
                             temperature: float = 1.0, chunk_size: int = 1024,
                             with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [N] fp32, entropy [N] fp32 or None). Inputs may carry leading batch dims."""
    lead = targets_N.shape
    h_ND = hidden_ND.reshape(-1, hidden_ND.shape[-1])
    y_N = targets_N.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (h_ND.requires_grad or lm_head_VD.requires_grad)
    logps, ents = [], []
    for start in range(0, y_N.numel(), chunk_size):
        args = (h_ND[start:start + chunk_size], lm_head_VD, y_N[start:start + chunk_size], temperature, with_entropy)
        if needs_grad:
            logp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(*args)
        logps.append(logp)
        ents.append(ent)
    if not logps:
        empty = h_ND.new_zeros(0, dtype=torch.float32)
        return empty.reshape(lead), (empty.reshape(lead) if with_entropy else None)
    logp_N = torch.cat(logps).reshape(lead)
    return logp_N, (torch.cat(ents).reshape(lead) if with_entropy else None)


def token_logprobs(hidden_ND: torch.Tensor, lm_head_VD: torch.Tensor, targets_N: torch.Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                   kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to the reference or (kernels="triton") the fused kernel."""
    if kernels == "triton":
        from .kernels.logprobs import fused_token_logprobs

        return fused_token_logprobs(hidden_ND, lm_head_VD, targets_N, temperature=temperature,
                                    with_entropy=with_entropy)
    return token_logprobs_reference(hidden_ND, lm_head_VD, targets_N, temperature, chunk_size, with_entropy)
