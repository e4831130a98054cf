"""fastText math classifier and the iterative recall loop (DeepSeekMath, Qwen2.5-Math).

- :func:`train_classifier`: supervised fastText on positive (math) vs negative records with
  DeepSeekMath's settings (dim 256, lr 0.1, word n-grams 3, min count 3, 3 epochs).
- :func:`score_records`: P(math) per record; keep by threshold or by top fraction.
- :func:`classify`: ``qmath data classify`` (score shards, then keep by threshold or global
  top fraction), on :mod:`qmath_megatron.data.shards`.
- :func:`recall`: per round, train, score the pool, select, then find domains whose
  pages are recalled above ``domain_ratio`` (default 10%) and add *all* their pool pages to
  the next round's positives. Departure from DeepSeekMath: their domain-level step added
  URL paths that were then annotated by hand; here every page of a qualifying domain is
  added automatically (the per-round report lists the domains so they can be reviewed).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from qmath_megatron.curation.records import (
    check_output,
    count_rejects,
    dumps,
    files_fingerprint,
    jsonl_lines,
    read_texts,
    write_reject,
)
from qmath_megatron.data.readers import Record, Reject
from qmath_megatron.data.shards import (
    Shard,
    ShardJob,
    ShardOutput,
    ShardRun,
    discover,
    path_fingerprint,
)
from qmath_megatron.data.shards import plan as plan_shards

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

    def __post_init__(self) -> None:
        for name in ("dim", "word_ngrams", "min_count", "epoch", "threads", "bucket"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


def fasttext_line(text: str) -> str:
    """One line per document, lower case, whitespace collapsed (fastText's input format)."""
    return _SPACE.sub(" ", text.lower()).strip()


def _train_file(train_file: str, model_path: str, config: FastTextConfig) -> None:
    import fasttext

    model = fasttext.train_supervised(
        input=train_file,
        dim=config.dim,
        lr=config.lr,
        wordNgrams=config.word_ngrams,
        minCount=config.min_count,
        epoch=config.epoch,
        thread=config.threads,
        seed=config.seed,
        bucket=config.bucket,
        verbose=0,
    )
    model.save_model(model_path)


def train_classifier(
    positives: Sequence[str],
    negatives: Sequence[str],
    model_path: str | Path,
    config: FastTextConfig | None = None,
):
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


def _train_to(
    path: Path, positives: Sequence[str], negatives: Sequence[str], config: FastTextConfig
) -> None:
    """Train into ``path`` atomically (a kill mid-training leaves no half-written model)."""
    tmp = path.with_name(f".{path.name}.tmp")
    train_classifier(positives, negatives, tmp, config)
    os.replace(tmp, path)


def _score_init(
    model_path: str, text_key: str, allow_truncated: bool, extra: dict | None = None
) -> dict:
    return {
        "model": load_classifier(model_path),
        "text_key": text_key,
        "allow_truncated": allow_truncated,
        **(extra or {}),
    }


def _scored_batches(shard: Shard, state: dict, rejects, rejected: Counter, batch: int = 4096):
    """(records, P(math)) in batches; bad lines go to ``rejects``."""
    items: list[Record] = []
    for item in shard.records([state["text_key"]], allow_truncated=state["allow_truncated"]):
        if isinstance(item, Reject):
            write_reject(rejects, item, rejected)
            continue
        items.append(item)
        if len(items) >= batch:
            yield items, math_probabilities(state["model"], [r.text for r in items])
            items = []
    if items:
        yield items, math_probabilities(state["model"], [r.text for r in items])


# --------------------------------------------------------------------------- classify


@dataclass
class ClassifyConfig:
    inputs: list[str]
    output: str
    positive: list[str] | None = None
    negative: list[str] | None = None
    model: str | None = None
    threshold: float | None = None
    top_fraction: float | None = None
    text_key: str = "text"
    fasttext: FastTextConfig = field(default_factory=FastTextConfig)
    overwrite: bool = False
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.top_fraction is None):
            raise ValueError("give exactly one of --threshold or --top-fraction")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if not self.model and not (self.positive and self.negative):
            raise ValueError("give --model, or --positive and --negative to train one")


def _classify_score_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    rejected: Counter[str] = Counter()
    n = 0
    with out.open("scored") as fs, out.open("rejects") as fj:
        for items, scores in _scored_batches(shard, state, fj, rejected):
            for r, s in zip(items, scores):
                fs.write(dumps({**r.obj, "math_score": round(s, 6)}) + "\n")
            n += len(items)
    return {"scored": n, "rejected": dict(rejected)}


