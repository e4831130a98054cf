r"""Mathematical equivalence of a predicted answer and a reference answer.

:func:`is_equivalent` decides in this order, stopping at the first "equal":

1. percent convention (:class:`Convention`), applied to both strings before anything else;
2. equal :func:`normalize_answer` strings;
3. math-verify (``parse(f"${s}$")`` then ``verify(gold, pred)``) on the strings as given,
   then on cleaned strings (see :func:`clean_answer`) when cleaning changed something;
4. fallbacks on the parsed values: numeric comparison with a relative tolerance,
   degrees against radians, symbolic comparison of expressions in the same variables,
   and case-insensitive comparison of plain-word answers.

Where this departs from math-verify 0.9.0 (``verify(parse(ref), parse(pred))``):

- Percent: math-verify accepts ``10\%`` as both ``10`` and ``0.1`` (and ``20`` as ``20\%``).
  Here ``Convention.percent`` decides: ``"as_number"`` (default; MATH/GSM8K keys, as the
  MATH paper's grader, which strips ``\%``) makes ``10\%`` equal ``10`` only;
  ``"either"`` (Qwen2.5-Math's ``include_percentage``) also accepts ``0.1``.
- Decimals: math-verify rounds floats to 6 places, so ``3`` vs ``3.0001`` is False. Here a
  written decimal on either side is compared with ``Convention.rel_tol`` (default 1e-4).
- Accepted in addition: scientific notation (``1e-3``; math-verify reads ``1e-3`` as
  ``e - 3``), ``\varnothing`` = ``\emptyset``, Python/sympy-printed answers from tool
  outputs (``pi/2``, ``sqrt(3)/3``, ``2*pi``, ``Rational(1, 3)``, ``x**2``, ``1 + 2*I``),
  unit words after a number (``18 dollars``, ``5 cm``; a known list, never single
  letters, so ``2x`` stays ``2x``), any trailing ``\text{...}``/``\mbox{...}`` after a
  number, "all real numbers" = ``(-\infty, \infty)``, ``1\,000`` = ``1000``, a radian
  value containing pi against a reference written in degrees (``120^\circ`` =
  ``\frac{2\pi}{3}``; only that direction), and the same expression written with
  different spacing around ``i`` (math-verify gives ``3i`` and ``3 i`` different
  assumptions).

Where this departs from Qwen2.5-Math's grader (``math_equal``, ``rel_tol=1e-4``):

- The relative tolerance applies only when a decimal number was written. Two exact values
  must be equal exactly (``\frac{99}{70}`` is not ``\sqrt{2}``), and a decimal is never
  accepted for an integer reference it is half a unit or more away from (``70003.5`` is
  not ``70000``, although it is within 1e-4).
- Percent defaults to "as_number" (the grader always includes the fraction).
- Ordered tuples stay ordered, intervals keep their bracket types, and ``\pm`` is never
  dropped (math-verify's semantics); bare comma lists are unordered (math-verify's
  reading of MATH's "enter all solutions separated by commas").

This module is pure and has no timeout guarantee of its own: math-verify's signal-based
timeouts (``math_verify_timeout``) only work on a main thread and are switched off
elsewhere. :class:`qmath_megatron.rewards.AnswerChecker` runs checks in worker processes
with a hard wall-clock limit.
"""

from __future__ import annotations

import cmath
import functools
import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    import sympy

__all__ = [
    "Convention",
    "Verdict",
    "check_equivalence",
    "clean_answer",
    "is_equivalent",
    "normalize_answer",
]


@dataclass(frozen=True)
class Convention:
    """Benchmark conventions that change what counts as equal.

    ``percent``: ``"as_number"`` -- "x%" means the number x (``10\\%`` = ``10`` only);
    ``"either"`` -- a percentage also equals its fraction (``10\\%`` = ``0.1`` and ``10``).
    ``rel_tol``: relative tolerance for comparisons that involve a written decimal.
    """

    percent: Literal["as_number", "either"] = "as_number"
    rel_tol: float = 1e-4

    def __post_init__(self) -> None:
        if self.percent not in ("as_number", "either"):
            raise ValueError(f"percent must be 'as_number' or 'either', got {self.percent!r}")
        if not (0.0 <= self.rel_tol < 1.0):
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol}")


