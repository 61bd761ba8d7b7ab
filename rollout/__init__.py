"""Group rollouts for GRPO: G sampled completions per prompt with logprobs, from vLLM (in-process or
a server) or our own latent-cache sampler, plus weight sync from the trainer's live policy.

    from rollout import RolloutConfig, SamplingConfig, build_engine
    engine = build_engine(RolloutConfig(backend="vllm", model="/ckpt/policy", dtype="bfloat16"))
    groups = engine.generate_groups(prompts, group_size=8, sampling=SamplingConfig(max_new_tokens=512))
    engine.update_weights(policy)        # our names; LoRA merged; converted per backend

Backends: rollout/vllm_engine.py (`vllm`), rollout/client.py + rollout/serve.py (`vllm_server`),
rollout/native.py (`native`). The interface and the logprob convention: rollout/engine.py.
"""

from model.generation import SamplingConfig

from .config import RolloutConfig, RolloutConfigError
from .engine import Completion, PromptTooLongError, RolloutEngine, RolloutGroup
from .weights import checkpoint_tensors, merged_lora_state_dict, policy_state_dict


def build_engine(config: RolloutConfig | dict, *, model=None, tokenizer=None) -> RolloutEngine:
    """The engine `config.backend` names. `model`: a live DeepseekV2ForCausalLM for the native backend
    (sampling straight from the trainer's policy); `tokenizer`: overrides the one found on disk."""
    if isinstance(config, dict):
        config = RolloutConfig.from_dict(config)
    if model is not None and config.backend != "native":
        raise ValueError(f"a live model can only back the native engine, not {config.backend!r}")
    if config.backend == "native":
        from .native import NativeEngine

        return NativeEngine(config, model=model, tokenizer=tokenizer)
    if config.backend == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(config, tokenizer=tokenizer)
    from .client import ServerEngine

    return ServerEngine(config)


def __getattr__(name):  # the client pulls in httpx: import it only when asked for
    if name == "RolloutServerError":
        from .client import RolloutServerError

        return RolloutServerError
    raise AttributeError(name)


__all__ = [
    "Completion",
    "PromptTooLongError",
    "RolloutConfig",
    "RolloutConfigError",
    "RolloutEngine",
    "RolloutGroup",
    "RolloutServerError",
    "SamplingConfig",
    "build_engine",
    "checkpoint_tensors",
    "merged_lora_state_dict",
    "policy_state_dict",
]
