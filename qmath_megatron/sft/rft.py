"""Rejection-sampling fine-tuning data: ``qmath data rft``.

For each problem, ``n`` responses are sampled through the engine interface (vLLM on GPU,
transformers on CPU; in TIR mode through the evaluation's TIR loop, code run in the
sandbox), prompted exactly as evaluation prompts (:func:`qmath_megatron.tokenizer.chat.
build_prompt`), and their final answers extracted and compared with the shared checker
(:mod:`qmath_megatron.rewards`). Only responses that finished (``finish_reason ==
"stop"``: an end of turn, not the length limit or the TIR execution cap) are eligible.

Selection (pure functions below, shapes in their docstrings):

- **with a reference answer**: the correct responses, ranked by reward-model score
  (highest first; by sample index without ``--scorer``), then greedily kept when not a
  near-duplicate of one already kept, up to ``k``;
- **without one**: a weighted majority vote over the equivalence classes of the extracted
  answers (answers with the same normalised string, or that the checker finds equivalent,
  share a class). A response's vote weight is ``sigmoid(score)`` with ``--scorer`` (reward
  models output unbounded logits; the sigmoid keeps every vote positive and at most 1, so
  a class's weight never falls as it gains members; departure from "weight = score"),
  ``1`` otherwise; NaN scores weigh 0. The class with the largest total weight wins; ties
  go to the class with more members, then to the one whose first member was sampled
  first (the evaluation's maj@k rule). The winning class's responses are then ranked and
  kept as above.

Near-duplicates ("distinct by reasoning path"): two responses are near-duplicates when
the Jaccard similarity of their sets of word 3-grams (lower-cased; words and single
punctuation marks as tokens) is at least ``max_similarity`` (default 0.7). Responses that
differ only in wording of a few steps are dropped; different derivations of the same
answer are kept.

Output (``OUT/sft/<input name>.jsonl``): one SFT chat record per kept response, ready for
``qmath data sft-prepare --mode MODE``: ``messages`` = [system (the mode's prompt), user
(the problem), assistant (the response, TIR output blocks included: sft-prepare masks
them)] and provenance: ``problem_id``, ``sample_index``, ``answer``, ``reference``,
``correct`` (None without a reference), ``voted`` (True when chosen by the vote, None with a
reference), ``votes`` / ``vote_weight`` of the chosen class, ``score`` (the RM score, None
without ``--scorer``), ``mode``, ``source``, ``line``. Problems with no kept response go to
``OUT/unsolved/`` (with the answers seen), unreadable lines to ``OUT/rejects/``: every input
line ends in exactly one of the three. ``OUT/groups/`` holds, once more, every problem with
a reference and all its ``n`` responses labelled by the verifier (``{"prompt", "responses":
[{"text", "correct", "finished"}], ...}``): the input of ``qmath data rm-prepare`` (the
reward model is trained on the SFT model's own samples). Resumable per shard through
:mod:`qmath_megatron.data.shards` (a rerun with other settings is refused unless
``--overwrite``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from qmath_megatron.data.readers import Reject
from qmath_megatron.data.shards import (
    STATE_DIR,
    ShardJob,
    discover,
    output_lock,
    path_fingerprint,
    plan,
    refuse_inputs_as_outputs,
)
from qmath_megatron.evaluation.config import EvalModelConfig
from qmath_megatron.evaluation.tir import run_tir
from qmath_megatron.inference.engine import request_seed, resolve_engine_backend
from qmath_megatron.inference.progress import ShardProgress
from qmath_megatron.inference.sampling import CLI_KEYS, SamplingConfig, sample_problems
from qmath_megatron.rewards import AnswerChecker, normalize_answer
from qmath_megatron.rewards.extract import extract_answer, reference_answer
from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor
from qmath_megatron.tokenizer import chat

# --------------------------------------------------------------------------- selection

_TOKEN = re.compile(r"\w+|[^\w\s]")


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """Word ``n``-grams of ``text`` (lower-cased; words and punctuation marks as tokens)."""
    tokens = _TOKEN.findall(text.lower())
    if len(tokens) < n:
        return frozenset([tuple(tokens)])
    return frozenset(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the word 3-gram sets of ``a`` and ``b`` (1.0: same path)."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def distinct_top(
    ranked: Sequence[int], texts: Sequence[str], k: int, max_similarity: float
) -> list[int]:
    """Up to ``k`` of ``ranked`` (indices into ``texts``, best first), each kept only when
    its similarity to every one kept before is below ``max_similarity``."""
    kept: list[int] = []
    sets: list[frozenset] = []
    for i in ranked:
        if len(kept) == k:
            break
        s = shingles(texts[i])
        if all(len(s & t) / len(s | t) < max_similarity for t in sets):
            kept.append(i)
            sets.append(s)
    return kept


def rank(indices: Sequence[int], scores: Sequence[float] | None) -> list[int]:
    """``indices`` best first: by score (NaN lowest), then by sample index; by sample
    index alone without scores."""
    if scores is None:
        return sorted(indices)
    return sorted(indices, key=lambda i: (-_finite(scores[i]), i))


def _finite(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def vote_weights(scores: Sequence[float] | None, n: int) -> list[float]:
    """[n] vote weights: ``sigmoid(score)`` (NaN: 0), or 1 each without scores."""
    if scores is None:
        return [1.0] * n
    return [
        0.0 if math.isnan(s) else 1.0 / (1.0 + math.exp(-max(min(s, 60.0), -60.0))) for s in scores
    ]


def weighted_vote(classes: Sequence[int | None], weights: Sequence[float]) -> int | None:
    """The winning class label of ``classes`` ([n] labels, None = no answer, no vote) under
    ``weights`` ([n]): largest total weight; ties to more members, then to the class whose
    first member comes first. None when no response has an answer."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, (label, w) in enumerate(zip(classes, weights, strict=True)):
        if label is None:
            continue
        total[label] = total.get(label, 0.0) + w
        count[label] = count.get(label, 0) + 1
        first.setdefault(label, i)
    if not total:
        return None
    return min(total, key=lambda c: (-total[c], -count[c], first[c]))


