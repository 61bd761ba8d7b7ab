"""The reward plug-in API: what a reward is, how it is registered, and how a name becomes one.

A reward is a batched callable

    reward(prompts: list, completions: list[str], **columns) -> list[float | None]

returning one score per sample, None where the reward does not apply to that sample (a math
reward on a row without an `answer`). `columns` are the dataset's other columns, one list per
column, aligned with `prompts` (for instance `answer=[...]`, `tests=[[...], ...]`). A reward that
does not take `**columns` receives only the columns its signature names. It may be `async def`.
A prompt is a string or a chat (a list of `{"role", "content"}` messages).

Where a name is looked up, in order:
1. rewards registered in this process with `@reward("name")` (the built-ins register on import);
2. the entry-point group `latentalign.rewards` of installed distributions (`name = "pkg.mod:obj"`);
3. a dotted path `package.module:object` or `package.module.object`.
The registered object is either a reward function or a class (a reward factory) whose instances
are rewards. `get_reward(name, **kwargs)` instantiates a class with `kwargs`, or binds `kwargs` to a
function's keyword parameters; a kwarg it does not accept is an error naming it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import numbers
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, TypeVar

ENTRY_POINT_GROUP = "latentalign.rewards"

RewardFn = Callable[..., Any]
_T = TypeVar("_T")


class RewardRegistry:
    """Names → reward functions or reward classes. The process-wide instance is `REGISTRY`."""

    def __init__(self) -> None:
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"a reward named {name!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = obj

    def names(self) -> list[str]:
        """Registered names plus those the entry points offer."""
        return sorted(set(self._entries) | {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})

    def lookup(self, name: str) -> Any:
        """The registered function or class for `name` (see the module docstring for the order)."""
        if name in self._entries:
            return self._entries[name]
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
        if entry_points:
            # Several distributions offering one name is ambiguous only if they disagree.
            targets = {ep.value for ep in entry_points}
            if len(targets) > 1:
                raise ValueError(f"reward {name!r} is offered by several entry points: {sorted(targets)}")
            return next(iter(entry_points)).load()
        if "." in name or ":" in name:
            return import_dotted(name)
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(self.names())}")


REGISTRY = RewardRegistry()


def reward(name: str) -> Callable[[_T], _T]:
    """Decorator: register a reward function or reward class under `name`."""

    def decorate(obj: _T) -> _T:
        REGISTRY.register(name, obj)
        return obj

    return decorate


class DottedImportError(KeyError, ValueError):
    """A dotted path that does not import. A KeyError to registry lookups, a ValueError to config checks."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


def import_dotted(path: str, what: str = "reward") -> Any:
    """The object at `module:attr.sub` or `module.attr`; an import that fails raises DottedImportError
    naming `what`, the path and the module or attribute that is missing."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DottedImportError(f"{what} {path!r}: cannot import module {module_name!r} ({error})") from error
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise DottedImportError(f"{what} {path!r}: module {module_name!r} has no {attribute!r}") from None


def _check_kwargs(target: Callable, kwargs: dict[str, Any], what: str) -> None:
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = {n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for key in kwargs:
        if key not in accepted:
            raise TypeError(f"{what} got an unknown kwarg {key!r}; it accepts: {', '.join(sorted(accepted))}")


def get_reward(name: str, **kwargs: Any) -> RewardFn:
    """The reward called `name` (registered, entry point, or dotted path), configured with `kwargs`."""
    obj = REGISTRY.lookup(name)
    if inspect.isclass(obj):
        _check_kwargs(obj.__init__, kwargs, f"reward {name!r}")
        return obj(**kwargs)
    if not callable(obj):
        raise TypeError(f"reward {name!r} resolved to {obj!r}, which is not callable")
    if kwargs:
        _check_kwargs(obj, kwargs, f"reward {name!r}")
        bound = functools.partial(obj, **kwargs)
        functools.update_wrapper(bound, obj)
        return bound
    return obj


def _call_target(fn: RewardFn) -> Callable:
    """What actually runs when `fn` is called: the function under a partial, a class's __call__
    (unbound, so its first parameter is self) for a reward instance."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = type(target).__call__
    return target


def _accepted_columns(fn: RewardFn, columns: dict[str, Any]) -> dict[str, Any]:
    target = _call_target(fn)
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return columns
    return {key: value for key, value in columns.items() if key in parameters}


def required_columns(fn: RewardFn) -> list[str]:
    """The dataset columns `fn` cannot be called without: its parameters after (prompts, completions)
    that have no default. The signature of the callable itself: a reward instance's bound __call__, and
    a partial's kwargs as defaults (not followed through get_reward's __wrapped__ to the bare function)."""
    parameters = list(inspect.signature(fn, follow_wrapped=False).parameters.values())[2:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def _is_async(fn: RewardFn) -> bool:
    return inspect.iscoroutinefunction(_call_target(fn))


def call_reward(fn: RewardFn, prompts: Sequence, completions: Sequence[str], **columns: Any) -> list[float | None]:
    """Call a reward (sync or async) and check that it returned one float or None per sample."""
    for key, values in columns.items():
        if len(values) != len(completions):
            raise ValueError(f"column {key!r} has {len(values)} values for {len(completions)} completions")
    arguments = _accepted_columns(fn, columns)
    if _is_async(fn):
        scores = asyncio.run(fn(list(prompts), list(completions), **arguments))
    else:
        scores = fn(list(prompts), list(completions), **arguments)
    scores = list(scores)
    if len(scores) != len(completions):
        raise ValueError(f"reward returned {len(scores)} scores for {len(completions)} completions")
    checked: list[float | None] = []
    for score in scores:
        if score is not None and not isinstance(score, numbers.Real):
            raise TypeError(f"reward returned {score!r} ({type(score).__name__}); expected float or None")
        checked.append(None if score is None else float(score))
    return checked