class Verdict(NamedTuple):
    """Outcome of one check: ``timed_out`` is True when math-verify's own timeout fired and
    nothing else established equality (the answer may be right; it could not be decided)."""

    equal: bool
    timed_out: bool = False


# --------------------------------------------------------------------------------------
# String normalisation (pure regex; no sympy)
# --------------------------------------------------------------------------------------

_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*percent\s*\}|(?<=[\d}\s])percent\b)", re.I)
_DEGREE = re.compile(r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree(?![a-zA-Z]))")
_SPACING = re.compile(r"\\[,;:!>]|\\q?quad(?![a-zA-Z])|\\ |~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|operatorname)\s*\{([^{}]*)\}")

# Unit words stripped after a number. Deliberately a closed list of words (no single
# letters): "2x" and "5m" must keep their variable.
_UNIT_WORDS = (
    "dollars?|cents?|usd|euros?|pounds?|lbs?|ounces?|oz|grams?|kilograms?|kg|mg|tons?|"
    "cm|mm|km|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|"
    "inch|inches|feet|foot|ft|yards?|yd|miles?|mph|kph|"
    "liters?|litres?|ml|gallons?|cups?|quarts?|pints?|"
    "degrees?|radians?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|"
    "units?|sq\\.?\\s*units?|square\\s+units?|cubic\\s+units?|"
    "people|persons?|students?|times|ways|"
)
_UNIT = rf"(?:(?:square|sq\.?|cubic)\s+)?(?:{_UNIT_WORDS.rstrip('|')})"
_POWER = r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
_AFTER_NUMBER = r"(?<=[\d}).])"
_TRAILING_UNIT = re.compile(
    rf"{_AFTER_NUMBER}\s*(?:\\(?:text|mbox|mathrm|textrm)\s*\{{\s*{_UNIT}{_POWER}\s*\}}|{_UNIT}\b)"
    rf"(?:\s*(?:per|/)\s*{_UNIT}\b)?{_POWER}\s*\.?\s*$",
    re.I,
)
# Any \text{...}/\mbox{...} ending an answer right after a number is a unit or a remark.
_TRAILING_TEXT = re.compile(
    rf"{_AFTER_NUMBER}\s*\\(?:text|mbox)\s*\{{[^{{}}]*\}}{_POWER}\s*\.?\s*$"
)
_THOUSANDS = re.compile(r"^([-+]?)(\d{1,3}(?:,\d{3})+)(\.\d+)?$")
_THIN_SPACE_GROUP = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_SCIENTIFIC = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)(?![\w.])")
_ALL_REALS = {
    "all real numbers",
    "all reals",
    "all real values",
    "every real number",
    "the set of all real numbers",
    "real numbers",
    "the real numbers",
    "allrealnumbers",
}
_EMPTY_SET = re.compile(
    r"^(?:\\varnothing|\\emptyset|∅|\\\{\s*\\\}|\\text\{\s*(?:the\s+)?empty\s+set\s*\})$"
)


def _strip_percent(answer: str) -> tuple[str, bool]:
    """(answer without percent markers, whether it had any)."""
    stripped = _PERCENT.sub("", answer)
    return stripped, stripped != answer


def _strip_units(s: str) -> str:
    """Remove trailing unit words / ``\\text{...}`` that follow a number (repeatedly: a
    unit may follow another, as in ``5\\text{ cm}^2``)."""
    for _ in range(3):
        new = _TRAILING_UNIT.sub("", s).rstrip()
        new = _TRAILING_TEXT.sub("", new).rstrip()
        if new == s or not new:
            break
        s = new
    return s


def _strip_delimiters(s: str) -> str:
    s = s.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).strip()
    return s


