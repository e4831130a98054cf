"""AnswerChecker: pool timeouts (slow input, injected sleep), crashes, order, cache."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from qmath_megatron.rewards import AnswerChecker, CheckResult, Convention, extract_boxed

SLOW_REFERENCE = "9^{9^{9}}"  # math-verify's comparison with "1" runs into its 5 s timeout


# Injected check functions: module level, since workers receive them by pickling.
def sleepy_check(reference: str, prediction: str, convention: Convention) -> bool:
    if prediction == "hang":
        time.sleep(120)
    return reference == prediction


def crashing_check(reference: str, prediction: str, convention: Convention) -> bool:
    if prediction == "crash":
        os._exit(3)
    if prediction == "raise":
        raise RuntimeError("broken check")
    return reference == prediction


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(workers=2, timeout_s=10.0) as c:
        yield c


def test_results_in_order_with_cache_and_empty_predictions(checker):
    pairs = [
        (r"\frac12", "0.5"),
        ("(1,2)", "(2,1)"),
        ("18", "18 dollars"),
        ("5", None),
        ("5", "  "),
        (r"\frac12", "0.5"),  # repeated in the batch: one task
        ("2021", r"\pm 2021"),
    ]
    before = dict(checker.stats)
    results = checker.equivalent_many(pairs)
    assert [r.equal for r in results] == [True, False, True, False, False, True, False]
    assert all(r.status == "ok" for r in results)
    delta = {k: checker.stats[k] - before[k] for k in before}
    assert delta["checks"] == 7 and delta["empty"] == 2
    assert delta["tasks"] == 4 and delta["cache_hits"] == 1
    # Seen before: answered from the cache without a task.
    again = checker.equivalent_many([("2021", r"\pm 2021"), ("18", "18 dollars")])
    assert [r.equal for r in again] == [False, True]
    assert checker.stats["tasks"] - before["tasks"] == 4
    assert checker.stats["cache_hits"] - before["cache_hits"] == 3


def test_single_check_and_score_completions(checker):
    assert checker.equivalent("x=3", "3") == CheckResult(True, "ok")
    assert checker.equivalent("3", None) == CheckResult(False, "ok")
    scored = checker.score_completions(
        r"\frac{\pi}{2}",
        [r"so $\boxed{\dfrac{\pi}{2}}$", "The final answer is $\\pi$.", "I give up", "pi/2"],
    )
    assert [a for a, _ in scored] == [r"\dfrac{\pi}{2}", r"\pi", None, "2"]
    assert [r.equal for _, r in scored] == [True, False, False, False]


def test_percent_convention_reaches_the_workers():
    with AnswerChecker(1, 10.0, Convention(percent="either")) as either:
        assert either.equivalent(r"10\%", "0.1").equal
    with AnswerChecker(1, 10.0) as as_number:
        assert not as_number.equivalent(r"10\%", "0.1").equal


def test_slow_input_is_killed_by_the_hard_timeout(capfd):
    # math-verify's own timeout (5 s) is above the hard limit (2 s): the pool must kill it.
    with AnswerChecker(workers=2, timeout_s=2.0, math_verify_timeout=5) as c:
        pairs = [(str(i), str(i)) for i in range(6)] + [(SLOW_REFERENCE, "1")]
        pairs += [(str(i), str(i + 1)) for i in range(6)]
        results = c.equivalent_many(pairs)
        assert results[6] == CheckResult(False, "timeout")
        assert [r.equal for r in results[:6]] == [True] * 6
        assert [r.equal for r in results[7:]] == [False] * 6
        assert all(r.status == "ok" for i, r in enumerate(results) if i != 6)
        assert c.stats["timeouts"] == 1 and c.stats["killed"] == 1
        # The pool replaced the killed worker and keeps serving.
        assert c.equivalent(r"\frac{1}{2}", "0.5") == CheckResult(True, "ok")
    out, err = capfd.readouterr()
    assert "Timeout" not in out and "Timeout" not in err


def test_math_verify_timeout_below_the_hard_limit_is_counted_too(capfd):
    # Default math_verify_timeout = timeout_s // 3 = 1 s: its own timeout fires first, the
    # worker survives, and the check still scores as a (counted) timeout.
    with AnswerChecker(workers=1, timeout_s=4.0) as c:
        assert c.equivalent(SLOW_REFERENCE, "1") == CheckResult(False, "timeout")
        assert c.stats["timeouts"] == 1 and c.stats["killed"] == 0
    out, _ = capfd.readouterr()
    assert out == ""


def test_injected_hang_among_many():
    with AnswerChecker(workers=2, timeout_s=1.0, check_fn=sleepy_check) as c:
        pairs = [("a", "a"), ("a", "b"), ("a", "hang"), *[(str(i), str(i % 3)) for i in range(12)]]
        results = c.equivalent_many(pairs)
        assert results[2] == CheckResult(False, "timeout")
        expected = [p == r for p, r in pairs]
        assert [r.equal for i, r in enumerate(results) if i != 2] == expected[:2] + expected[3:]
        assert c.stats["timeouts"] == 1 and c.stats["crashes"] == 0
        # A hung pair is cached as a timeout: asking again costs no second timeout.
        assert c.equivalent("a", "hang") == CheckResult(False, "timeout")
        assert c.stats["timeouts"] == 1
        assert c.equivalent("z", "z").equal


def test_crash_and_exception_are_counted_and_the_pool_survives():
    with AnswerChecker(workers=2, timeout_s=5.0, check_fn=crashing_check) as c:
        results = c.equivalent_many([("a", "a"), ("a", "crash"), ("b", "raise"), ("c", "c")])
        assert results == [
            CheckResult(True, "ok"),
            CheckResult(False, "crash"),
            CheckResult(False, "error"),
            CheckResult(True, "ok"),
        ]
        assert c.stats["crashes"] == 1 and c.stats["errors"] == 1
        # Crashes are not cached: a retry runs again (and crashes again).
        assert c.equivalent("a", "crash").status == "crash"
        assert c.stats["crashes"] == 2
        assert c.equivalent_many([("d", "d"), ("d", "e")]) == [
            CheckResult(True, "ok"),
            CheckResult(False, "ok"),
        ]


def test_usable_from_a_worker_thread_and_after_close(checker):
    box: list = []
    thread = threading.Thread(target=lambda: box.append(checker.equivalent("1e-3", "0.001")))
    thread.start()
    thread.join(60)
    assert box == [CheckResult(True, "ok")]
    c = AnswerChecker(1, 10.0)
    assert c.equivalent("2", "2.0").equal
    c.close()
    c.close()  # idempotent
    assert c.equivalent("3", "4") == CheckResult(False, "ok")  # restarts its pool
    c.close()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        AnswerChecker(workers=0)
    with pytest.raises(ValueError):
        AnswerChecker(timeout_s=0)
    with pytest.raises(ValueError):
        CheckResult(True, "timeout")


def test_batch_of_math500_answers(checker, shared_benchmark):
    path = shared_benchmark("math500")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = rows[:100]
    # Each reference against its own boxed solution (equal) and the next problem's (mostly not).
    pairs = [(r["answer"], extract_boxed(r["solution"])) for r in rows]
    pairs += [(a["answer"], extract_boxed(b["solution"])) for a, b in zip(rows, rows[1:])]
    results = checker.equivalent_many(pairs)
    assert all(r.status == "ok" for r in results)
    assert all(r.equal for r in results[: len(rows)])
    assert sum(r.equal for r in results[len(rows) :]) <= 3  # different problems' answers
