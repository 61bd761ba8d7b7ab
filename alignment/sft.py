"""Stage 1 of the pipeline: supervised fine-tuning on chat data (`run_sft`).

TRL's SFTTrainer does the data side (chat template, tokenisation, assistant-only labels from the
template's `{% generation %}` markers, padding) and transformers' Trainer the loop (optimizer and
schedule, gradient accumulation, eval, TensorBoard, progress bar, checkpoints, resume). What we change:

- The loss is our model's own: cross-entropy over the assistant tokens plus the MoE balance losses
  α1·expert + α2·device + α3·comm (DeepseekV2Config.aux_loss_alpha / device_balance_alpha /
  comm_balance_alpha). TRL 1.16's SFTTrainer patches in a fused LM head that drops them (it knows only
  Mixtral-style router logits), so `compute_loss` calls the model's unpatched forward instead.
  Normalisation: the cross-entropy is summed over the assistant tokens of a micro-batch and divided by
  the assistant tokens of the whole accumulated batch (Trainer's `num_items_in_batch`), so every
  token weighs the same whatever the accumulation; the balance losses are per-micro-batch means and
  are divided by the accumulation steps. Eval runs in eval mode: eval_loss is the plain token-mean CE.
- Packing (SFTTrainingConfig.packing) is TRL's best-fit-decreasing packing in padding-free form: the
  samples of a batch are concatenated into one row whose `position_ids` restart at 0 at every sample;
  our model turns those restarts into a block-diagonal causal mask, so no sample attends to another
  (tests/test_sft.py checks per-token log-probs against the unpacked samples), and the collator
  masks the label of every sample's first token, so no loss crosses a boundary either.
- Checkpoints are written by the model's own `save_pretrained` (HF deepseek_v2 layout, per-expert
  keys, loads in transformers); with LoRA a checkpoint holds the adapter, and the final model is
  merged and saved in full, so the next stage loads a plain checkpoint.
- Evaluation: Trainer's eval loss on the eval split (training.eval_steps / eval_on_start), and the
  recipe's `eval:` evaluators (alignment.evaluators, e.g. held-out accuracy) on their own schedule
  through alignment.eval_callback, logged as `eval_<name>/<metric>` and to <output_dir>/evals.jsonl.

Config: `SFTConfig` = model / data / training / output / logging / eval sections, one typed
dataclass each (a recipe's sections map onto them one to one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.data import EVAL_SPLIT, TRAIN_SPLIT, DataConfig
from alignment.evaluators import Callback, EvalConfig

DTYPES = ("float32", "bfloat16", "float16")
LORA_DEFAULT_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                        "gate_proj", "up_proj", "down_proj"]
"""Linear layers of our DeepseekV2; routed experts are stacked parameters, not Linear, so LoRA skips them."""


# ---------------------------------------------------------------------------------------------
# Config sections.
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """LoRA adapters instead of full fine-tuning (peft)."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """Names of the nn.Linear modules that get adapters (names absent from the model are skipped by peft)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")


@dataclass
class ModelConfig:
    """Which model and tokenizer a stage starts from (a recipe's `model:` section)."""

    name_or_path: str | None = None
    """Checkpoint directory to start from (ours or transformers' deepseek_v2); None builds a fresh model."""
    preset: str = "tiny"
    """DeepseekV2Config preset of a fresh model (`tiny`, `v2-lite`, `v2`); ignored with name_or_path."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """DeepseekV2Config fields set on top of the preset or the checkpoint's config (e.g. aux_loss_alpha)."""
    tokenizer_path: str | None = None
    """Tokenizer directory; None means name_or_path. A fresh model takes its vocab and special ids from it."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    lora: LoraSettings | None = None
    """LoRA settings; None means full fine-tuning."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.name_or_path is None and self.tokenizer_path is None:
            raise ValueError("model.tokenizer_path is required when model.name_or_path is empty (fresh model)")


