"""Answer extraction and equivalence checking: evaluation scoring, the RL verifier and
rejection sampling.

- :mod:`.extract`: final answer of a completion (``\\boxed{}`` > "final answer is" > last
  number) and GSM8K ``####`` references;
- :mod:`.equivalence`: :func:`is_equivalent` (math-verify, then numeric / symbolic
  fallbacks) under a benchmark :class:`Convention`, and :func:`normalize_answer`;
- :mod:`.checker`: :class:`AnswerChecker`, checks in a process pool with a hard timeout.

sympy and math-verify are imported on first use, so importing this package is cheap.
"""

from qmath_megatron.rewards.checker import AnswerChecker, CheckResult
from qmath_megatron.rewards.equivalence import (
    Convention,
    Verdict,
    check_equivalence,
    clean_answer,
    is_equivalent,
    normalize_answer,
)
from qmath_megatron.rewards.extract import (
    extract_answer,
    extract_boxed,
    extract_gsm8k_reference,
    extract_last_number,
)

__all__ = [
    "AnswerChecker",
    "CheckResult",
    "Convention",
    "Verdict",
    "check_equivalence",
    "clean_answer",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k_reference",
    "extract_last_number",
    "is_equivalent",
    "normalize_answer",
]
