"""Rewards → advantages: group baselines, the std options, overlong shaping and zero-variance groups.

Shape legend: N groups (prompts), G completions per group.

    A_ig = (r_ig − mean_g' r_ig') / (σ + eps)      σ = std of group i     (`group`, the paper)
                                                   σ = std of the batch   (`batch`)
                                                   σ + eps := 1           (`none`, Dr. GRPO)

std is the population std (divide by G, not G − 1): the spread of the group as sampled. TRL divides
by G − 1; with G = 2 and rewards {0, 1} ours gives A = ±1, theirs ±0.71. The same advantage is given
to every token of a completion (outcome supervision).
"""

from __future__ import annotations

from typing import Literal

import torch


def group_advantages(rewards_NG: torch.Tensor, scale: Literal["group", "batch", "none"] = "group",
                     eps: float = 1e-4, batch_std: float | None = None) -> torch.Tensor:
    """Advantages [N, G] from rewards [N, G]. `batch_std`: the std over the WHOLE batch (all processes) for
    scale="batch"; default: the std of `rewards_NG` (correct on one process)."""
    dtype = rewards_NG.dtype if rewards_NG.is_floating_point() else torch.float32
    rewards_NG = rewards_NG.double()
    centred_NG = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred_NG.to(dtype)
    if scale == "group":
        std_N1 = rewards_NG.std(dim=1, keepdim=True, unbiased=False)
    elif scale == "batch":
        std = batch_std if batch_std is not None else float(rewards_NG.std(unbiased=False))
        std_N1 = torch.full_like(rewards_NG[:, :1], std)
    else:
        raise ValueError(f"unknown advantage scale {scale!r}")
    return (centred_NG / (std_N1 + eps)).to(dtype)


def zero_variance_groups(rewards_NG: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """[N] bool: groups whose rewards all agree (every advantage 0: no learning signal)."""
    return (rewards_NG.amax(dim=1) - rewards_NG.amin(dim=1)) <= tol


def overlong_soft_penalty(lengths: torch.Tensor, max_new_tokens: int, cache: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to L_max − cache tokens, then falling
    linearly to −penalty at L_max (and staying there)."""
    start = max_new_tokens - cache
    over = (lengths.double() - start).clamp(min=0) / cache
    return -penalty * over.clamp(max=1.0)
