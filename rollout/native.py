"""The `native` backend: our own latent-cache sampler (`model.generation.generate`), batched.

For machines without vLLM, for tests, and wherever per-token routed experts are needed (it always
can report them). It samples from an in-memory `DeepseekV2ForCausalLM` — the trainer's own policy
(then `update_weights` has nothing to copy) or a private copy loaded from `config.model`.

Every prompt is repeated G times and the sequences are decoded in batches of `max_num_seqs`; batch
b samples with seed `seed + b`, so two batches never replay one random stream.
"""

from __future__ import annotations

import dataclasses

import torch

from model import DeepseekV2ForCausalLM
from model.generation import SamplingConfig, generate

from .config import RolloutConfig
from .engine import Completion, RolloutEngine, find_tokenizer_dir, load_tokenizer
from .weights import policy_state_dict


class NativeEngine(RolloutEngine):
    def __init__(self, config: RolloutConfig, model: DeepseekV2ForCausalLM | None = None, tokenizer=None):
        if model is None:
            if config.model is None:
                raise ValueError("the native backend needs RolloutConfig.model (a checkpoint dir) or a live model")
            device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
            # whole in every process, also under a ZeRO-3 launch: the trainer refills it from the gathered policy
            model = DeepseekV2ForCausalLM.from_pretrained(config.model, dtype=config.dtype, device=device,
                                                          partition=False)
        self.model = model
        limit = model.config.max_position_embeddings
        if config.max_model_len > limit:
            config = dataclasses.replace(config, max_model_len=limit)  # positions beyond the model's are not defined
        if tokenizer is None:
            tokenizer = load_tokenizer(find_tokenizer_dir(config))
        super().__init__(config, model.config.eos_token_id, tokenizer)

    def _generate(self, prompt_ids, group_size, sampling: SamplingConfig) -> list[list[Completion]]:
        flat = [ids for ids in prompt_ids for _ in range(group_size)]
        step = self.config.max_num_seqs
        generations = []
        for b, start in enumerate(range(0, len(flat), step)):
            batch_sampling = dataclasses.replace(sampling, seed=sampling.seed + b)
            generations += generate(self.model, flat[start:start + step], batch_sampling,
                                    return_routing=self.config.return_routed_experts)
        completions = [Completion(token_ids=g.token_ids, logprobs=g.logprobs, finish_reason=g.finish_reason,
                                  routed_experts=g.routed_experts) for g in generations]
        return [completions[i * group_size:(i + 1) * group_size] for i in range(len(prompt_ids))]

    @torch.no_grad()
    def update_weights(self, named_tensors) -> None:
        if named_tensors is self.model:
            self.weights_version += 1
            return
        state = policy_state_dict(named_tensors)
        own = self.model.state_dict()
        for name, tensor in state.items():
            if name not in own:
                raise KeyError(f"update_weights: {name!r} is not a parameter of the rollout model")
            if own[name].shape != tensor.shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the rollout model's is {tuple(own[name].shape)}")
            own[name].copy_(tensor)
        self.weights_version += 1
