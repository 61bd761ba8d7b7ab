"""`model`: the scalar output of a reward model loaded from a local directory.

Two kinds of directory load:
- ours: config.json says `"model_type": "deepseek_v2"` and `"architectures":
  ["DeepseekV2ForSequenceClassification"]` (what the RM stage saves) → `model.DeepseekV2ForSequenceClassification`;
- any transformers `AutoModelForSequenceClassification` checkpoint.
Either must have one label (num_labels == 1): its logit is the reward.

Scoring: the tokenizer saved beside the weights renders [prompt turns..., assistant completion] with
its chat template (the RM was trained on that rendering); without a template the text is prompt +
completion. Batches of `batch_size` are padded and scored in eval mode under inference_mode on
`device`. Inputs longer than `max_length` tokens lose their *start*: the score is read at the last
token, so the end of the completion must survive truncation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rewards.chat import as_messages, prompt_text
from rewards.registry import reward

if TYPE_CHECKING:
    import torch

OUR_ARCHITECTURE = "DeepseekV2ForSequenceClassification"


def load_reward_model(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a one-label sequence-classification model (ours or a transformers one) from `path`."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"reward model directory {path} has no config.json")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "deepseek_v2" and OUR_ARCHITECTURE in config.get("architectures", []):
        from model import DeepseekV2ForSequenceClassification  # lazy: rewards must not need the model package

        # whole in every process, also under a ZeRO-3 launch: a frozen scorer, each process scores its own
        # completions (a partitioned model's forward would be collective)
        model = DeepseekV2ForSequenceClassification.from_pretrained(path, dtype=dtype or "auto", partition=False)
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype or "auto")
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            # transformers builds every model partitioned once a ZeRO-3 launch is active, with no switch to
            # load one whole; a partitioned scorer holds empty shards and cannot score a process's own batch.
            raise ValueError(f"reward model {path}: a transformers model loads partitioned (empty shards) under a "
                             "DeepSpeed ZeRO-3 launch and cannot score each process's completions; under ZeRO-3 use a "
                             "DeepSeek-V2 reward model of ours (loaded whole in every process), or launch with ZeRO-2")
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels != 1:
        raise ValueError(f"reward model {path} has num_labels={num_labels}; a scalar reward model needs 1")
    return model


@reward("model")
class RewardModel:
    """Reward = the logit of a scalar reward model on the rendered (prompt, completion) chat."""

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int = 4096,
    ) -> None:
        """`path`: the model directory (weights, config.json, tokenizer); `device`: e.g. "cuda:1"
        (default: cuda if available, else cpu); `dtype`: "float32" | "bfloat16" | "float16" (default:
        the checkpoint's); `max_length`: tokens kept per sample, from the end."""
        import torch  # lazy, like transformers: `import rewards` should not pay for torch
        from transformers import AutoTokenizer

        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype, None) if dtype is not None else None
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"reward model dtype {dtype!r} is not a torch dtype")
        self._attach(load_reward_model(path, torch_dtype).to(self.device).eval(), AutoTokenizer.from_pretrained(path))

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 8, max_length: int = 4096) -> RewardModel:
        """Score with a live one-label model and its tokenizer (e.g. the reward model being trained), on
        the model's device and in its current mode; the tokenizer is copied (scoring truncates on the left)."""
        import copy

        self = cls.__new__(cls)
        self.path, self.batch_size, self.max_length = None, batch_size, max_length
        self.device = next(model.parameters()).device
        self._attach(model, copy.deepcopy(tokenizer))
        return self

    def _attach(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {self.path or 'the model'} has neither a pad nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            # transformers' classifiers find the last real token through pad_token_id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def render(self, prompt: object, completion: str) -> str:
        """The text the reward model reads for one sample."""
        if self.tokenizer.chat_template:
            messages = as_messages(prompt) + [{"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt_text(prompt) + completion

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        import torch

        scores: list[float] = []
        # A template already holds the special tokens it wants; do not add a second BOS.
        add_special = not self.tokenizer.chat_template
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                truncation=True, max_length=self.max_length, add_special_tokens=add_special,
            ).to(self.device)
            with torch.inference_mode():
                logits_B1 = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores.extend(logits_B1[:, 0].float().cpu().tolist())
        return scores

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        return self.score_texts([self.render(p, c) for p, c in zip(prompts, completions, strict=True)])
