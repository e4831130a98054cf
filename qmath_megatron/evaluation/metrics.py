"""Evaluation metrics over scored completions: pure functions, shapes in the docstrings.

For one problem with ``n`` completions in sampling order:
- ``correct``: ``[n]`` bools, the extracted answer of each completion equals the reference;
- ``classes``: ``[n]`` equivalence-class labels of the extracted answers (equal labels:
  equivalent answers), None where no answer could be extracted;
- ``rm_scores``: ``[n]`` reward-model scores, or None.

Tie rules (deterministic, stated because they change maj@k and rm@k):
- maj@k: the class with the most members among the first k completions wins; on a tie, the
  class whose first member comes earliest. Completions without an answer do not vote; if
  none has an answer the problem counts as wrong.
- rm@k: the completion with the highest score among the first k; on a tie, the earliest.
  NaN scores rank below every number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

METRIC_KEYS = ("greedy", "pass@{k}", "maj@{k}", "rm@{k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): the probability that at least one of k
    completions drawn without replacement from n, c of them correct, is correct;
    ``1 - C(n-c, k) / C(n, k)`` in its product form (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_index(classes: Sequence[int | None]) -> int | None:
    """Index of the earliest member of the winning class in ``classes`` ([k] labels), or
    None when no completion has an answer."""
    count: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, label in enumerate(classes):
        if label is None:
            continue
        count[label] = count.get(label, 0) + 1
        first.setdefault(label, i)
    if not count:
        return None
    winner = min(count, key=lambda label: (-count[label], first[label]))
    return first[winner]


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest of ``scores`` ([k] floats); earliest on ties; NaN lowest."""
    if not scores:
        raise ValueError("no scores")
    ranked = [-math.inf if math.isnan(s) else s for s in scores]
    return max(range(len(ranked)), key=lambda i: (ranked[i], -i))


@dataclass
class ProblemScore:
    correct: list[bool]  # [n]
    classes: list[int | None]  # [n]
    greedy_correct: bool
    rm_scores: list[float] | None = None  # [n]


def problem_outcome(p: ProblemScore, k: int) -> dict:
    """greedy (bool), pass (probability), maj (bool), rm (bool or None) for one problem,
    plus the indices chosen by majority vote and by the reward model."""
    n = len(p.correct)
    maj = majority_index(p.classes[:k])
    rm = best_index(p.rm_scores[:k]) if p.rm_scores is not None else None
    return {
        "greedy": p.greedy_correct,
        "pass": pass_at_k(n, sum(p.correct), k),
        "maj": maj is not None and p.correct[maj],
        "maj_index": maj,
        "rm": None if rm is None else p.correct[rm],
        "rm_index": rm,
    }


def aggregate(outcomes: Sequence[dict], k: int) -> dict[str, float | None]:
    """``{"greedy", "pass@K", "maj@K", "rm@K"}`` in percent over problems. rm@K is None
    unless every problem has reward-model scores."""
    if not outcomes:
        raise ValueError("no problems to aggregate")

    def pct(values) -> float:
        return round(100.0 * sum(values) / len(outcomes), 4)

    rm = [o["rm"] for o in outcomes]
    return {
        "greedy": pct(o["greedy"] for o in outcomes),
        f"pass@{k}": pct(o["pass"] for o in outcomes),
        f"maj@{k}": pct(o["maj"] for o in outcomes),
        f"rm@{k}": None if any(r is None for r in rm) else pct(rm),
    }
