"""A thin, type-checked layer of YAML files and ``key.sub=value`` overrides over config
dataclasses. Recipes are Python functions that build the dataclasses; this module only
edits fields that already exist, converting each value to the field's declared type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An override or YAML value that does not fit the config (unknown key, wrong type)."""


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_null and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            with contextlib.suppress(ConfigError):
                return _convert(value, option, key)
        raise ConfigError(f"{key}: {value!r} fits none of {annotation}")
    if origin is Literal:
        choices = get_args(annotation)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_convert(v, item_type, key) for v in value]
        return items if origin is list else tuple(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        return str(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__}")
        return from_dict(annotation, value, prefix=key + ".")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (YAML) mapping, refusing unknown keys."""
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(config: T, overrides: list[str]) -> T:
    """Return a copy of ``config`` with ``key.sub=value`` overrides applied (typed)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        path, raw = item.split("=", 1)
        config = _set(config, path.strip().split("."), yaml.safe_load(raw) if raw else "", path)
    return config


def _set(obj: Any, keys: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{full}: cannot set a field on a {type(obj).__name__}")
    name = keys[0]
    field_names = [f.name for f in dataclasses.fields(obj)]
    if name not in field_names:
        raise ConfigError(
            f"unknown config key {full!r} ({type(obj).__name__} has: {', '.join(field_names)})"
        )
    if len(keys) == 1:
        new = _convert(value, _field_types(type(obj))[name], full)
    else:
        new = _set(getattr(obj, name), keys[1:], value, full)
    return dataclasses.replace(obj, **{name: new})


def load_yaml(cls: type[T], path: str | Path) -> T:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (for printing, YAML dumps and checkpoints)."""
    return dataclasses.asdict(config)
