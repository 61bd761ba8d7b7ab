"""Greedy completions of prompts straight from a model, for the evaluators (alignment.evaluators).

Prompts are rendered with the tokenizer's chat template plus the generation prompt (the rendering
the model was trained on); our DeepseekV2 models decode with the latent-cache sampler of
`model.generation`, any other causal LM with transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _unwrap(model):
    """The module that generates: PEFT's wrapper exposes the base model (its layers carry the adapters)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def render_prompts(tokenizer, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt (a messages list or a plain string) with the generation prompt."""
    ids = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]))
    return ids


def generate_completions(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int = 64,
                         batch_size: int = 64) -> list[str]:
    """Greedy completion text (special tokens dropped) for every prompt."""
    import torch

    from model.generation import SamplingConfig, generate
    from model.modeling import DeepseekV2PreTrainedModel

    model = _unwrap(model)
    prompt_ids = render_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    completions: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start:start + batch_size]
        if isinstance(model, DeepseekV2PreTrainedModel):
            sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(eos,))
            token_lists = [g.token_ids for g in generate(model, batch, sampling)]
        else:  # any transformers causal LM: left-padded batch through its own generate
            was_training = model.training
            model.eval()
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            width = max(len(p) for p in batch)
            device = next(model.parameters()).device
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad)
            model.train(was_training)
            token_lists = [row[width:].tolist() for row in out]
        completions.extend(tokenizer.decode(tokens, skip_special_tokens=True) for tokens in token_lists)
    return completions
