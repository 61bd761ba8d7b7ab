"""Generation-based evaluation: greedy answers to held-out prompts, scored by a reward function.

The SFT stage hooks `exact_match_hook` into its evaluation; tests call `exact_match_accuracy` on a
model directly. Prompts are rendered with the tokenizer's chat template plus the generation prompt
(the rendering the model was trained on); our DeepseekV2 models decode with the latent-cache sampler
of `model.generation`, any other causal LM with transformers' `generate`. A completion is scored by
a registered reward (`math` by default: math-verify against the row's `answer`), so the checking
logic lives in one place, `rewards/`. Accuracy = mean score over the rows (a None score counts as 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

EvalHook = Callable[[Any, Any], dict[str, float]]
"""`hook(model, tokenizer) -> {metric name: value}`; the SFT trainer logs them with the eval prefix."""


@dataclass
class GenerationEvalConfig:
    """The generation-based eval of the SFT stage (a recipe's `evaluation:` section)."""

    prompt_files: list[str] = field(default_factory=list)
    """Prompt datasets (`prompt` + the reward's columns, e.g. math_grpo/test.jsonl); empty turns it off."""
    reward: str = "math"
    """Registered reward that scores a completion (1.0 = correct); `math` checks the `answer` column."""
    answer_column: str = "answer"
    """Column passed to the reward as the gold answer (keyword `answer`)."""
    max_samples: int | None = None
    """Score only the first N prompts; None scores all."""
    max_new_tokens: int = 64
    """Generation budget per prompt (greedy)."""
    batch_size: int = 64
    """Prompts decoded together."""
    metric_name: str = "exact_match"
    """Name the accuracy is logged under (with the eval prefix: eval_exact_match)."""

    def __post_init__(self) -> None:
        if isinstance(self.prompt_files, str):
            raise ValueError("evaluation.prompt_files must be a list of paths, not a single string")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"evaluation.{name} must be positive, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"evaluation.max_samples must be positive or None, got {self.max_samples}")


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


def exact_match_accuracy(model, tokenizer, prompts: Sequence[Any], answers: Sequence[Any], reward: str = "math",
                         max_new_tokens: int = 64, batch_size: int = 64) -> tuple[float, list[str]]:
    """(share of prompts whose greedy completion the reward scores as correct, the completions)."""
    from rewards import get_reward

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    scores = get_reward(reward)(list(prompts), completions, answer=list(answers))
    return sum(float(s or 0.0) for s in scores) / len(scores), completions


def exact_match_hook(config: GenerationEvalConfig) -> EvalHook | None:
    """An eval hook scoring the configured prompt files, or None when none are configured."""
    if not config.prompt_files:
        return None
    from alignment.data import DataConfig, load_prompt_dataset

    rows = load_prompt_dataset(DataConfig(train_files=list(config.prompt_files),
                                          max_train_samples=config.max_samples),
                               required_columns=(config.answer_column,))["train"]
    prompts, answers = list(rows["prompt"]), list(rows[config.answer_column])

    def hook(model, tokenizer) -> dict[str, float]:
        accuracy, _ = exact_match_accuracy(model, tokenizer, prompts, answers, config.reward,
                                           config.max_new_tokens, config.batch_size)
        return {config.metric_name: accuracy}

    return hook
