"""Evaluation hooks: callbacks and evaluators registered by name, configured in a recipe's `eval:` section.

An evaluator is `fn(context: EvalContext, **kwargs) -> dict[str, float]`, registered with
`@evaluator("name")` or given as a dotted path `package.module:function` in the recipe. Built-ins:

  accuracy      greedy completions of held-out prompts scored by a reward (math by default: share
                correct), plus pass@k over k sampled completions when k > 1
  rm_accuracy   pairwise accuracy on preference pairs of a saved reward model, or of the model being
                trained (the RM stage)
  reward_mean   mean of each reward component (a RewardPipeline) over completions of held-out prompts

Completions come from the stage's rollout engine when the context has one (GRPO: it holds the
current weights), else from the model itself.

`EvalRunner` runs the evaluators that are due at a step, prefixes their metrics with the
evaluator's name (`eval/<name>/<metric>`), appends one record per evaluation to
`<run_dir>/evals.jsonl`, and passes the record to every callback's `on_evaluate`. Every stage drives
one the same way: evaluate at step 0 when `on_start`, every `every_steps` (per evaluator if it sets
its own), and all evaluators once at the last step; the stage logs the record with its own metrics
(GRPO: metrics.jsonl + TensorBoard; SFT / RM: the Trainer's log, hence its trackers) and calls the
callbacks' `on_step_end` / `on_save` (`step_end`, `saved`). Evaluators run on the main process only
(under ZeRO-3 on every process, since each forward gathers parameters from all of them; only the
main process writes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Evaluator = Callable[..., dict[str, float]]
EVALUATORS: dict[str, Evaluator] = {}


def evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    def register(fn: Evaluator) -> Evaluator:
        if name in EVALUATORS and EVALUATORS[name] is not fn:
            raise ValueError(f"evaluator {name!r} is already registered")
        EVALUATORS[name] = fn
        return fn

    return register


def _import_dotted(path: str, what: str) -> Any:
    """The object at `module:attr` or `module.attr` (rewards.registry.import_dotted); None when `path`
    has no dot or colon. An import that fails raises a ValueError naming `what` and the path."""
    if "." not in path and ":" not in path:
        return None
    from rewards.registry import import_dotted

    return import_dotted(path, what)


def get_evaluator(name: str) -> Evaluator:
    if name in EVALUATORS:
        return EVALUATORS[name]
    fn = _import_dotted(name, "evaluator")
    if fn is None:
        raise ValueError(f"unknown evaluator {name!r}; registered: {sorted(EVALUATORS)} (or give a dotted path)")
    return fn


@dataclass
class EvaluatorSpec:
    """One entry of a recipe's `eval.evaluators` list."""

    name: str
    """Metric prefix; also the evaluator to use when `evaluator` is empty."""
    evaluator: str | None = None
    """Registered evaluator name or dotted path `module:function`; None: `name`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the evaluator (files, reward, k, ...)."""
    every_steps: int | None = None
    """Run every N steps; None: the section's `every_steps`."""

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 0:
            raise ValueError(f"eval.evaluators: {self.name}: every_steps must be >= 0, got {self.every_steps}")


