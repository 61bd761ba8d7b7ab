"""Reward models: pairwise Bradley–Terry training of a scalar reward model (`run_reward_model`).

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected))      mean over the pairs of a micro-batch

(+ an optional centring term c·mean(r²), TRL's `center_rewards_coefficient`). r is the one logit of a
sequence-classification model read at the last real token: our `DeepseekV2ForSequenceClassification`
(the DeepseekV2 backbone + a linear `score` head) or any transformers AutoModelForSequenceClassification.
TRL's RewardTrainer does the work: it renders prompt + reply with the tokenizer's chat template (the
same rendering `rewards/model_reward.py` scores at inference), batches chosen and rejected together,
and logs eval_accuracy (share of pairs with r_chosen > r_rejected, averaged over eval batches).
What we add:

- Initialisation: a fresh model from a preset, a saved reward model, or an SFT (causal-LM) checkpoint
  whose backbone is copied and whose `score` head starts from the init distribution (the usual
  InstructGPT / DeepSeek recipe: the RM starts from the SFT model).
- Our MoE balance losses: our sequence classifier does not return them, so a forward hook on the
  backbone picks up its weighted aux loss (α1·expert + α2·device + α3·comm) and it is added to the
  pairwise loss of the micro-batch (both per-micro-batch means; Trainer divides by the accumulation).
- Saving: the model's own `save_pretrained` (config.json architectures
  ["DeepseekV2ForSequenceClassification"], safetensors) + tokenizer, the directory layout
  `rewards.model_reward` loads; LoRA is merged before the final save.
- `pairwise_accuracy` over a preference split (exact count, not a mean of batch means), run at the end
  on the saved directory through `rewards.RewardModel`, so the reported number is the one the RL stage
  will see.
- The recipe's `eval:` evaluators (e.g. `rm_accuracy` on held-out pairs, scoring the model in training)
  and user callbacks, on their own schedule (alignment.eval_callback, as in SFT).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignment.data import EVAL_SPLIT, TRAIN_SPLIT, DataConfig
from alignment.evaluators import Callback, EvalConfig
from alignment.sft import (
    LoggingConfig,
    ModelConfig,
    OutputConfig,
    TrainerSettings,
    add_eval_callback,
    apply_lora,
    build_deepseek,
    callbacks,
    load_tokenizer,
    resolve_resume,
    save_final_and_notify,
    trainer_logging_args,
)

OUR_RM_ARCHITECTURE = "DeepseekV2ForSequenceClassification"


@dataclass
class RewardTrainingConfig(TrainerSettings):
    """Optimisation and batching of reward-model training (a recipe's `training:` section); the shared
    fields are TrainerSettings', counted in preference pairs (the model sees twice as many sequences)."""

    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    max_length: int | None = 1024
    """Pairs whose chosen or rejected rendering is longer are dropped (TRL's rule); None keeps all."""
    center_rewards_coefficient: float | None = None
    """Weight of mean(r²), which keeps rewards centred on 0 (None turns it off)."""


@dataclass
class RewardModelConfig:
    """The whole reward-model stage."""

    model: ModelConfig
    """Starting point: a preset (fresh), a reward model, an SFT checkpoint (backbone copied) or any
    transformers model directory (loaded with AutoModelForSequenceClassification, num_labels=1)."""
    data: DataConfig
    """Preference (`prompt`, `chosen`, `rejected`) data and its eval split."""
    output: OutputConfig
    """Checkpoints and the final reward model (+ tokenizer)."""
    training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    """Optimisation and batching."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluators (e.g. rm_accuracy on held-out pairs), their schedule and user callbacks."""


@dataclass
class RewardModelResult:
    """What `run_reward_model` returns."""

    output_dir: str
    """Directory of the final reward model; `rewards.get_reward("model", path=output_dir)` loads it."""
    global_step: int
    """Optimizer steps done (counting those before a resume)."""
    train_loss: float
    """Mean training loss over the steps of this run."""
    eval_metrics: dict[str, float]
    """Final eval metrics: Trainer's eval_loss / eval_accuracy, `pairwise_accuracy` (exact, on the
    saved model) when there is an eval split, and the `eval:` evaluators' `eval_<name>/<metric>`."""
    log_history: list[dict[str, float]]
    """Every logged record (Trainer's state.log_history)."""


# ---------------------------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------------------------


def build_reward_model(config: ModelConfig, tokenizer, seed: int):
    """A one-label sequence classifier: ours from a preset / RM / SFT checkpoint, else transformers'."""
    import torch

    from model import DeepseekV2ForSequenceClassification

    overrides = {"num_labels": 1, **config.config_overrides}
    path = config.name_or_path
    if path is None:
        return build_deepseek(ModelConfig(**{**config.__dict__, "config_overrides": overrides}), tokenizer, seed,
                              cls=DeepseekV2ForSequenceClassification)
    raw = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if raw.get("model_type") != "deepseek_v2":
        from transformers import AutoModelForSequenceClassification

        with torch.random.fork_rng(devices=[]):  # the new score head is drawn from a seeded generator
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=getattr(torch, config.dtype), **config.config_overrides)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.train()
        return model
    if OUR_RM_ARCHITECTURE in raw.get("architectures", []):
        return build_deepseek(config, tokenizer, seed, cls=DeepseekV2ForSequenceClassification)
    # A causal LM (e.g. the SFT model): same backbone keys (`model.*`); the LM head is skipped and the
    # score head is freshly initialised (seeded). Loaded straight into the classifier, so that under
    # ZeRO-3 it is partitioned like any other load.
    return build_deepseek(ModelConfig(**{**config.__dict__, "config_overrides": overrides}), tokenizer, seed,
                          cls=DeepseekV2ForSequenceClassification, init_missing=["score."],
                          ignore_unexpected=["lm_head."])


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def pairwise_accuracy(scorer, rows) -> float:
    """Share of rows (prompt, chosen, rejected) where scorer(prompts, chosen) > scorer(prompts, rejected).

    `scorer(prompts, completions) -> rewards` is e.g. `rewards.get_reward("model", path=...)`; chosen /
    rejected may be one-message assistant lists (the conversational form) or strings.
    """
    def text(reply):
        return reply if isinstance(reply, str) else "".join(message["content"] for message in reply)

    prompts = list(rows["prompt"])
    if not prompts:
        raise ValueError("no preference rows to score")
    chosen = scorer(prompts, [text(r) for r in rows["chosen"]])
    rejected = scorer(prompts, [text(r) for r in rows["rejected"]])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(prompts)


