"""Benchmark decontamination as in the Qwen2.5-Math report.

A training record is removed when, after normalisation (NFKC, lower case, words = runs of
letters or digits, so LaTeX like ``\\frac{n}{1400}`` becomes ``frac n 1400``):

- it shares any 13-gram of words with a benchmark item (rule ``ngram13``), or
- it is short (at most ``lcs_max_words`` words, i.e. a problem rather than a web page) and
  the longest common subsequence of its words and a benchmark item's words, divided by the
  length of the longer sequence, is >= 0.6 (rule ``lcs``). This catches problems that are
  the same except for changed numbers, which share no 13-gram.

LCS candidates come from an index of word 3-grams: only the ``lcs_candidates`` benchmark
items sharing the most 3-grams with the record are compared, so the check is not
all-pairs. The report does not say how candidates were found; this is our choice.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalize_words(text: str) -> list[str]:
    """Words of ``text`` after NFKC and lower-casing (punctuation and LaTeX syntax dropped)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def lcs_ratio(a: Sequence[str], b: Sequence[str]) -> float:
    """LCS of two word sequences over the length of the longer one (0 for empty input)."""
    longest = max(len(a), len(b))
    return lcs_length(a, b) / longest if longest else 0.0


@dataclass(frozen=True)
class BenchmarkItem:
    source: str  # "FILE:FIELD"
    index: int  # line number in the file (0-based)
    item_id: str  # the item's id/unique_id field when present, else the index
    words: tuple[str, ...]


@dataclass(frozen=True)
class Match:
    rule: str  # "ngram13" | "lcs"
    item: BenchmarkItem
    score: float  # 1.0 for n-gram hits, the LCS ratio otherwise


class BenchmarkIndex:
    """13-gram and 3-gram indices over benchmark items."""

    def __init__(
        self,
        items: Sequence[BenchmarkItem],
        ngram: int = 13,
        lcs_threshold: float = 0.6,
        lcs_max_words: int = 256,
        lcs_candidates: int = 8,
    ):
        self.items = list(items)
        self.ngram = ngram
        self.lcs_threshold = lcs_threshold
        self.lcs_max_words = lcs_max_words
        self.lcs_candidates = lcs_candidates
        self._long: dict[tuple[str, ...], int] = {}
        self._short: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            for g in ngrams(item.words, ngram):
                self._long.setdefault(g, i)
            for g in ngrams(item.words, 3):
                self._short[g].append(i)

    @classmethod
    def from_specs(cls, specs: Sequence[str], **kwargs) -> BenchmarkIndex:
        """Benchmarks given as ``FILE:FIELD`` (JSONL), e.g. ``math500/test.jsonl:problem``."""
        items: list[BenchmarkItem] = []
        for spec in specs:
            path, sep, field = spec.rpartition(":")
            if not sep or not path or not field:
                raise ValueError(f"--benchmark {spec!r} must be FILE:FIELD")
            if not Path(path).is_file():
                raise FileNotFoundError(f"benchmark file not found: {path}")
            with open(path, "rb") as f:
                for i, raw in enumerate(f):
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise ValueError(f"{path}:{i + 1} is not a JSON line ({exc})") from None
                    if not isinstance(row, dict):
                        raise ValueError(
                            f"{path}:{i + 1} is a JSON {type(row).__name__}, not an object "
                            f"with a {field!r} field"
                        )
                    if field not in row:
                        raise ValueError(f"{path}:{i + 1} has no field {field!r}")
                    item_id = str(row.get("unique_id", row.get("id", i)))
                    items.append(
                        BenchmarkItem(spec, i, item_id, tuple(normalize_words(str(row[field]))))
                    )
        if not items:
            raise ValueError("no benchmark items loaded")
        return cls(items, **kwargs)

    def match(self, text: str) -> Match | None:
        """The first rule that flags ``text`` against any benchmark item, or None."""
        words = normalize_words(text)
        for g in ngrams(words, self.ngram):
            hit = self._long.get(g)
            if hit is not None:
                return Match("ngram13", self.items[hit], 1.0)
        if len(words) > self.lcs_max_words or not words:
            return None
        shared = Counter(i for g in ngrams(words, 3) for i in self._short.get(g, ()))
        best: Match | None = None
        for i, _ in shared.most_common(self.lcs_candidates):
            item = self.items[i]
            # Upper bound before the quadratic LCS: it cannot exceed the shorter length.
            if (
                min(len(words), len(item.words)) / max(len(words), len(item.words))
                < self.lcs_threshold
            ):
                continue
            ratio = lcs_ratio(words, item.words)
            if ratio >= self.lcs_threshold and (best is None or ratio > best.score):
                best = Match("lcs", item, ratio)
        return best
