"""Reward-model data: ``qmath data rm-prepare`` and the grouped dataset training reads.

Input: JSONL(.gz/.zst), one object per prompt::

    {"prompt": "...", "responses": [{"text": "...", "correct": true}, ...]}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "responses": [...]}

Each response becomes the conversation [prompt turns..., assistant response] (a ``prompt``
gets the CoT system prompt, as ``qmath rm score`` renders a prompt + response), rendered
with the chat template without generation prompt and tokenized without added special
tokens -- :func:`qmath_megatron.reward_model.rendering.encode_for_rm`, the functions scoring
uses, so training and scoring see the same token sequences.

Every input line ends in exactly one of (the report's counts add up to the line count):

- **kept**: a group with at least one positive and one negative response;
- **dropped** (``PREFIX.dropped.jsonl``, with the reason ``no_positive`` / ``no_negative``):
  a valid group without a pair to train on (the report drops these); responses longer than
  ``--seq-length`` are removed from their group first (counted as ``responses_too_long``);
- **rejected** (``PREFIX.rejects.jsonl``, with a reason from :data:`RM_REJECT_REASONS`).

On-disk layout at ``PREFIX``:

- ``PREFIX.bin/.idx``: a Megatron indexed dataset; each *sequence* is one response's
  token ids, each *document* one group (prompt), in input order;
- ``PREFIX.labels.npy``: uint8 per sequence, 1 for a correct response;
- ``PREFIX.report.json``: format/version, tokenizer, seq_length, counts. Written last: a
  dataset without it is incomplete.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qmath_megatron.data.chat_prepare import (
    LINE_REJECT_REASONS,
    LineError,
    Where,
    check_prepare_args,
    existing_outputs,
    find_control_token,
    iter_input_lines,
    parse_line,
    reject_entry,
)
from qmath_megatron.data.indexed import read_dataset_report, validate_indexed_dataset
from qmath_megatron.data.readers import DEFAULT_MAX_LINE_BYTES, expand_inputs
from qmath_megatron.data.shards import output_lock, refuse_inputs_as_outputs, remove_stale_partials
from qmath_megatron.reward_model.rendering import render_for_rm, tokenize_for_rm
from qmath_megatron.tokenizer import chat
from qmath_megatron.tokenizer.qwen import load_tokenizer

FORMAT = "qmath-rm-groups"
VERSION = 1
REPORT_SUFFIX = ".report.json"
LABELS_SUFFIX = ".labels.npy"

RM_REJECT_REASONS: tuple[str, ...] = (
    *LINE_REJECT_REASONS,  # the shared ones (a blank line is "empty")
    "missing_prompt",  # neither a string `prompt` nor a `messages` list
    # bad_message: `messages` malformed (roles, content), not ending in a user turn, or a
    # control token in the prompt
    "bad_message",
    "missing_responses",  # no non-empty `responses` list
    # bad_response: not {"text": str, "correct": bool}, a control token in the text, or the
    # same text as another response with the opposite label
    "bad_response",
    "unrenderable",  # the chat template failed on the conversation
)
DROP_REASONS: tuple[str, ...] = ("no_positive", "no_negative")


class GroupError(LineError):
    """A line that cannot become a group; ``reason`` is one of :data:`RM_REJECT_REASONS`."""


def parse_group(obj: object, mode: str = "cot") -> tuple[list[dict], list[str], list[bool]]:
    """(prompt turns, response texts, correct flags) of one input object, or
    :class:`GroupError` with a reason from :data:`RM_REJECT_REASONS`."""
    if not isinstance(obj, dict):
        raise GroupError("not_an_object", "the line is not a JSON object")
    if "messages" in obj:
        try:
            prompt = chat.check_messages(obj["messages"])
        except ValueError as exc:
            raise GroupError("bad_message", str(exc)) from None
        if prompt[-1]["role"] != "user":
            raise GroupError("bad_message", "`messages` (the prompt) must end with a user turn")
    elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        prompt = chat.prompt_messages(obj["prompt"], mode)
    else:
        raise GroupError("missing_prompt", "needs a non-empty string `prompt` or `messages`")
    for i, m in enumerate(prompt):
        # Rendered as the real special token, it would fake a turn boundary.
        found = find_control_token(m["content"])
        if found is not None:
            raise GroupError("bad_message", f"prompt turn {i} contains the control token {found}")
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses:
        raise GroupError("missing_responses", "`responses` must be a non-empty list")
    texts, labels = [], []
    for i, r in enumerate(responses):
        if not (
            isinstance(r, dict)
            and isinstance(r.get("text"), str)
            and isinstance(r.get("correct"), bool)
        ):
            raise GroupError(
                "bad_response", f"response {i} is not {{'text': str, 'correct': bool}}"
            )
        found = find_control_token(r["text"])
        if found is not None:
            raise GroupError("bad_response", f"response {i} contains the control token {found}")
        texts.append(r["text"])
        labels.append(r["correct"])
    # The same text both correct and wrong: the pair would train the model on noise.
    first: dict[tuple[str, bool], int] = {}
    for i, key in enumerate(zip(texts, labels, strict=True)):
        first.setdefault(key, i)
        j = first.get((key[0], not key[1]))
        if j is not None:
            raise GroupError(
                "bad_response", f"responses {j} and {i} are the same text with opposite labels"
            )
    return prompt, texts, labels


# --------------------------------------------------------------------------- the dataset


class RMGroup(NamedTuple):
    """One prompt's responses: token ids (int64 arrays) and correct flags (bool ``[n]``)."""

    sequences: list[np.ndarray]
    correct: np.ndarray