# ---------------------------------------------------------------------------------------------
# Trainer.
# ---------------------------------------------------------------------------------------------


def _make_trainer_class():
    from trl import RewardTrainer

    from model import DeepseekV2Model

    class LatentAlignRewardTrainer(RewardTrainer):
        """RewardTrainer that adds our backbone's MoE balance losses to the pairwise loss."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._aux_loss = None
            for module in self.model.modules():
                if isinstance(module, DeepseekV2Model):
                    module.register_forward_hook(self._capture_aux_loss)
                    break

        def _capture_aux_loss(self, module, inputs, output) -> None:
            self._aux_loss = output.aux_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._aux_loss = None
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            aux = self._aux_loss
            if aux is None or not model.training:
                return result
            self._metrics["train"]["aux_loss"].append(aux.item())
            if return_outputs:
                return result[0] + aux, result[1]
            return result + aux

    return LatentAlignRewardTrainer


def build_reward_trainer(config: RewardModelConfig, extra_callbacks: Sequence = (),
                         eval_callbacks: Sequence[Callback] = ()):
    """The configured RewardTrainer (model, tokenizer, data and eval hooks in place), before `train()`.
    `extra_callbacks`: transformers TrainerCallbacks; `eval_callbacks`: alignment.evaluators Callbacks."""
    from trl import RewardConfig

    from alignment.data import load_preference_dataset

    model_cfg, train_cfg, out_cfg = config.model, config.training, config.output
    tokenizer = load_tokenizer(model_cfg)
    splits = load_preference_dataset(config.data)
    eval_dataset = splits[EVAL_SPLIT] if EVAL_SPLIT in splits else None
    # The arguments before the model, as in alignment.sft.build_sft_trainer (ZeRO-3 partitioned loading).
    args = RewardConfig(
        output_dir=out_cfg.output_dir,
        seed=train_cfg.seed,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler_type=train_cfg.lr_scheduler_type,
        warmup_steps=train_cfg.warmup_steps,
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        per_device_train_batch_size=train_cfg.per_device_train_batch_size,
        per_device_eval_batch_size=train_cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        num_train_epochs=train_cfg.num_train_epochs,
        max_steps=train_cfg.max_steps,
        max_length=train_cfg.max_length,
        center_rewards_coefficient=train_cfg.center_rewards_coefficient,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        bf16=model_cfg.dtype == "bfloat16",
        fp16=False,
        use_cpu=train_cfg.use_cpu,
        dataloader_num_workers=train_cfg.dataloader_num_workers,
        eval_strategy=("steps" if train_cfg.eval_steps else "no") if eval_dataset is not None else "no",
        eval_steps=train_cfg.eval_steps,
        eval_on_start=train_cfg.eval_on_start and eval_dataset is not None,
        save_strategy="steps" if out_cfg.save_steps else "no",
        save_steps=out_cfg.save_steps or 500,
        save_total_limit=out_cfg.save_total_limit,
        dataset_num_proc=None,
        **trainer_logging_args(config.logging),
    )
    model = build_reward_model(model_cfg, tokenizer, train_cfg.seed)
    if model_cfg.lora:
        model = apply_lora(model, model_cfg.lora, "SEQ_CLS")
    trainer = _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=splits[TRAIN_SPLIT],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[*callbacks(config.logging, out_cfg.output_dir), *extra_callbacks],
    )
    trainer.preference_eval_rows = eval_dataset  # the untokenized rows, for pairwise_accuracy
    return add_eval_callback(trainer, config.eval, eval_callbacks)


def run_reward_model(config: RewardModelConfig, extra_callbacks: Sequence = (),
                     eval_callbacks: Sequence[Callback] = ()) -> RewardModelResult:
    """Train, save (model + tokenizer, loadable by rewards.model_reward) and evaluate a reward model."""
    resume = resolve_resume(config.output)
    trainer = build_reward_trainer(config, extra_callbacks, eval_callbacks)
    train_output = trainer.train(resume_from_checkpoint=resume)
    finished = trainer.state.global_step >= trainer.state.max_steps
    eval_metrics: dict[str, float] = {}
    if finished:
        if trainer.eval_dataset is not None:
            eval_metrics = trainer.evaluate()
        eval_metrics.update(trainer.eval_callback.final_metrics)
        save_final_and_notify(trainer, config.output.output_dir)
        if trainer.preference_eval_rows is not None:
            from rewards import get_reward

            scorer = get_reward("model", path=config.output.output_dir,
                                batch_size=config.training.per_device_eval_batch_size,
                                device="cpu" if config.training.use_cpu else None)
            eval_metrics["pairwise_accuracy"] = pairwise_accuracy(scorer, trainer.preference_eval_rows)
            trainer.log({"eval_pairwise_accuracy": eval_metrics["pairwise_accuracy"]})
            if trainer.is_world_process_zero():
                trainer.save_state()  # again, now with the pairwise accuracy in its log history
    loss = train_output.training_loss
    return RewardModelResult(output_dir=config.output.output_dir, global_step=trainer.state.global_step,
                             train_loss=float(loss) if loss is not None and not math.isnan(loss) else float("nan"),
                             eval_metrics=eval_metrics, log_history=list(trainer.state.log_history))
