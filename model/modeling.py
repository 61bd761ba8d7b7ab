"""The DeepSeek-V2 network: decoder layers, the base model, the causal LM and the reward-model head.

Shape legend: B batch, T new tokens, P past (cached) tokens, S = P + T, D hidden, V vocab,
R2 rope frequency pairs, K experts per token, Lm MoE layers.

Every layer: x + MLA(RMSNorm(x)), then + FFN(RMSNorm(·)); the FFN is a dense SwiGLU for the first
`first_k_dense_replace` layers and DeepSeekMoE after. Subclasses transformers' `PreTrainedModel`
(so generate, PEFT, Trainer and gradient checkpointing work); checkpoints are read and written by
`model.checkpoint` in the Hugging Face deepseek_v2 layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.utils import ModelOutput

from . import checkpoint
from .attention import MultiHeadLatentAttention
from .config import DeepseekV2Config
from .moe import DeepSeekMoE, RoutedExperts, Router, RoutingInfo, SwiGLU
from .norm import RMSNorm
from .rope import rope_cos_sin, rope_inv_freq


@dataclass
class DeepseekV2Output(ModelOutput):
    """Base-model and causal-LM output.

    `balance_losses` holds the unweighted expert/device/comm losses summed over MoE layers (training
    only); `aux_loss` is their weighted sum α1·expert + α2·device + α3·comm, already in `loss`.
    `routed_experts` [Lm, B, T, K] are the experts each MoE layer chose (when `output_routing`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    past_key_values: object | None = None
    aux_loss: torch.Tensor | None = None
    balance_losses: dict[str, torch.Tensor] | None = None
    routed_experts: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=config.kernels)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=config.kernels)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepSeekMoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, h_BTD, cos_BTR2, sin_BTR2, mask_B1TS, valid_BT, cache=None, replay_ids_BTK=None):
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), cos_BTR2, sin_BTR2, mask_B1TS, cache)
        normed_BTD = self.post_attention_layernorm(h_BTD)
        if self.is_moe:
            ffn_BTD, routing = self.mlp(normed_BTD, valid_BT, replay_ids_BTK)
            return h_BTD + ffn_BTD, routing
        return h_BTD + self.mlp(normed_BTD), None


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    config: DeepseekV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RoutedExperts):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                p.normal_(0.0, std)

    # Checkpoints: the Hugging Face deepseek_v2 layout, safetensors only (model/checkpoint.py).
    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | str | None = "auto", device=None, init_missing=(),
                        ignore_unexpected=(), partition: bool | None = None, **config_overrides):
        """Partitioned under DeepSpeed ZeRO-3 unless partition=False; see `model.checkpoint.load_pretrained` for
        the key options."""
        return checkpoint.load_pretrained(cls, path, dtype=dtype, device=device, init_missing=init_missing,
                                          ignore_unexpected=ignore_unexpected, partition=partition,
                                          **config_overrides)

    def save_pretrained(self, save_directory, *, state_dict=None, is_main_process: bool = True,
                        max_shard_size: str | int = "5GB", **_ignored):
        """Write config.json + safetensors with HF key names (per-expert weights)."""
        if is_main_process:
            checkpoint.save_pretrained(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=config.kernels)
        inv_freq_R2, cos_scale = rope_inv_freq(config)
        # Not a buffer: derived from the config, never saved, and safe to build on the meta device.
        self._rope = (inv_freq_R2.to("cpu"), cos_scale)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, routing_replay=None, output_routing=False,
                output_hidden_states=False, **_kwargs) -> DeepseekV2Output:
        """routing_replay: [Lm, B, T, K] expert ids to use instead of the gate's choice (routing replay)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = h_BTD.shape
        device = h_BTD.device
        if use_cache and past_key_values is None:
            from transformers import DynamicCache
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        S = past + T
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, S)}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=device)[None].expand(B, T)
        valid_BT = (attention_mask[:, past:].bool() if attention_mask is not None
                    else torch.ones(B, T, dtype=torch.bool, device=device))
        mask_B1TS = None
        # Packed rows (TRL's padding-free packing): positions restart at 0 where a new sample begins;
        # attention must stay inside each sample, so the mask becomes block-diagonal causal.
        packed = position_ids is not None and past == 0 and T > 1 and bool((position_ids[:, 1:] == 0).any())
        if packed:
            segment_BT = (position_ids == 0).long().cumsum(-1)
            same_sample_BTT = segment_BT[:, :, None] == segment_BT[:, None, :]
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask_B1TS = (same_sample_BTT & causal_TT)[:, None]
            if attention_mask is not None:
                mask_B1TS = mask_B1TS & attention_mask.bool()[:, None, None, :]
            mask_B1TS = mask_B1TS | torch.eye(T, dtype=torch.bool, device=device)
        elif padded or past > 0:
            query_pos_T1 = torch.arange(past, S, device=device)[:, None]
            key_pos_1S = torch.arange(S, device=device)[None]
            mask_B1TS = (key_pos_1S <= query_pos_T1)[None, None].expand(B, 1, T, S)
            if attention_mask is not None:
                # Padding keys are masked; a padding query still sees itself so no row is empty.
                mask_B1TS = (mask_B1TS & attention_mask.bool()[:, None, None, :]) | (key_pos_1S == query_pos_T1)
        inv_freq_R2, cos_scale = self._rope
        cos_BTR2, sin_BTR2 = rope_cos_sin(inv_freq_R2, cos_scale, position_ids, h_BTD.dtype)

        routings: list[RoutingInfo] = []
        all_hidden = [] if output_hidden_states else None
        moe_idx = 0
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(h_BTD)
            replay = None
            if routing_replay is not None and layer.is_moe:
                replay = routing_replay[moe_idx]
            h_BTD, routing = layer(h_BTD, cos_BTR2, sin_BTR2, mask_B1TS, valid_BT, past_key_values, replay)
            if routing is not None:
                routings.append(routing)
                moe_idx += 1
        h_BTD = self.norm(h_BTD)
        if all_hidden is not None:
            all_hidden.append(h_BTD)

        balance = aux = None
        if routings and routings[0].balance is not None:
            balance = {k: sum(r.balance[k] for r in routings) for k in ("expert", "device", "comm")}
            cfg = self.config
            aux = (cfg.aux_loss_alpha * balance["expert"] + cfg.device_balance_alpha * balance["device"]
                   + cfg.comm_balance_alpha * balance["comm"])
        routed = None
        if output_routing and routings:
            routed = torch.stack([r.expert_ids_NK.view(B, T, -1) for r in routings])
        return DeepseekV2Output(last_hidden_state=h_BTD, past_key_values=past_key_values, aux_loss=aux,
                                balance_losses=balance, routed_experts=routed,
                                hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel, GenerationMixin):
    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                num_items_in_batch=None, routing_replay=None, output_routing=False,
                output_hidden_states=False, **kwargs) -> DeepseekV2Output:
        """Causal-LM loss = mean token cross-entropy over labels != -100 (or the sum divided by
        `num_items_in_batch`, as Trainer passes under gradient accumulation) + aux_loss in training."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         routing_replay=routing_replay, output_routing=output_routing,
                         output_hidden_states=output_hidden_states)
        h_BTD = out.last_hidden_state
        if logits_to_keep:
            h_BTD = h_BTD[:, -logits_to_keep:]
        logits_BTV = self.lm_head(h_BTD)
        loss = None
        if labels is not None:
            targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction=reduction)
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        out.loss, out.logits = loss, logits_BTV
        return out


class DeepseekV2ForSequenceClassification(DeepseekV2PreTrainedModel):
    """Backbone + linear `score` head read at the last real token: a scalar reward model when
    num_labels == 1. Same key names as transformers' class, so either library loads the other's."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepseekV2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        h_BTD = out.last_hidden_state
        B, T, _ = h_BTD.shape
        if attention_mask is not None:  # last position holding a real token (left or right padding)
            last_B = T - 1 - attention_mask.flip(1).long().argmax(1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            is_real_BT = (input_ids != self.config.pad_token_id).long()
            last_B = T - 1 - is_real_BT.flip(1).argmax(1)
        else:
            last_B = torch.full((B,), T - 1, device=h_BTD.device)
        logits_BL = self.score(h_BTD[torch.arange(B, device=h_BTD.device), last_B])
        loss = None
        if labels is not None:
            loss = F.mse_loss(logits_BL.squeeze(-1).float(), labels.float())
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits_BL)
