"""Evaluation metrics against hand-computed values: pass@k, maj@k (ties, equivalence
classes), rm@k (ties), greedy, and the scoring of sample records."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from qmath_megatron.evaluation.metrics import (
    ProblemScore,
    aggregate,
    best_index,
    majority_index,
    pass_at_k,
    problem_outcome,
)
from qmath_megatron.evaluation.scoring import resolve_k, score_records, validate_record


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 0.4),  # c/n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2)
        (8, 0, 8, 0.0),
        (8, 1, 8, 1.0),
        (4, 4, 2, 1.0),
        (10, 3, 8, 1.0),  # n - c < k: every draw of 8 contains a correct one
        (10, 3, 7, 1 - 1 / 120),  # n - c == k: only the draw of all 7 wrong misses
        (100, 1, 1, 0.01),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_and_rejects_bad_arguments():
    for n, c, k in [(16, 5, 4), (64, 10, 8), (20, 19, 3)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    for bad in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@pytest.mark.parametrize(
    "classes,expected",
    [
        ([0, 1, 1, 0], 0),  # 2-2 tie: the class whose first member is earliest
        ([1, 0, 0, 1], 0),  # labels are arbitrary; index 0 is the earliest member
        ([3, 5, 5, 3, 5], 1),  # a clear majority: index of its first member
        ([None, 2, 3, 3], 2),  # no-answer completions do not vote
        ([None, None], None),
        ([None, 7], 1),
        ([4], 0),
    ],
)
def test_majority_index(classes, expected):
    assert majority_index(classes) == expected


@pytest.mark.parametrize(
    "scores,expected",
    [([0.1, 0.9, 0.2, 0.9], 1), ([0.0, 0.0], 0), ([float("nan"), -5.0], 1), ([-1.0, 2, 3, 3], 2)],
)
def test_best_index_ties_and_nan(scores, expected):
    assert best_index(scores) == expected


def test_problem_outcome_and_aggregate_by_hand():
    a = ProblemScore([True, False, False, True], [0, 1, 1, 0], True, [0.1, 0.9, 0.2, 0.9])
    b = ProblemScore([False, False, True, False], [None, 1, 2, 1], False, [1.0, 0.0, 5.0, 0.0])
    oa, ob = problem_outcome(a, 4), problem_outcome(b, 4)
    assert (oa["maj"], oa["rm"], oa["pass"]) == (True, False, 1.0)
    assert (ob["maj"], ob["rm"], ob["pass"]) == (False, True, 1.0)
    assert aggregate([oa, ob], 4) == {"greedy": 50.0, "pass@4": 100.0, "maj@4": 50.0, "rm@4": 50.0}
    no_rm = problem_outcome(ProblemScore([True], [0], True), 1)
    assert aggregate([oa, no_rm], 1)["rm@1"] is None  # rm@k only when every problem has scores


class TableChecker:
    """Answer equivalence by a hand-written table (no math-verify): the metric logic is
    tested on its own. Answers map to a canonical value; equal values are equivalent."""

    CANON = {"0.5": "1/2", "\\frac{1}{2}": "1/2", "\\frac{8}{2}": "4"}

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def equivalent_many(self, pairs):
        self.calls += pairs

        def canon(s: str) -> str:
            return self.CANON.get(s.strip(), s.strip())

        return [SimpleNamespace(equal=canon(a) == canon(b), status="ok") for a, b in pairs]


def boxed(x: str) -> str:
    return f"Some reasoning. So the answer is $\\boxed{{{x}}}$."


# Four problems, k = 4, worked by hand (see test_score_records_by_hand).
RECORDS = [
    {
        "gt": "5",
        "completions": [boxed("5"), boxed("3"), boxed("3"), boxed("5")],
        "rm_scores": [0.1, 0.9, 0.2, 0.9],
    },
    {
        "gt": "2",
        "completions": ["I do not know.", boxed("7"), boxed("2"), boxed("7")],
        "rm_scores": [1.0, 0.0, 5.0, 0.0],
    },
    {
        "gt": "1/2",
        "completions": [boxed("0.5"), boxed("3"), boxed("\\frac{1}{2}"), boxed("3")],
        "rm_scores": [0.0, 0.0, 0.0, 0.0],
    },
    {
        "gt": "10",
        "completions": [boxed("10"), boxed("4"), boxed("\\frac{8}{2}"), boxed("7")],
        "rm_scores": [-1.0, 2.0, 3.0, 3.0],
    },
]


def _copy(records):
    return [dict(r, completions=list(r["completions"])) for r in records]


def test_score_records_by_hand():
    # P1: 5,3,3,5: 2-2 tie -> "5" (earliest) right; rm picks index 1 ("3", 0.9 first) wrong.
    # P2: -,7,2,7: "7" wins maj (wrong); greedy has no answer (wrong); rm index 2 right.
    # P3: 0.5 and 1/2 are one class (both right): 2 votes vs "3" 2 votes -> tie -> index 0
    #     right. Counted as separate classes, "3" would win: this checks the grouping.
    # P4: "4" and "8/2" are one (wrong) class with 2 votes: maj wrong; separately, every
    #     class would have 1 vote and "10" (index 0) would win. rm index 2 ("8/2") wrong.
    metrics, details, k = score_records(_copy(RECORDS), 4, TableChecker())
    assert k == 4
    assert metrics == {"greedy": 75.0, "pass@4": 100.0, "maj@4": 50.0, "rm@4": 50.0}
    assert [d["maj_correct"] for d in details] == [True, False, True, False]
    assert [d["rm_index"] for d in details] == [1, 2, 0, 2]
    assert details[1]["answers"][0] is None and details[1]["check_status"][0] == "no_answer"
    assert details[3]["classes"][1] == details[3]["classes"][2] != details[3]["classes"][0]
    assert details[2]["correct"] == [True, False, True, False]


def test_score_records_at_k2_by_hand():
    # pass@2 per problem: c=2 -> 5/6, c=1 -> 1/2: (5/6 + 1/2 + 5/6 + 1/2) / 4 = 2/3.
    # maj@2: [5,3] tie->5 right; [-,7] wrong; [0.5,3] tie->0.5 right; [10,4] tie->10 right.
    # rm@2: [0.1,0.9]->3 wrong; [1,0]->no answer wrong; [0,0]->0.5 right; [-1,2]->4 wrong.
    metrics, _, _ = score_records(_copy(RECORDS), 2, TableChecker())
    assert metrics == {
        "greedy": 75.0,
        "pass@2": pytest.approx(66.6667, abs=1e-4),
        "maj@2": 75.0,
        "rm@2": 25.0,
    }


def test_greedy_field_overrides_the_first_completion():
    records = [{"gt": "3", "completions": [boxed("4"), boxed("3")], "greedy": boxed("3")}]
    metrics, details, _ = score_records(records, None, TableChecker())
    assert metrics["greedy"] == 100.0 and details[0]["greedy_answer"] == "3"
    del records[0]["greedy"]
    assert score_records(records, None, TableChecker())[0]["greedy"] == 0.0


def test_only_wrong_answers_are_compared_pairwise():
    checker = TableChecker()
    score_records(_copy(RECORDS[3:]), 4, checker)
    # 4 correctness checks, then the pairs among the 3 wrong distinct answers: 3 pairs.
    assert len(checker.calls) == 4 + 3
    assert all("10" not in pair for pair in checker.calls[4:])


def test_record_validation_and_k_errors():
    with pytest.raises(ValueError, match="'completions'"):
        validate_record({"gt": "1", "completions": []}, "f:1")
    with pytest.raises(ValueError, match="rm_scores"):
        validate_record({"gt": "1", "completions": ["a"], "rm_scores": [1, 2]}, "f:1")
    with pytest.raises(ValueError, match="'gt'"):
        validate_record({"completions": ["a"]}, "f:2")
    assert validate_record({"gt": 18, "completions": ["a"]}, "f:3")["gt"] == "18"
    recs = [{"gt": "1", "completions": ["a", "b"]}, {"gt": "1", "completions": ["a"]}]
    with pytest.raises(ValueError, match="fewer than k=2"):
        resolve_k(recs, 2)
    assert resolve_k(recs, None) == 1
    mixed = [
        {"gt": "1", "completions": ["a"], "rm_scores": [1.0]},
        {"gt": "1", "completions": ["a"]},
    ]
    with pytest.raises(ValueError, match="rm_scores are missing"):
        resolve_k(mixed, None)
