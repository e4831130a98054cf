"""Score saved generations: extract answers, check them, group them, compute the metrics.

The samples format (what ``qmath eval`` writes and ``qmath eval metrics`` reads), one JSON
object per problem::

    {"gt": "18", "completions": ["...", "..."], "rm_scores": [0.3, -1.2],   # rm_scores optional
     "greedy": "...",                                                      # optional
     "id": "...", "problem": "..."}                                         # optional, kept

``greedy`` is the greedy-decoded completion when the run had one besides its samples;
without it the greedy metric scores the first completion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from qmath_megatron.evaluation.metrics import ProblemScore, aggregate, problem_outcome
from qmath_megatron.rewards import extract_answer, normalize_answer


class RewardScorer(Protocol):
    """Scores completions for RM@k (implemented by the reward model stage).

    ``problems``: [P] problem texts; ``completions``: [P][n] texts; returns [P][n] floats.
    """

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[float]]: ...


class AnswerChecking(Protocol):
    """What scoring needs from :class:`qmath_megatron.rewards.AnswerChecker`."""

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list: ...


def read_samples(path: str | Path) -> list[dict]:
    """Validated sample records from a JSONL file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                records.append(validate_record(record, f"{path}:{lineno}"))
    if not records:
        raise ValueError(f"{path}: no samples")
    return records


