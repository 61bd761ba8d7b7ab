"""`RewardPipeline`: score a batch with several named rewards at once and combine them.

    total_i = Σ_k weight_k · norm_k(r_ik)

over the components k of the recipe (stage 1: math + code + format; stage 2: the paper's
r = c1·helpful + c2·safety + c3·rule, each c a `weight`).

None: a component that is None for a sample (not applicable, or the reward failed) is left out of
that sample's sum. With `missing: zero` it contributes 0; with `missing: renormalize` the present
components are scaled by Σ_k|w_k| / Σ_present|w_k|, so a sample's total stays on the scale of a
sample with every component present. A sample with no component present totals 0.0 either way.

Normalisation per component, applied to the non-None values before weighting: `none`; `batch`
(z-score over this batch); `running` (z-score with a running mean/std over every batch this
pipeline has seen, this one included). A batch with zero spread normalises to 0. When several
processes each score their share of one batch (GRPO under DDP / DeepSpeed), `share_statistics`
makes "this batch" the whole batch: the count, sum and sum of squares of every normalised
component are summed over the processes (one collective per scored batch, which every process
makes, also with nothing to normalise), so the totals do not depend on the number of processes.

Failure isolation: each reward runs in its own daemon thread, all at once, each with its own
deadline. A reward that raises, returns the wrong number of scores, or misses its deadline gives
None for every sample of the batch; it is logged and counted in the metrics, and training goes on
(`on_error: raise` stops instead). A thread that misses its deadline is abandoned, not killed:
Python cannot stop a thread, so a reward must not rely on being called only once at a time. The
threads overlap I/O, subprocesses (the code sandbox), GPU work and remote calls; pure-Python
rewards still take turns on the GIL.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from model.typed_config import from_mapping
from rewards.registry import RewardFn, call_reward, get_reward, required_columns

logger = logging.getLogger(__name__)

_NORMALIZE_EPS = 1e-6


@dataclass
class RewardSpec:
    """One component of the reward: which reward, its weight, its kwargs, its normalisation."""

    name: str
    """Label of the component in totals and metrics (e.g. `helpful`); also the reward to use by default."""
    reward: str | None = None
    """Registered name, entry-point name or dotted path of the reward; None: `name`."""
    weight: float = 1.0
    """Coefficient of this component in the total (c1, c2, c3 of the paper)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward (e.g. `path` of a reward model)."""
    normalize: Literal["none", "batch", "running"] = "none"
    """Z-score the component before weighting: not at all, over the batch, or with running stats."""
    timeout_s: float | None = None
    """Seconds this reward may take per batch; None: the pipeline's `timeout_s`."""


