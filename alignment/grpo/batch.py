"""Rollout groups → padded training tensors, and the module whose forward gives per-token logprobs.

Shape legend: B sequences, S = longest prompt + completion − 1 (fed tokens, right-padded), C longest
completion, D hidden, Lm MoE layers, K experts per token, E routed experts.

A sequence x = prompt + completion is fed as x[:-1]; completion token c_j is predicted at position
P − 1 + j. Only those positions go through the LM head (`token_logprobs`, chunked, no [B, S, V] logits).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from model.logprobs import token_logprobs


@dataclass
class SequenceBatch:
    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    positions_BC: torch.Tensor
    """Index into S of the position that predicts completion token j (0 where padded)."""
    targets_BC: torch.Tensor
    """Completion tokens (0 where padded)."""
    mask_BC: torch.Tensor
    """1.0 on completion tokens that count in the loss."""
    advantages_B: torch.Tensor
    engine_logp_BC: torch.Tensor
    """Logprobs the rollout engine reported."""
    old_logp_BC: torch.Tensor | None = None
    """π_old: the trainer's logprobs before this batch's first update (filled by the trainer)."""
    ref_logp_BC: torch.Tensor | None = None
    """π_ref logprobs (β > 0 only)."""
    routing_replay_LBSK: torch.Tensor | None = None
    """Expert ids the engine chose, −1 where unknown (routing replay only)."""

    def __len__(self) -> int:
        return self.input_ids_BS.shape[0]

    def select(self, rows: slice) -> SequenceBatch:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif f.name == "routing_replay_LBSK":
                out[f.name] = value[:, rows]
            else:
                out[f.name] = value[rows]
        return SequenceBatch(**out)


def build_sequence_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], engine_logprobs: list[list[float]],
                         advantages: torch.Tensor, loss_rows: torch.Tensor, pad_token_id: int,
                         routed_experts: list[torch.Tensor | None] | None = None) -> SequenceBatch:
    """`loss_rows` [B] bool: sequences that count (False: overlong-masked, their tokens get mask 0)."""
    B = len(prompt_ids)
    S = max(len(p) + len(c) - 1 for p, c in zip(prompt_ids, completion_ids))
    C = max(max(len(c) for c in completion_ids), 1)
    input_BS = torch.full((B, S), pad_token_id, dtype=torch.long)
    attn_BS = torch.zeros(B, S, dtype=torch.long)
    pos_BC = torch.zeros(B, C, dtype=torch.long)
    tgt_BC = torch.zeros(B, C, dtype=torch.long)
    mask_BC = torch.zeros(B, C)
    engine_BC = torch.zeros(B, C)
    replay = None
    if routed_experts is not None:
        Lm, K = routed_experts[0].shape[1], routed_experts[0].shape[2]
        replay = torch.full((Lm, B, S, K), -1, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        fed = (p + c)[:-1]
        input_BS[b, :len(fed)] = torch.tensor(fed)
        attn_BS[b, :len(fed)] = 1
        n = len(c)
        pos_BC[b, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        tgt_BC[b, :n] = torch.tensor(c)
        mask_BC[b, :n] = float(loss_rows[b])
        engine_BC[b, :n] = torch.tensor(engine_logprobs[b][:n])
        if replay is not None:
            routed_TLK = routed_experts[b]
            T = min(routed_TLK.shape[0], len(fed))
            replay[:, b, :T] = routed_TLK[:T].permute(1, 0, 2)
    return SequenceBatch(input_BS, attn_BS, pos_BC, tgt_BC, mask_BC, advantages.float(), engine_BC,
                         routing_replay_LBSK=replay)


class PolicyLogprobs(nn.Module):
    """Wraps the causal LM so that DDP sees one forward: hidden states → completion logprobs (+ entropy),
    the MoE balance losses and the routed experts. Router gate probabilities are captured by hooks for
    the router-entropy metric."""

    def __init__(self, model: nn.Module, temperature: float, chunk_size: int = 1024):
        super().__init__()
        self.policy = model
        self.temperature = temperature
        self.chunk_size = chunk_size

    def causal_lm(self) -> nn.Module:
        model = self.policy
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, input_ids_BS, attention_mask_BS, positions_BC, targets_BC, routing_replay_LBSK=None,
                with_entropy: bool = False):
        lm = self.causal_lm()
        out = lm.model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, routing_replay=routing_replay_LBSK,
                       output_routing=True)
        h_BSD = out.last_hidden_state
        h_BCD = h_BSD.gather(1, positions_BC[..., None].expand(-1, -1, h_BSD.shape[-1]))
        logp_BC, entropy_BC = token_logprobs(h_BCD, lm.lm_head.weight, targets_BC, self.temperature,
                                             self.chunk_size, with_entropy, kernels=lm.config.kernels)
        return logp_BC, entropy_BC, out.balance_losses, out.routed_experts


class RouterProbe:
    """Forward hooks on every MoE gate; keeps the last forward's gate probabilities [N, E] (detached)."""

    def __init__(self, model: nn.Module):
        from model.moe import Router

        self.scores: list[torch.Tensor] = []
        self.active = False
        """Record only while True (the trainer's forwards), not during sampling."""
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, Router)]

    def _hook(self, module, inputs, output):
        if self.active:
            self.scores.append(output.detach())

    def pop(self) -> list[torch.Tensor]:
        scores, self.scores = self.scores, []
        return scores

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def moe_metrics(gate_scores: list[torch.Tensor], routed_LBSK: torch.Tensor | None, valid_BS: torch.Tensor,
                num_experts: int) -> dict[str, float]:
    """Router entropy (mean over valid tokens and layers, nats) and expert-load imbalance (max / mean load
    of the routed experts per layer, averaged over layers; 1 = perfectly balanced)."""
    metrics = {}
    valid_N = valid_BS.reshape(-1).bool()
    if gate_scores:
        ents = []
        for scores_NE in gate_scores:
            if scores_NE.shape[0] != valid_N.shape[0]:
                continue
            p = scores_NE[valid_N].float()
            ents.append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
        if ents:
            metrics["moe/router_entropy"] = sum(ents) / len(ents)
    if routed_LBSK is not None:
        imb = []
        for routed_BSK in routed_LBSK:
            ids = routed_BSK.reshape(-1, routed_BSK.shape[-1])[valid_N].reshape(-1)
            load_E = torch.bincount(ids, minlength=num_experts).float()
            imb.append(float(load_E.max() / load_E.mean().clamp_min(1e-12)))
        metrics["moe/load_imbalance"] = sum(imb) / len(imb)
    return metrics
