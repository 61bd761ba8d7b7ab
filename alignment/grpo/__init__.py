"""GRPO (DESIGN.md §3): our own loop on accelerate — rollout → rewards → advantages → policy update →
weight sync → eval hooks → checkpoint. See trainer.py for the loop and its departures from the paper."""

from .advantages import group_advantages, overlong_soft_penalty, zero_variance_groups
from .config import GRPOConfig
from .loss import ConstantNorm, GRPOLoss, LossNormalizer, SequenceMean, TokenMean, k3_kl, make_aggregation


def __getattr__(name):  # the trainer pulls in accelerate, rollout and rewards: import it only when asked
    if name in ("GRPOTrainer", "run_grpo", "GRPOResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["ConstantNorm", "GRPOConfig", "GRPOLoss", "GRPOResult", "GRPOTrainer", "LossNormalizer", "SequenceMean",
           "TokenMean", "group_advantages", "k3_kl", "make_aggregation", "overlong_soft_penalty", "run_grpo",
           "zero_variance_groups"]
