"""LLM curation steps: quality scoring and MAmmoTH2-style QA synthesis.

- ``score``: an instruct model rates each document 0-5 for its value as math pretraining
  data (prompt :data:`SCORE_PROMPT`); the number is parsed strictly
  (:func:`parse_score`), and answers without one are reported as unparseable and kept
  with ``quality_score: null``, never guessed.
- ``synthesize``: extract question/answer pairs already present in a document
  (:data:`EXTRACT_PROMPT`, parsed by :func:`parse_qa_pairs`), then have the model refine
  each answer into a complete step-by-step solution (:data:`REFINE_PROMPT`), as in
  MAmmoTH2 (Yue et al. 2024: extract, then refine). Output records carry ``source_id``.

Prompts are rendered with the model's chat template when it has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from qmath_megatron.inference.engine import GenerationEngine, SamplingParams
from qmath_megatron.tokenizer.chat import render_user_prompt

SCORE_PROMPT = """Below is an extract from a web page. Rate how useful it is for teaching \
mathematics to a language model, on an integer scale from 0 to 5:
0: no mathematical content.
1: mentions numbers or math terms in passing, no reasoning.
2: some math, but fragmentary, wrong, or mostly boilerplate.
3: a coherent explanation or solved problem of elementary level.
4: clear, correct mathematical reasoning with worked steps.
5: excellent, rigorous and well-structured mathematics (textbook or competition quality).

Extract:
<<<
{text}
>>>

Answer with the score only, in the form "Score: N"."""

EXTRACT_PROMPT = """Extract every question that is answered in the document below, with its answer \
as written in the document. If there are none, write "NONE". Use exactly this format for each pair:
Q: <question>
A: <answer>

Document:
<<<
{text}
>>>"""

REFINE_PROMPT = """Rewrite the answer to the question below as a complete, correct, step-by-step \
solution. Keep the final result of the original answer unless it is wrong, and put the final \
answer within \\boxed{{}}.

Question: {question}
Original answer: {answer}

Solution:"""

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([0-5])(?:\s*/\s*5)?\b", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**([0-5])\**\s*(?:/\s*5)?\s*\.?\s*$")
_QA = re.compile(r"^Q:\s*(.+?)\s*^A:\s*(.+?)\s*(?=^Q:|\Z)", re.MULTILINE | re.DOTALL)


def parse_score(answer: str) -> int | None:
    """The 0-5 score in a model's answer, or None when there is no unambiguous one.

    Accepts "Score: 4", "score = 4/5", "**Score:** 3", or an answer that is only the digit.
    Several different scores in one answer are ambiguous (None).
    """
    found = {int(m) for m in _SCORE.findall(answer)}
    if len(found) == 1:
        return found.pop()
    if not found:
        m = _BARE.match(answer)
        return int(m.group(1)) if m else None
    return None


def parse_qa_pairs(answer: str) -> list[tuple[str, str]]:
    """``Q: ... / A: ...`` pairs from an extraction answer (empty for "NONE" or no pairs)."""
    if answer.strip().upper().startswith("NONE"):
        return []
    return [(q.strip(), a.strip()) for q, a in _QA.findall(answer) if q.strip() and a.strip()]


def render(engine: GenerationEngine, content: str) -> str:
    """The prompt as the model expects it: its chat template when it has one (rendered by
    :func:`qmath_megatron.tokenizer.chat.render_user_prompt`, shared by every stage)."""
    return render_user_prompt(getattr(engine, "tokenizer", None), content)


@dataclass
class ScoreResult:
    score: int | None
    raw: str


def score_texts(
    engine: GenerationEngine, texts: Sequence[str], max_chars: int = 6000, max_new_tokens: int = 16
) -> list[ScoreResult]:
    prompts = [render(engine, SCORE_PROMPT.format(text=t[:max_chars])) for t in texts]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return [ScoreResult(parse_score(o[0].text), o[0].text) for o in outs]


def synthesize_texts(
    engine: GenerationEngine,
    texts: Sequence[str],
    source_ids: Sequence[str],
    max_chars: int = 6000,
    max_new_tokens: int = 1024,
) -> tuple[list[dict], int]:
    """QA records ``{source_id, question, answer, extracted_answer}`` and the number of
    documents whose extraction produced no parseable pair."""
    extracts = engine.generate(
        [render(engine, EXTRACT_PROMPT.format(text=t[:max_chars])) for t in texts],
        SamplingParams(max_new_tokens=max_new_tokens),
    )
    pairs, empty = [], 0
    for source, out in zip(source_ids, extracts):
        found = parse_qa_pairs(out[0].text)
        empty += not found
        pairs.extend((source, q, a) for q, a in found)
    if not pairs:
        return [], empty
    refined = engine.generate(
        [render(engine, REFINE_PROMPT.format(question=q, answer=a)) for _, q, a in pairs],
        SamplingParams(max_new_tokens=max_new_tokens),
    )
    records = [
        {"source_id": s, "question": q, "answer": r[0].text.strip(), "extracted_answer": a}
        for (s, q, a), r in zip(pairs, refined)
    ]
    return records, empty
