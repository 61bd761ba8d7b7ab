"""`GRPOConfig`: a recipe's `grpo:` section, one typed field per knob (docs/DESIGN.md §3).

The section maps onto the dataclass one to one: `GRPOConfig.from_dict(section, source)` names the key
and the file on an unknown or ill-typed key (the shared `model.typed_config.from_mapping` check).
Defaults are the DeepSeekMath/DeepSeek-V2 GRPO of the paper: group-std advantages, symmetric clip
0.2, per-sequence mean aggregation, token-level ratio, μ = 1, KL to a frozen reference with β = 0.04.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass
class GRPOConfig:
    # ------------------------------------------------------------------ batch shape
    prompts_per_step: int = 8
    """Prompts per optimizer step over all processes (the global batch is prompts_per_step × group_size)."""
    group_size: int = 8
    """G: completions sampled per prompt."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one process; gradients accumulate over the rest of the batch."""
    max_steps: int = 100
    """Rollout steps to run (each = one rollout batch and `updates_per_batch` optimizer steps)."""
    # ------------------------------------------------------------------ sampling
    max_new_tokens: int = 64
    """Completion budget L_max."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's logprobs use the same temperature (log_softmax(logits/τ))."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (the trainer then sees the truncated support, see rollout/engine.py)."""
    top_k: int = 0
    """Top-k sampling of the rollouts (0 = off)."""
    # ------------------------------------------------------------------ advantages
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """Divide (r − group mean) by the group's std (paper), the whole batch's std, or nothing (Dr. GRPO)."""
    advantage_eps: float = 1e-4
    """Added to the std before dividing."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards all agree (zero advantage) and refill the batch with fresh prompts (DAPO)."""
    max_refill_rounds: int = 4
    """Dynamic sampling: extra rollout rounds at most before training on a short batch."""
    # ------------------------------------------------------------------ loss
    clip_eps_low: float = 0.2
    """ε_low: the ratio is clipped from below at 1 − ε_low."""
    clip_eps_high: float = 0.2
    """ε_high: the ratio is clipped from above at 1 + ε_high (DAPO's clip-higher: 0.28)."""
    beta: float = 0.04
    """β: weight of the k3 KL to the reference policy; 0 skips the reference model entirely."""
    reference: Literal["frozen_copy", "disable_adapter"] = "frozen_copy"
    """Reference policy: a frozen copy of the starting model, or (LoRA) the same model with adapters off."""
    aggregation: Literal["sequence_mean", "token_mean", "constant"] = "sequence_mean"
    """Loss over tokens: mean per sequence then over sequences (paper), mean over all tokens (DAPO),
    or sum over tokens / (sequences × max_new_tokens) (Dr. GRPO)."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO) or the length-normalised sequence ratio (GSPO)."""
    updates_per_batch: int = 1
    """μ: optimizer steps per rollout batch; the batch is split into μ equal parts; old logprobs are kept."""
    # ------------------------------------------------------------------ off-policy care
    tis_cap: float | None = None
    """Truncated importance sampling against the rollout engine's logprobs: weight min(π_old/π_engine, cap);
    None = off."""
    overlong: Literal["none", "mask", "soft_penalty"] = "none"
    """Completions cut at max_new_tokens: trained on as is, left out of the loss, or penalised (DAPO)."""
    overlong_cache: int = 16
    """Soft penalty: the last `overlong_cache` tokens of the budget ramp the penalty from 0 to −overlong_penalty."""
    overlong_penalty: float = 1.0
    """Soft penalty: the reward subtracted at (and beyond) the full budget."""
    # ------------------------------------------------------------------ MoE
    balance_coef_expert: float = 0.0
    """Weight of the expert-level balance loss during RL (off by default: it fights the policy gradient)."""
    balance_coef_device: float = 0.0
    """Weight of the device-level balance loss during RL."""
    balance_coef_comm: float = 0.0
    """Weight of the communication-level balance loss during RL."""
    routing_replay: bool = False
    """Training forwards use the experts the rollout engine chose (needs an engine that reports them)."""
    # ------------------------------------------------------------------ optimisation
    learning_rate: float = 1e-6
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW (β1, β2)."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps, then constant."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk of the logprob computation (peak memory = one chunk's logits)."""
    seed: int = 0
    """Seed of data order, sampling and everything else random."""
    seed_per_group: bool = True
    """Sample each group with its own seed (from seed, step, prompt index): the rollouts do not depend on how
    prompts are sharded over processes (1 process == N processes). False batches all groups in one call (faster)."""
    # ------------------------------------------------------------------ bookkeeping
    save_every: int = 50
    """Write a checkpoint every N rollout steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are deleted after a new one is complete)."""
    eval_every: int = 0
    """Run the eval hooks every N rollout steps (0 = never, except as asked by the caller)."""
    log_completions: int = 0
    """Write this many sample completions per step to completions.jsonl (0 = none)."""
    progress_bar: bool = True
    """Show a progress bar on the main process."""
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""

    def __post_init__(self) -> None:
        positive = ("prompts_per_step", "group_size", "micro_batch_size", "max_steps", "max_new_tokens",
                    "updates_per_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError("grpo.clip_eps_low / clip_eps_high must be >= 0")
        if self.clip_eps_low >= 1:
            raise ValueError(f"grpo.clip_eps_low must be < 1, got {self.clip_eps_low}")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"grpo.tis_cap must be > 0 or null, got {self.tis_cap}")
        if self.temperature <= 0:
            raise ValueError("grpo.temperature must be > 0 (the policy gradient needs a sampling distribution)")
        if len(self.adam_betas) != 2:
            raise ValueError(f"grpo.adam_betas must hold two numbers, got {self.adam_betas}")
        if self.overlong == "soft_penalty" and not 0 < self.overlong_cache <= self.max_new_tokens:
            raise ValueError("grpo.overlong_cache must lie in (0, max_new_tokens]")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<recipe>") -> GRPOConfig:
        """From a recipe's `grpo:` section; an unknown or ill-typed key raises ConfigError naming it."""
        from model.typed_config import from_mapping

        return from_mapping(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
