"""The GRPO stage as a recipe: `stage: grpo` plus the sections below, each a dataclass of the package
that owns it (model: alignment.sft.ModelConfig, data: alignment.data.DataConfig, rollout:
rollout.RolloutConfig, rewards: rewards.RewardPipelineConfig, grpo: alignment.grpo.GRPOConfig,
eval: alignment.evaluators.EvalConfig). The loop itself is `alignment.grpo.trainer.GRPOTrainer`.

The `eval:` section becomes the trainer's EvalRunner: its evaluators run at step 0 (`on_start`), every
`every_steps` and at the last step, with the rollout engine in their context; their results are
logged with the step's metrics (metrics.jsonl, TensorBoard) and appended to `<output_dir>/evals.jsonl`,
and its callbacks get on_step_end / on_evaluate / on_save. (`grpo.eval_every` only schedules plain
eval hooks handed to GRPOTrainer / run_grpo in code.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignment.data import DataConfig
from alignment.evaluators import Callback, EvalConfig, EvalRunner
from alignment.grpo.config import GRPOConfig
from alignment.sft import ModelConfig
from rewards.pipeline import RewardPipelineConfig
from rollout.config import RolloutConfig


@dataclass
class GRPOOutputConfig:
    """Where the stage writes (a recipe's `output:` section)."""

    output_dir: str
    """Checkpoints, metrics.jsonl, evals.jsonl, TensorBoard events and the final model."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir when there is one."""


@dataclass
class GRPOStageConfig:
    """The whole GRPO stage."""

    model: ModelConfig
    """Starting policy (usually the SFT model, or stage 1's final model for stage 2) and tokenizer."""
    data: DataConfig
    """Prompt data: a `prompt` column plus the columns its rewards read (answer, tests, ...)."""
    rewards: RewardPipelineConfig
    """The stage's reward components and weights."""
    output: GRPOOutputConfig
    """Run directory."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(backend="native", dtype="float32"))
    """Rollout engine (native by default; vllm / vllm_server)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The algorithm's knobs."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluators, their schedule and user callbacks."""


def build_grpo_stage(config: GRPOStageConfig, callbacks: Sequence[Callback] = ()):
    """The stage's GRPOTrainer (policy, data, reward pipeline, rollout engine, EvalRunner), before `train()`.
    `callbacks`: alignment.evaluators Callbacks added to those of the `eval:` section."""
    from alignment.grpo.trainer import build_grpo_trainer

    run_dir = Path(config.output.output_dir)
    return build_grpo_trainer(config.model, config.data, config.rollout, config.rewards, config.grpo, run_dir,
                              eval_runner=EvalRunner(config.eval, run_dir, callbacks))


def run_grpo_stage(config: GRPOStageConfig, callbacks: Sequence[Callback] = ()):
    trainer = build_grpo_stage(config, callbacks)
    try:
        return trainer.train(resume=config.output.resume)
    finally:
        trainer.close()