def read_report(prefix: str | Path) -> dict:
    """The checked ``PREFIX.report.json`` of an RM dataset."""
    return read_dataset_report(
        prefix,
        format=FORMAT,
        version=VERSION,
        suffix=REPORT_SUFFIX,
        missing="not an RM dataset, or rm-prepare did not finish",
    )


class RMGroupDataset:
    """Groups written by ``qmath data rm-prepare``; item ``i`` is group ``i`` (:class:`RMGroup`)."""

    def __init__(self, prefix: str | Path):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.report = read_report(self.prefix)
        for suffix in (".bin", ".idx", LABELS_SUFFIX):
            if not Path(self.prefix + suffix).is_file():
                raise FileNotFoundError(f"{self.prefix}{suffix} not found")
        # As SFT's: a .bin shorter than its .idx fails here, naming the file, not at the
        # step that first reads its end.
        validate_indexed_dataset(self.prefix)
        try:
            self.tokens = IndexedDataset(self.prefix, mmap=True)
        except Exception as exc:  # megatron raises assertion/struct errors on bad files
            raise ValueError(
                f"{self.prefix}.idx/.bin: not a readable indexed dataset ({exc})"
            ) from None
        self.labels = np.load(self.prefix + LABELS_SUFFIX)
        if len(self.labels) != len(self.tokens):
            raise ValueError(
                f"{self.prefix}{LABELS_SUFFIX} has {len(self.labels)} labels for "
                f"{len(self.tokens)} sequences"
            )
        self._docs = self.tokens.document_indices
        self.seq_length = int(self.report["seq_length"])
        self.pad_id = int(self.report["pad_id"])

    def __len__(self) -> int:
        return len(self._docs) - 1

    def __getitem__(self, index: int) -> RMGroup:
        if not -len(self) <= index < len(self):
            raise IndexError(f"group {index} out of range ({len(self)})")
        index %= len(self)
        lo, hi = int(self._docs[index]), int(self._docs[index + 1])
        seqs = [np.asarray(self.tokens[i], dtype=np.int64) for i in range(lo, hi)]
        return RMGroup(seqs, self.labels[lo:hi].astype(bool))

    @property
    def max_group_size(self) -> int:
        return int(np.diff(self._docs).max()) if len(self) else 0


# --------------------------------------------------------------------------- rm-prepare


@dataclass
class RMPrepareConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    seq_length: int = 4096
    mode: str = "cot"  # system prompt of `prompt` rows
    overwrite: bool = False
    batch_size: int = 64  # groups tokenized per call
    # A line of more bytes (16 MiB by default; None: no limit) is rejected as line_too_long
    # before it is parsed, its rejects entry holding only its first bytes: one huge line
    # would otherwise cost minutes and gigabytes to parse and render.
    max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES
    # A truncated/corrupt .gz/.zst input: an error by default; True keeps the lines read
    # before the cut and rejects the rest as one truncated_input line.
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        check_prepare_args(
            self.inputs, self.output_prefix, self.seq_length, self.mode, self.max_line_bytes
        )

    def path(self, suffix: str) -> Path:
        return Path(self.output_prefix + suffix)

    def dataset_paths(self) -> list[Path]:
        return [self.path(s) for s in (".bin", ".idx", LABELS_SUFFIX, REPORT_SUFFIX)]

    def side_paths(self) -> list[Path]:
        """The dropped and rejects files (also written by a run that keeps no group)."""
        return [self.path(s) for s in (".dropped.jsonl", ".rejects.jsonl")]

    def output_paths(self) -> list[Path]:
        return [*self.dataset_paths(), *self.side_paths()]