def answer_classes(answers: Sequence[str | None], checker: Any) -> list[int | None]:
    """[n] class labels (the index of the class's first member) of ``answers``: equal
    normalised strings share a class; other pairs of classes are merged when ``checker``
    (``equivalent_many`` of the rewards' AnswerChecker) finds them equivalent."""
    by_key: dict[str, int] = {}
    labels: list[int | None] = []
    for i, a in enumerate(answers):
        labels.append(None if a is None else by_key.setdefault(normalize_answer(a), i))
    reps = sorted(set(by_key.values()))
    pairs = [(reps[x], reps[y]) for x in range(len(reps)) for y in range(x + 1, len(reps))]
    parent = {r: r for r in reps}

    def find(r: int) -> int:
        while parent[r] != r:
            r = parent[r]
        return r

    results = checker.equivalent_many([(answers[a], answers[b]) for a, b in pairs]) if pairs else []
    for (a, b), result in zip(pairs, results, strict=True):
        if result.equal:
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
    return [None if lab is None else find(lab) for lab in labels]


@dataclass
class Selection:
    """The responses kept for one problem and why."""

    kept: list[int]  # sample indices, best first
    voted_label: int | None = None  # the winning class (no reference)
    votes: int | None = None
    vote_weight: float | None = None
    reason: str = ""  # why nothing was kept: no_correct | no_answer


def select_with_reference(
    texts: Sequence[str],
    correct: Sequence[bool],
    finished: Sequence[bool],
    scores: Sequence[float] | None,
    k: int,
    max_similarity: float,
) -> Selection:
    """Up to ``k`` distinct correct finished responses, best score first ([n] inputs)."""
    eligible = [i for i in range(len(texts)) if correct[i] and finished[i]]
    kept = distinct_top(rank(eligible, scores), texts, k, max_similarity)
    return Selection(kept, reason="" if kept else "no_correct")