@dataclass
class EvalConfig:
    """A recipe's `eval:` section."""

    evaluators: list[EvaluatorSpec] = field(default_factory=list)
    """The evaluators to run."""
    every_steps: int = 0
    """Default period in optimizer steps (0: only at the start and the end of a stage)."""
    on_start: bool = True
    """Evaluate before the first step (the baseline)."""
    callbacks: list[str] = field(default_factory=list)
    """User callbacks: dotted paths `module:Class` of Callback subclasses, built without arguments."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        names = [spec.name for spec in self.evaluators]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval.evaluators: names must be unique (they prefix the metrics); repeated: {repeated}")


@dataclass
class EvalContext:
    """What an evaluator gets to work with."""

    model: Any
    tokenizer: Any
    step: int
    run_dir: Path
    engine: Any = None
    """A rollout engine holding the current weights, when the stage has one."""


class Callback:
    """Hooks a stage calls on its main process; subclass and override what you need.

    on_step_end  after a logged optimizer step, with that step's metrics (GRPO: every step, eval
                 results included; SFT / RM: every `logging.logging_steps`, the Trainer's training log)
    on_evaluate  after an evaluation, with its record (`eval/<name>/<metric>`)
    on_save      after a checkpoint or the final model is written, with its directory
    """

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_evaluate(self, step: int, results: dict[str, float]) -> None: ...

    def on_save(self, step: int, path: str) -> None: ...


def get_callback(path: str) -> type[Callback]:
    """The Callback class at a dotted path `module:Class` (or `module.Class`)."""
    cls = _import_dotted(path, "callback")
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ValueError(f"callback {path!r} is not a subclass of alignment.evaluators.Callback")
    return cls


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, step, metrics):
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    on_evaluate = on_step_end


class EvalRunner:
    """A stage's evaluators, their schedule, evals.jsonl and the callbacks (module docstring)."""

    def __init__(self, config: EvalConfig, run_dir: str | Path, callbacks: Sequence[Callback] = ()):
        self.config = config
        self.run_dir = Path(run_dir)
        self.callbacks = [get_callback(path)() for path in config.callbacks] + list(callbacks)
        self.evaluators = [(spec, get_evaluator(spec.evaluator or spec.name)) for spec in config.evaluators]

    def due(self, step: int, final: bool = False) -> bool:
        return any(self._due(spec, step, final) for spec, _ in self.evaluators)

    def _due(self, spec: EvaluatorSpec, step: int, final: bool) -> bool:
        every = spec.every_steps if spec.every_steps is not None else self.config.every_steps
        return final or (step == 0 and self.config.on_start) or (step > 0 and every > 0 and step % every == 0)

    def run(self, model, tokenizer, step: int, engine=None, final: bool = False,
            write: bool = True) -> dict[str, float]:
        """Run the evaluators due at `step` (`final`: all of them); `write`: append the record to
        evals.jsonl and pass it to the callbacks (the main process; others only compute)."""
        context = EvalContext(model=model, tokenizer=tokenizer, step=step, run_dir=self.run_dir, engine=engine)
        record: dict[str, float] = {}
        for spec, fn in self.evaluators:
            if not self._due(spec, step, final):
                continue
            start = time.perf_counter()
            metrics = fn(context, **spec.kwargs)
            record.update({f"eval/{spec.name}/{k}": float(v) for k, v in metrics.items()})
            record[f"eval/{spec.name}/time_s"] = time.perf_counter() - start
        if record and write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "evals.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **record}) + "\n")
            for callback in self.callbacks:
                callback.on_evaluate(step, record)
        return record

    def step_end(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step, metrics)

    def saved(self, step: int, path: str | Path) -> None:
        for callback in self.callbacks:
            callback.on_save(step, str(path))


# ------------------------------------------------------------------------------------------- built-ins
def _rows(files: Sequence[str], max_samples: int | None, columns: Sequence[str]):
    from alignment.data import DataConfig, load_prompt_dataset

    return load_prompt_dataset(DataConfig(train_files=list(files), max_train_samples=max_samples),
                               required_columns=tuple(columns))["train"]


def _completions(context: EvalContext, prompts: Sequence[Any], max_new_tokens: int, batch_size: int = 64,
                 k: int = 1, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """k completion texts per prompt (prompt-major; greedy at temperature 0), special tokens dropped: from
    the context's rollout engine when it has one (it holds the current weights), else from the model."""
    from model.generation import SamplingConfig

    if context.engine is not None:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            groups = context.engine.generate_groups(list(prompts[start:start + batch_size]), k, sampling)
            texts += [c.text or "" for g in groups for c in g.completions]
        return texts
    from alignment.evaluation import generate_completions, render_prompts
    from model.generation import generate

    if k == 1 and temperature == 0.0:
        return generate_completions(context.model, context.tokenizer, prompts, max_new_tokens, batch_size)
    ids = render_prompts(context.tokenizer, prompts)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                              stop_token_ids=(context.tokenizer.eos_token_id,))
    model = context.model.get_base_model() if hasattr(context.model, "get_base_model") else context.model
    gens = generate(model, [p for p in ids for _ in range(k)], sampling)
    return [context.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]