def _compact(s: str) -> str:
    """Remove spaces except between a LaTeX command and a following letter or between two
    alphanumerics (``\\pi r`` and ``1 2`` keep theirs: removing them changes meaning)."""
    s = re.sub(r"\s+", " ", s).strip()
    return re.sub(r"(?<![a-zA-Z0-9]) | (?![a-zA-Z0-9])", "", s)


def normalize_answer(answer: str) -> str:
    """A light canonical form of an answer string, for grouping identical answers cheaply.

    Equal normalised strings are always equivalent (:func:`is_equivalent` checks this
    first), under either percent convention; different ones may still be equivalent.
    Removes math delimiters, ``\\left``/``\\right``, spacing commands, percent signs,
    degree signs, text wrappers, trailing units and a final full stop; ``\\dfrac`` and
    ``\\tfrac`` become ``\\frac``; whole-number thousands commas are removed.
    """
    s = _strip_delimiters(answer)
    s = _LEFT_RIGHT.sub("", s)
    s = _THIN_SPACE_GROUP.sub("", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s, _ = _strip_percent(s)
    s = _DEGREE.sub("", s)
    s = _strip_units(s)
    for _ in range(3):  # nested wrappers, e.g. \textbf{\text{A}}
        s = _TEXT_WRAP.sub(r"\1", s)
    s = s.strip().rstrip(".").strip()
    if _EMPTY_SET.match(s):
        s = "\\emptyset"
    thousands = _THOUSANDS.match(s)
    if thousands:
        s = thousands.group(1) + thousands.group(2).replace(",", "") + (thousands.group(3) or "")
    return _compact(s)


def clean_answer(answer: str) -> str:
    """The answer rewritten for math-verify: currency, units, spacing-based thousands
    separators, scientific notation, empty-set and all-reals spellings, Python/sympy
    printed expressions (as LaTeX). Percent signs are handled by the caller."""
    s = _strip_delimiters(answer)
    s = _THIN_SPACE_GROUP.sub("", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    # "\text{18 dollars}": a text wrapper around a number and its unit.
    s = re.sub(r"^\\(?:text|mbox)\s*\{\s*([-+]?\d[^{}]*)\}$", r"\1", s.strip())
    s = _strip_units(s).strip()
    s = s.rstrip(".").strip() if re.search(r"\d\.$", s) else s
    words = re.sub(r"\s+", " ", _TEXT_WRAP.sub(r"\1", s)).strip().rstrip(".").lower()
    if words in _ALL_REALS:
        return "(-\\infty,\\infty)"
    if _EMPTY_SET.match(s):
        return "\\emptyset"
    thousands = _THOUSANDS.match(s)
    if thousands:
        s = thousands.group(1) + thousands.group(2).replace(",", "") + (thousands.group(3) or "")
    s = _SCIENTIFIC.sub(r"\1\\times 10^{\2}", s)
    python = _python_to_latex(s)
    return python if python is not None else s


# --------------------------------------------------------------------------------------
# Python / sympy printed answers (TIR tool outputs)
# --------------------------------------------------------------------------------------

_PY_CHARS = re.compile(r"^[0-9A-Za-z+\-*/^().,\[\]\s]+$")
_PY_FUNCTIONS = {
    "sqrt",
    "Rational",
    "exp",
    "log",
    "ln",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "Abs",
    "abs",
    "cbrt",
    "root",
}
_PY_CONSTANTS = {"pi", "E", "I", "oo"}
# Something only a program prints: "**", "*", a known function call, or a constant name.
_PY_MARKER = re.compile(r"\*|\b(?:sqrt|Rational|exp|log|ln|Abs|abs|cbrt|root)\s*\(|\bpi\b|\boo\b")


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside parentheses or brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


@functools.lru_cache(maxsize=1)
def _python_namespace() -> dict[str, Any]:
    import sympy

    # parse_expr emits these constructors (Add/Mul/Pow with evaluate=False).
    constructors = ("Integer", "Float", "Symbol", "Add", "Mul", "Pow")
    names: dict[str, Any] = {n: getattr(sympy, n) for n in constructors}
    names.update(
        {
            "Rational": sympy.Rational,
            "sqrt": sympy.sqrt,
            "exp": sympy.exp,
            "log": sympy.log,
            "ln": sympy.log,
            "sin": sympy.sin,
            "cos": sympy.cos,
            "tan": sympy.tan,
            "asin": sympy.asin,
            "acos": sympy.acos,
            "atan": sympy.atan,
            "Abs": sympy.Abs,
            "abs": sympy.Abs,
            "cbrt": sympy.cbrt,
            "root": sympy.root,
            "pi": sympy.pi,
            "E": sympy.E,
            "I": sympy.I,
            "oo": sympy.oo,
        }
    )
    # eval() would add the real builtins if this key were missing.
    names["__builtins__"] = {}
    return names


def _parse_python(expr: str) -> sympy.Expr | None:
    """A sympy expression from a Python-printed one, or None.

    The input is model output, and parse_expr evaluates code, so it is only called on
    strings made of digits, operators, brackets and whitelisted names or single letters
    (no quotes, underscores or attribute access), with a namespace holding nothing else.
    Powers stay unevaluated (``9**9**9`` must not build a huge integer).
    """
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    if not expr.strip() or not _PY_CHARS.match(expr) or re.search(r"\.\s*[A-Za-z]", expr):
        return None
    for name in re.findall(r"[A-Za-z]+", expr):
        if len(name) > 1 and name not in _PY_FUNCTIONS and name not in _PY_CONSTANTS:
            return None
    transformations = (*standard_transformations, implicit_multiplication, convert_xor)
    try:
        result = parse_expr(
            expr,
            global_dict=dict(_python_namespace()),
            transformations=transformations,
            evaluate=False,
        )
    except Exception:  # any syntax the whitelist let through but Python/sympy rejects
        return None
    import sympy

    return result if isinstance(result, sympy.Basic) else None


def _compact_latex(latex: str) -> str:
    # sympy prints "2 i"; math-verify gives "i" after a space other assumptions than "2i".
    return re.sub(r"(?<![a-zA-Z]) +| +(?![a-zA-Z])", "", latex)


def _python_to_latex(s: str) -> str | None:
    """LaTeX for a Python/sympy-printed answer (tuples and comma lists element-wise), or
    None when ``s`` does not look printed by a program."""
    if "\\" in s or "{" in s or not _PY_MARKER.search(s):
        return None
    import sympy

    body, opening, closing = s.strip(), "", ""
    if len(body) >= 2 and body[0] in "([" and body[-1] in ")]":
        inner_parts = _split_top_level(body[1:-1])
        if len(inner_parts) > 1:
            body, opening, closing = body[1:-1], body[0], body[-1]
    parts = _split_top_level(body)
    latex_parts = []
    for part in parts:
        expr = _parse_python(part)
        if expr is None:
            return None
        latex_parts.append(_compact_latex(sympy.latex(expr)))
    return opening + ",".join(latex_parts) + closing


# --------------------------------------------------------------------------------------
# math-verify
# --------------------------------------------------------------------------------------


def _on_main_thread() -> bool:
    # math-verify's timeouts use SIGALRM, which only a main thread may set.
    return threading.current_thread() is threading.main_thread()


class _Parsed(NamedTuple):
    values: list[Any]
    timed_out: bool


def _mv_parse(answer: str, timeout: int | None) -> _Parsed:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return _Parsed(parse(f"${answer}$", parsing_timeout=timeout, raise_on_error=True), False)
    except TimeoutException:
        return _Parsed([], True)
    except Exception:  # unparsable: math-verify has nothing to compare
        return _Parsed([], False)


def _mv_verify(gold: list[Any], pred: list[Any], timeout: int | None) -> Verdict:
    """math-verify's verify over all (gold, pred) extraction pairs, reporting its timeouts
    (its own ``raise_on_error=False`` path would turn them into a silent False)."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=timeout, raise_on_error=True):
                    return Verdict(True)
            except TimeoutException:
                timed_out = True
            except Exception:  # a comparison sympy cannot do is not an equality
                continue
    return Verdict(False, timed_out)


def _first_value(parsed: _Parsed) -> Any:
    """The sympy value math-verify extracted (it appends the raw string as a fallback)."""
    return next((v for v in parsed.values if not isinstance(v, str)), None)


# --------------------------------------------------------------------------------------
# Fallbacks on parsed values
# --------------------------------------------------------------------------------------

_EXACT_REL = 1e-30  # "equal" for two exact values evaluated to 50 digits
_MAX_EXPONENT = 1e6
_SAMPLE_POINTS = (-1.3719, 0.5387, 2.2191, -0.7163, 3.3071)


def _is_assignment(value: Any) -> bool:
    import sympy

    return isinstance(value, sympy.Eq) and isinstance(value.lhs, sympy.Symbol)


def _unwrap_assignments(a: Any, b: Any) -> tuple[Any, Any] | None:
    """``x = 3`` against ``3`` compares 3 with 3 (an answer written as an assignment to one
    variable); ``x = 3`` against ``y = 3`` is None: different variables never match."""
    if _is_assignment(a) and _is_assignment(b):
        return (a.rhs, b.rhs) if a.lhs.name == b.lhs.name else None
    return (a.rhs if _is_assignment(a) else a), (b.rhs if _is_assignment(b) else b)


def _complex_value(expr: Any) -> complex | None:
    """The finite complex value of a closed-form expression, else None."""
    import sympy

    if not isinstance(expr, sympy.Expr) or expr.free_symbols:
        return None
    try:
        # Power towers (9^{9^{9^9}}) make evalf itself take minutes: an exponent beyond
        # 10^6 in absolute value means "not a comparable finite number" here.
        for node in sympy.postorder_traversal(expr):
            if (
                isinstance(node, sympy.Pow)
                and node.exp.is_number
                and abs(complex(node.exp.evalf(15))) > _MAX_EXPONENT
            ):
                return None
        value = complex(expr.evalf(50))
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return None
    except Exception:  # sympy raises assorted errors on exotic expressions
        return None
    if not (math.isfinite(value.real) and math.isfinite(value.imag)):
        return None
    return value


def _has_float(expr: Any) -> bool:
    import sympy

    return isinstance(expr, sympy.Basic) and bool(expr.atoms(sympy.Float))


def _numbers_close(a: Any, b: Any, rel_tol: float) -> bool:
    """Two closed-form numbers are equal: within ``rel_tol`` if a decimal was written on
    either side (and then never half a unit or more from an exact integer), otherwise
    equal to 50 digits."""
    import sympy

    if a == b:
        return True
    va, vb = _complex_value(a), _complex_value(b)
    if va is None or vb is None:
        return False
    if not (_has_float(a) or _has_float(b)):
        return cmath.isclose(va, vb, rel_tol=_EXACT_REL, abs_tol=0.0)
    if not cmath.isclose(va, vb, rel_tol=rel_tol, abs_tol=0.0):
        return False
    for exact, other in ((a, vb), (b, va)):
        if isinstance(exact, sympy.Integer) and abs(other - int(exact)) >= 0.5:
            return False
    return True


def _values_close(a: Any, b: Any, rel_tol: float) -> bool:
    """Structure-aware numeric comparison: numbers, ordered tuples, sets (any order),
    intervals (same bracket types) and matrices (same shape)."""
    import sympy

    pair = _unwrap_assignments(a, b)
    if pair is None:
        return False
    a, b = pair
    if isinstance(a, sympy.Tuple) and isinstance(b, sympy.Tuple):
        return len(a) == len(b) and all(_values_close(x, y, rel_tol) for x, y in zip(a, b))
    if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
        return a.shape == b.shape and all(
            _values_close(x, y, rel_tol) for x, y in zip(list(a), list(b))
        )
    if isinstance(a, sympy.Interval) and isinstance(b, sympy.Interval):
        return (
            a.left_open == b.left_open
            and a.right_open == b.right_open
            and _values_close(a.start, b.start, rel_tol)
            and _values_close(a.end, b.end, rel_tol)
        )
    if isinstance(a, sympy.FiniteSet) and isinstance(b, sympy.FiniteSet):
        if len(a) != len(b):
            return False
        keyed_a, keyed_b = _sorted_by_value(a), _sorted_by_value(b)
        if keyed_a is None or keyed_b is None:
            return False
        return all(_values_close(x, y, rel_tol) for x, y in zip(keyed_a, keyed_b))
    if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
        return _numbers_close(a, b, rel_tol)
    return False


def _sorted_by_value(items: Any) -> list[Any] | None:
    values = []
    for item in items:
        v = _complex_value(item)
        if v is None:
            return None
        values.append((v.real, v.imag, item))
    return [item for _, _, item in sorted(values, key=lambda t: (t[0], t[1]))]


def _same_expression(a: Any, b: Any, rel_tol: float) -> bool:
    """Expressions in the same variables (matched by name: parsers differ in the
    assumptions they give symbols) that agree at several sample points, negatives
    included (so ``x`` and ``|x|`` differ)."""
    import sympy

    pair = _unwrap_assignments(a, b)
    if pair is None:
        return False
    a, b = pair
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return False
    names_a = {s.name: s for s in a.free_symbols if isinstance(s, sympy.Symbol)}
    names_b = {s.name: s for s in b.free_symbols if isinstance(s, sympy.Symbol)}
    if not names_a or set(names_a) != set(names_b) or len(names_a) != len(a.free_symbols):
        return False
    tol = rel_tol if (_has_float(a) or _has_float(b)) else 1e-12
    agreed = 0
    for k, _ in enumerate(_SAMPLE_POINTS):
        # Each variable gets a different point so that x - y is not identically zero.
        point = {
            name: sympy.Float(_SAMPLE_POINTS[(k + j) % len(_SAMPLE_POINTS)], 30)
            for j, name in enumerate(sorted(names_a))
        }
        va = _complex_value(a.subs({names_a[n]: v for n, v in point.items()}))
        vb = _complex_value(b.subs({names_b[n]: v for n, v in point.items()}))
        if va is None and vb is None:
            continue
        if va is None or vb is None or not cmath.isclose(va, vb, rel_tol=tol, abs_tol=1e-12):
            return False
        agreed += 1
    return agreed >= 3


_DEGREE_MARK = re.compile(r"\^\s*\{?\s*\\circ|°|\\degree(?![a-zA-Z])|\bdeg(?:rees?)?\b")
_HAS_PI = re.compile(r"\\pi(?![a-zA-Z])|\bpi\b|π")


def _degrees_match(
    reference: str, prediction: str, ref_value: Any, pred_value: Any, rel_tol: float
) -> bool:
    """A reference in degrees against a prediction in radians (it contains pi)."""
    if not (_DEGREE_MARK.search(reference) and _HAS_PI.search(prediction)):
        return False
    import sympy

    pair = _unwrap_assignments(ref_value, pred_value)
    if pair is None:
        return False
    ref_value, pred_value = pair
    if not isinstance(pred_value, sympy.Expr):
        return False
    return _values_close(ref_value, pred_value * 180 / sympy.pi, rel_tol)


def _word_key(s: str) -> str | None:
    """Lower-case words of a plain-text answer ("\\text{Monday}" -> "monday"), or None
    when the answer is not made of words (single letters are variables or choices)."""
    for _ in range(3):
        s = _TEXT_WRAP.sub(r"\1", s)
    s = re.sub(r"\s+", " ", s).strip().strip(".").lower()
    if not re.fullmatch(r"[a-z]+(?: [a-z]+)*", s) or not re.search(r"[a-z]{2}", s):
        return None
    return s


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _percent_variants(answer: str, convention: Convention) -> list[str]:
    stripped, had_percent = _strip_percent(answer)
    stripped = stripped.strip()
    if not had_percent or convention.percent == "as_number":
        return [stripped]
    # "either": x% also means x/100.
    return [stripped, f"\\frac{{{clean_answer(stripped)}}}{{100}}"]


def _core(reference: str, prediction: str, convention: Convention, timeout: int | None) -> Verdict:
    if normalize_answer(reference) == normalize_answer(prediction):
        return Verdict(True)
    timed_out = False
    gold_raw, pred_raw = _mv_parse(reference, timeout), _mv_parse(prediction, timeout)
    timed_out |= gold_raw.timed_out or pred_raw.timed_out
    verdict = _mv_verify(gold_raw.values, pred_raw.values, timeout)
    if verdict.equal:
        return verdict
    timed_out |= verdict.timed_out

    ref_clean, pred_clean = clean_answer(reference), clean_answer(prediction)
    gold, pred = gold_raw, pred_raw
    if (ref_clean, pred_clean) != (reference, prediction):
        gold = _mv_parse(ref_clean, timeout) if ref_clean != reference else gold_raw
        pred = _mv_parse(pred_clean, timeout) if pred_clean != prediction else pred_raw
        timed_out |= gold.timed_out or pred.timed_out
        # A comparison that already ran out of time once is not retried on the same values.
        if not verdict.timed_out:
            second = _mv_verify(gold.values, pred.values, timeout)
            if second.equal:
                return second
            timed_out |= second.timed_out

    ref_value = _first_value(gold)
    pred_value = _first_value(pred)
    if ref_value is not None and pred_value is not None:
        if _values_close(ref_value, pred_value, convention.rel_tol):
            return Verdict(True)
        if _degrees_match(reference, prediction, ref_value, pred_value, convention.rel_tol):
            return Verdict(True)
        if _same_expression(ref_value, pred_value, convention.rel_tol):
            return Verdict(True)
    words_ref, words_pred = _word_key(reference), _word_key(prediction)
    if words_ref is not None and words_ref == words_pred:
        return Verdict(True)
    return Verdict(False, timed_out)


def check_equivalence(
    reference: str,
    prediction: str,
    convention: Convention = Convention(),
    *,
    math_verify_timeout: int | None = 5,
) -> Verdict:
    """Whether ``prediction`` is mathematically equivalent to ``reference``, with a flag for
    "math-verify ran out of time and nothing else decided".

    ``math_verify_timeout`` (whole seconds, SIGALRM-based) bounds each math-verify parse
    and comparison; it is ignored off the main thread, where signals cannot be used.
    Asymmetric like math-verify: ``reference`` is the gold answer.
    """
    if not isinstance(reference, str) or not isinstance(prediction, str):
        return Verdict(False)
    if not reference.strip() or not prediction.strip():
        return Verdict(False)
    timeout = math_verify_timeout if _on_main_thread() else None
    if timeout is not None:
        timeout = max(1, int(timeout))
    timed_out = False
    for ref in _percent_variants(reference, convention):
        for pred in _percent_variants(prediction, convention):
            if not ref or not pred:
                continue
            verdict = _core(ref, pred, convention, timeout)
            if verdict.equal:
                return verdict
            timed_out |= verdict.timed_out
    return Verdict(False, timed_out)


def is_equivalent(
    reference: str,
    prediction: str,
    convention: Convention = Convention(),
    *,
    math_verify_timeout: int | None = 5,
) -> bool:
    """True when ``prediction`` is mathematically equivalent to ``reference``.

    math-verify first, then the fallbacks described in the module docstring. Pure, but
    may be slow on adversarial inputs: use :class:`AnswerChecker` for a hard time limit.
    """
    return check_equivalence(
        reference, prediction, convention, math_verify_timeout=math_verify_timeout
    ).equal
