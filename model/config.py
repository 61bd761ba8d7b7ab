"""DeepSeek-V2 configuration: the Hugging Face `deepseek_v2` config.json plus latentalign's own fields.

We subclass transformers' `DeepseekV2Config` so that config.json is read and written exactly as
transformers and vLLM expect it (including the legacy `rope_scaling` / `rope_theta` keys of the
published checkpoints, which transformers folds into `rope_parameters`). The fields below are the
ones the published config carries but transformers' class does not declare, and our own additions;
every field is checked for consistency in `validate_latentalign`, which names the offending field.

Presets: `DeepseekV2Config.preset("tiny" | "v2-lite" | "v2")`.
"""

from __future__ import annotations

import math
from typing import Literal

from transformers import DeepseekV2Config as _HFDeepseekV2Config

TOPK_METHODS = ("greedy", "group_limited_greedy", "device_limited_greedy")
KERNELS = ("torch", "triton")
MLA_IMPLS = ("auto", "naive", "absorb")


class DeepseekV2Config(_HFDeepseekV2Config):
    model_type = "deepseek_v2"

    num_experts_per_tok: int | None = 6
    """Top-K routed experts per token (transformers leaves it unset; 6 in both published configs)."""

    # --- fields of the published config.json that transformers' class leaves undeclared ---
    moe_layer_freq: int = 1
    """Every `moe_layer_freq`-th layer at or after `first_k_dense_replace` is MoE; the others dense."""
    aux_loss_alpha: float = 0.001
    """α1: coefficient of the expert-level balance loss (the paper's pre-training value is 0.003)."""
    seq_aux: bool = True
    """Balance-loss statistics per sequence (then averaged) instead of over the whole batch."""
    scoring_func: str = "softmax"
    """Gate scoring function; DeepSeek-V2 uses softmax (computed in fp32)."""

    # --- latentalign's own fields ---
    device_balance_alpha: float = 0.0
    """α2: coefficient of the device-level balance loss (paper: 0.05); 0 switches it off."""
    comm_balance_alpha: float = 0.0
    """α3: coefficient of the communication balance loss (paper: 0.02); 0 switches it off."""
    ep_size: int = 1
    """Devices the routed experts are spread over (expert parallelism); experts are split evenly."""
    max_devices_per_token: int | None = None
    """M of device-limited routing: each token reaches experts on at most M devices (paper: 3)."""
    capacity_factor: float | None = None
    """Per-device token capacity factor for token dropping in training; None = dropless."""
    drop_exempt_fraction: float = 0.0
    """Share of sequences per batch whose tokens are never dropped (the paper keeps ~10%)."""
    kernels: Literal["torch", "triton"] = "torch"
    """Compute path: plain PyTorch reference or the Triton kernels of model/kernels."""
    mla_impl: Literal["auto", "naive", "absorb"] = "auto"
    """MLA path: `naive` expands K/V per head; `absorb` attends over the latent cache; `auto` = naive
    without a cache, absorb when decoding from a cache."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.n_group is None:
            self.n_group = 1
        if self.topk_group is None:
            self.topk_group = 1
        self.validate_latentalign()

    # ------------------------------------------------------------------ checks
    def validate_latentalign(self) -> None:
        """Raise ValueError naming the field for any inconsistent combination."""

        def need(cond: bool, field: str, why: str) -> None:
            if not cond:
                raise ValueError(f"DeepseekV2Config.{field}={getattr(self, field)!r}: {why}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size",
                     "intermediate_size", "moe_intermediate_size", "n_routed_experts"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE rotates pairs: must be even")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be null or positive")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             f"MLA has one latent per token; must equal num_attention_heads ({self.num_attention_heads})")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(self.scoring_func == "softmax", "scoring_func", "DeepSeek-V2 gates score with softmax")
        k = self.num_experts_per_tok
        need(isinstance(k, int) and 1 <= k <= self.n_routed_experts, "num_experts_per_tok",
             f"top-k must be in [1, n_routed_experts={self.n_routed_experts}]")
        need(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
             f"must divide n_routed_experts={self.n_routed_experts}")
        need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
        if self.topk_method == "group_limited_greedy":
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= k, "topk_group",
                 f"topk_group groups of {per_group} experts cannot hold top-{k}")
        need(self.ep_size >= 1 and self.n_routed_experts % self.ep_size == 0, "ep_size",
             f"must divide n_routed_experts={self.n_routed_experts}")
        if self.topk_method == "device_limited_greedy":
            m = self.max_devices_per_token
            need(m is not None and 1 <= m <= self.ep_size, "max_devices_per_token",
                 f"device-limited routing needs 1 <= M <= ep_size={self.ep_size}")
            need(m * (self.n_routed_experts // self.ep_size) >= k, "max_devices_per_token",
                 f"M devices of {self.n_routed_experts // self.ep_size} experts cannot hold top-{k}")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor", "must be null or > 0")
        need(0.0 <= self.drop_exempt_fraction <= 1.0, "drop_exempt_fraction", "must be in [0, 1]")
        for name in ("aux_loss_alpha", "device_balance_alpha", "comm_balance_alpha"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.kernels in KERNELS, "kernels", f"must be one of {KERNELS}")
        need(self.mla_impl in MLA_IMPLS, "mla_impl", f"must be one of {MLA_IMPLS}")
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if rope.get(key) is None:
                    raise ValueError(f"DeepseekV2Config.rope_scaling: yarn needs `{key}`")

    # ------------------------------------------------------------------ derived
    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @qk_head_dim.setter
    def qk_head_dim(self, value: int) -> None:  # transformers' __post_init__ assigns it; it is derived here
        pass

    @property
    def routing_groups(self) -> tuple[int, int]:
        """(number of expert groups, groups a token may reach) for the configured routing."""
        if self.topk_method == "group_limited_greedy":
            return self.n_group, self.topk_group
        if self.topk_method == "device_limited_greedy":
            return self.ep_size, self.max_devices_per_token
        return 1, 1

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DESIGN.md §2)."""
        scale = self.qk_head_dim ** -0.5
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") == "yarn" and rope.get("mscale_all_dim"):
            m = yarn_mscale(rope["factor"], rope["mscale_all_dim"])
            scale *= m * m
        return scale

    def latent_cache_width(self) -> int:
        """Elements cached per token and layer: [c_kv ; k_pe]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> DeepseekV2Config:
        """`tiny` (tests; vLLM-compatible latent 512/64), `v2-lite`, `v2` (published configs)."""
        yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        common = dict(vocab_size=102400, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=100000, eos_token_id=100001, first_k_dense_replace=1,
                      norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
                      max_position_embeddings=163840, rope_scaling=yarn, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, n_shared_experts=2,
                      num_experts_per_tok=6, hidden_act="silu", moe_layer_freq=1)
        presets = {
            "v2": dict(common, num_hidden_layers=60, hidden_size=5120, num_attention_heads=128,
                       num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160,
                       moe_intermediate_size=1536, intermediate_size=12288,
                       topk_method="group_limited_greedy", n_group=8, topk_group=3,
                       routed_scaling_factor=16.0),
            "v2-lite": dict(common, num_hidden_layers=27, hidden_size=2048, num_attention_heads=16,
                            num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64,
                            moe_intermediate_size=1408, intermediate_size=10944, topk_method="greedy",
                            n_group=1, topk_group=1, routed_scaling_factor=1.0),
            # Tiny but vLLM-runnable: the latent head must keep DeepSeek's 512/64 (ENVIRONMENT.md) and
            # MoE dims multiples of 32. YaRN on with a small original length so it is exercised.
            "tiny": dict(common, vocab_size=512, num_hidden_layers=3, hidden_size=96, num_attention_heads=4,
                         num_key_value_heads=4, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=64,
                         v_head_dim=32, kv_lora_rank=512, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=192,
                         topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=2048,
                         rope_scaling=dict(yarn, factor=4, original_max_position_embeddings=512)),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(factor) + 1 (1 when not scaling)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