class _Run:
    def __init__(
        self, cfg: RMPrepareConfig, tokenizer: Any, builder: Any, dropped_out, rejects_out
    ):
        self.cfg, self.tokenizer, self.builder = cfg, tokenizer, builder
        self.dropped_out, self.rejects_out = dropped_out, rejects_out
        self.rejects: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.lines = self.kept = self.responses = self.too_long = self.tokens = 0
        self.pos = self.neg = 0
        self.labels: list[np.ndarray] = []
        self.pending: list[tuple[tuple, list[dict], list[str], list[bool]]] = []

    def _write(self, out, where: Where, reason: str, detail: str, raw_bytes: int = -1) -> None:
        entry = reject_entry(where, LineError(reason, detail, raw_bytes), offset=False)
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def add_rejected(self, where: Where, error: LineError) -> None:
        """A line rejected before it is parsed (too long, a truncated input's rest)."""
        self.lines += 1
        self.rejects[error.reason] += 1
        self._write(self.rejects_out, where, error.reason, str(error), error.raw_bytes)

    def add(self, where: Where) -> None:
        self.lines += 1
        try:
            prompt, texts, labels = parse_group(parse_line(where[3], GroupError), self.cfg.mode)
        except GroupError as err:
            self.rejects[err.reason] += 1
            self._write(self.rejects_out, where, err.reason, str(err))
            return
        self.pending.append((where, prompt, texts, labels))
        if len(self.pending) >= self.cfg.batch_size:
            self.flush()

    def flush(self) -> None:
        texts, owners, ok = [], [], []
        for k, (where, prompt, responses, _) in enumerate(self.pending):
            try:
                rendered = [
                    render_for_rm(self.tokenizer, [*prompt, {"role": "assistant", "content": r}])
                    for r in responses
                ]
            except Exception as exc:
                self.rejects["unrenderable"] += 1
                self._write(self.rejects_out, where, "unrenderable", str(exc))
                continue
            ok.append(k)
            texts += rendered
            owners += [k] * len(rendered)
        ids = tokenize_for_rm(self.tokenizer, texts)
        by_group: dict[int, list[list[int]]] = {}
        for k, seq in zip(owners, ids, strict=True):
            by_group.setdefault(k, []).append(seq)
        for k in ok:
            where, _, _, labels = self.pending[k]
            keep = [
                (s, c)
                for s, c in zip(by_group[k], labels, strict=True)
                if len(s) <= self.cfg.seq_length
            ]
            self.too_long += len(labels) - len(keep)
            n_pos = sum(c for _, c in keep)
            if n_pos == 0 or n_pos == len(keep):
                reason = "no_positive" if n_pos == 0 else "no_negative"
                self.dropped[reason] += 1
                self._write(
                    self.dropped_out,
                    where,
                    reason,
                    f"{n_pos} positive(s) of {len(keep)} usable response(s)",
                )
                continue
            seqs = [np.asarray(s, dtype=np.int64) for s, _ in keep]
            self.builder.add_document(np.concatenate(seqs), [len(s) for s in seqs])
            self.labels.append(np.asarray([c for _, c in keep], dtype=np.uint8))
            self.kept += 1
            self.responses += len(keep)
            self.pos += n_pos
            self.neg += len(keep) - n_pos
            self.tokens += sum(len(s) for s in seqs)
        self.pending.clear()


def prepare_rm(cfg: RMPrepareConfig) -> dict:
    """``qmath data rm-prepare``: returns the report also written to ``PREFIX.report.json``.

    Outputs are built under temporary names; an earlier dataset (``--overwrite``) is
    replaced only once the new one is complete, so a run that fails or is killed leaves it
    as it was. One run at a time per output prefix (a lock). A run that keeps no group
    writes no dataset, only the dropped and rejects files saying why (unless an earlier
    dataset is kept); those files without their dataset are no earlier output: the next run
    replaces them without ``--overwrite``.
    """
    files = expand_inputs(cfg.inputs)
    refuse_inputs_as_outputs(files, cfg.output_paths())
    if not Path(cfg.output_prefix).parent.is_dir():
        raise FileNotFoundError(f"output directory {Path(cfg.output_prefix).parent} does not exist")
    with output_lock(cfg.output_prefix):
        remove_stale_partials(cfg.output_prefix)  # left by killed runs (their pid is gone)
        return _prepare_rm_locked(cfg, files)