@dataclass
class TrainerSettings:
    """Optimisation and batching shared by the Trainer-based stages (SFT, reward models)."""

    seed: int = 0
    """Seed of the model's initialisation, the data order and dropout."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_steps: float = 0
    """Warmup: optimizer steps if >= 1, else a share of the total steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    per_device_train_batch_size: int = 8
    """Samples per micro-batch and process."""
    per_device_eval_batch_size: int = 8
    """Samples per eval batch and process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_train_epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means num_train_epochs."""
    eval_steps: int | None = None
    """Eval loss every N optimizer steps; None: only at the end (with an eval split; the `eval:`
    evaluators have their own schedule)."""
    eval_on_start: bool = False
    """Also compute the eval loss before the first step (the baseline)."""
    use_cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    dataloader_num_workers: int = 0
    """Worker processes loading batches (0 loads in the main process)."""

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"training.{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 and self.max_steps != -1:
            raise ValueError(f"training.max_steps must be positive or -1, got {self.max_steps}")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ValueError(f"training.eval_steps must be positive or None, got {self.eval_steps}")


@dataclass
class SFTTrainingConfig(TrainerSettings):
    """Optimisation and batching of the SFT stage (a recipe's `training:` section)."""

    max_length: int | None = 1024
    """Tokens kept per sample (truncated from the end); None keeps all."""
    assistant_only_loss: bool = True
    """Train on the assistant turns only (the template's generation markers); False trains on every token."""
    packing: bool = False
    """Pack samples into rows of max_length tokens (best-fit decreasing, padding-free; no attention or
    loss across samples). Batches then hold a roughly constant number of tokens instead of samples."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing and self.max_length is None:
            raise ValueError("training.packing needs training.max_length (the length of a packed row)")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"training.max_length must be positive or None, got {self.max_length}")


@dataclass
class OutputConfig:
    """Where a stage writes its checkpoints and final model (a recipe's `output:` section)."""

    output_dir: str
    """Directory of the checkpoints (checkpoint-N/) and, at the end, of the final model and tokenizer."""
    save_steps: int | None = 500
    """Write a checkpoint every N optimizer steps; None writes none (only the final model)."""
    save_total_limit: int | None = 2
    """Keep only the newest N checkpoints; None keeps all."""
    resume_from_checkpoint: bool | str = False
    """True: continue from the newest checkpoint-N in output_dir (an error if there is none);
    a path: continue from that checkpoint; False: start afresh."""

    def __post_init__(self) -> None:
        if self.save_steps is not None and self.save_steps <= 0:
            raise ValueError(f"output.save_steps must be positive or None, got {self.save_steps}")


@dataclass
class LoggingConfig:
    """Metrics and progress reporting (a recipe's `logging:` section)."""

    logging_steps: int = 10
    """Log the training metrics every N optimizer steps."""
    tensorboard: bool = True
    """Write the metrics as TensorBoard events."""
    tensorboard_dir: str | None = None
    """Event directory; None means <output_dir>/runs."""
    report_to: list[str] = field(default_factory=list)
    """Other transformers integrations to report to (e.g. wandb, trackio)."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""


@dataclass
class SFTConfig:
    """The whole SFT stage."""

    model: ModelConfig
    """Starting model and tokenizer."""
    data: DataConfig
    """Chat (`messages`) data and its eval split."""
    output: OutputConfig
    """Checkpoints and final model."""
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    """Optimisation and batching."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluators (e.g. held-out accuracy), their schedule and user callbacks (alignment.evaluators)."""


@dataclass
class SFTResult:
    """What `run_sft` returns."""

    output_dir: str
    """Directory holding the final model (HF format) and its tokenizer."""
    global_step: int
    """Optimizer steps done (counting those before a resume)."""
    train_loss: float
    """Mean training loss over the steps of this run."""
    eval_metrics: dict[str, float]
    """Metrics of the final evaluation (eval_loss, eval_<evaluator>/<metric>, ...); empty without eval."""
    log_history: list[dict[str, float]]
    """Every logged record (Trainer's state.log_history)."""


# ---------------------------------------------------------------------------------------------
# Model and tokenizer.
# ---------------------------------------------------------------------------------------------


def load_tokenizer(config: ModelConfig):
    """The stage's tokenizer; it must have a pad token (batches are padded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path or config.name_or_path)
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer {config.tokenizer_path or config.name_or_path} has no pad token")
    return tokenizer


def check_special_tokens(model_config, tokenizer) -> None:
    """The model's vocabulary and pad/bos/eos ids must match the tokenizer's."""
    if model_config.vocab_size < len(tokenizer):
        raise ValueError(f"model vocab_size {model_config.vocab_size} < tokenizer size {len(tokenizer)}")
    for name in ("pad", "bos", "eos"):
        ours, theirs = getattr(model_config, f"{name}_token_id"), getattr(tokenizer, f"{name}_token_id")
        if theirs is not None and ours != theirs:
            raise ValueError(f"model {name}_token_id is {ours} but the tokenizer's is {theirs}")


def build_deepseek(config: ModelConfig, tokenizer, seed: int, cls=None, **load_options):
    """A DeepseekV2 model of class `cls` (default: the causal LM), from the checkpoint or freshly built.
    `load_options`: `init_missing` / `ignore_unexpected` of `from_pretrained` (model.checkpoint).

    Under DeepSpeed ZeRO-3 the model comes out partitioned: the stage's TrainingArguments must exist
    before this is called (their construction under an accelerate DeepSpeed launch is what makes
    `is_deepspeed_zero3_enabled()` true)."""
    import torch

    from model import DeepseekV2Config, DeepseekV2ForCausalLM
    from model.checkpoint import fresh_model

    cls = cls or DeepseekV2ForCausalLM
    dtype = getattr(torch, config.dtype)
    # Seeded here, not by Trainer: the initial weights (of a fresh model or of the parameters a checkpoint
    # lacks, e.g. a reward head) are part of the run's reproducibility.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.name_or_path is not None:
            model = cls.from_pretrained(config.name_or_path, dtype=dtype, **load_options, **config.config_overrides)
        else:
            model_config = DeepseekV2Config.preset(
                config.preset,
                **{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   **config.config_overrides},
            )
            model = fresh_model(cls, model_config, dtype)
    check_special_tokens(model.config, tokenizer)
    model.train()
    return model


def lora_config(settings: LoraSettings, task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), task_type=task_type)


def apply_lora(model, settings: LoraSettings, task_type: str):
    """`model` wrapped by peft with LoRA adapters on the configured nn.Linear modules."""
    return wrap_lora(model, lora_config(settings, task_type))


def wrap_lora(model, peft_config):
    """`get_peft_model(model, peft_config)`, with one workaround.

    peft (0.21) rewrites the targets of models whose `model_type` transformers 5 stores with fused experts
    (deepseek_v2 among them): `gate_proj`/`up_proj`/`down_proj` become parameter targets on the fused
    experts, so our dense and shared-expert Linears would get no adapter and our stacked routed
    `experts.down_proj` an unintended one. The model_type is hidden from peft while it wraps (our
    checkpoints keep the per-Linear layout peft's rewrite exists for).
    """
    from peft import get_peft_model

    config = model.config
    had_own = "model_type" in vars(config)
    config.model_type = f"latentalign-{type(config).model_type}"
    try:
        return get_peft_model(model, peft_config)
    finally:
        if had_own:
            config.model_type = type(config).model_type
        else:
            del config.model_type


def resolve_resume(output: OutputConfig) -> str | None:
    """The checkpoint directory to resume from, or None."""
    if output.resume_from_checkpoint is False:
        return None
    if output.resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output.output_dir) if Path(output.output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(f"output.resume_from_checkpoint is true but {output.output_dir} holds no "
                                    "checkpoint-N directory")
        return last
    if not Path(output.resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"output.resume_from_checkpoint: no checkpoint directory {output.resume_from_checkpoint}")
    return str(output.resume_from_checkpoint)


def trainer_logging_args(logging: LoggingConfig) -> dict[str, Any]:
    """TrainingArguments for the logging section (TensorBoard is added as a callback, see `callbacks`)."""
    return dict(logging_steps=logging.logging_steps, logging_first_step=True, report_to=list(logging.report_to) or "none",
                disable_tqdm=not logging.progress_bar)


def callbacks(logging: LoggingConfig, output_dir: str) -> list:
    """TensorBoard writer into the configured directory (transformers 5 dropped `logging_dir`)."""
    if not logging.tensorboard:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=logging.tensorboard_dir
                                                        or os.path.join(output_dir, "runs")))]


# ---------------------------------------------------------------------------------------------
# Trainer.
# ---------------------------------------------------------------------------------------------


def _make_trainer_class():
    from trl import SFTTrainer

    class LatentAlignSFTTrainer(SFTTrainer):
        """SFTTrainer with our model's own loss (balance losses included)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            mode = "train" if model.training else "eval"
            kwargs = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
            # Padding-free (packed) batches carry position_ids and no attention_mask; the model builds the
            # block-diagonal mask from the position restarts.
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                            position_ids=inputs.get("position_ids"), labels=inputs["labels"], use_cache=False,
                            **kwargs)
            aux = outputs.aux_loss
            token_loss = outputs.loss - aux if aux is not None else outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts the tokens of every process and DDP averages gradients: undo the mean.
                token_loss = token_loss * self.accelerator.num_processes
            loss = token_loss
            if aux is not None:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + aux / steps

            with torch.no_grad():
                labels_BT = inputs["labels"][:, 1:]
                valid_BT = labels_BT != -100
                correct = ((outputs.logits[:, :-1].argmax(-1) == labels_BT) & valid_BT).sum()
                metrics = self._metrics[mode]
                metrics["mean_token_accuracy"].append((correct / valid_BT.sum().clamp(min=1)).item())
                if aux is not None:
                    metrics["aux_loss"].append(aux.item())
                    for name, value in outputs.balance_losses.items():
                        metrics[f"balance_{name}"].append(float(value))
            return (loss, outputs) if return_outputs else loss

    return LatentAlignSFTTrainer


def add_eval_callback(trainer, eval_config: EvalConfig, eval_callbacks: Sequence[Callback] = ()):
    """Attach the `eval:` section (evaluators + user callbacks) to a Trainer; it is `trainer.eval_callback`."""
    from alignment.eval_callback import EvalTrainerCallback
    from alignment.evaluators import EvalRunner

    callback = EvalTrainerCallback(EvalRunner(eval_config, trainer.args.output_dir, eval_callbacks), trainer)
    trainer.add_callback(callback)
    trainer.eval_callback = callback
    return trainer


def build_sft_trainer(config: SFTConfig, extra_callbacks: Sequence = (), eval_callbacks: Sequence[Callback] = ()):
    """The configured trainer (model, tokenizer, data and eval hooks in place), before `train()`.
    `extra_callbacks`: transformers TrainerCallbacks; `eval_callbacks`: alignment.evaluators Callbacks."""
    from trl import SFTConfig as TRLSFTConfig

    from alignment.data import load_chat_dataset

    model_cfg, train_cfg, out_cfg = config.model, config.training, config.output
    tokenizer = load_tokenizer(model_cfg)
    splits = load_chat_dataset(config.data)
    eval_dataset = splits[EVAL_SPLIT] if EVAL_SPLIT in splits else None
    evaluates = eval_dataset is not None

    # The arguments before the model: under an accelerate DeepSpeed launch their construction registers
    # the DeepSpeed config with transformers, and only then does ZeRO-3 build the model partitioned.
    args = TRLSFTConfig(
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
        assistant_only_loss=train_cfg.assistant_only_loss,
        packing=train_cfg.packing,
        packing_strategy="bfd",  # TRL's only strategy that keeps samples whole (wrapped splits them)
        padding_free=train_cfg.packing,
        # Our loss adds the balance losses itself; 0 keeps TRL from asking for Mixtral-style router logits.
        router_aux_loss_coef=0.0,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        bf16=model_cfg.dtype == "bfloat16",
        fp16=False,
        use_cpu=train_cfg.use_cpu,
        dataloader_num_workers=train_cfg.dataloader_num_workers,
        eval_strategy=("steps" if train_cfg.eval_steps else "no") if evaluates else "no",
        eval_steps=train_cfg.eval_steps,
        eval_on_start=train_cfg.eval_on_start and evaluates,
        save_strategy="steps" if out_cfg.save_steps else "no",
        save_steps=out_cfg.save_steps or 500,
        save_total_limit=out_cfg.save_total_limit,
        dataset_num_proc=None,
        **trainer_logging_args(config.logging),
    )
    model = build_deepseek(model_cfg, tokenizer, train_cfg.seed)
    if model_cfg.lora:
        model = apply_lora(model, model_cfg.lora, "CAUSAL_LM")
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=splits[TRAIN_SPLIT],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[*callbacks(config.logging, out_cfg.output_dir), *extra_callbacks],
    )
    return add_eval_callback(trainer, config.eval, eval_callbacks)


