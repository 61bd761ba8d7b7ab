"""Recipe sections → typed dataclasses, one to one; an unknown or ill-typed key names itself and the file.

Shared by every package (model → rollout → rewards → alignment), hence its place at the bottom of the
import order; it imports nothing of the project."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A recipe section does not match its dataclass."""


def _matches(value: Any, annotation: Any) -> bool:
    """A shallow type check: enough to catch a string where a number belongs, not a full validator."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict | annotation)
    return isinstance(value, annotation)


def from_mapping(cls: type[_T], data: dict[str, Any], source: str = "<config>") -> _T:
    """Build dataclass `cls` from `data`; nested dataclass fields (and lists of them) are built too."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}; known: {', '.join(fields)}")
        annotation = hints[key]
        nested = _nested_dataclass(annotation)
        if nested is not None and isinstance(value, list):
            value = [from_mapping(nested, item, f"{source}: {key}[{i}]") if isinstance(item, dict) else item
                     for i, item in enumerate(value)]
        elif dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            value = from_mapping(annotation, value, f"{source}: {key}")
        if not _matches(value, annotation):
            raise ConfigError(f"{source}: key {key!r} of {cls.__name__} is {value!r}, expected {annotation}")
        values[key] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: {cls.__name__} is missing required key(s) {', '.join(missing)}")
    return cls(**values)


def _nested_dataclass(annotation: Any) -> type | None:
    """The dataclass X of a `list[X]` annotation, else None."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if dataclasses.is_dataclass(item):
            return item
    return None
