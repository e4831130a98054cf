"""One command-line path for every command: a command's settings are one config dataclass.

:class:`ConfigArgs` adds a command's flags to its parser from the dataclass's fields: flag
``--kebab-name``, type from the field's annotation, default from the dataclass. A flag
whose name or meaning differs from its field (``--input`` for ``inputs``, ``--no-eod`` for
``append_eod=False``, ``--n`` for ``sampling.n``) is mapped where the command adds it, one
call per flag. Every command also takes ``--config FILE.yaml`` (the dataclass's keys,
nested like it) and trailing ``key.sub=value`` overrides. :meth:`ConfigArgs.build` makes
the dataclass from, in order of precedence (last wins):

    the defaults (or the command's base config) < the YAML file < the flags given on the
    command line < the key=value overrides

every value type-checked against its field by :mod:`qmath_megatron.config.overrides`: an
unknown key or a value of the wrong type is a one-line error naming the key. A flag left
at its default does not override the YAML file; a required flag may come from the file.

The parsers of :func:`qmath_megatron.cli.build_parser` are :class:`CommandParser` objects:
a command's flags are added when that command is used (:func:`build_later`, so that
``qmath --help`` imports no command's config modules), required flags may come from
``--config``, and trailing overrides are found also after a command that has subcommands of
its own (``qmath eval``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Union, get_args, get_origin

from qmath_megatron.config.overrides import (
    ConfigError,
    flatten,
    from_dict,
    load_mapping,
    merge,
    parse_override,
    put,
    to_dict,
)

CONFIG_HELP = "YAML file of settings (keys nested like the config); flags given override it"
OVERRIDES_HELP = "settings as key=value (sub.key for a section's), applied last"
_SPEC = "_qmath_config_args"  # the parser's default: the ConfigArgs of its command
_GIVEN = "_qmath_given"  # namespace: the dests of the flags given on the command line
_OVERRIDE = re.compile(r"([A-Za-z_]\w*)(\.[A-Za-z_]\w*)*=")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_help: str = CONFIG_HELP,
    overrides_help: str = OVERRIDES_HELP,
) -> None:
    """``--config FILE.yaml`` and the trailing ``KEY=VALUE`` overrides (``args.config``,
    ``args.overrides``)."""
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


@dataclasses.dataclass(frozen=True)
class _Mapped:
    dest: str
    key: str
    negate: bool
    convert: Callable[[Any], Any] | None


class ConfigArgs:
    """The flags of one command, each mapped to a key of its config dataclass ``config``.

    ``prepare(data)`` may complete the nested mapping of settings before the dataclass is
    built (e.g. values derived from two flags). Call :meth:`add` per flag in the order they
    should be listed, then :meth:`finish`; the command's function calls :func:`build_config`.
    """

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        config: type,
        prepare: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.parser = parser
        self.config = config
        self.prepare = prepare
        self.mapped: dict[str, _Mapped] = {}

    def add(
        self,
        key: str,
        flag: str | None = None,
        *,
        container: Any = None,
        negate: bool = False,
        convert: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> argparse.Action:
        """Add the flag of config key ``key`` (dotted for a section's field).

        ``flag`` defaults to ``--`` + the field's name in kebab case. A bool field becomes a
        ``store_true`` flag; ``negate`` makes it ``--no-...`` style (given: the field is
        False). ``convert`` turns a given value into the field's (e.g. a comma-separated
        list). Other keyword arguments go to ``add_argument`` (help, choices, action, nargs,
        required, metavar, ...); ``type`` and ``default`` come from the field unless given.
        """
        annotation, default = _field(self.config, key)
        flag = flag or "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        if flag.startswith("-"):
            dest = kwargs.setdefault("dest", flag.lstrip("-").replace("-", "_"))
        else:  # a positional argument: argparse takes its dest from the name
            dest = flag
        scalar = _scalar(annotation)
        if scalar is bool and convert is None:
            if default is not negate:
                raise TypeError(f"{key}: a flag sets a bool to its non-default value")
            kwargs.setdefault("action", "store_true")
            kwargs.setdefault("default", False)
        else:
            if convert is None and scalar in (int, float):
                kwargs.setdefault("type", scalar)
            kwargs.setdefault("default", None if default is dataclasses.MISSING else default)
        action_class = self.parser._registry_get("action", kwargs.get("action"), None)
        kwargs["action"] = _recording(action_class or kwargs.get("action"))
        self.mapped[dest] = _Mapped(dest, key, negate, convert)
        return (container or self.parser).add_argument(flag, **kwargs)

    def finish(self, config_help: str = CONFIG_HELP, overrides_help: str = OVERRIDES_HELP) -> None:
        """Add ``--config`` and the overrides; the parser remembers this mapping."""
        add_config_arguments(self.parser, config_help, overrides_help)
        self.parser.set_defaults(**{_SPEC: self})

    def build(self, args: argparse.Namespace, base: Any = None) -> Any:
        """The config: ``base`` (default: the dataclass's defaults) < ``--config`` < the
        flags given < the overrides."""
        data: dict[str, Any] = to_dict(base) if base is not None else {}
        if args.config:
            merge(data, load_mapping(args.config))
        given = getattr(args, _GIVEN, set())
        for m in self.mapped.values():
            if m.dest in given:
                value = getattr(args, m.dest)
                if m.negate:
                    value = not value
                elif m.convert is not None:
                    value = m.convert(value)
                put(data, m.key, value)
        for item in args.overrides:
            path, value = parse_override(item)
            put(data, path, value)
        if self.prepare is not None:
            self.prepare(data)
        return from_dict(self.config, data)

    # -- parsing (CommandParser)

    def split_overrides(self, args: list[str], parser: argparse.ArgumentParser) -> int:
        """Where the trailing ``key=value`` overrides start in ``args`` (``len(args)``:
        none). A word counts when its first key is a field of the config and it is not the
        value of the option before it."""
        fields = {f.name for f in dataclasses.fields(self.config)}
        subcommands = {
            name
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name in action.choices
        }
        if subcommands & set(args):
            return len(args)  # the subcommand's line, not this command's
        start = len(args)
        while start > 0:
            word = args[start - 1]
            match = _OVERRIDE.match(word)
            if not match or match.group(1) not in fields or takes_value(parser, args, start - 1):
                break
            start -= 1
        return start

    def required_from_file(self, args: list[str], parser: argparse.ArgumentParser) -> list:
        """The required flags (and required groups of exclusive flags) whose keys the
        ``--config`` file in ``args`` sets. A file that cannot be read is a usage error
        here only when there are required flags to look up (else :meth:`build` says so)."""
        required = [a for a in parser._actions if a.required and a.dest in self.mapped]
        groups = [g for g in parser._mutually_exclusive_groups if g.required]
        path = _config_path(args)
        if path is None or not (required or groups):
            return []
        try:
            keys = set(flatten(load_mapping(path)))
        except ConfigError as exc:
            parser.error(str(exc))
        except OSError as exc:
            parser.error(f"--config {path}: {exc.strerror or exc}")
        covered = [a for a in required if self._sets(a, keys)]
        covered += [
            g for g in groups if any(a in covered or self._sets(a, keys) for a in g._group_actions)
        ]
        return covered

    def _sets(self, action: argparse.Action, keys: set[str]) -> bool:
        m = self.mapped.get(action.dest)
        return m is not None and any(k == m.key or k.startswith(m.key + ".") for k in keys)


def build_config(args: argparse.Namespace, base: Any = None) -> Any:
    """The config dataclass of the command that parsed ``args`` (see :class:`ConfigArgs`)."""
    spec = getattr(args, _SPEC, None)
    if spec is None:
        raise TypeError("the command's parser was not built with ConfigArgs")
    return spec.build(args, base)


def build_later(
    parser: argparse.ArgumentParser, build: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``parser``'s arguments (``build(parser)``) when it is first used: parsed, or its
    help or usage formatted. A command's flags need its config dataclass, whose module may be
    heavy (numpy, ...); building only the parser of the command being run keeps every other
    command's modules out of start-up. A plain ArgumentParser builds at once."""
    if isinstance(parser, CommandParser):
        parser.pending.append(build)
    else:
        build(parser)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments may be added when first needed (:func:`build_later`),
    whose :class:`ConfigArgs` commands take their required flags from ``--config FILE.yaml``
    too, and which finds trailing ``key=value`` overrides even where a subcommand could stand
    (argparse alone would read them as a subcommand's name). Subparsers are of this class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[Callable[[argparse.ArgumentParser], None]] = []

    def build(self) -> None:
        """Add the arguments :func:`build_later` deferred."""
        while self.pending:
            self.pending.pop(0)(self)

    def format_usage(self) -> str:
        self.build()
        return super().format_usage()

    def format_help(self) -> str:
        self.build()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        self.build()
        spec = self.get_default(_SPEC)
        if spec is None or args is None:
            return super().parse_known_args(args, namespace)
        args = list(args)
        start = spec.split_overrides(args, self)
        args, trailing = args[:start], args[start:]
        relaxed = spec.required_from_file(args, self)
        for action in relaxed:
            action.required = False
        try:
            namespace, extras = super().parse_known_args(args, namespace)
        finally:
            for action in relaxed:
                action.required = True
        namespace.overrides = [*(namespace.overrides or []), *trailing]
        return namespace, extras


def _config_path(args: list[str]) -> str | None:
    path = None
    for i, word in enumerate(args):
        if word == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif word.startswith("--config="):
            path = word.split("=", 1)[1]
    return path


def takes_value(parser: argparse.ArgumentParser, args: list[str], i: int) -> bool:
    """Whether ``args[i]`` is read as the value of the option before it (a list option's
    values end at the first ``key=value`` word after at least one value)."""
    j = next((j for j in range(i - 1, -1, -1) if args[j].startswith("-")), None)
    if j is None or "=" in args[j]:
        return False
    action = parser._option_string_actions.get(args[j])
    if action is None:
        return False
    if action.nargs in (None, "?", "+"):
        return i == j + 1
    if isinstance(action.nargs, int):
        return i - j <= action.nargs
    return False


def _recording(action_class: Any) -> type[argparse.Action]:
    """``action_class`` that also records its dest as given; a list flag's first use
    replaces the default list instead of appending to it."""

    class Recording(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            given = getattr(namespace, _GIVEN, None)
            if given is None:
                given = set()
                setattr(namespace, _GIVEN, given)
            if self.dest not in given and isinstance(self, argparse._AppendAction):
                setattr(namespace, self.dest, None)
            given.add(self.dest)
            super().__call__(parser, namespace, values, option_string)

    return Recording


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation: once per class


def _field(cls: type, key: str) -> tuple[Any, Any]:
    """``(annotation, default)`` of the dotted ``key`` of dataclass ``cls``
    (``dataclasses.MISSING`` for a required field)."""
    name, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise TypeError(f"{cls.__name__} has no field {name!r}")
    f = fields[name]
    default = f.default
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    annotation = _type_hints(cls)[name]
    if not rest:
        return annotation, default
    section = _scalar(annotation)
    inner_annotation, inner_default = _field(section, rest)
    if dataclasses.is_dataclass(default):
        for part in rest.split("."):
            default = getattr(default, part)
        return inner_annotation, default
    return inner_annotation, inner_default


def _scalar(annotation: Any) -> Any:
    """The type a flag's value has: ``X`` for ``X | None`` and for ``list[X]``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar(options[0]) if options else annotation
    if origin in (list, tuple, Sequence):
        (item, *_) = get_args(annotation) or (Any,)
        return _scalar(item)
    return annotation