def validate_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    gt = record.get("gt")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        record["gt"] = gt = str(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise ValueError(f"{where}: 'gt' (the reference answer) must be a non-empty string")
    comps = record.get("completions")
    if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
        raise ValueError(f"{where}: 'completions' must be a non-empty list of strings")
    scores = record.get("rm_scores")
    if scores is not None and (
        not isinstance(scores, list)
        or len(scores) != len(comps)
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
    ):
        raise ValueError(
            f"{where}: 'rm_scores' must be a list of {len(comps)} numbers (one per completion)"
        )
    if "greedy" in record and not isinstance(record["greedy"], str):
        raise ValueError(f"{where}: 'greedy' must be a string (the greedy completion)")
    return record


def resolve_k(records: Sequence[dict], k: int | None) -> int:
    """k defaults to the number of completions; every problem must have at least k."""
    sizes = [len(r["completions"]) for r in records]
    if k is None:
        k = min(sizes)
        if len(set(sizes)) > 1:
            print(f"note: problems have {min(sizes)} to {max(sizes)} completions; k = {k}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    short = [i for i, size in enumerate(sizes) if size < k]
    if short:
        raise ValueError(
            f"{len(short)} problems have fewer than k={k} completions (the first is problem "
            f"#{short[0]} with {sizes[short[0]]}); pass a smaller --k"
        )
    rm = [r.get("rm_scores") is not None for r in records]
    if any(rm) and not all(rm):
        raise ValueError(f"rm_scores are missing for {rm.count(False)} of {len(rm)} problems")
    return k


def _classes(
    answers: list[list[str | None]],
    correct: list[list[bool]],
    checker: AnswerChecking,
    normalize: Callable[[str], str],
) -> list[list[int | None]]:
    """Equivalence classes of each problem's answers ([P][m] -> [P][m] labels).

    Answers with the same normalised string share a class at once. Class representatives
    that are correct all equal the reference, so they form one class; a correct and a wrong
    one never do. Only wrong representatives are compared with each other (batched over
    all problems), which keeps the checks far below m^2.
    """
    labels: list[list[int | None]] = []
    reps_per_problem: list[list[int]] = []
    pairs: list[tuple[str, str]] = []
    pair_owner: list[tuple[int, int, int]] = []
    for p, (ans, ok) in enumerate(zip(answers, correct, strict=True)):
        by_key: dict[str, int] = {}
        row: list[int | None] = []
        for i, a in enumerate(ans):
            row.append(None if a is None else by_key.setdefault(normalize(a), i))
        reps = sorted(set(by_key.values()))
        wrong = [r for r in reps if not ok[r]]
        for x in range(len(wrong)):
            for y in range(x + 1, len(wrong)):
                pairs.append((ans[wrong[x]], ans[wrong[y]]))
                pair_owner.append((p, wrong[x], wrong[y]))
        labels.append(row)
        reps_per_problem.append(reps)
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(node: tuple[int, int]) -> tuple[int, int]:
        while parent.get(node, node) != node:
            node = parent[node]
        return node

    for p, reps in enumerate(reps_per_problem):
        right = [r for r in reps if correct[p][r]]
        for r in right[1:]:
            parent[find((p, r))] = find((p, right[0]))
    for (p, a, b), result in zip(pair_owner, checker.equivalent_many(pairs), strict=True):
        if result.equal:
            ra, rb = find((p, a)), find((p, b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return [
        [None if lab is None else find((p, lab))[1] for lab in row] for p, row in enumerate(labels)
    ]


def score_records(
    records: Sequence[dict], k: int | None, checker: AnswerChecking
) -> tuple[dict[str, float | None], list[dict], int]:
    """(metrics, per-problem details, k) for validated sample records."""
    k = resolve_k(records, k)
    answers = [[extract_answer(c) for c in r["completions"]] for r in records]
    # A separate greedy completion is checked on its own; otherwise it is completion 0.
    separate = {p: extract_answer(r["greedy"]) for p, r in enumerate(records) if "greedy" in r}
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, int]] = []  # (problem, completion index; -1 = separate greedy)
    for p, r in enumerate(records):
        extra = [separate[p]] if p in separate else []
        for i, a in enumerate([*answers[p], *extra]):
            if a is not None:
                pairs.append((r["gt"], a))
                slots.append((p, i if i < len(answers[p]) else -1))
    correct = [[False] * len(a) for a in answers]
    statuses: list[list[str]] = [["no_answer"] * len(a) for a in answers]
    greedy_ok = [False] * len(records)
    for (p, i), result in zip(slots, checker.equivalent_many(pairs), strict=True):
        if i < 0:
            greedy_ok[p] = result.equal
        else:
            correct[p][i], statuses[p][i] = result.equal, result.status
    greedy = [separate[p] if p in separate else a[0] for p, a in enumerate(answers)]
    greedy_ok = [greedy_ok[p] if p in separate else c[0] for p, c in enumerate(correct)]
    classes = _classes([a[:k] for a in answers], correct, checker, normalize_answer)
    outcomes, details = [], []
    for p, r in enumerate(records):
        score = ProblemScore(
            correct[p],
            classes[p] + [None] * (len(correct[p]) - k),
            greedy_ok[p],
            r.get("rm_scores"),
        )
        o = problem_outcome(score, k)
        outcomes.append(o)
        details.append(
            {
                **{key: r[key] for key in ("id", "benchmark", "mode") if key in r},
                "gt": r["gt"],
                "answers": answers[p],
                "correct": correct[p],
                "check_status": statuses[p],
                "classes": score.classes,
                "greedy_answer": greedy[p],
                "greedy_correct": greedy_ok[p],
                "pass": o["pass"],
                "maj_answer": None if o["maj_index"] is None else answers[p][o["maj_index"]],
                "maj_correct": o["maj"],
                "rm_index": o["rm_index"],
                "rm_correct": o["rm"],
            }
        )
    return aggregate(outcomes, k), details, k


def format_table(rows: dict[str, dict[str, float | None]], k: int) -> str:
    """A fixed-width table: one row per benchmark/mode, one column per metric."""
    cols = ["greedy", f"pass@{k}", f"maj@{k}", f"rm@{k}"]
    width = max([len("benchmark"), *map(len, rows)]) + 2
    lines = ["benchmark".ljust(width) + "".join(c.rjust(10) for c in cols)]
    for name, metrics in rows.items():
        cells = []
        for c in cols:
            v = metrics.get(c)
            cells.append(
                (
                    "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
                ).rjust(10)
            )
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
