"""A labelled near-duplicate set and pairwise precision/recall, for dedup tests and benchmarks.

Each base document (generated math text) gets variants of the kinds web crawls contain:
word edits, inserted sentences, reordered paragraphs and a few changed numbers; other base
documents are the true non-duplicates. Records carry ``label`` = the base document.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import defaultdict

from qmath_megatron.data.synthetic import generate_documents

_FILLER = [
    "Note that this step is important.",
    "We double-check the arithmetic below.",
    "This is a standard technique.",
    "Remember to simplify at the end.",
]


def _edit_words(text: str, rng: random.Random, frac: float) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(["the", "a", "value", "number", "result", "so"])
    return " ".join(words)


def _insert(text: str, rng: random.Random) -> str:
    paras = text.split("\n\n")
    for _ in range(2):
        paras.insert(rng.randrange(len(paras) + 1), rng.choice(_FILLER))
    return "\n\n".join(paras)


def _reorder(text: str, rng: random.Random) -> str:
    paras = text.split("\n\n")
    rng.shuffle(paras)
    return "\n\n".join(paras)


def _change_numbers(text: str, rng: random.Random, count: int = 2) -> str:
    matches = list(re.finditer(r"\b\d+\b", text))
    chosen = {m.start() for m in rng.sample(matches, min(count, len(matches)))}
    return re.sub(
        r"\b\d+\b", lambda m: str(int(m.group()) + 7) if m.start() in chosen else m.group(), text
    )


def labelled_corpus(n_bases: int, seed: int = 0) -> list[dict]:
    """Records ``{"id", "text", "label", "kind"}``; about half the bases get 1-4 variants."""
    rng = random.Random(seed)
    records = []
    for base in generate_documents(n_bases, seed=seed + 1000, problems_per_doc=6):
        label = base["id"]
        records.append({"id": label, "text": base["text"], "label": label, "kind": "original"})
        if rng.random() < 0.5:
            continue
        kinds = rng.sample(["edit", "insert", "reorder", "numbers"], rng.randint(1, 4))
        for kind in kinds:
            text = base["text"]
            text = {
                "edit": lambda t: _edit_words(t, rng, 0.03),
                "insert": lambda t: _insert(t, rng),
                "reorder": lambda t: _reorder(t, rng),
                "numbers": lambda t: _change_numbers(t, rng),
            }[kind](text)
            records.append({"id": f"{label}-{kind}", "text": text, "label": label, "kind": kind})
    rng.shuffle(records)
    return records


def pairwise_precision_recall(labels: list[str], clusters: list[int]) -> tuple[float, float]:
    """Precision/recall of the duplicate pairs implied by ``clusters`` against ``labels``."""

    def pairs(groups: list) -> set[tuple[int, int]]:
        by = defaultdict(list)
        for i, g in enumerate(groups):
            by[g].append(i)
        return {p for members in by.values() for p in itertools.combinations(members, 2)}

    truth, predicted = pairs(labels), pairs(clusters)
    hit = len(truth & predicted)
    precision = hit / len(predicted) if predicted else 1.0
    recall = hit / len(truth) if truth else 1.0
    return precision, recall