def _classify_select_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    keep, pos = state["keep"], state["offsets"][shard.index]
    kept = dropped = 0
    with out.open("kept") as fk, out.open("dropped") as fd:
        for line in jsonl_lines(state["run"].path("scored", shard)):
            if keep[pos]:
                fk.write(line.decode("utf-8") + "\n")
                kept += 1
            else:
                fd.write(line.decode("utf-8") + "\n")
                dropped += 1
            pos += 1
    return {"kept": kept, "dropped": dropped}


def classify(cfg: ClassifyConfig, log=print) -> dict:
    """Pass 1 (resumable per shard): score into DIR/scored/ (bad lines to DIR/rejects/).
    Pass 2: keep by the threshold, or by the global top fraction, into DIR/kept/ and
    DIR/dropped/. Returns the report (also DIR/report.json)."""
    start = time.time()
    check_output(cfg.output)
    shards = plan_shards(discover(cfg.inputs))
    out = Path(cfg.output)
    if cfg.model:
        model_print = {"model": path_fingerprint(cfg.model)}
    else:
        model_print = {
            "positive": files_fingerprint(cfg.positive),
            "negative": files_fingerprint(cfg.negative),
            "fasttext": asdict(cfg.fasttext),
        }
    settings = {
        **model_print,
        "threshold": cfg.threshold,
        "top_fraction": cfg.top_fraction,
        "text_key": cfg.text_key,
        "allow_truncated": cfg.allow_truncated,
    }
    job = ShardJob(
        "classify",
        out,
        ("scored", "kept", "dropped", "rejects"),
        settings,
        overwrite=cfg.overwrite,
        extra_outputs=[out / "report.json", out / "model.bin"],
    )
    run = job.open(shards)
    model_path = Path(cfg.model) if cfg.model else out / "model.bin"
    if not cfg.model and not model_path.is_file():
        pos, _ = read_texts(cfg.positive or [], cfg.text_key, allow_truncated=cfg.allow_truncated)
        neg, _ = read_texts(cfg.negative or [], cfg.text_key, allow_truncated=cfg.allow_truncated)
        _train_to(model_path, pos, neg, cfg.fasttext)
        log(f"trained on {len(pos):,} positive / {len(neg):,} negative documents -> {model_path}")
    scored = run.map(
        "score",
        _classify_score_shard,
        init=_score_init,
        init_args=(str(model_path), cfg.text_key, cfg.allow_truncated),
        kinds=("scored", "rejects"),
        describe=lambda s, r: f"{r['scored']:,} documents",
    )
    all_scores = [
        json.loads(line)["math_score"]
        for s in shards
        for line in jsonl_lines(run.path("scored", s))
    ]
    keep = select(all_scores, threshold=cfg.threshold, top_fraction=cfg.top_fraction)
    offsets = [0]
    for r in scored:
        offsets.append(offsets[-1] + r["scored"])
    state = {"keep": keep, "offsets": offsets, "run": run}
    selected = run.map(
        "select", _classify_select_shard, init=dict, init_args=(state,), kinds=("kept", "dropped")
    )
    report = {
        "scored": len(all_scores),
        "kept": sum(r["kept"] for r in selected),
        "dropped": sum(r["dropped"] for r in selected),
        "rejected": count_rejects(scored),
        "resumed_shards": run.resumed["score"],
        "seconds": round(time.time() - start, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------- recall


@dataclass
class RecallConfig:
    positive: list[str]
    negative: list[str]
    pool: list[str]
    output: str
    rounds: int = 3
    threshold: float = 0.5
    domain_ratio: float = 0.1
    text_key: str = "text"
    fasttext: FastTextConfig = field(default_factory=FastTextConfig)
    overwrite: bool = False
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        if not 0 < self.domain_ratio <= 1:
            raise ValueError(f"--domain-ratio must be in (0, 1], got {self.domain_ratio}")


def _recall_read_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    rejected: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    with out.open("rejects") as fj:
        for item in shard.records([state["text_key"]], allow_truncated=state["allow_truncated"]):
            if isinstance(item, Reject):
                write_reject(fj, item, rejected)
            else:
                domains[str(domain_of(item.obj.get("url")))] += 1
    return {"pages": sum(domains.values()), "domains": dict(domains), "rejected": dict(rejected)}


def _recall_round_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    k = state["round"]
    recalled: Counter[str] = Counter()
    selected = 0
    rejected: Counter[str] = Counter()
    with (
        out.open(f"round_{k}/selected") as fs,
        out.open(f"round_{k}/dropped") as fd,
        open(os.devnull, "w") as sink,  # rejects were written by the read step
    ):
        for items, scores in _scored_batches(shard, state, sink, rejected):
            for r, s in zip(items, scores):
                row = dumps({**r.obj, "math_score": round(s, 6), "recall_round": k}) + "\n"
                if s >= state["threshold"]:
                    fs.write(row)
                    selected += 1
                    recalled[str(domain_of(r.obj.get("url")))] += 1
                else:
                    fd.write(row)
    return {"selected": selected, "recalled": dict(recalled)}


def _domain_pages(
    run: ShardRun, shards: list[Shard], domains: set[str], text_key: str, allow_truncated: bool
) -> list[tuple[int, int, str]]:
    """(shard, line, text) of every good pool page whose domain is in ``domains``."""
    pages = []
    for shard in shards:
        for item in shard.records([text_key], allow_truncated=allow_truncated):
            if isinstance(item, Record) and str(domain_of(item.obj.get("url"))) in domains:
                pages.append((shard.index, item.line, item.text))
    return pages


def recall(cfg: RecallConfig, log=print) -> list[dict]:
    """Iterative recall over pool shards; writes ``round_K/model.bin``,
    ``round_K/selected/<shard>`` and ``round_K/dropped/<shard>`` (every good pool page, with
    ``math_score``), ``rejects/<shard>`` and ``report.json``; returns the per-round reports.
    Finished rounds are reused by a rerun with the same inputs and settings."""
    check_output(cfg.output)
    shards = plan_shards(discover(cfg.pool))
    out = Path(cfg.output)
    settings = {
        "positive": files_fingerprint(cfg.positive),
        "negative": files_fingerprint(cfg.negative),
        "rounds": cfg.rounds,
        "threshold": cfg.threshold,
        "domain_ratio": cfg.domain_ratio,
        "text_key": cfg.text_key,
        "fasttext": asdict(cfg.fasttext),
        "allow_truncated": cfg.allow_truncated,
    }
    kinds = ["rejects"] + [
        f"round_{k}/{x}" for k in range(1, cfg.rounds + 1) for x in ("selected", "dropped")
    ]
    extra = [out / "report.json"] + [out / f"round_{k}" for k in range(1, cfg.rounds + 1)]
    run = ShardJob(
        "recall", out, kinds, settings, overwrite=cfg.overwrite, extra_outputs=extra
    ).open(shards)
    seeds, _ = read_texts(cfg.positive, cfg.text_key, allow_truncated=cfg.allow_truncated)
    negatives, _ = read_texts(cfg.negative, cfg.text_key, allow_truncated=cfg.allow_truncated)
    if not seeds or not negatives:
        raise ValueError("need at least one positive and one negative document")
    read = run.map(
        "read",
        _recall_read_shard,
        init=dict,
        init_args=({"text_key": cfg.text_key, "allow_truncated": cfg.allow_truncated},),
        kinds=("rejects",),
    )
    pages_per_domain: Counter[str] = Counter()
    for r in read:
        pages_per_domain.update(r["domains"])
    pool_size = sum(r["pages"] for r in read)
    seed_ids: set[tuple[int, int]] = set()
    reports: list[dict] = []
    for k in range(1, cfg.rounds + 1):
        report = run.load_state(f"round_{k}")
        resumed = report is not None
        if report is None:
            model = out / f"round_{k}" / "model.bin"
            if not model.is_file():
                _train_to(model, seeds, negatives, cfg.fasttext)
            results = run.map(
                f"round_{k}",
                _recall_round_shard,
                init=_score_init,
                init_args=(
                    str(model),
                    cfg.text_key,
                    cfg.allow_truncated,
                    {"round": k, "threshold": cfg.threshold},
                ),
                kinds=(f"round_{k}/selected", f"round_{k}/dropped"),
            )
            recalled: Counter[str] = Counter()
            for r in results:
                recalled.update(r["recalled"])
            domains = sorted(
                d
                for d, n in recalled.items()
                if d != "None" and n / pages_per_domain[d] >= cfg.domain_ratio
            )
            report = {
                "round": k,
                "pool": pool_size,
                "selected": sum(r["selected"] for r in results),
                "math_domains": domains,
            }
        pages = _domain_pages(
            run, shards, set(report["math_domains"]), cfg.text_key, cfg.allow_truncated
        )
        new = [(s, line, text) for s, line, text in pages if (s, line) not in seed_ids]
        seed_ids.update((s, line) for s, line, _ in new)
        seeds.extend(text for _, _, text in new)
        report = {**report, "pages_added_to_seeds": len(new), "seeds_next_round": len(seeds)}
        if not resumed:
            run.save_state(f"round_{k}", report)
            (out / f"round_{k}" / "round.json").write_text(json.dumps(report) + "\n")
        reports.append({**report, "resumed": True} if resumed else report)
        log(
            f"round {k}: selected {report['selected']:,} of {pool_size:,}; math domains "
            f"{report['math_domains']}; +{len(new)} seed pages{' (resumed)' if resumed else ''}"
        )
        if not new:
            break
    rejected = count_rejects(read)
    (out / "report.json").write_text(
        json.dumps({"rounds": reports, "rejected": rejected}, indent=2) + "\n"
    )
    return reports
