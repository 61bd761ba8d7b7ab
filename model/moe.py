"""DeepSeekMoE (DeepSeek-V2 §2.2): shared + fine-grained routed experts, limited routing, balance
losses and token dropping.

Shape legend: B batch, T tokens per sequence, N = B·T flattened tokens, D hidden, E routed experts,
K experts per token (top-k), F expert intermediate size, G routing groups (devices), A assignments
(token, expert) pairs, C expert buffer rows.

Gate: s = softmax(h·W_gateᵀ) in fp32. Top-K routed experts per token; the weight of expert i is s_i,
renormalised over the K chosen only when `norm_topk_prob`. Following DeepSeek-V2's reference code,
`routed_scaling_factor` multiplies the un-normalised weights only (with renormalisation the weights
already sum to one); DeepSeek-V3 multiplies both — a departure worth knowing when porting configs.

Routing variants: `greedy` (plain top-K); `group_limited_greedy` (keep the `topk_group` groups whose
best expert scores highest, then top-K inside them); `device_limited_greedy`, the same selection
with the groups being the `ep_size` devices of expert parallelism and at most M of them per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekV2Config


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ⊙ up(x)): the dense FFN, the shared experts, and each routed expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))


# ---------------------------------------------------------------------------------------- routing
def limited_topk(scores_NE: torch.Tensor, k: int, n_groups: int, groups_per_token: int) -> torch.Tensor:
    """Top-k expert ids [N, K] restricted to the `groups_per_token` groups with the best max score."""
    if n_groups > 1 and groups_per_token < n_groups:
        N, E = scores_NE.shape
        group_best_NG = scores_NE.view(N, n_groups, E // n_groups).amax(-1)
        keep_groups_NG = torch.zeros_like(group_best_NG, dtype=torch.bool)
        keep_groups_NG.scatter_(1, group_best_NG.topk(groups_per_token, dim=-1).indices, True)
        keep_NE = keep_groups_NG.repeat_interleave(E // n_groups, dim=1)
        scores_NE = scores_NE.masked_fill(~keep_NE, float("-inf"))
    return scores_NE.topk(k, dim=-1).indices


def gate_weights(scores_NE: torch.Tensor, expert_ids_NK: torch.Tensor, config: DeepseekV2Config) -> torch.Tensor:
    """Weights [N, K] (fp32) of the chosen experts (see the module docstring for the scaling rule)."""
    weights_NK = scores_NE.gather(1, expert_ids_NK)
    if config.norm_topk_prob and expert_ids_NK.shape[1] > 1:
        return weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
    return weights_NK * config.routed_scaling_factor


# ---------------------------------------------------------------------------------- balance losses
def balance_losses(scores_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor, valid_BT: torch.Tensor,
                   config: DeepseekV2Config, per_sequence: bool) -> dict[str, torch.Tensor]:
    """The paper's three balance losses (unweighted), eqs. 12-20 of arXiv 2405.04434.

    expert: Σ_i f_i·P_i,   f_i = E/(K·T)·#tokens choosing i,   P_i = mean_t s_{i,t}
    device: Σ_d f'_d·P'_d, f'_d = mean_{i∈d} f_i,               P'_d = Σ_{i∈d} P_i
    comm:   Σ_d f''_d·P''_d, f''_d = G/(M·T)·#tokens sent to d,  P''_d = Σ_{i∈d} P_i
    T counts valid tokens only. `per_sequence` computes f and P per sequence and averages the losses
    over sequences that have tokens (the published seq_aux); otherwise over the whole batch. f is a
    count (no gradient); P carries the gradient to the gate.
    """
    B, T, E = scores_BTE.shape
    K = expert_ids_BTK.shape[-1]
    if not per_sequence:
        keep = valid_BT.reshape(-1)
        scores_BTE = scores_BTE.reshape(1, B * T, E)[:, keep]
        expert_ids_BTK = expert_ids_BTK.reshape(1, B * T, K)[:, keep]
        valid_BT = torch.ones(1, int(keep.sum()), dtype=torch.bool, device=keep.device)
    valid_BT1 = valid_BT[..., None].to(scores_BTE.dtype)
    tokens_B1 = valid_BT1.sum(1).clamp(min=1)
    chosen_BTE = torch.zeros_like(scores_BTE).scatter_(-1, expert_ids_BTK, 1.0) * valid_BT1
    f_BE = chosen_BTE.sum(1) * E / (K * tokens_B1)
    P_BE = (scores_BTE * valid_BT1).sum(1) / tokens_B1
    G = config.ep_size
    M = config.max_devices_per_token or min(K, G)
    f_dev_BG = f_BE.view(-1, G, E // G).mean(-1)
    P_dev_BG = P_BE.view(-1, G, E // G).sum(-1)
    sent_BTG = chosen_BTE.view(*chosen_BTE.shape[:2], G, E // G).amax(-1)
    f_comm_BG = sent_BTG.sum(1) * G / (M * tokens_B1)
    has_tokens_B = valid_BT.any(1).to(scores_BTE.dtype)
    n_seq = has_tokens_B.sum().clamp(min=1)

    def mean_over_sequences(loss_B: torch.Tensor) -> torch.Tensor:
        return (loss_B * has_tokens_B).sum() / n_seq

    return {
        "expert": mean_over_sequences((f_BE * P_BE).sum(-1)),
        "device": mean_over_sequences((f_dev_BG * P_dev_BG).sum(-1)),
        "comm": mean_over_sequences((f_comm_BG * P_dev_BG).sum(-1)),
    }


# ---------------------------------------------------------------------------------- token dropping
def capacity_keep_mask(scores_NE: torch.Tensor, expert_ids_NK: torch.Tensor, valid_N: torch.Tensor,
                       exempt_N: torch.Tensor, config: DeepseekV2Config) -> torch.Tensor:
    """Boolean [N, K]: which (token, expert) assignments survive per-device capacity.

    Capacity per device = ceil(capacity_factor · valid_tokens · K / G). Within each device the
    assignments with the lowest affinity s_{i,t} beyond capacity are dropped; assignments of exempt
    sequences are ranked first and so are never dropped while capacity allows (the paper keeps a share
    of sequences undropped). Padding assignments are always dropped.
    """
    N, K = expert_ids_NK.shape
    G = config.ep_size
    E = scores_NE.shape[1]
    capacity = math.ceil(config.capacity_factor * int(valid_N.sum()) * K / G)
    affinity_NK = scores_NE.gather(1, expert_ids_NK)  # in [0, 1]
    priority_NK = affinity_NK + 2.0 * exempt_N[:, None] - 4.0 * (~valid_N)[:, None]
    device_A = (expert_ids_NK // (E // G)).reshape(-1)
    # Sort by device, then by descending priority; rank within the device decides survival.
    order_A = torch.argsort(device_A * 8.0 - priority_NK.reshape(-1), stable=True)
    device_sorted_A = device_A[order_A]
    start_G = torch.searchsorted(device_sorted_A, torch.arange(G, device=device_A.device))
    rank_A = torch.arange(N * K, device=device_A.device) - start_G[device_sorted_A]
    keep_A = torch.empty_like(rank_A, dtype=torch.bool)
    keep_A[order_A] = rank_A < capacity
    return keep_A.view(N, K) & valid_N[:, None]


# ---------------------------------------------------------------------------------- experts
class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked, computed without a Python loop over experts.

    Parameters: gate_proj / up_proj [E, F, D], down_proj [E, D, F] (each slice an nn.Linear weight).
    The checkpoint stores them per expert (`experts.{e}.gate_proj.weight`); the load pre-hook below
    stacks such keys, and `model.checkpoint` splits them on save.

    Reference path: assignments are sorted by expert into a zero-padded [E, C, D] buffer
    (C = the most tokens any expert got), three batched matmuls, then a weighted scatter-add back.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, kernels: str = "torch"):
        super().__init__()
        self.num_experts = num_experts
        self.kernels = kernels  # "torch": the reference below; "triton": model.kernels.moe (fused grouped GEMMs)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self._register_load_state_dict_pre_hook(self._stack_per_expert_keys)

    def _stack_per_expert_keys(self, state_dict, prefix, *args) -> None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"{prefix}{e}.{name}.weight" for e in range(self.num_experts)]
            if keys[0] in state_dict and prefix + name not in state_dict:
                missing = [k for k in keys if k not in state_dict]
                if missing:
                    raise KeyError(f"checkpoint is missing expert weight {missing[0]!r}")
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])

    def forward(self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                keep_NK: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernels == "triton":
            from .kernels.moe import moe_experts

            return moe_experts(x_ND, self.gate_proj, self.up_proj, self.down_proj, expert_ids_NK, weights_NK, keep_NK)
        N, D = x_ND.shape
        K = expert_ids_NK.shape[1]
        expert_A = expert_ids_NK.reshape(-1)
        token_A = torch.arange(N, device=x_ND.device).repeat_interleave(K)
        weight_A = weights_NK.reshape(-1)
        if keep_NK is not None:
            keep_A = keep_NK.reshape(-1)
            expert_A, token_A, weight_A = expert_A[keep_A], token_A[keep_A], weight_A[keep_A]
        out_ND = torch.zeros_like(x_ND)
        if expert_A.numel() == 0:
            return out_ND
        order_A = torch.argsort(expert_A, stable=True)
        expert_A, token_A, weight_A = expert_A[order_A], token_A[order_A], weight_A[order_A]
        counts_E = torch.bincount(expert_A, minlength=self.num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        slot_A = torch.arange(expert_A.numel(), device=x_ND.device) - starts_E[expert_A]
        rows = int(counts_E.max())
        buffer_ECD = x_ND.new_zeros(self.num_experts, rows, D)
        buffer_ECD[expert_A, slot_A] = x_ND[token_A]
        hidden_ECF = F.silu(torch.bmm(buffer_ECD, self.gate_proj.transpose(1, 2))) * torch.bmm(
            buffer_ECD, self.up_proj.transpose(1, 2))
        y_ECD = torch.bmm(hidden_ECF, self.down_proj.transpose(1, 2))
        y_AD = y_ECD[expert_A, slot_A] * weight_A[:, None].to(x_ND.dtype)
        return out_ND.index_add(0, token_A, y_AD)


@dataclass
class RoutingInfo:
    """What one MoE layer reports besides its output."""

    expert_ids_NK: torch.Tensor
    """The routed experts chosen per token (for routing replay and load metrics)."""
    scores_NE: torch.Tensor
    """Gate probabilities (fp32)."""
    balance: dict[str, torch.Tensor] | None
    """Unweighted expert/device/comm balance losses (training only)."""
    kept_NK: torch.Tensor | None
    """Assignments that survived token dropping (None when dropless)."""


class Router(nn.Module):
    """The gate: `weight` [E, D]; checkpoint key `mlp.gate.weight`."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return F.linear(x_ND.float(), self.weight.float()).softmax(dim=-1)  # fp32 scores [N, E]