def select_by_vote(
    texts: Sequence[str],
    classes: Sequence[int | None],
    finished: Sequence[bool],
    scores: Sequence[float] | None,
    k: int,
    max_similarity: float,
) -> Selection:
    """Weighted majority vote over ``classes`` ([n]; unfinished responses do not vote), then
    up to ``k`` distinct members of the winning class, best score first."""
    voting = [c if f else None for c, f in zip(classes, finished, strict=True)]
    weights = vote_weights(scores, len(texts))
    winner = weighted_vote(voting, weights)
    if winner is None:
        return Selection([], reason="no_answer")
    members = [i for i, c in enumerate(voting) if c == winner]
    kept = distinct_top(rank(members, scores), texts, k, max_similarity)
    return Selection(kept, winner, len(members), round(sum(weights[i] for i in members), 6))


# --------------------------------------------------------------------------- the tool


@dataclass
class RFTConfig:
    problems: list[str]
    output: str
    model: str
    mode: str = "cot"
    n: int = 8
    k: int = 4
    scorer: str | None = None  # reward model (HF directory or qmath checkpoint)
    tokenizer: str | None = None  # needed for a Megatron checkpoint
    engine: str = "auto"
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 2048
    seed: int = 0
    batch_size: int = 8  # transformers engine: prompts per generate call
    dtype: str = "float32"  # transformers engine
    tensor_parallel_size: int = 1  # vLLM
    gpu_memory_utilization: float = 0.9  # vLLM
    max_similarity: float = 0.7
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str = "id"
    # A field holding a worked reference solution: added to the problem's reward-model group
    # as one more correct response (a group then has a positive even when the policy never
    # solves the problem; off by default: the report's RM data are the policy's samples).
    reference_solution_key: str | None = None
    chunk_problems: int = 512  # problems per engine call
    shard_mb: float = 1.0  # plain JSONL inputs are cut into shards of this size (resume unit)
    check_workers: int = 2
    check_timeout_s: float = 10.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.mode not in chat.MODES:
            raise ValueError(f"--mode must be one of {', '.join(chat.MODES)}, got {self.mode!r}")
        self.sampling()  # the shared sampling checks, in flag names
        if not 1 <= self.k <= self.n:
            raise ValueError(f"need n >= 1 and 1 <= k <= n (n={self.n}, k={self.k})")
        if not 0 < self.max_similarity <= 1:
            raise ValueError(f"--max-similarity must be in (0, 1], got {self.max_similarity}")
        if self.chunk_problems < 1 or self.shard_mb <= 0:
            raise ValueError("chunk_problems and shard_mb must be positive")
        if not str(self.output).strip():
            raise ValueError("--output must name a directory")

    def sampling(self) -> SamplingConfig:
        """``--n`` responses per problem (the seed is set per chunk of problems)."""
        return SamplingConfig.from_keys(
            CLI_KEYS,
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )


# sft / unsolved / rejects: every input line ends in exactly one. groups: every problem with
# a reference once more, all its responses labelled by the verifier (reward-model data).
KINDS = ("sft", "unsolved", "rejects", "groups")


def _generate(state: dict, problems: list[str], seed: int) -> list[list[tuple[str, bool]]]:
    """[P][n] (response text, finished) for the problems (TIR: the evaluation's loop)."""
    cfg: RFTConfig = state["cfg"]
    tir = partial(run_tir, executor=state["executor"])
    groups = sample_problems(state["engine"], problems, cfg.mode, cfg.sampling(), seed, tir)
    return [[(c.text, c.finish_reason == "stop") for c in g] for g in groups]