def save_final_model(trainer, output_dir: str) -> None:
    """Full model (LoRA merged) in HF format + tokenizer into output_dir; the adapter also under adapter/.
    Every process must call it (under ZeRO-3 the parameters are gathered collectively)."""
    from peft import PeftModel

    model = trainer.model
    if _zero3_partitioned(model):
        _save_final_zero3(trainer, output_dir)
        return
    if isinstance(model, PeftModel):
        model.save_pretrained(os.path.join(output_dir, "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)


def _zero3_partitioned(model) -> bool:
    return any(hasattr(p, "ds_numel") for p in model.parameters())


def _save_final_zero3(trainer, output_dir: str) -> None:
    """ZeRO-3: the full state dict is gathered onto the main process (DeepSpeed's consolidated state dict,
    which needs zero3_save_16bit_model / stage3_gather_16bit_weights_on_model_save), which writes it;
    with LoRA the main process first rebuilds the peft model on its CPU from that state dict (meta
    construction + assign, no other copy) and merges it there, as the unpartitioned path does."""
    import torch
    from peft import PeftModel

    model = trainer.model
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        if isinstance(model, PeftModel):
            base = model.get_base_model()
            with torch.device("meta"):
                rebuilt = wrap_lora(type(base)(base.config), model.peft_config["default"])
            rebuilt.load_state_dict(state_dict, strict=True, assign=True)
            rebuilt.save_pretrained(os.path.join(output_dir, "adapter"))
            rebuilt.merge_and_unload().save_pretrained(output_dir)
        else:
            model.save_pretrained(output_dir, state_dict=state_dict)
        trainer.processing_class.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()


def save_final_and_notify(trainer, output_dir: str) -> None:
    """`save_final_model` and the trainer state (its log history feeds `python -m alignment report` also
    when no checkpoint was kept), then the `eval:` callbacks' on_save (main process)."""
    save_final_model(trainer, output_dir)
    if trainer.is_world_process_zero():
        trainer.save_state()
        trainer.eval_callback.runner.saved(trainer.state.global_step, output_dir)


def run_sft(config: SFTConfig, extra_callbacks: Sequence = (), eval_callbacks: Sequence[Callback] = ()) -> SFTResult:
    """Train, evaluate and save; `extra_callbacks` are transformers TrainerCallbacks added to the run,
    `eval_callbacks` alignment.evaluators Callbacks (with those of the `eval:` section)."""
    resume = resolve_resume(config.output)
    trainer = build_sft_trainer(config, extra_callbacks, eval_callbacks)
    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_metrics: dict[str, float] = {}
    if trainer.control.should_training_stop and trainer.state.global_step < trainer.state.max_steps:
        # Stopped early by a callback: leave the evaluation and the final model to the resumed run.
        pass
    elif trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
    eval_metrics.update(trainer.eval_callback.final_metrics)  # the evaluators' last-step run (in train())
    if trainer.state.global_step >= trainer.state.max_steps:
        save_final_and_notify(trainer, config.output.output_dir)
    loss = train_output.training_loss
    return SFTResult(output_dir=config.output.output_dir, global_step=trainer.state.global_step,
                     train_loss=float(loss) if loss is not None and not math.isnan(loss) else float("nan"),
                     eval_metrics=eval_metrics, log_history=list(trainer.state.log_history))