@evaluator("accuracy")
def accuracy(context: EvalContext, files: list[str], reward: str = "math", columns: Sequence[str] = ("answer",),
             max_samples: int | None = None, max_new_tokens: int = 64, k: int = 1, temperature: float = 1.0,
             seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Greedy accuracy (mean reward of the greedy completion, None → 0) and, for k > 1, pass@k: the share
    of prompts with at least one of k sampled completions scoring 1."""
    from rewards import get_reward

    rows = _rows(files, max_samples, columns)
    prompts = list(rows["prompt"])
    cols = {c: list(rows[c]) for c in columns}
    score = get_reward(reward)
    greedy = _completions(context, prompts, max_new_tokens, batch_size)
    scores = score(prompts, greedy, **cols)
    result = {"accuracy": sum(float(s or 0.0) for s in scores) / len(scores), "n": float(len(scores))}
    if k > 1:
        texts = _completions(context, prompts, max_new_tokens, batch_size, k=k, temperature=temperature, seed=seed)
        repeated = {c: [v for v in values for _ in range(k)] for c, values in cols.items()}
        sampled = score([p for p in prompts for _ in range(k)], texts, **repeated)
        hits = [any(float(s or 0.0) >= 1.0 for s in sampled[i * k:(i + 1) * k]) for i in range(len(prompts))]
        result[f"pass@{k}"] = sum(hits) / len(hits)
    return result


@evaluator("rm_accuracy")
def rm_accuracy(context: EvalContext, files: list[str], path: str | None = None, max_samples: int | None = None,
                batch_size: int = 32, max_length: int = 4096) -> dict[str, float]:
    """Share of preference pairs whose chosen completion the reward model scores higher than the
    rejected one, and the mean score margin. The reward model: the one saved at `path`, or (None) the
    context's model, i.e. the one being trained in the RM stage."""
    from rewards.model_reward import RewardModel

    rows = _rows(files, max_samples, ("chosen", "rejected"))
    if path is not None:
        rm = RewardModel(path=path, batch_size=batch_size, max_length=max_length)
    else:
        rm = RewardModel.from_model(context.model, context.tokenizer, batch_size=batch_size, max_length=max_length)
    prompts = list(rows["prompt"])

    def text(reply):
        return reply[-1]["content"] if isinstance(reply, list) else reply

    was_training = rm.model.training
    rm.model.eval()
    try:
        chosen = rm(prompts, [text(r) for r in rows["chosen"]])
        rejected = rm(prompts, [text(r) for r in rows["rejected"]])
    finally:
        rm.model.train(was_training)
    wins = [float(c > r) for c, r in zip(chosen, rejected)]
    margin = [c - r for c, r in zip(chosen, rejected)]
    return {"pairwise_accuracy": sum(wins) / len(wins), "mean_margin": sum(margin) / len(margin)}


@evaluator("reward_mean")
def reward_mean(context: EvalContext, files: list[str], rewards: dict[str, Any], columns: Sequence[str] = (),
                max_samples: int | None = None, max_new_tokens: int = 64) -> dict[str, float]:
    """Mean of each reward component and of the weighted total over greedy completions of held-out
    prompts. `rewards` is a RewardPipelineConfig mapping (as in a recipe's rewards section)."""
    from model.typed_config import from_mapping
    from rewards import RewardPipeline
    from rewards.pipeline import RewardPipelineConfig

    rows = _rows(files, max_samples, columns)
    prompts = list(rows["prompt"])
    pipeline = RewardPipeline(from_mapping(RewardPipelineConfig, rewards, "eval.reward_mean"))
    completions = _completions(context, prompts, max_new_tokens)
    out = pipeline(prompts, completions, **{c: list(rows[c]) for c in columns})
    result = {"total": sum(out.totals) / len(out.totals)}
    for name, values in out.components.items():
        present = [v for v in values if v is not None]
        result[name] = sum(present) / len(present) if present else float("nan")
    return result
