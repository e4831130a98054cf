"""Final-answer extraction from model completions and benchmark reference fields.

Rules, in priority order (:func:`extract_answer`):

1. the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched, escaped
   ``\\{`` ``\\}`` ignored while matching), or the token after ``\\boxed`` written without
   braces (``\\boxed 5``);
2. the text after the last "final answer is" / "final answer:" (case-insensitive), up to
   the end of its line, with ``$...$`` delimiters, "I hope it is correct." and a trailing
   full stop removed;
3. the last number in the text: optional sign, thousands commas (``1,234``), decimals,
   simple fractions (``3/4``); commas are removed from the result.

GSM8K references (:func:`extract_gsm8k_reference`) are the text after the last ``####``;
a problem record's reference (:func:`reference_answer`) is its answer field as text.
All functions here are pure string functions (no sympy), cheap enough for every completion.
"""

from __future__ import annotations

import re

__all__ = [
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k_reference",
    "extract_last_number",
    "reference_answer",
]

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# A number: sign handled separately; thousands groups only when exactly 3 digits follow
# each comma (so "1,2" is two numbers, a list, not 12); decimals; a simple fraction.
_NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+")
# "is" or a colon is required: "the final answer should be..." is not a statement of it.
_FINAL_ANSWER = re.compile(r"final\s+answer\s*(?:is\b\s*[:：]?|[:：])\s*", re.IGNORECASE)
_HOPE = re.compile(r"\s*I\s+hope\s+it\s+is\s+correct\.?\s*$", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the brace group opening at ``text[start] == "{"``; None if unclosed.

    ``\\{`` and ``\\}`` are literal braces in LaTeX (sets), so they do not change the depth.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _box_content(text: str, match: re.Match[str]) -> str | None:
    """Content of one ``\\boxed``/``\\fbox`` occurrence; None when malformed/truncated."""
    i = match.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        group = _braced(text, i)
        return None if group is None else group[0].strip()
    if i > match.end():
        # "\boxed 5": the braceless form takes one token, ending at whitespace or "$".
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            return token.group(0).rstrip(".,;")
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``.

    Nested braces are matched. A last box that is never closed (a completion cut off by
    the length limit) is skipped in favour of the previous complete one. Returns None when
    there is no box; an empty box gives "".
    """
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _box_content(text, match)
        if content is not None:
            return content
    return None


def _signed(text: str, match: re.Match[str]) -> str:
    """The matched number with its sign, when the "-" is a sign and not a subtraction.

    A sign is attached to the digits and not glued to what precedes it: "is -7", "(-3",
    "=-2" are negative; "x-3", "2)-3" and "5 - 3" are subtractions, giving 3.
    """
    number = match.group(0).replace(",", "")
    start = match.start()
    if start >= 1 and text[start - 1] in "-−":
        before = text[start - 2] if start >= 2 else " "
        if not (before.isalnum() or before in ")]}_."):
            return "-" + number
    return number


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (sign kept, thousands commas removed), or None."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    return _signed(text, matches[-1])


def _final_answer_text(text: str) -> str | None:
    """What follows the last "final answer is" phrase, cleaned; None when absent/empty."""
    matches = list(_FINAL_ANSWER.finditer(text))
    if not matches:
        return None
    # The answer runs to the end of its line ("...is\n$5$" takes the next line).
    rest = text[matches[-1].end() :].lstrip().split("\n", 1)[0].strip()
    span = _MATH_SPAN.match(rest)
    if span:
        # "The final answer is $5$ dollars." -> the leading math span is the answer.
        rest = next(g for g in span.groups() if g is not None)
    else:
        rest = _HOPE.sub("", rest)
        # A sentence end ("7. I hope...") but not a decimal point ("3.5").
        rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]
    rest = rest.strip().strip("$").strip()
    return rest.rstrip(".").strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: boxed > "final answer is" > last number.

    Returns None when the completion has none of them (or only an empty box and no other
    cue), so that "no answer" is distinguishable from a wrong one.
    """
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    final = _final_answer_text(text)
    if final:
        return final
    return extract_last_number(text)


def extract_gsm8k_reference(answer_field: str) -> str:
    """The GSM8K reference answer: the text after the last ``####``, commas removed.

    Raises ValueError when the field has no ``####`` marker or nothing after it.
    """
    marker = answer_field.rfind("####")
    if marker < 0:
        raise ValueError("GSM8K answer has no '####' final-answer marker")
    answer = answer_field[marker + 4 :].strip().replace(",", "")
    if not answer:
        raise ValueError("GSM8K answer has nothing after '####'")
    return answer


def reference_answer(record: dict, key: str) -> str | None:
    """The reference answer of a problem record (``record[key]`` as stripped text); None
    when it is absent, null, blank, or a list or object (no single answer to check)."""
    value = record.get(key)
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None
