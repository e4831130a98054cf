"""A pipeline's stages and their DAG.

A :class:`Stage` is one existing ``qmath`` command (no second implementation of any
stage): its settings render to the command line a user would type. Settings whose values
hold ``{stage.output}`` placeholders take upstream outputs from the pipeline's state, so the
tools never agree on hard-coded names; every placeholder adds its stage to the upstream
set. ``{run}`` is the run directory and ``{self}`` the stage's own directory.

Settings keys (``STAGE.KEY=VALUE`` on ``qmath pipeline run``):

- ``recipe``: a trainer's ``--recipe``;
- a key with a dot (``train.train_iters``): a trailing ``key=value`` override;
- any other key (``n``, ``max_new_tokens``): the flag ``--n`` / ``--max-new-tokens``; a list
  is one flag with several values, ``True`` a bare flag, ``False`` / ``None`` no flag.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("data", "train", "convert", "eval")
# Placeholder roots that are not stages: the run directory, the stage's own directory, and
# the recipe's inputs (paths the user gives: ``inputs.NAME=PATH``).
RESERVED = ("run", "self", "inputs")
UNSET = "???"  # an input the user must set
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w-]*)(?:\.([A-Za-z_]\w*))?\}")


@dataclass(frozen=True)
class Resources:
    """What a stage asks a scheduler for (the local executor runs it on this machine).
    ``tasks_per_node`` processes per node: torchrun's ``--nproc-per-node`` for training
    stages when above 1 (GPU clusters: one per GPU)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem: str | None = None  # Slurm --mem, e.g. "64G"; None: the partition's default
    time: str = "01:00:00"

    def __post_init__(self) -> None:
        if min(self.nodes, self.tasks_per_node, self.cpus_per_task) < 1 or self.gpus_per_node < 0:
            raise ValueError(f"bad resources {self}")


