"""The DeepSeek-V2 MoE/MLA policy model (reference PyTorch paths, Triton kernels behind a switch)."""

from .cache import LatentCache, kv_cache_bytes_per_token
from .checkpoint import CheckpointError
from .config import DeepseekV2Config
from .modeling import (
    DeepseekV2ForCausalLM,
    DeepseekV2ForSequenceClassification,
    DeepseekV2Model,
    DeepseekV2Output,
)

__all__ = [
    "CheckpointError",
    "DeepseekV2Config",
    "DeepseekV2ForCausalLM",
    "DeepseekV2ForSequenceClassification",
    "DeepseekV2Model",
    "DeepseekV2Output",
    "LatentCache",
    "kv_cache_bytes_per_token",
]