@dataclass
class RewardPipelineConfig:
    """A recipe's `rewards:` section."""

    rewards: list[RewardSpec]
    """The components, each a RewardSpec mapping."""
    missing: Literal["zero", "renormalize"] = "zero"
    """How a None component enters a sample's total (see the module docstring)."""
    timeout_s: float = 600.0
    """Default seconds each reward may take per batch before it is abandoned (its scores None)."""
    on_error: Literal["none", "raise"] = "none"
    """A failing reward yields None scores and is counted (`none`), or stops the run (`raise`)."""

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.rewards]
        if not names:
            raise ValueError("a reward pipeline needs at least one reward")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward component names must be unique; repeated: {', '.join(duplicates)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<recipe>") -> RewardPipelineConfig:
        """From a recipe section; unknown or ill-typed keys raise ConfigError naming key and `source`."""
        return from_mapping(cls, data, source)


class RewardError(RuntimeError):
    """A reward failed and the pipeline is configured to fail fast."""


@dataclass
class RewardOutput:
    """Scores of one batch."""

    totals: list[float]
    """Combined reward per sample."""
    components: dict[str, list[float | None]]
    """Raw score per component and sample (None: not applicable or failed)."""
    metrics: dict[str, float]
    """`rewards/<name>/{mean,std,none_share,failed,failures_total,time_s}` and `rewards/total/{mean,std}`."""


class _RunningMoments:
    """Mean and variance over every value seen so far, merged batch by batch (Chan et al.'s update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.sum_sq = 0, 0.0, 0.0

    def merge(self, count: float, mean: float, sum_sq: float) -> None:
        """Add a batch of `count` values with this mean and Σ(v − mean)²."""
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.sum_sq += sum_sq + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.sum_sq / self.count) if self.count else 0.0


def _moments(values: Sequence[float]) -> list[float]:
    """[count, sum, sum of squares] of the values (what `share_statistics` sums over processes)."""
    return [float(len(values)), math.fsum(values), math.fsum(v * v for v in values)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class _Call:
    """One reward on one batch, in its own daemon thread so that a hung reward cannot block exit."""

    def __init__(self, fn: RewardFn, prompts: Sequence, completions: Sequence[str], columns: dict) -> None:
        self.scores: list[float | None] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, prompts, completions, columns), daemon=True)
        self._thread.start()

    def _run(self, fn: RewardFn, prompts: Sequence, completions: Sequence[str], columns: dict) -> None:
        try:
            self.scores = call_reward(fn, prompts, completions, **columns)
        except BaseException as error:  # noqa: BLE001 - isolate whatever the plug-in raises
            self.error = error
        finally:
            self.finished = time.monotonic()

    def wait(self, deadline: float) -> bool:
        """Whether the call finished by `deadline` (a time.monotonic() value)."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()


class RewardPipeline:
    """Named, weighted rewards evaluated concurrently; see the module docstring for the combination."""

    def __init__(self, config: RewardPipelineConfig) -> None:
        self.config = config
        self.rewards: dict[str, RewardFn] = {
            spec.name: get_reward(spec.reward or spec.name, **spec.kwargs) for spec in config.rewards
        }
        self._running = {spec.name: _RunningMoments() for spec in config.rewards}
        self.failures_total = {spec.name: 0 for spec in config.rewards}
        self._sum_over_processes: Callable[[list[float]], list[float]] | None = None

    def share_statistics(self, sum_over_processes: Callable[[list[float]], list[float]]) -> None:
        """Normalise over the batch of all processes: `sum_over_processes(values)` returns the element-wise
        sum of `values` over every process (a collective all of them call; module docstring)."""
        self._sum_over_processes = sum_over_processes

    def check_columns(self, available: Sequence[str], source: str = "the dataset") -> None:
        """Raise before any work if a reward needs a column that `source` does not have at all (a column
        null on some rows is fine: the reward scores those rows None)."""
        for name, fn in self.rewards.items():
            missing = [column for column in required_columns(fn) if column not in available]
            if missing:
                raise ValueError(f"reward {name!r} needs column(s) {missing} that {source} does not have "
                                 f"(its columns besides the prompt: {sorted(available) or 'none'})")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<recipe>") -> RewardPipeline:
        return cls(RewardPipelineConfig.from_dict(data, source))

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns: Sequence) -> RewardOutput:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        calls = {name: _Call(fn, prompts, completions, columns) for name, fn in self.rewards.items()}
        components: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for spec in self.config.rewards:
            call = calls[spec.name]
            timeout = spec.timeout_s if spec.timeout_s is not None else self.config.timeout_s
            finished = call.wait(call.started + timeout)
            failure = None
            if not finished:
                failure = TimeoutError(f"reward {spec.name!r} took longer than {timeout} s")
            elif call.error is not None:
                failure = call.error
            if failure is not None:
                self._fail(spec.name, failure, len(completions))
                scores: list[float | None] = [None] * len(completions)
            else:
                scores = call.scores
            components[spec.name] = scores
            present = [s for s in scores if s is not None]
            mean, std = _mean_std(present)
            elapsed = (call.finished if finished else time.monotonic()) - call.started
            prefix = f"rewards/{spec.name}"
            metrics.update({
                f"{prefix}/mean": mean, f"{prefix}/std": std,
                f"{prefix}/none_share": 1 - len(present) / len(scores) if scores else 0.0,
                f"{prefix}/failed": float(failure is not None),
                f"{prefix}/failures_total": float(self.failures_total[spec.name]),
                f"{prefix}/time_s": elapsed,
            })
        totals = self.combine(components)
        metrics["rewards/total/mean"], metrics["rewards/total/std"] = _mean_std(totals)
        return RewardOutput(totals, components, metrics)

    def _fail(self, name: str, failure: BaseException, batch_size: int) -> None:
        self.failures_total[name] += 1
        if self.config.on_error == "raise":
            raise RewardError(f"reward {name!r} failed: {failure!r}") from failure
        logger.warning("reward %r failed on a batch of %d (scored None): %r", name, batch_size, failure,
                       exc_info=failure if not isinstance(failure, TimeoutError) else None)

    def normalized(self, components: dict[str, list[float | None]]) -> dict[str, list[float | None]]:
        """Each component's scores after its configured normalisation (running stats are updated), over this
        process's batch or, after `share_statistics`, over every process's."""
        modes = {spec.name: spec.normalize for spec in self.config.rewards}
        names = [name for name in components if modes[name] != "none"]
        moments = [m for name in names for m in _moments([s for s in components[name] if s is not None])]
        if self._sum_over_processes is not None and names:
            moments = self._sum_over_processes(moments)
        out = dict(components)
        for i, name in enumerate(names):
            count, total, total_sq = moments[3 * i: 3 * i + 3]
            if count == 0:
                continue
            mean = total / count
            sum_sq = max(total_sq - count * mean * mean, 0.0)  # Σ(v − mean)²
            if modes[name] == "running":
                running = self._running[name]
                running.merge(count, mean, sum_sq)
                mean, std = running.mean, running.std
            else:
                std = math.sqrt(sum_sq / count)
            scores = components[name]
            out[name] = ([None if s is None else 0.0 for s in scores] if std < _NORMALIZE_EPS
                         else [None if s is None else (s - mean) / std for s in scores])
        return out

    def combine(self, components: dict[str, list[float | None]]) -> list[float]:
        """Weighted per-sample totals (None handling: see the module docstring)."""
        weights = {spec.name: spec.weight for spec in self.config.rewards}
        normalized = self.normalized(components)
        size = len(next(iter(components.values())))
        all_weight = sum(abs(w) for w in weights.values())
        totals = []
        for i in range(size):
            present = {name: values[i] for name, values in normalized.items() if values[i] is not None}
            total = sum(weights[name] * value for name, value in present.items())
            present_weight = sum(abs(weights[name]) for name in present)
            if self.config.missing == "renormalize" and present_weight > 0:
                total *= all_weight / present_weight
            totals.append(float(total))
        return totals
