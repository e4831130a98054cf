"""What a ``qmath pipeline run`` does: which stages run, which are done, what is refused.

- A done stage (its marker exists) is skipped, unless ``--from`` names it or a stage
  upstream of it. Its recorded settings must equal the recipe's with the new overrides,
  else the run is refused naming ``stage.key: old -> new``; its outputs must still match
  their fingerprint and the upstream outputs it read must be the current ones, else the
  run is refused naming the stage (``--from`` that stage reruns it).
- ``--from STAGE`` reruns STAGE and everything downstream of it: their directories are
  moved to ``RUN/.previous/<stage>`` (the last ones only) when each starts.
- ``--stages a,b``: only these run; a stage they need that is not done is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmath_megatron.pipeline.stage import Pipeline
from qmath_megatron.pipeline.state import (
    RunState,
    outputs_fingerprint,
    read_marker,
    settings_diff,
)


@dataclass
class Plan:
    pipeline: Pipeline
    run: Path
    todo: list[str]  # stages to run, in DAG order
    done: list[str]
    rerun: set[str] = field(default_factory=set)  # --from: done stages to redo
    overrides: dict[str, Any] = field(default_factory=dict)


def make_plan(
    pipeline: Pipeline,
    run: Path,
    overrides: Mapping[str, Any],
    stages: Sequence[str] | None = None,
    from_stage: str | None = None,
) -> Plan:
    state = RunState(run)
    if state.exists():
        recorded = state.read()
        if recorded.get("recipe") not in (None, pipeline.recipe):
            raise ValueError(
                f"{run} is a run of recipe {recorded['recipe']!r}, not {pipeline.recipe!r}: "
                "use another --workdir"
            )
    for name in stages or ():
        if name not in pipeline.stages:
            raise ValueError(f"--stages: no stage {name!r}; stages: {', '.join(pipeline.stages)}")
    rerun = set(pipeline.downstream(from_stage)) if from_stage else set()
    selected = set(stages) if stages else set(pipeline.stages)
    if from_stage and stages:
        selected |= rerun & selected
    refusals: list[str] = []
    todo: list[str] = []
    done: list[str] = []
    for name in pipeline.names():
        marker = read_marker(run, name)
        if name in rerun:
            if name in selected:
                todo.append(name)
            continue
        if marker is None:
            if name in selected:
                todo.append(name)
            continue
        done.append(name)
        refusals += _check_done(pipeline, run, name, marker)
    if refusals:
        raise ValueError(
            "the run differs from what is done:\n  "
            + "\n  ".join(refusals)
            + "\nrerun the changed stage and everything after it with --from STAGE"
        )
    for name in todo:
        for up in pipeline.stages[name].upstream():
            if up not in todo and up not in done:
                raise ValueError(
                    f"stage {name} needs {up}, which is not done: run it too (--stages)"
                )
    return Plan(pipeline, run, todo, done, rerun & set(todo), dict(overrides))


def _check_done(pipeline: Pipeline, run: Path, name: str, marker: dict) -> list[str]:
    recorded = marker["fingerprint"]
    lines = settings_diff(name, recorded["settings"], pipeline.resolve(run, name))
    try:
        if outputs_fingerprint(pipeline.outputs(run, name)) != marker["outputs_fingerprint"]:
            lines.append(f"{name}: its outputs changed after it finished ({run / name})")
    except FileNotFoundError as exc:
        lines.append(f"{name}: {exc}")
    for up, digest in recorded.get("inputs", {}).items():
        up_marker = read_marker(run, up)
        if up_marker is None or up_marker["outputs_fingerprint"] != digest:
            lines.append(f"{name}: read outputs of {up} that have changed since")
    return lines
