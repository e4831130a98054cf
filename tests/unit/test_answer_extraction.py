"""Final-answer extraction: boxed answers, "final answer is", last number, GSM8K ####."""

from __future__ import annotations

import json

import pytest

from qmath_megatron.rewards import (
    extract_answer,
    extract_boxed,
    extract_gsm8k_reference,
    extract_last_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1}, then corrected: \boxed{2}", "2"),  # the last box wins
        (r"The roots are $\boxed{\{1,2\}}$", r"\{1,2\}"),  # escaped braces do not nest
        (r"The answer is \boxed{5} dollars, as computed.", "5"),  # a box inside prose
        (r"$\boxed 5$", "5"),  # braceless form
        (r"hence \boxed 42.", "42"),
        (r"\fbox{7}", "7"),
        (r"\boxed {x^{2}}", "x^{2}"),
        (r"\boxed{\text{(A)}}", r"\text{(A)}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxedx{3}", None),  # another command, not \boxed
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_truncated_last_box_falls_back_to_the_previous_complete_one():
    assert extract_boxed(r"\boxed{3} ... so \boxed{\frac{1") == "3"
    assert extract_boxed(r"\boxed{\frac{1") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The final answer is $5$.", "5"),
        ("final answer is: 12", "12"),
        ("Final Answer: The final answer is 7. I hope it is correct.", "7"),
        ("The final answer is 3.5", "3.5"),
        (r"Final answer: $\frac{1}{2}$ dollars", r"\frac{1}{2}"),
        ("so the final answer is\n$-4$\n", "-4"),
        # A box beats "final answer is"; "final answer is" beats the last number.
        (r"The final answer is 3, i.e. \boxed{4}.", "4"),
        ("We got 12 apples. The final answer is 10. Then 99 more", "10"),
        # "the final answer should be" is no statement of it: the last number is used.
        ("The final answer should be 5 or 6", "6"),
    ],
)
def test_final_answer_phrase(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 apples and buys 4 more, so 7 apples.", "7"),
        ("The total is 1,234 dollars.", "1234"),
        ("It costs $1,234,567.50 in all", "1234567.50"),
        ("The temperature drops to -3.5 degrees", "-3.5"),
        ("x = -2", "-2"),
        ("compute 10-3", "3"),  # a subtraction, not a negative number
        ("5 - 3", "3"),
        ("the ratio is 3/4.", "3/4"),
        ("about .5 of it", ".5"),
        ("values 1,2", "2"),  # "1,2" is a list, not one thousand-separated number
        ("no digits at all", None),
    ],
)
def test_last_number(text, expected):
    assert extract_last_number(text) == expected
    assert extract_answer(text) == expected


def test_nothing_to_extract_is_none():
    assert extract_answer("") is None
    assert extract_answer("I cannot solve this problem.") is None
    assert extract_answer(r"\boxed{}") is None  # an empty box is no answer


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("... so the total is 1,000.\n#### 1,000", "1000"),
        ("#### -5", "-5"),
        ("first #### 3 then\n#### 4", "4"),  # the last marker
    ],
)
def test_gsm8k_reference(field, expected):
    assert extract_gsm8k_reference(field) == expected


def test_gsm8k_reference_errors():
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_reference("no marker 42")
    with pytest.raises(ValueError):
        extract_gsm8k_reference("#### ")


def test_gsm8k_reference_from_the_benchmark(shared_benchmark):
    path = shared_benchmark("gsm8k")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert extract_gsm8k_reference(rows[0]["answer"]) == "18"
    with_comma = next(r for r in rows if r["answer"].rsplit("####", 1)[1].count(","))
    reference = extract_gsm8k_reference(with_comma["answer"])
    assert "," not in reference and reference.lstrip("-").isdigit()
    # Every reference is a plain (possibly negative) integer once commas are removed.
    assert all(extract_gsm8k_reference(r["answer"]).lstrip("-").isdigit() for r in rows)


def test_math500_solutions_have_their_answer_boxed(shared_benchmark):
    path = shared_benchmark("math500")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    # Measured: the last box of every solution is exactly the `answer` field.
    assert sum(extract_boxed(r["solution"]) == r["answer"] for r in rows) == len(rows)
