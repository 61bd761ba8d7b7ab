"""The GRPO stage as a recipe: `stage: grpo` plus the sections below, each a dataclass of the package
that owns it (model: alignment.sft.ModelConfig, data: alignment.data.DataConfig, rollout:
rollout.RolloutConfig, rewards: rewards.RewardPipelineConfig, grpo: alignment.grpo.GRPOConfig,
eval: alignment.evaluators.EvalConfig). The loop itself is `alignment.grpo.run_grpo`.

Evaluators configured under `eval:` run as the trainer's eval hooks (every `grpo.eval_every` steps
and at the end) and also append their records to `<output_dir>/evals.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignment.data import DataConfig
from alignment.evaluators import EvalConfig, EvalContext, get_evaluator
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
    """Evaluators run as eval hooks."""


def _hooks(config: EvalConfig, run_dir: Path):
    hooks = []
    for spec in config.evaluators:
        fn = get_evaluator(spec.evaluator or spec.name)

        def hook(model, tokenizer, fn=fn, spec=spec):
            metrics = fn(EvalContext(model=model, tokenizer=tokenizer, step=-1, run_dir=run_dir), **spec.kwargs)
            return {f"{spec.name}/{k}": v for k, v in metrics.items()}

        hooks.append(hook)
    return hooks


def run_grpo_stage(config: GRPOStageConfig):
    from alignment.grpo import run_grpo

    run_dir = Path(config.output.output_dir)
    return run_grpo(config.model, config.data, config.rollout, config.rewards, config.grpo, run_dir,
                    eval_hooks=_hooks(config.eval, run_dir), resume=config.output.resume)
