"""The engine interface every backend implements, and what it returns.

    groups = engine.generate_groups(prompts, group_size=G, sampling=SamplingConfig(...))
    engine.update_weights(policy.state_dict())   # our parameter names; converted per backend
    engine.sleep(); ...train...; engine.wake()
    engine.close()

A prompt is token ids (`list[int]`), text (`str`, tokenized as is, no special tokens added), or chat
messages (`list[dict]`, rendered with the tokenizer's chat template plus the generation prompt).
Shape legend for routed experts: T = prompt + completion − 1 fed tokens, Lm MoE layers, K experts.

Logprobs are those of the distribution the token was sampled from (vLLM's `processed_logprobs`):
log-softmax(logits / temperature) after top-k / top-p. Without top-k / top-p, that is exactly what a
trainer recomputes from the policy; with them, the trainer sees the truncated support.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.generation import SamplingConfig

from .config import RolloutConfig

Prompt = list[int] | str | list[dict]


class PromptTooLongError(ValueError):
    """prompt + max_new_tokens exceeds the engine's max_model_len (and truncation is off)."""


@dataclass
class Completion:
    token_ids: list[int]
    """Sampled tokens, a final stop token included."""
    logprobs: list[float]
    """The engine's logprob of each sampled token (module docstring)."""
    finish_reason: str
    """`stop` (a stop token was sampled) or `length` (max_new_tokens reached)."""
    text: str | None = None
    """Decoded completion (None without a tokenizer)."""
    routed_experts: torch.Tensor | None = field(default=None, repr=False)
    """[T, Lm, K] expert ids per fed token, prompt included (None where the engine cannot report them)."""


@dataclass
class RolloutGroup:
    prompt_ids: list[int]
    """The prompt as the engine saw it (after chat templating / truncation)."""
    completions: list[Completion]
    """G samples for this prompt."""
    prompt_text: str | None = None
    """The prompt decoded (or as given, for text prompts); None without a tokenizer."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the server's wire format)."""
        return {"prompt_ids": self.prompt_ids, "prompt_text": self.prompt_text,
                "completions": [{"token_ids": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                                 "text": c.text,
                                 "routed_experts": None if c.routed_experts is None else c.routed_experts.tolist()}
                                for c in self.completions]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutGroup:
        completions = []
        for c in data["completions"]:
            routed = c.get("routed_experts")
            completions.append(Completion(token_ids=c["token_ids"], logprobs=c["logprobs"],
                                          finish_reason=c["finish_reason"], text=c.get("text"),
                                          routed_experts=None if routed is None else torch.tensor(routed)))
        return cls(prompt_ids=data["prompt_ids"], completions=completions, prompt_text=data.get("prompt_text"))


def sampling_to_dict(sampling: SamplingConfig) -> dict[str, Any]:
    out = dataclasses.asdict(sampling)
    out["stop_token_ids"] = list(sampling.stop_token_ids)
    return out


def sampling_from_dict(data: dict[str, Any]) -> SamplingConfig:
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown sampling key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    data = dict(data)
    if "stop_token_ids" in data:
        data["stop_token_ids"] = tuple(data["stop_token_ids"])
    return SamplingConfig(**data)


def find_tokenizer_dir(config: RolloutConfig) -> str | None:
    if config.tokenizer is not None:
        return config.tokenizer
    if config.model is not None and any((Path(config.model) / f).exists()
                                        for f in ("tokenizer.json", "tokenizer_config.json")):
        return config.model
    return None


class RolloutEngine:
    """Base of the backends: prompt normalisation, length policy and the shared defaults.

    Subclasses implement `_generate(prompt_ids, group_size, sampling) -> list[list[Completion]]`
    (without text) and `update_weights`; `sleep` / `wake` / `close` default to what a CPU engine can do.
    """

    def __init__(self, config: RolloutConfig, eos_token_id: int | None, tokenizer=None):
        self.config = config
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        self.sleeping = False
        self.weights_version = 0
        """How many `update_weights` calls this engine has applied."""

    # ------------------------------------------------------------------ interface
    def generate_groups(self, prompts: list[Prompt], group_size: int,
                        sampling: SamplingConfig | None = None) -> list[RolloutGroup]:
        """G completions for every prompt, in prompt order."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if self.sleeping:
            raise RuntimeError("the rollout engine is asleep: call wake() before generating")
        sampling = self.resolve_sampling(sampling)
        prompt_ids = [self.prompt_to_ids(p, i, sampling.max_new_tokens) for i, p in enumerate(prompts)]
        completions = self._generate(prompt_ids, group_size, sampling) if prompt_ids else []
        groups = []
        for prompt, ids, samples in zip(prompts, prompt_ids, completions):
            if self.tokenizer is not None:
                for c in samples:
                    c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=self.config.skip_special_tokens)
            prompt_text = prompt if isinstance(prompt, str) else (
                self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else None)
            groups.append(RolloutGroup(prompt_ids=ids, completions=samples, prompt_text=prompt_text))
        return groups

    def update_weights(self, named_tensors) -> None:
        """Load new policy weights: a state dict / (name, tensor) pairs with OUR model's names, or a model
        (a PEFT model is merged first; see `rollout.weights.policy_state_dict`)."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free accelerator memory while the trainer runs; a flag only where the backend cannot."""
        self.sleeping = True

    def wake(self) -> None:
        self.sleeping = False

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ helpers for subclasses
    def _generate(self, prompt_ids: list[list[int]], group_size: int,
                  sampling: SamplingConfig) -> list[list[Completion]]:
        raise NotImplementedError

    def resolve_sampling(self, sampling: SamplingConfig | None) -> SamplingConfig:
        """Fill the defaults: max_new_tokens from the config, eos as a stop token, a seed, processed logprobs."""
        if sampling is None:
            sampling = SamplingConfig(max_new_tokens=self.config.max_new_tokens)
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if sampling.max_new_tokens >= self.config.max_model_len:
            raise PromptTooLongError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in "
                                     f"max_model_len={self.config.max_model_len}")
        stops = tuple(sampling.stop_token_ids)
        if self.config.stop_at_eos and self.eos_token_id is not None and self.eos_token_id not in stops:
            stops = stops + (self.eos_token_id,)
        seed = sampling.seed if sampling.seed is not None else self.config.seed
        # Every engine reports processed logprobs (module docstring); vLLM can report nothing else.
        return dataclasses.replace(sampling, stop_token_ids=stops, seed=seed, logprobs_mode="processed")

    def prompt_to_ids(self, prompt: Prompt, index: int, max_new_tokens: int) -> list[int]:
        is_text = isinstance(prompt, str)
        is_chat = isinstance(prompt, list | tuple) and len(prompt) > 0 and isinstance(prompt[0], dict)
        if (is_text or is_chat) and self.tokenizer is None:
            raise ValueError(f"prompt {index} is text but the engine has no tokenizer "
                             "(set RolloutConfig.tokenizer or save one beside the model)")
        if is_text:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif is_chat:
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        elif isinstance(prompt, list | tuple):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"prompt {index}: expected token ids, text or chat messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        room = self.config.max_model_len - max_new_tokens
        if len(ids) > room:
            if self.config.prompt_truncation == "left":
                return ids[-room:]
            raise PromptTooLongError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"max_model_len={self.config.max_model_len} (at most {room} prompt tokens). Shorten it, raise "
                "max_model_len, or set prompt_truncation: left")
        return ids


def load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
