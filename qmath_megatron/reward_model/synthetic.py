"""A generated reward-model task for CPU runs and tests (``tiny_cpu_rm``).

Each prompt is a small arithmetic question; each response is a few neutral filler words
with one or two *marker* words inserted at random positions: words from :data:`GOOD` in
correct responses, from :data:`BAD` in wrong ones. The rendered sequences of a group end
with the same template tokens (``<|im_end|>\\n``), so the score at the last token can only
separate them through attention over the response: a learnable signal that exercises the
whole path (rendering, last-token scoring, the listwise loss), not arithmetic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILLER = (
    "first",
    "we",
    "add",
    "the",
    "numbers",
    "so",
    "then",
    "result",
    "is",
    "step",
    "carry",
    "sum",
    "value",
    "look",
    "at",
    "next",
    "digit",
    "write",
    "down",
    "answer",
)
GOOD = ("verified", "consistent", "checked", "exactly")
BAD = ("guess", "perhaps", "unsure", "roughly")


def synthetic_groups(n: int, seed: int, group_size: int = 4) -> list[dict]:
    """``n`` rm-prepare input objects, each with ``group_size`` responses, at least one
    correct and one wrong."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        k = rng.randint(1, group_size - 1)
        labels = [True] * k + [False] * (group_size - k)
        rng.shuffle(labels)
        responses = []
        for ok in labels:
            words = [rng.choice(FILLER) for _ in range(rng.randint(6, 10))]
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randint(0, len(words)), rng.choice(GOOD if ok else BAD))
            answer = a + b if ok else a + b + rng.choice((-10, -1, 1, 10))
            text = " ".join(words) + f" \\boxed{{{answer}}}"
            responses.append({"text": text, "correct": ok})
        rows.append({"prompt": f"What is {a} + {b}?", "responses": responses})
    return rows


def write_synthetic_jsonl(path: str | Path, n: int, seed: int, group_size: int = 4) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for row in synthetic_groups(n, seed, group_size):
            f.write(json.dumps(row) + "\n")
    return path