def _prepare_rm_locked(cfg: RMPrepareConfig, files: list[Path]) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.time()
    existing = [str(p) for p in existing_outputs(cfg.dataset_paths(), cfg.side_paths())]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the dataset")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if not chat.has_chat_template(tokenizer):
        raise ValueError(f"the tokenizer at {cfg.tokenizer} has no chat template")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    token_dtype = np.dtype(DType.optimal_dtype(len(tokenizer)))
    tmp = f"{cfg.output_prefix}.partial-{os.getpid()}"
    suffixes = (".bin", ".idx", LABELS_SUFFIX, ".dropped.jsonl", ".rejects.jsonl", REPORT_SUFFIX)
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=token_dtype.type)
        with (
            open(tmp + ".dropped.jsonl", "w", encoding="utf-8") as dropped_out,
            open(tmp + ".rejects.jsonl", "w", encoding="utf-8") as rejects_out,
        ):
            run = _Run(cfg, tokenizer, builder, dropped_out, rejects_out)
            for where, error in iter_input_lines(
                files, max_line_bytes=cfg.max_line_bytes, allow_truncated=cfg.allow_truncated
            ):
                if error is None:
                    run.add(where)
                else:
                    run.add_rejected(where, error)
            run.flush()
        builder.finalize(tmp + ".idx")
        if not run.kept:
            if not existing:  # nothing to keep: the dropped and rejects files say why
                for side in (".dropped.jsonl", ".rejects.jsonl"):
                    os.replace(tmp + side, cfg.output_prefix + side)
            raise ValueError(
                f"no usable group in {len(files)} input file(s) ({run.lines} lines; dropped "
                f"{dict(run.dropped)}, rejects {dict(run.rejects)}); "
                + (
                    f"see {cfg.output_prefix}.rejects.jsonl and .dropped.jsonl"
                    if not existing
                    else "the earlier dataset is kept"
                )
            )
        labels = np.concatenate(run.labels)
        with open(tmp + LABELS_SUFFIX, "wb") as f:
            np.save(f, labels)
        rejected, dropped = sum(run.rejects.values()), sum(run.dropped.values())
        if run.kept + dropped + rejected != run.lines:  # every line ends in exactly one place
            raise RuntimeError(
                f"{run.lines} lines but {run.kept} kept + {dropped} dropped + {rejected} rejected"
            )
        report = {
            "format": FORMAT,
            "version": VERSION,
            "output_prefix": cfg.output_prefix,
            "inputs": [str(f) for f in files],
            "tokenizer": str(Path(cfg.tokenizer).resolve()),
            "vocab_size": len(tokenizer),
            "pad_id": int(pad_id),
            "token_dtype": token_dtype.name,
            "mode": cfg.mode,
            "seq_length": cfg.seq_length,
            "max_line_bytes": cfg.max_line_bytes,
            "allow_truncated": cfg.allow_truncated,
            "lines": run.lines,
            "kept": run.kept,
            "dropped": dropped,
            "dropped_by_reason": {r: run.dropped.get(r, 0) for r in DROP_REASONS},
            "rejected": rejected,
            "rejects": {r: run.rejects.get(r, 0) for r in RM_REJECT_REASONS},
            "responses": run.responses,
            "positives": run.pos,
            "negatives": run.neg,
            "responses_too_long": run.too_long,
            "tokens": run.tokens,
            "max_group_size": int(max(len(x) for x in run.labels)),
            "seconds": round(time.time() - start, 3),
        }
        with open(tmp + REPORT_SUFFIX, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        # Everything new is complete: replace the old dataset, its report first (an
        # interrupted swap never looks complete) and the new report last.
        cfg.path(REPORT_SUFFIX).unlink(missing_ok=True)
        for suffix in suffixes:
            os.replace(tmp + suffix, cfg.output_prefix + suffix)
    finally:
        for suffix in suffixes:
            Path(tmp + suffix).unlink(missing_ok=True)
    return report
