"""Benchmarks as JSONL files with a field mapping.

Built in: ``gsm8k`` (GSM8K test, the reference after ``#### ``) and ``math500`` (MATH-500,
the ``answer`` field), found under a benchmark directory laid out as
``DIR/gsm8k/test.jsonl`` and ``DIR/math500/test.jsonl``. Any other file is described by a
spec string, ``name=aime24,path=aime.jsonl,problem=question,answer=answer`` followed by the
optional fields ``[,format=plain|gsm8k|boxed]``, ``[,id=id]`` and
``[,percent=as_number|either]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from qmath_megatron.rewards import extract_boxed, extract_gsm8k_reference

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
BENCHMARK_DIR_ENV = "QMATH_BENCHMARK_DIR"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's problems are and how to read them.

    ``answer_format`` says how the reference answer is taken from ``answer_key``: ``plain``
    (the field is the answer), ``gsm8k`` (the text after the last ``#### ``) or ``boxed``
    (the last ``\\boxed{}`` of a worked solution). ``percent`` is the answer key's
    convention for percentages (see :class:`qmath_megatron.rewards.Convention`).
    """

    name: str
    path: str
    problem_key: str
    answer_key: str
    answer_format: AnswerFormat = "plain"
    id_key: str | None = None
    percent: Literal["as_number", "either"] = "as_number"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"benchmark name must be non-empty without '/': {self.name!r}")
        if self.answer_format not in ("plain", "gsm8k", "boxed"):
            raise ValueError(f"benchmark {self.name}: unknown answer format {self.answer_format!r}")
        if self.percent not in ("as_number", "either"):
            raise ValueError(f"benchmark {self.name}: percent must be as_number or either")


# Relative paths are resolved against the benchmark directory.
BUILTIN_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "gsm8k": BenchmarkSpec("gsm8k", "gsm8k/test.jsonl", "question", "answer", "gsm8k", "idx"),
    "math500": BenchmarkSpec(
        "math500", "math500/test.jsonl", "problem", "answer", "plain", "unique_id"
    ),
}

_SPEC_KEYS = {
    "name": "name",
    "path": "path",
    "problem": "problem_key",
    "answer": "answer_key",
    "format": "answer_format",
    "id": "id_key",
    "percent": "percent",
}


@dataclass
class Problem:
    id: str
    problem: str
    reference: str
    extra: dict = field(default_factory=dict)  # e.g. MATH's level and subject, kept in outputs


def parse_benchmark_spec(text: str) -> BenchmarkSpec:
    """``name=X,path=F,problem=KEY,answer=KEY[,format=..][,id=KEY][,percent=..]``."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _SPEC_KEYS:
            raise ValueError(
                f"bad benchmark spec {text!r}: expected comma-separated key=value with keys "
                f"{', '.join(_SPEC_KEYS)}"
            )
        fields[_SPEC_KEYS[key]] = value.strip()
    missing = [k for k in ("name", "path", "problem", "answer") if _SPEC_KEYS[k] not in fields]
    if missing:
        raise ValueError(f"benchmark spec {text!r} lacks {', '.join(missing)}")
    return BenchmarkSpec(**fields)  # type: ignore[arg-type]


def resolve_benchmarks(
    names: list[str], benchmark_dir: str | Path | None = None, specs: list[str] | None = None
) -> list[BenchmarkSpec]:
    """Specs for ``names`` (built-ins or names defined by ``specs``), paths made absolute."""
    custom = {s.name: s for s in map(parse_benchmark_spec, specs or [])}
    root = benchmark_dir or os.environ.get(BENCHMARK_DIR_ENV)
    out = []
    for name in names:
        spec = custom.get(name) or BUILTIN_BENCHMARKS.get(name)
        if spec is None:
            known = sorted({*BUILTIN_BENCHMARKS, *custom})
            raise ValueError(
                f"unknown benchmark {name!r} (known: {', '.join(known)}; describe others with "
                f"--benchmark name=...,path=...,problem=KEY,answer=KEY)"
            )
        path = Path(spec.path)
        if not path.is_absolute() and name not in custom:
            if root is None:
                raise ValueError(
                    f"benchmark {name!r} is read from a benchmark directory: pass "
                    f"--benchmark-dir DIR (holding {spec.path}) or set {BENCHMARK_DIR_ENV}"
                )
            path = Path(root) / path
        out.append(replace(spec, path=str(path)))
    return out


def _reference(spec: BenchmarkSpec, value: object, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {spec.answer_key!r} is not a non-empty string")
    if spec.answer_format == "gsm8k":
        try:
            return extract_gsm8k_reference(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if spec.answer_format == "boxed":
        boxed = extract_boxed(value)
        if boxed is None:
            raise ValueError(f"{where}: no \\boxed{{}} answer in field {spec.answer_key!r}")
        return boxed
    return value.strip()


def load_problems(spec: BenchmarkSpec, limit: int | None = None) -> list[Problem]:
    """The problems of ``spec`` (the first ``limit``). Any malformed line is an error naming
    the file and line: a benchmark with silently dropped problems reports wrong accuracy."""
    path = Path(spec.path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {spec.name}: file not found: {path}")
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            text = row.get(spec.problem_key)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: field {spec.problem_key!r} is not a non-empty string")
            pid = row.get(spec.id_key) if spec.id_key else None
            extra = {k: v for k, v in row.items() if k in ("level", "subject", "type")}
            problems.append(
                Problem(
                    id=str(pid if pid is not None else len(problems)),
                    problem=text,
                    reference=_reference(spec, row.get(spec.answer_key), where),
                    extra=extra,
                )
            )
    if not problems:
        raise ValueError(f"benchmark {spec.name}: no problems in {path}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark {spec.name}: duplicate ids in field {spec.id_key!r}")
    return problems
