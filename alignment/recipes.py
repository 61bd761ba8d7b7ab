"""Recipes: one YAML file = one stage (sft, rm, grpo), typed end to end.

A recipe is `stage: <name>` plus the fields of that stage's config dataclass, section for section
(model, data, rollout, rewards, training, eval, logging, output — each section maps one to one
onto a dataclass of the stage's module). Loading checks, before any work starts:
  * YAML syntax, an unknown or ill-typed key, a missing required key, a value the dataclass rejects —
    each error names the key and the recipe file;
  * that every referenced local file or directory exists (data files, model and tokenizer paths);
  * that every reward named in a `rewards:` section resolves (registry, entry point or dotted path).

Command-line overrides use dotted keys: `training.learning_rate=1e-4 model.lora.r=16`; the value is
parsed as YAML (so numbers, booleans, null and lists work).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

import yaml

from model.typed_config import ConfigError, from_mapping

# stage → (config dataclass, runner) as "module:attribute"; imported lazily (torch, trl, vllm are heavy).
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("alignment.sft:SFTConfig", "alignment.sft:run_sft"),
    "rm": ("alignment.reward_model:RewardModelConfig", "alignment.reward_model:run_reward_model"),
    "grpo": ("alignment.grpo_recipe:GRPOStageConfig", "alignment.grpo_recipe:run_grpo_stage"),
}

# Fields holding paths that must exist when the recipe runs (a later stage's input may be an earlier
# stage's output, so `validate(check_paths=False)` skips this for chained recipes).
PATH_FIELDS = ("train_files", "eval_files", "name_or_path", "tokenizer_path", "path", "init_from")


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; in a recipe it is always meant as a float."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 — a SafeLoader subclass


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Set `a.b.c=value` entries on the raw mapping (before typing, so typos are caught as unknown keys)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{source}: override {item!r} is not of the form dotted.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"{source}: override {key!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = _load_yaml(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"{source}: override {key!r}: value is not valid YAML ({err})") from err
    return raw


def read_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[str, dict[str, Any]]:
    """(stage, raw mapping without `stage`), overrides applied."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found")
    try:
        raw = _load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a `stage` key, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides), source)
    stage = raw.pop("stage", None)
    if stage not in STAGES:
        raise RecipeError(f"{source}: key 'stage' is {stage!r}; expected one of {sorted(STAGES)}")
    return stage, raw


def load_recipe(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> tuple[str, Any]:
    """(stage, typed stage config). Raises RecipeError naming the file and key."""
    stage, raw = read_recipe(path, overrides)
    config_cls = _resolve(STAGES[stage][0])
    try:
        config = from_mapping(config_cls, raw, str(path))
    except ConfigError as err:
        raise RecipeError(str(err)) from err
    except (ValueError, TypeError) as err:  # a dataclass's own __post_init__ check
        raise RecipeError(f"{path}: {err}") from err
    if check_paths:
        for key, value in _walk(config):
            if key.rsplit(".", 1)[-1] in PATH_FIELDS:
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str) and not Path(item).exists():
                        raise RecipeError(f"{path}: key {key!r}: {item!r} does not exist")
    _check_rewards(config, str(path))
    _check_evaluators(config, str(path))
    return stage, config


def _walk(obj: Any, prefix: str = ""):
    """(dotted key, value) for every field of nested dataclasses (and lists of them)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            yield key, value
            yield from _walk(value, key + ".")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            key = f"{prefix[:-1]}[{i}]"
            if dataclasses.is_dataclass(item):
                yield key, item
            yield from _walk(item, key + ".")


def _check_rewards(config: Any, source: str) -> None:
    """Every reward resolves and accepts its kwargs (checked by signature: nothing is loaded yet)."""
    import inspect

    from rewards.pipeline import RewardSpec
    from rewards.registry import REGISTRY, _check_kwargs

    for key, value in _walk(config):
        if isinstance(value, RewardSpec):
            name = value.reward or value.name
            try:
                target = REGISTRY.lookup(name)
                _check_kwargs(target.__init__ if inspect.isclass(target) else target, dict(value.kwargs),
                              f"reward {name!r}")
            except Exception as err:  # unknown name, bad kwargs, ...
                raise RecipeError(f"{source}: key {key!r}: {err}") from err


def _check_evaluators(config: Any, source: str) -> None:
    """Every evaluator resolves (registry or dotted path) and accepts its kwargs; every callback resolves."""
    from alignment.evaluators import EvalConfig, EvaluatorSpec, get_callback, get_evaluator
    from rewards.registry import _check_kwargs

    for key, value in _walk(config):
        if isinstance(value, EvaluatorSpec):
            name = value.evaluator or value.name
            try:
                _check_kwargs(get_evaluator(name), dict(value.kwargs), f"evaluator {name!r}")
            except Exception as err:
                raise RecipeError(f"{source}: key {key!r}: {err}") from err
        elif isinstance(value, EvalConfig):
            for i, path in enumerate(value.callbacks):
                try:
                    get_callback(path)
                except ValueError as err:
                    raise RecipeError(f"{source}: key '{key}.callbacks[{i}]': {err}") from err


def run_recipe(path: str | Path, overrides: list[str] = ()) -> Any:
    stage, config = load_recipe(path, overrides)
    return _resolve(STAGES[stage][1])(config)