class DeepSeekMoE(nn.Module):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.gate = Router(config.n_routed_experts, config.hidden_size)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                     kernels=config.kernels)
        self.shared_experts = (SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor,
                replay_ids_BTK: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingInfo]:
        cfg = self.config
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        scores_NE = self.gate(x_ND)
        n_groups, groups_per_token = cfg.routing_groups
        expert_ids_NK = limited_topk(scores_NE, cfg.num_experts_per_tok, n_groups, groups_per_token)
        if replay_ids_BTK is not None:
            # Routing replay: use the recorded experts; a row containing -1 (not recorded, e.g. the
            # last sampled token) keeps the gate's own choice.
            replay_NK = replay_ids_BTK.reshape(B * T, -1).to(device=x_BTD.device, dtype=torch.long)
            recorded_N1 = (replay_NK >= 0).all(-1, keepdim=True)
            expert_ids_NK = torch.where(recorded_N1, replay_NK, expert_ids_NK)
        weights_NK = gate_weights(scores_NE, expert_ids_NK, cfg)
        kept_NK = None
        if self.training and cfg.capacity_factor is not None:
            exempt_B = torch.zeros(B, dtype=torch.bool, device=x_BTD.device)
            n_exempt = math.ceil(cfg.drop_exempt_fraction * B)
            if n_exempt:
                exempt_B[torch.randperm(B, device=x_BTD.device)[:n_exempt]] = True
            kept_NK = capacity_keep_mask(scores_NE, expert_ids_NK, valid_BT.reshape(-1),
                                         exempt_B.repeat_interleave(T), cfg)
        routed_ND = self.experts(x_ND, expert_ids_NK, weights_NK, kept_NK)
        balance = None
        if self.training:
            balance = balance_losses(scores_NE.view(B, T, -1), expert_ids_NK.view(B, T, -1), valid_BT, cfg,
                                     per_sequence=cfg.seq_aux)
        out_BTD = routed_ND.view(B, T, D)
        if self.shared_experts is not None:
            out_BTD = out_BTD + self.shared_experts(x_BTD)
        return out_BTD, RoutingInfo(expert_ids_NK, scores_NE, balance, kept_NK)