@dataclass
class Stage:
    """One stage: ``qmath <command...> <settings>`` writing into ``RUN/<name>/``.

    ``outputs`` name the paths (relative to the stage's directory) that downstream stages
    may use as ``{name.output}``. ``resumable``: the command continues an interrupted run
    itself (training checkpoints, data-tool shards); otherwise a rerun clears the stage's
    outputs first. ``model``: the model an eval stage evaluates (``base``, ``sft1``, ...).
    ``metrics``: the stage's metrics file (relative), read for ``status`` and ``report``.
    """

    name: str
    kind: str
    command: tuple[str, ...]
    settings: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    resumable: bool = False
    model: str | None = None
    metrics: str | None = None
    after: tuple[str, ...] = ()  # upstream stages besides those the placeholders name

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"stage name {self.name!r}: use lower-case letters, digits and _")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; :meth:`from_dict` rebuilds the stage (a job runs it from the run's
        recorded DAG, not from the recipe's code)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "command": list(self.command),
            "settings": self.settings,
            "outputs": self.outputs,
            "resources": vars(self.resources),
            "resumable": self.resumable,
            "model": self.model,
            "metrics": self.metrics,
            "after": list(self.after),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage:
        return cls(
            name=d["name"],
            kind=d["kind"],
            command=tuple(d["command"]),
            settings=dict(d["settings"]),
            outputs=dict(d["outputs"]),
            resources=Resources(**d["resources"]),
            resumable=bool(d["resumable"]),
            model=d.get("model"),
            metrics=d.get("metrics"),
            after=tuple(d.get("after", ())),
        )

    def upstream(self) -> list[str]:
        """The stages this one reads (placeholders and ``after``), in first-use order."""
        names: list[str] = []
        for value in _strings(self.settings):
            for m in _PLACEHOLDER.finditer(value):
                if m.group(1) not in RESERVED and m.group(1) not in names:
                    names.append(m.group(1))
        return names + [a for a in self.after if a not in names]


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class Pipeline:
    """The DAG of a recipe: stages in a valid order (each after its upstream stages)."""

    def __init__(
        self, recipe: str, stages: Sequence[Stage], inputs: Mapping[str, str] | None = None
    ) -> None:
        self.recipe = recipe
        self.inputs: dict[str, str] = dict(inputs or {})
        self.stages: dict[str, Stage] = {}
        for s in stages:
            if s.name in self.stages or s.name in RESERVED:
                raise ValueError(f"stage name {s.name!r} used twice (or reserved)")
            self.stages[s.name] = s
        for s in stages:
            for up in s.upstream():
                if up not in self.stages:
                    raise ValueError(f"stage {s.name} reads {{{up}...}}: no such stage")
                if list(self.stages).index(up) >= list(self.stages).index(s.name):
                    raise ValueError(f"stage {s.name} comes before its upstream stage {up}")
            for value in _strings(s.settings):
                for m in _PLACEHOLDER.finditer(value):
                    up, out = m.group(1), m.group(2)
                    if up == "inputs" and out not in self.inputs:
                        raise ValueError(f"stage {s.name} reads {{inputs.{out}}}: no such input")
                    if up in RESERVED or out is None:
                        continue
                    if out not in self.stages[up].outputs:
                        raise ValueError(
                            f"stage {s.name} reads {{{up}.{out}}}, but {up} has outputs "
                            f"{sorted(self.stages[up].outputs)}"
                        )

    def unset_inputs(self) -> list[str]:
        return [f"inputs.{k}" for k, v in self.inputs.items() if v == UNSET]

    def names(self) -> list[str]:
        return list(self.stages)

    def downstream(self, name: str) -> list[str]:
        """``name`` and every stage that depends on it, directly or not, in DAG order."""
        if name not in self.stages:
            raise ValueError(f"no stage {name!r}; stages: {', '.join(self.stages)}")
        hit = {name}
        for s in self.stages.values():
            if set(s.upstream()) & hit:
                hit.add(s.name)
        return [n for n in self.stages if n in hit]

    def apply_overrides(self, overrides: Mapping[str, Any]) -> None:
        """``{"stage.key": value}``: set a stage's setting (a new key is allowed: it becomes
        a flag or an override of the stage's command, which checks it when it runs)."""
        for key, value in overrides.items():
            stage, _, setting = key.partition(".")
            if stage == "inputs":
                if setting not in self.inputs:
                    raise ValueError(
                        f"override {key!r}: no input {setting!r}; inputs: "
                        + (", ".join(self.inputs) or "none")
                    )
                self.inputs[setting] = str(value)
                continue
            if stage not in self.stages or not setting:
                raise ValueError(
                    f"override {key!r}: expected STAGE.KEY=VALUE with STAGE one of "
                    f"{', '.join(self.stages)}"
                )
            self.stages[stage].settings[setting] = value

    def stage_dir(self, run: Path, name: str) -> Path:
        return run / name

    def outputs(self, run: Path, name: str) -> dict[str, Path]:
        return {k: run / name / v for k, v in self.stages[name].outputs.items()}

    def resolve(self, run: Path, name: str) -> dict[str, Any]:
        """The stage's settings with every placeholder replaced by its path."""

        def sub(value: Any) -> Any:
            if isinstance(value, str):
                return _PLACEHOLDER.sub(lambda m: self._path(run, name, m), value)
            if isinstance(value, list | tuple):
                return [sub(v) for v in value]
            if isinstance(value, Mapping):
                return {k: sub(v) for k, v in value.items()}
            return value

        return {k: sub(v) for k, v in self.stages[name].settings.items()}

    def _path(self, run: Path, name: str, m: re.Match) -> str:
        up, out = m.group(1), m.group(2)
        if up == "run":
            return str(run)
        if up == "inputs":
            return self.inputs[out]
        if up == "self":
            if out is None:
                return str(run / name)
            return str(run / name / self.stages[name].outputs.get(out, out))
        return str(run / up / self.stages[up].outputs[out]) if out else str(run / up)

    def argv(self, run: Path, name: str) -> list[str]:
        """The stage's command line after ``qmath`` (flags first, then overrides)."""
        return [*self.stages[name].command, *render_settings(self.resolve(run, name))]


def render_settings(settings: Mapping[str, Any]) -> list[str]:
    """Settings as command-line words (see the module docstring for the rules)."""
    flags: list[str] = []
    overrides: list[str] = []
    for key, value in settings.items():
        if "." in key:
            overrides.append(f"{key}={_override_value(value)}")
            continue
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, list | tuple):
            if value:
                flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags + overrides


def _override_value(value: Any) -> str:
    import json

    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    return json.dumps(value)


def shell_line(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)
