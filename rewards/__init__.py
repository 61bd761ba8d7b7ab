"""Rewards: the plug-in API, the built-in rewards of both RL stages, and the reward pipeline.

    from rewards import reward, get_reward, RewardPipeline

Built-in names: `math`, `code`, `format`, `length`, `language`, `repetition`, `model` (a reward
model from a path) and `remote` (a reward hosted by `python -m rewards.serve`). The calling
convention and lookup order are in `rewards/registry.py`; how components combine, in
`rewards/pipeline.py`. This package imports neither `alignment` nor `rollout`; `model` only when a
DeepseekV2 reward model is loaded.
"""

from model.typed_config import ConfigError
from rewards import code_execution, format_reward, math_accuracy, model_reward, remote, rules  # noqa: F401 - register
from rewards.code_execution import CodeExecution, extract_program
from rewards.format_reward import FormatReward
from rewards.math_accuracy import MathAccuracy
from rewards.model_reward import RewardModel, load_reward_model
from rewards.pipeline import RewardError, RewardOutput, RewardPipeline, RewardPipelineConfig, RewardSpec
from rewards.registry import ENTRY_POINT_GROUP, REGISTRY, call_reward, get_reward, reward
from rewards.remote import RemoteReward, RemoteRewardError
from rewards.rules import LanguageConsistency, LengthBand, RepetitionPenalty
from rewards.sandbox import SandboxConfig, SandboxResult, SandboxUnavailableError, run_in_sandbox

__all__ = [
    "ENTRY_POINT_GROUP", "REGISTRY", "CodeExecution", "ConfigError", "FormatReward", "LanguageConsistency",
    "LengthBand", "MathAccuracy", "RemoteReward", "RemoteRewardError", "RepetitionPenalty", "RewardError",
    "RewardModel", "RewardOutput", "RewardPipeline", "RewardPipelineConfig", "RewardSpec", "SandboxConfig",
    "SandboxResult", "SandboxUnavailableError", "call_reward", "extract_program", "get_reward",
    "load_reward_model", "reward", "run_in_sandbox",
]
