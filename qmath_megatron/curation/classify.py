"""fastText math classifier and the iterative recall loop (DeepSeekMath, Qwen2.5-Math).

- :func:`train_classifier`: supervised fastText on positive (math) vs negative records with
  DeepSeekMath's settings (dim 256, lr 0.1, word n-grams 3, min count 3, 3 epochs).
- :func:`score_records`: P(math) per record; keep by threshold or by top fraction.
- :func:`recall_loop`: per round, train, score the pool, select, then find domains whose
  pages are recalled above ``domain_ratio`` (default 10%) and add *all* their pool pages to
  the next round's positives. Departure from DeepSeekMath: their domain-level step added
  URL paths that were then annotated by hand; here every page of a qualifying domain is
  added automatically (the per-round report lists the domains so they can be reviewed).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

_SPACE = re.compile(r"\s+")
LABEL_MATH, LABEL_OTHER = "__label__math", "__label__other"


@dataclass
class FastTextConfig:
    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 3
    epoch: int = 3
    seed: int = 0
    threads: int = 1  # 1 keeps training deterministic; more threads are faster
    bucket: int = 2_000_000  # fastText's n-gram hash buckets (memory: bucket x dim floats)


def fasttext_line(text: str) -> str:
    """One line per document, lower case, whitespace collapsed (fastText's input format)."""
    return _SPACE.sub(" ", text.lower()).strip()


def _train_file(train_file: str, model_path: str, config: FastTextConfig) -> None:
    import fasttext

    model = fasttext.train_supervised(
        input=train_file, dim=config.dim, lr=config.lr, wordNgrams=config.word_ngrams,
        minCount=config.min_count, epoch=config.epoch, thread=config.threads, seed=config.seed,
        bucket=config.bucket, verbose=0,
    )  # fmt: skip
    model.save_model(model_path)


def train_classifier(positives: Sequence[str], negatives: Sequence[str], model_path: str | Path,
                     config: FastTextConfig | None = None):  # fmt: skip
    """Train and save a classifier; returns the loaded model.

    Training runs in a fresh (spawned) process: fastText's trainer was seen to hit "Encountered
    NaN" in a process whose heap had been used by other native libraries (building an HF
    tokenizer first was enough), with the same data and seed that train fine in a new process.
    """
    import multiprocessing as mp

    config = config or FastTextConfig()
    if not positives or not negatives:
        raise ValueError("need at least one positive and one negative document")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        for label, texts in ((LABEL_MATH, positives), (LABEL_OTHER, negatives)):
            for text in texts:
                line = fasttext_line(text)
                if line:
                    f.write(f"{label} {line}\n")
        train_file = f.name
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            pool.apply(_train_file, (train_file, str(model_path), config))
    finally:
        Path(train_file).unlink(missing_ok=True)
    return load_classifier(model_path)


def load_classifier(model_path: str | Path):
    import fasttext

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"fastText model not found: {model_path}")
    return fasttext.load_model(str(model_path))


def math_probabilities(model, texts: Sequence[str]) -> list[float]:
    """P(math) for each text."""
    lines = [fasttext_line(t) for t in texts]
    labels, probs = model.predict(lines, k=2)
    out = []
    for labs, ps in zip(labels, probs):
        scores = dict(zip(labs, ps))
        out.append(float(scores.get(LABEL_MATH, 0.0)))
    return out


def select(
    scores: Sequence[float], threshold: float | None = None, top_fraction: float | None = None
) -> list[bool]:
    """Keep mask: score >= threshold, or the highest ``top_fraction`` (ties by input order)."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of threshold or top_fraction")
    if threshold is not None:
        return [s >= threshold for s in scores]
    if not 0 < top_fraction <= 1:
        raise ValueError("top_fraction must be in (0, 1]")
    k = round(len(scores) * top_fraction)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    keep = [False] * len(scores)
    for i in order:
        keep[i] = True
    return keep


def domain_of(url: str | None) -> str | None:
    if not url:
        return None
    host = urlparse(url if "://" in url else f"http://{url}").hostname
    return host.removeprefix("www.") if host else None


def recall_loop(positives: list[str], negatives: list[str], pool: list[dict], out_dir: str | Path, *,
                rounds: int = 3, threshold: float = 0.5, domain_ratio: float = 0.1, text_key: str = "text",
                config: FastTextConfig | None = None) -> list[dict]:  # fmt: skip
    """Iterative recall; writes ``round_K/model.bin``, ``round_K/selected.jsonl`` and
    ``report.json``; returns the per-round reports."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(positives)
    seed_ids: set[int] = set()
    reports = []
    pages_per_domain = Counter(domain_of(r.get("url")) for r in pool)
    for k in range(1, rounds + 1):
        rdir = out / f"round_{k}"
        rdir.mkdir(exist_ok=True)
        if (rdir / "round.json").is_file():  # finished in an earlier, interrupted run
            report = json.loads((rdir / "round.json").read_text())
            new = [
                i
                for i, r in enumerate(pool)
                if domain_of(r.get("url")) in report["math_domains"] and i not in seed_ids
            ]
            seed_ids.update(new)
            seeds.extend(pool[i][text_key] for i in new)
            reports.append({**report, "resumed": True})
            if not new:
                break
            continue
        model = train_classifier(seeds, negatives, rdir / "model.bin", config)
        scores = math_probabilities(model, [r[text_key] for r in pool])
        keep = select(scores, threshold=threshold)
        with (rdir / "selected.jsonl").open("w", encoding="utf-8") as f:
            for r, s, kept in zip(pool, scores, keep):
                if kept:
                    f.write(
                        json.dumps(
                            {**r, "math_score": round(s, 6), "recall_round": k}, ensure_ascii=False
                        )
                        + "\n"
                    )
        recalled = Counter(domain_of(r.get("url")) for r, kept in zip(pool, keep) if kept)
        domains = sorted(
            d for d, n in recalled.items() if d and n / pages_per_domain[d] >= domain_ratio
        )
        new = [
            i
            for i, r in enumerate(pool)
            if domain_of(r.get("url")) in domains and i not in seed_ids
        ]
        seed_ids.update(new)
        seeds.extend(pool[i][text_key] for i in new)
        report = {"round": k, "pool": len(pool), "selected": sum(keep), "math_domains": domains,
                  "pages_added_to_seeds": len(new), "seeds_next_round": len(seeds)}  # fmt: skip
        (rdir / "round.json").write_text(json.dumps(report))  # marks the round finished
        reports.append(report)
        if not new:
            break
    (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    return reports