def _process_chunk(
    state: dict, chunk: list, seed: int, source: str, sft, unsolved, groups, stats: Counter
) -> None:
    cfg: RFTConfig = state["cfg"]
    problems = [r.text for r in chunk]
    responses = _generate(state, problems, seed)
    texts = [[t for t, _ in g] for g in responses]
    scores = state["scorer"].score(problems, texts) if state["scorer"] is not None else None
    answers = [[extract_answer(t) for t in g] for g in texts]
    refs = [reference_answer(r.obj, cfg.answer_key) for r in chunk]
    pairs = [(refs[p], a) for p in range(len(chunk)) if refs[p] is not None for a in answers[p]]
    verdicts = iter(state["checker"].equivalent_many(pairs) if pairs else [])
    for p, record in enumerate(chunk):
        finished = [f for _, f in responses[p]]
        sc = None if scores is None else [float(x) for x in scores[p]]
        if refs[p] is not None:
            correct = [next(verdicts).equal for _ in answers[p]]
            sel = select_with_reference(texts[p], correct, finished, sc, cfg.k, cfg.max_similarity)
            stats["with_reference"] += 1
            stats["correct_responses"] += sum(correct)
        else:
            correct = None
            classes = answer_classes(
                [a if f else None for a, f in zip(answers[p], finished)], state["checker"]
            )
            sel = select_by_vote(texts[p], classes, finished, sc, cfg.k, cfg.max_similarity)
            stats["without_reference"] += 1
        pid = str(record.obj.get(cfg.id_key, f"{source}:{record.line}"))
        if correct is not None:
            stats["groups"] += 1
            groups.write(
                json.dumps(
                    {
                        "prompt": record.text,
                        "responses": [
                            {"text": t, "correct": c, "finished": f}
                            for t, c, f in zip(texts[p], correct, finished, strict=True)
                        ]
                        + _reference_response(record.obj, cfg.reference_solution_key, stats),
                        "problem_id": pid,
                        "reference": refs[p],
                        "mode": cfg.mode,
                        "source": source,
                        "line": record.line,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        stats["responses"] += len(texts[p])
        stats["finished_responses"] += sum(finished)
        if not sel.kept:
            stats["unsolved"] += 1
            unsolved.write(
                json.dumps(
                    {
                        **record.obj,
                        "rft": {
                            "problem_id": pid,
                            "reason": sel.reason,
                            "answers": answers[p],
                            "finished": finished,
                            "correct": correct,
                            "scores": sc,
                        },
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            continue
        stats["problems_kept"] += 1
        stats["responses_kept"] += len(sel.kept)
        for i in sel.kept:
            row = {
                "messages": [
                    *chat.prompt_messages(record.text, cfg.mode),
                    {"role": "assistant", "content": texts[p][i]},
                ],
                "problem_id": pid,
                "sample_index": i,
                "answer": answers[p][i],
                "reference": refs[p],
                "correct": None if correct is None else correct[i],
                "voted": None if correct is not None else True,
                "votes": sel.votes,
                "vote_weight": sel.vote_weight,
                "score": None if sc is None else sc[i],
                "mode": cfg.mode,
                "source": source,
                "line": record.line,
            }
            sft.write(json.dumps(row, ensure_ascii=False) + "\n")


def _reference_response(row: dict, key: str | None, stats: Counter) -> list[dict]:
    """The row's reference solution as a correct response (``--reference-solution-key``)."""
    text = row.get(key) if key else None
    if not isinstance(text, str) or not text.strip():
        return []
    stats["reference_responses"] += 1
    return [{"text": text, "correct": True, "finished": True, "reference": True}]


def rft_shard(shard, out, state: dict) -> dict:
    """One shard of problems: generate, check, select; write sft / unsolved / rejects."""
    cfg: RFTConfig = state["cfg"]
    stats: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    with (
        out.open("sft") as sft,
        out.open("unsolved") as unsolved,
        out.open("rejects") as rej,
        out.open("groups") as groups,
    ):
        chunk: list = []
        chunk_no = 0
        progress = ShardProgress(shard)

        def flush() -> None:
            nonlocal chunk_no
            if chunk:
                seed = request_seed(cfg.seed, shard.index * 100_003 + chunk_no)
                _process_chunk(state, chunk, seed, shard.file.rel, sft, unsolved, groups, stats)
                state["log"](
                    f"  {shard.name}: {stats['problems']:,} problems, "
                    f"{stats['problems_kept']:,} kept, {stats['responses_kept']:,} responses"
                    + progress.status(stats["problems"], chunk[-1])
                )
                chunk.clear()
                chunk_no += 1

        for item in shard.records([cfg.problem_key]):
            if isinstance(item, Reject):
                rejected[item.reason] += 1
                rej.write(item.to_json() + "\n")
                continue
            stats["problems"] += 1
            chunk.append(item)
            if len(chunk) >= cfg.chunk_problems:
                flush()
        flush()
    return {**{k: stats.get(k, 0) for k in _COUNTS}, "rejected": dict(rejected)}


_COUNTS = (
    "problems",
    "with_reference",
    "without_reference",
    "problems_kept",
    "unsolved",
    "responses",
    "finished_responses",
    "correct_responses",
    "responses_kept",
    "groups",
    "reference_responses",
)


def _state(cfg: RFTConfig, engine, scorer, checker, executor, log) -> dict:
    return {
        "cfg": cfg,
        "engine": engine,
        "scorer": scorer,
        "checker": checker,
        "executor": executor,
        "log": log,
    }


def run_rft(
    cfg: RFTConfig, *, engine=None, scorer=None, checker=None, executor=None, log=None
) -> dict:
    """Run (or resume) ``qmath data rft``; returns the report (also ``OUT/report.json``).

    ``engine`` (with ``.tokenizer``), ``scorer`` (a ``RewardScorer``), ``checker`` (an
    ``AnswerChecker``-like ``equivalent_many``) and ``executor`` (TIR sandbox) can be
    injected; otherwise they are built from ``cfg``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    files = discover(cfg.problems)
    out = Path(cfg.output)
    # --overwrite clears OUT: an input inside it would be deleted before it is read.
    refuse_inputs_as_outputs([f.path for f in files], [out], dirs=[out])
    with output_lock(out):
        return _run_locked(cfg, files, engine, scorer, checker, executor, log)


def _run_locked(cfg: RFTConfig, files, engine, scorer, checker, executor, log) -> dict:
    start = time.time()
    shards = plan(files, chunk_bytes=int(cfg.shard_mb * 2**20))
    if engine is None and not Path(cfg.model).exists():
        raise FileNotFoundError(f"model not found: {cfg.model}")
    if scorer is None and cfg.scorer is not None and not Path(cfg.scorer).exists():
        raise FileNotFoundError(f"reward model not found: {cfg.scorer}")
    settings = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("problems", "output", "overwrite", "model", "scorer", "check_workers")
    }
    settings["model"] = path_fingerprint(cfg.model) if engine is None else f"injected:{cfg.model}"
    settings["scorer"] = (
        path_fingerprint(cfg.scorer)
        if cfg.scorer and scorer is None
        else (f"injected:{type(scorer).__name__}" if scorer is not None else None)
    )
    settings["system_prompt"] = chat.SYSTEM_PROMPTS[cfg.mode]
    out = Path(cfg.output)
    # --overwrite of earlier outputs builds in a directory beside OUT and swaps it in at the
    # end: a failed or killed rerun leaves them as they were (and a rerun resumes the build).
    staged = cfg.overwrite and any((out / name).exists() for name in _OUTPUT_NAMES)
    real = Path(os.path.abspath(out))
    build = real.with_name(f".{real.name}.overwrite") if staged else out
    job = ShardJob(
        "rft",
        build,
        KINDS,
        settings,
        overwrite=cfg.overwrite and not staged,
        extra_outputs=[build / "report.json"],
        log=log,
    )
    try:
        run = job.open(shards)
    except (ValueError, FileExistsError):
        if not staged:
            raise
        run = dataclasses.replace(job, overwrite=True).open(shards)  # another build's files
    todo = [s for s in shards if not run.is_done("rft", s)]
    own: list = []
    try:
        if todo:
            engine, scorer, checker, executor = _build(
                cfg, out, engine, scorer, checker, executor, own, log
            )
        state = _state(cfg, engine, scorer, checker, executor, log)
        results = run.map(
            "rft",
            rft_shard,
            workers=1,
            init=dict,  # read-only: a shallow copy is the same state
            init_args=(state,),
            describe=lambda s, r: (
                f"{r['problems_kept']:,}/{r['problems']:,} problems kept, "
                f"{r['responses_kept']:,} responses"
            ),
        )
    finally:
        for obj in own:
            obj.close()
    report: dict[str, Any] = {k: sum(r[k] for r in results) for k in _COUNTS}
    rejects: Counter[str] = Counter()
    for r in results:
        rejects.update(r["rejected"])
    report.update(
        rejected=sum(rejects.values()),
        rejects=dict(rejects),
        mode=cfg.mode,
        n=cfg.n,
        k=cfg.k,
        scorer=cfg.scorer,
        resumed_shards=run.resumed["rft"],
        sft_files=[str(out / run.path("sft", s).relative_to(build)) for s in shards],
        groups_files=[str(out / run.path("groups", s).relative_to(build)) for s in shards],
        seconds=round(time.time() - start, 2),
    )
    (build / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if staged:
        _swap_in(build, out)
    return report


# What a run writes in OUT (--overwrite replaces these, and only these).
_OUTPUT_NAMES = ("report.json", STATE_DIR, *KINDS)


def _swap_in(build: Path, out: Path) -> None:
    """Replace OUT's outputs by the complete ones in ``build``: the old report goes first
    and the new one comes last, so an interrupted swap never looks complete."""
    real = Path(os.path.abspath(out))
    trash = real.with_name(f".{real.name}.replaced")
    if trash.exists():
        shutil.rmtree(trash)
    trash.mkdir()
    for name in _OUTPUT_NAMES:
        if (out / name).exists():
            os.replace(out / name, trash / name)
    for name in reversed(_OUTPUT_NAMES):
        if (build / name).exists():
            os.replace(build / name, out / name)
    shutil.rmtree(build)
    shutil.rmtree(trash)


def _build(cfg: RFTConfig, out: Path, engine, scorer, checker, executor, own: list, log):
    """The engine, scorer, answer checker and sandbox not injected (closed by the caller)."""
    if engine is None:
        # evaluation.runner imports torch, and `qmath data rft --help` imports this module
        # (the flags come from RFTConfig): the engine's modules load when one is built.
        from qmath_megatron.evaluation.runner import make_eval_engine, resolve_model

        model_cfg = EvalModelConfig(
            path=cfg.model,
            tokenizer=cfg.tokenizer,
            engine=cfg.engine,
            batch_size=cfg.batch_size,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        model_dir, tok_dir = resolve_model(model_cfg, out, log)
        log(f"loading the {resolve_engine_backend(cfg.engine)} engine for {model_dir}")
        engine = make_eval_engine(model_cfg, model_dir, tok_dir)
    if not chat.has_chat_template(getattr(engine, "tokenizer", None)):
        raise ValueError("the engine's tokenizer has no chat template (RFT prompts use it)")
    if scorer is None and cfg.scorer is not None:
        from qmath_megatron.reward_model.scoring import load_scorer  # torch, as above

        scorer = load_scorer(cfg.scorer, mode=cfg.mode)
    if checker is None:
        checker = AnswerChecker(cfg.check_workers, cfg.check_timeout_s)
        own.append(checker)
    if executor is None and cfg.mode == "tir":
        executor = SandboxExecutor(SandboxConfig())
        own.append(executor)
        log(f"sandbox: {executor.isolation.backend} isolation")
    return engine, scorer, checker, executor
