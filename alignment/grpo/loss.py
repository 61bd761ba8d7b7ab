"""The GRPO policy loss: clipped importance ratio × advantage, minus β·k3 KL, aggregated over tokens.

Shape legend: B sequences (completions) in the micro-batch, T completion positions (right-padded).

Per token t of completion i (mask m_it = 1 on tokens that count):

    ρ_it  = exp(logp_it − old_it)                                  (ratio_level="token", GRPO)
    ρ_it  = exp(Σ_t m_it (logp_it − old_it) / |o_i|)  for every t   (ratio_level="sequence", GSPO)
    s_it  = min(ρ_it·A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high)·A_i) · w_it
    KL_it = exp(ref_it − logp_it) − (ref_it − logp_it) − 1          (k3; skipped when β = 0)
    ℓ_it  = −s_it + β·KL_it

w_it is the truncated importance weight min(π_old/π_engine, cap) (1 without it), a constant.
The loss MINIMISED is an aggregate of ℓ (the objective of DESIGN.md §3 negated).

Normalisation (`LossNormalizer` holds the counts of the WHOLE batch, over all micro-batches and all
processes, so the gradient of a micro-batch is its exact share of the one-big-batch gradient):

    SequenceMean   Σ_i (Σ_t m_it ℓ_it / |o_i|) / N_seq      the paper: mean per sequence, then mean
    TokenMean      Σ_it m_it ℓ_it / N_tok                     DAPO: every token weighs the same
    ConstantNorm   Σ_it m_it ℓ_it / (N_seq · L)               Dr. GRPO: L = max_new_tokens, no length bias

Each is multiplied by `world_size` because DDP averages (not sums) the gradients of the processes.
Summing the micro-batch losses of all processes / world_size thus gives exactly the one-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossNormalizer:
    """Counts of the whole optimizer-step batch, taken before its micro-batches run."""

    num_sequences: float
    """Sequences in the batch over all micro-batches and processes (dropped ones excluded)."""
    num_tokens: float
    """Loss tokens (mask = 1) in the batch over all micro-batches and processes."""
    world_size: int = 1
    """Processes whose gradients DDP averages."""

    @classmethod
    def of(cls, mask_BT: torch.Tensor) -> LossNormalizer:
        """Counts of a single batch on one process (no accumulation)."""
        return cls(float((mask_BT.sum(1) > 0).sum()), float(mask_BT.sum()), 1)


class SequenceMean:
    """Mean over each sequence's tokens, then over sequences (GRPO paper)."""

    def __call__(self, loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
        per_seq_B = (loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)
        return per_seq_B.sum() * (norm.world_size / max(norm.num_sequences, 1.0))


class TokenMean:
    """Mean over every token of the batch (DAPO)."""

    def __call__(self, loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
        return (loss_BT * mask_BT).sum() * (norm.world_size / max(norm.num_tokens, 1.0))


class ConstantNorm:
    """Token sum divided by sequences × a constant length (Dr. GRPO)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def __call__(self, loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
        return (loss_BT * mask_BT).sum() * (norm.world_size / (max(norm.num_sequences, 1.0) * self.max_tokens))


def make_aggregation(name: str, max_tokens: int):
    if name == "sequence_mean":
        return SequenceMean()
    if name == "token_mean":
        return TokenMean()
    if name == "constant":
        return ConstantNorm(max_tokens)
    raise ValueError(f"unknown aggregation {name!r}")


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    delta_BT = ref_logp_BT - logp_BT
    return torch.exp(delta_BT) - delta_BT - 1


class GRPOLoss:
    """Clipped-ratio policy loss with optional k3 KL (module docstring). Returns (loss, metrics)."""

    def __init__(self, clip_eps_low: float | None = 0.2, clip_eps_high: float | None = 0.2, beta: float = 0.0,
                 aggregation=None, ratio_level: str = "token"):
        if ratio_level not in ("token", "sequence"):
            raise ValueError(f"unknown ratio_level {ratio_level!r}")
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.beta = beta
        self.aggregation = aggregation or SequenceMean()
        self.ratio_level = ratio_level

    def __call__(self, logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
                 mask_BT: torch.Tensor, norm: LossNormalizer | None = None, ref_logp_BT: torch.Tensor | None = None,
                 is_weight_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        mask_BT = mask_BT.to(logp_BT.dtype)
        norm = norm or LossNormalizer.of(mask_BT)
        log_ratio_BT = (logp_BT - old_logp_BT) * mask_BT
        if self.ratio_level == "sequence":
            seq_log_ratio_B1 = log_ratio_BT.sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1)
            log_ratio_BT = seq_log_ratio_B1.expand_as(logp_BT)
        ratio_BT = torch.exp(log_ratio_BT)
        adv_B1 = advantages_B.to(logp_BT.dtype)[:, None]
        low = 1 - self.clip_eps_low if self.clip_eps_low is not None else 0.0
        high = 1 + self.clip_eps_high if self.clip_eps_high is not None else float("inf")
        clipped_BT = ratio_BT.clamp(low, high)
        surrogate_BT = torch.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
        if is_weight_BT is not None:
            surrogate_BT = surrogate_BT * is_weight_BT.detach()
        loss_BT = -surrogate_BT
        kl_BT = None
        if self.beta > 0:
            if ref_logp_BT is None:
                raise ValueError("beta > 0 needs the reference logprobs")
            kl_BT = k3_kl(logp_BT, ref_logp_BT)
            loss_BT = loss_BT + self.beta * kl_BT
        loss = self.aggregation(loss_BT, mask_BT, norm)

        with torch.no_grad():
            tokens = mask_BT.sum().clamp(min=1)
            tmean = lambda x: float((x * mask_BT).sum() / tokens)
            metrics = {
                "tokens": float(mask_BT.sum()),
                "ratio/mean": tmean(ratio_BT),
                "ratio/max": float(ratio_BT.masked_fill(mask_BT == 0, float("-inf")).max()) if mask_BT.any() else 1.0,
                "clip/low_fraction": tmean(((ratio_BT < low) & (adv_B1 < 0)).to(mask_BT.dtype)),
                "clip/high_fraction": tmean(((ratio_BT > high) & (adv_B1 > 0)).to(mask_BT.dtype)),
            }
            metrics["clip/fraction"] = metrics["clip/low_fraction"] + metrics["clip/high_fraction"]
            if kl_BT is not None:
                metrics["kl"] = tmean(kl_BT)
            if is_weight_BT is not None:
                metrics["tis/weight_mean"] = tmean(is_weight_BT)
        return loss, metrics
