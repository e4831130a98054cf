"""A thin, type-checked layer of YAML files and ``key.sub=value`` overrides over config
dataclasses. Recipes are Python functions that build the dataclasses; this module only
edits fields that already exist, converting each value to the field's declared type.

Field metadata :data:`RESUME_SAFE` marks the fields (or whole sections) whose change is
applied when a run resumes instead of refused (:mod:`qmath_megatron.training.resume`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

# Field metadata: changing this field (or anything in this section) when a run resumes is
# applied with a warning; changes of unmarked fields are refused. A field redefined in a
# subclass (a new default) keeps its base class's marking.
RESUME_SAFE: Mapping[str, str] = types.MappingProxyType({"resume": "safe"})


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
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_convert(v, item_type, key) for v in value]
        return tuple(items) if origin is tuple else items
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
        if isinstance(value, list | tuple | dict):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__}")
        return from_dict(annotation, value, prefix=key + ".")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (YAML) mapping, refusing unknown keys and naming missing ones."""
    hints = _field_types(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    known = [f.name for f in fields]
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))} "
            f"({cls.__name__} has: {', '.join(known)})"
        )
    missing = [
        prefix + f.name
        for f in fields
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key(s) {', '.join(missing)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(item: str) -> tuple[str, Any]:
    """``"key.sub=value"`` -> ``("key.sub", value)``, the value read as YAML (``4`` is an
    int, ``[1,2]`` a list, ``null`` None; an empty value is the empty string)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    path, raw = item.split("=", 1)
    return path.strip(), yaml.safe_load(raw) if raw else ""


def apply_values(config: T, values: Mapping[str, Any]) -> T:
    """Return a copy of ``config`` with ``{"key.sub": value}`` set, in order (typed).

    Every value is converted and set first; then each section that changed is validated
    once (its ``__post_init__``), deepest first, with all of its new values in place. So
    settings that are only valid together (``rl.placement=remote rl.weight_transfer=nccl``)
    can be given in any order."""
    config = _set_all(config, {tuple(path.split(".")): (path, v) for path, v in values.items()})
    return config


def _set_all(obj: Any, values: dict[tuple[str, ...], tuple[str, Any]]) -> Any:
    """``obj`` rebuilt (so validated once) with ``values`` (``keys -> (path, value)``) set."""
    if not dataclasses.is_dataclass(obj):
        path = next(iter(values.values()))[0]
        raise ConfigError(f"{path}: cannot set a field on a {type(obj).__name__}")
    field_names = [f.name for f in dataclasses.fields(obj)]
    changes: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], tuple[str, Any]]] = {}
    for keys, (path, value) in values.items():
        name = keys[0]
        if name not in field_names:
            raise ConfigError(
                f"unknown config key {path!r} ({type(obj).__name__} has: {', '.join(field_names)})"
            )
        if len(keys) == 1:
            changes[name] = _convert(value, _field_types(type(obj))[name], path)
            nested.pop(name, None)  # a whole section set after its keys replaces them
        else:
            if name in changes and not dataclasses.is_dataclass(changes[name]):
                raise ConfigError(f"{path}: cannot set a field on a {type(changes[name]).__name__}")
            nested.setdefault(name, {})[keys[1:]] = (path, value)
    for name, inner in nested.items():
        changes[name] = _set_all(changes.get(name, getattr(obj, name)), inner)
    return dataclasses.replace(obj, **changes) if changes else obj


def apply_overrides(config: T, overrides: list[str]) -> T:
    """Return a copy of ``config`` with ``key.sub=value`` overrides applied (typed; each
    changed section is validated once, with all the overrides in place)."""
    return apply_values(config, dict(parse_override(item) for item in overrides))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"key.sub": value}`` (the leaves; a dict is always descended)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def put(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``path`` ``"a.b"`` in a nested mapping (the
    sections are created as needed; a value in the way is a ConfigError naming ``path``)."""
    *sections, name = path.split(".")
    for i, section in enumerate(sections):
        inner = data.setdefault(section, {})
        if not isinstance(inner, dict):
            raise ConfigError(f"{path}: {'.'.join(sections[: i + 1])} is not a section")
        data = inner
    data[name] = value


def merge(data: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Put every leaf of ``other`` into ``data`` (sections merge, leaves replace)."""
    for path, value in flatten(other).items():
        put(data, path, value)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping (an empty file is ``{}``)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_yaml(cls: type[T], path: str | Path) -> T:
    """``cls`` built from a YAML file (its keys nested like the dataclass)."""
    return from_dict(cls, load_mapping(path))


def marked_fields(config: Any, metadata: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted paths of the fields of ``config`` (an instance, walked into its dataclass
    sections) whose metadata holds ``metadata`` (e.g. :data:`RESUME_SAFE`); a field
    redefined in a subclass counts as marked when a base class marks it."""
    out: set[str] = set()
    bases = [c for c in type(config).__mro__ if dataclasses.is_dataclass(c)]
    for f in dataclasses.fields(config):
        if any(
            g.name == f.name and metadata.items() <= g.metadata.items()
            for c in bases
            for g in dataclasses.fields(c)
        ):
            out.add(prefix + f.name)
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section) and not isinstance(section, type):
            out |= marked_fields(section, metadata, f"{prefix}{f.name}.")
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (for printing, YAML dumps and checkpoints)."""
    return dataclasses.asdict(config)
