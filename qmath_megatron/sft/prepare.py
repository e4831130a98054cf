"""``qmath data sft-prepare``: chat conversations -> loss-masked token sequences -> a
packed indexed dataset (its layout, and how training reads it: :mod:`qmath_megatron.sft.dataset`).

Loss mask (``qmath data sft-prepare``)
    A conversation (``messages``: system/user/assistant turns) is rendered with the chat
    template (:mod:`qmath_megatron.tokenizer.chat`, the code evaluation and RL use) and
    tokenized once as a whole, as an engine tokenizes a prompt. A token is trained (mask 1)
    only when every character it covers belongs to an assistant turn's content or to the
    ``<|im_end|>`` that closes the turn (trained, as in standard SFT: it is how the model
    learns to stop). Mask 0: system and user turns, the template's role headers
    (``<|im_start|>assistant\\n``), the newline after ``<|im_end|>``, and in TIR mode the
    ```` ```output ```` blocks the interpreter wrote, from the ```` ```output ```` fence line
    through the closing ```` ``` ```` line
    (:func:`~qmath_megatron.tokenizer.chat.output_block_spans`). The model still learns to
    write code and close its block; it never learns to predict
    interpreter output. A conversation without a system turn gets the mode's system prompt
    (the one evaluation uses) unless ``default_system=False``, when the template's default
    applies. Every assistant turn of a multi-turn conversation is trained.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from qmath_megatron.data.indexed import write_index
from qmath_megatron.data.packing import pack_first_fit_decreasing, packing_stats
from qmath_megatron.data.readers import DEFAULT_MAX_LINE_BYTES, expand_inputs, input_format
from qmath_megatron.data.shards import (
    die_with_parent,
    output_lock,
    refuse_inputs_as_outputs,
    remove_stale_partials,
)
from qmath_megatron.data.tokenize import optimal_dtype
from qmath_megatron.sft.dataset import FORMAT, LOSS_MASK_SUFFIX, REPORT_SUFFIX, VERSION
from qmath_megatron.tokenizer import chat
from qmath_megatron.tokenizer.qwen import load_tokenizer

# Reasons an input line is rejected: the shared ones (a blank line is "empty") and those
# of conversations.
SFT_REJECT_REASONS: tuple[str, ...] = (
    *LINE_REJECT_REASONS,
    "missing_messages",  # no `messages` list
    # bad_message: not {role: system|user|assistant, content: str}, a late system turn, a
    # control token in the text, an empty or whitespace-only assistant turn
    "bad_message",
    "no_assistant_turn",  # nothing to train on
    "unclosed_output_block",  # TIR: a ```output block without its closing fence
    "unrenderable",  # the chat template does not render the turns as expected
    "too_long",  # more tokens than --seq-length (or nothing trainable left after --truncate)
)


class SampleError(LineError):
    """A conversation that cannot become an SFT sample; ``reason`` is one of
    :data:`SFT_REJECT_REASONS` (picklable: worker processes return rejects)."""


# --------------------------------------------------------------------------- loss masks


def conversation_char_mask(
    tokenizer: Any, obj: object, mode: str, *, default_system: bool = True
) -> tuple[str, np.ndarray]:
    """(rendered text, bool per character: True where trained) of one chat record."""
    if mode not in chat.MODES:
        raise ValueError(f"unknown SFT mode {mode!r} (cot, tir)")
    if not isinstance(obj, dict):
        raise SampleError("not_an_object", "the line is not a JSON object")
    if not isinstance(obj.get("messages"), list):
        raise SampleError("missing_messages", "no `messages` list")
    try:
        messages = chat.check_messages(obj["messages"])
    except ValueError as exc:
        raise SampleError("bad_message", str(exc)) from None
    for i, m in enumerate(messages):
        # A control token inside a turn would end or open a turn mid-text (an assistant
        # `<|im_end|>` in the content would teach the model to stop there).
        found = find_control_token(m["content"])
        if found is not None:
            raise SampleError("bad_message", f"message {i} contains the control token {found}")
        # An empty turn would train only its `<|im_end|>`: the model learns to stop at once.
        if m["role"] == "assistant" and not m["content"].strip():
            raise SampleError("bad_message", f"message {i} is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no_assistant_turn", "no assistant turn")
    if default_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": chat.SYSTEM_PROMPTS[mode]})
    try:
        text, spans = chat.assistant_spans(tokenizer, messages)
    except ValueError as exc:
        raise SampleError("unrenderable", str(exc)) from None
    trained = np.zeros(len(text), dtype=bool)
    for index, start, end in spans:
        trained[start:end] = True
        if mode == "tir":
            try:
                blocks = chat.output_block_spans(messages[index]["content"])
            except ValueError as exc:
                raise SampleError("unclosed_output_block", f"message {index}: {exc}") from None
            for a, b in blocks:
                trained[start + a : start + b] = False
    return text, trained


def token_mask(offsets: Sequence[tuple[int, int]], trained: np.ndarray) -> np.ndarray:
    """uint8 per token: 1 when every character of the token is trained.

    A token that straddles a trained and an untrained character (e.g. a byte-level merge
    across the edge of an output block) is not trained: no untrained character is ever a
    target. ``offsets``: the tokenizer's character offsets, which must cover the text.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(off) and (
        np.any(off[:, 1] <= off[:, 0]) or off[0, 0] != 0 or off[-1, 1] != len(trained)
    ):
        raise ValueError("the tokenizer's offsets do not cover the text (a slow tokenizer?)")
    untrained = np.concatenate([[0], np.cumsum(~trained, dtype=np.int64)])
    return (untrained[off[:, 1]] == untrained[off[:, 0]]).astype(np.uint8)


def encode_many(
    tokenizer: Any, texts: Sequence[str]
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, character offsets) of each text: the fast tokenizer, batched."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("sft-prepare needs a fast (tokenizer.json) tokenizer for offsets")
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


def encode_conversation(
    tokenizer: Any, obj: object, mode: str, *, default_system: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 token ids, uint8 loss mask) of one chat record (:class:`SampleError` if bad)."""
    text, trained = conversation_char_mask(tokenizer, obj, mode, default_system=default_system)
    ((ids, offsets),) = encode_many(tokenizer, [text])
    return np.asarray(ids, dtype=np.int64), token_mask(offsets, trained)


# --------------------------------------------------------------------------- sft-prepare


@dataclass
class SFTPrepareConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    seq_length: int = 4096
    mode: str = "cot"
    truncate: bool = False  # over-long samples: cut to seq_length instead of rejecting
    default_system: bool = True  # add the mode's system prompt to conversations without one
    rejects_file: str | None = None  # default PREFIX.rejects.jsonl
    overwrite: bool = False
    batch_size: int = 256  # conversations tokenized per call
    workers: int = 1  # processes rendering and tokenizing (the output does not depend on it)
    # A line of more bytes (16 MiB by default; None: no limit) is rejected as line_too_long
    # before it is parsed, its rejects entry holding only its first bytes: one huge line
    # would otherwise cost minutes and gigabytes before failing as too long.
    max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES
    # A truncated/corrupt .gz/.zst input: an error by default; True keeps the lines read
    # before the cut and rejects the rest as one truncated_input line.
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        check_prepare_args(
            self.inputs, self.output_prefix, self.seq_length, self.mode, self.max_line_bytes
        )
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError(
                f"batch_size and --workers must be >= 1, got {self.batch_size}, {self.workers}"
            )

    @property
    def rejects_path(self) -> Path:
        return Path(self.rejects_file or f"{self.output_prefix}.rejects.jsonl")

    def dataset_paths(self) -> list[Path]:
        p = self.output_prefix
        return [
            Path(p + s)
            for s in (
                ".bin",
                ".idx",
                f"{LOSS_MASK_SUFFIX}.bin",
                f"{LOSS_MASK_SUFFIX}.idx",
                REPORT_SUFFIX,
            )
        ]

    def output_paths(self) -> list[Path]:
        return [*self.dataset_paths(), self.rejects_path]


class _SampleStore:
    """Accepted samples' tokens and masks appended to flat temporary files, so that
    packing (which needs every length first) never holds the corpus in memory."""

    def __init__(self, prefix: Path, token_dtype: np.dtype):
        self.paths = (Path(f"{prefix}.samples.tokens"), Path(f"{prefix}.samples.mask"))
        self.token_dtype = token_dtype
        self.files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 - closed in close()
        self.lengths: list[int] = []

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.files[0].write(ids.astype(self.token_dtype).tobytes())
        self.files[1].write(mask.astype(np.uint8).tobytes())
        self.lengths.append(len(ids))

    def close(self) -> None:
        for f in self.files:
            f.close()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.lengths:
            return np.zeros(0, self.token_dtype), np.zeros(0, np.uint8)
        return (
            np.memmap(self.paths[0], dtype=self.token_dtype, mode="r"),
            np.memmap(self.paths[1], dtype=np.uint8, mode="r"),
        )

    def remove(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)


def _write_packed(
    prefix: str,
    tokens: np.ndarray,
    masks: np.ndarray,
    lengths: np.ndarray,
    bins: list[list[int]],
    token_dtype: np.dtype,
) -> None:
    """Write the packs as Megatron indexed datasets (samples = sequences, packs = documents).

    Written with the project's NumPy writer (:func:`qmath_megatron.data.indexed.write_index`,
    byte-identical to megatron-core's ``IndexedDatasetBuilder``; a test compares them), so
    that the command does not import megatron-core (seconds on every run).
    """
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    order = [i for members in bins for i in members]
    with open(prefix + ".bin", "wb") as ft, open(prefix + LOSS_MASK_SUFFIX + ".bin", "wb") as fm:
        for i in order:
            a, b = int(starts[i]), int(starts[i + 1])
            ft.write(np.ascontiguousarray(tokens[a:b], dtype=token_dtype).tobytes())
            fm.write(np.ascontiguousarray(masks[a:b], dtype=np.uint8).tobytes())
    seq_lengths = np.asarray(lengths, dtype=np.int64)[order]
    documents = np.concatenate([[0], np.cumsum([len(m) for m in bins])]).astype(np.int64)
    write_index(prefix + ".idx", token_dtype, seq_lengths, documents)
    write_index(prefix + LOSS_MASK_SUFFIX + ".idx", np.uint8, seq_lengths, documents)


@dataclass(frozen=True)
class _Encoded:
    ids: np.ndarray
    mask: np.ndarray
    truncated: bool


def encode_lines(
    tokenizer: Any,
    raws: Sequence[bytes],
    mode: str,
    seq_length: int,
    *,
    truncate: bool = False,
    default_system: bool = True,
) -> list[_Encoded | SampleError]:
    """Each raw JSONL line as an encoded sample or the :class:`SampleError` rejecting it;
    tokenized in one batched call."""
    out: list[_Encoded | SampleError | None] = []
    pending: list[tuple[int, str, np.ndarray]] = []
    for raw in raws:
        try:
            text, trained = conversation_char_mask(
                tokenizer, parse_line(raw, SampleError), mode, default_system=default_system
            )
        except SampleError as err:
            out.append(err)
            continue
        pending.append((len(out), text, trained))
        out.append(None)
    encoded = encode_many(tokenizer, [text for _, text, _ in pending]) if pending else []
    for (slot, _, trained), (ids, offsets) in zip(pending, encoded, strict=True):
        try:
            mask = token_mask(offsets, trained)
        except ValueError as exc:
            out[slot] = SampleError("unrenderable", str(exc))
            continue
        ids = np.asarray(ids, dtype=np.int64)
        cut = False
        if len(ids) > seq_length:
            if not truncate:
                out[slot] = SampleError(
                    "too_long", f"{len(ids)} tokens > --seq-length {seq_length}"
                )
                continue
            ids, mask, cut = ids[:seq_length], mask[:seq_length], True
            if not mask.any():
                out[slot] = SampleError(
                    "too_long", f"no assistant token in the first {seq_length} tokens"
                )
                continue
        out[slot] = _Encoded(ids, mask, cut)
    return out  # type: ignore[return-value]


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_dir: str, parent_pid: int) -> None:
    # A killed sft-prepare must not leave its workers (each holds a tokenizer) behind.
    die_with_parent(parent_pid)
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_dir)


def _worker_encode(raws: list[bytes], settings: dict) -> list:
    return encode_lines(_WORKER["tokenizer"], raws, **settings)


class _Preparer:
    """One sft-prepare run: lines -> samples (in a :class:`_SampleStore`) or rejects.

    Lines are encoded in batches of ``batch_size``, in this process or, with ``workers >
    1``, in worker processes (a window of ``2 * workers`` batches at a time, results taken
    in input order, so the output does not depend on the worker count)."""

    def __init__(self, cfg: SFTPrepareConfig, tokenizer: Any, store: _SampleStore, rejects_out):
        self.cfg, self.tokenizer, self.store, self.rejects_out = cfg, tokenizer, store, rejects_out
        self.rejects: Counter[str] = Counter()
        self.lines = self.truncated = self.trained_tokens = 0
        # (where, None) to encode, or (where, error) for a line rejected before parsing,
        # kept in the batch so the rejects file stays in input order for any --workers.
        self.batch: list[tuple[Where, LineError | None]] = []
        self.window: list[list[tuple[Where, LineError | None]]] = []
        self.settings = {
            "mode": cfg.mode,
            "seq_length": cfg.seq_length,
            "truncate": cfg.truncate,
            "default_system": cfg.default_system,
        }
        self.pool = None
        if cfg.workers > 1:
            self.pool = cf.ProcessPoolExecutor(
                cfg.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
                initargs=(cfg.tokenizer, os.getpid()),
            )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def reject(self, where: Where, err: LineError) -> None:
        self.rejects[err.reason] += 1
        self.rejects_out.write(json.dumps(reject_entry(where, err), ensure_ascii=False) + "\n")

    def add_line(self, where: Where, error: LineError | None = None) -> None:
        self.lines += 1
        self.batch.append((where, error))
        if len(self.batch) >= self.cfg.batch_size:
            self.window.append(self.batch)
            self.batch = []
            if len(self.window) >= 2 * max(self.cfg.workers, 1) or self.pool is None:
                self.flush()

    def flush(self) -> None:
        """Encode the pending batches; keep or reject each line, in input order."""
        if self.batch:
            self.window.append(self.batch)
            self.batch = []
        if not self.window:
            return
        raws = [[w[3] for w, error in batch if error is None] for batch in self.window]
        if self.pool is None:
            results = [encode_lines(self.tokenizer, r, **self.settings) for r in raws]
        else:
            try:
                results = list(self.pool.map(_worker_encode, raws, [self.settings] * len(raws)))
            except cf.process.BrokenProcessPool:
                raise RuntimeError(
                    "an sft-prepare worker process died (killed by a signal, e.g. the "
                    "out-of-memory killer): try fewer --workers"
                ) from None
        for batch, encoded in zip(self.window, results, strict=True):
            items = iter(encoded)
            for where, error in batch:
                item = error if error is not None else next(items)
                if isinstance(item, LineError):
                    self.reject(where, item)
                    continue
                self.truncated += item.truncated
                self.trained_tokens += int(item.mask.sum())
                self.store.add(item.ids, item.mask)
        self.window = []


def prepare_sft(cfg: SFTPrepareConfig) -> dict:
    """``qmath data sft-prepare``: returns the report also written to ``PREFIX.report.json``.

    Every input line ends as exactly one packed sample or one line of the rejects file.
    Outputs are written under temporary names and renamed at the end, the report last; an
    earlier dataset (``--overwrite``) is replaced only then, so a run that fails or is
    killed leaves it as it was. One run at a time per output prefix (a lock). A run whose
    every line is rejected writes no dataset, only the rejects file saying why (unless an
    earlier dataset is kept); a rejects file without its dataset is no earlier output: the
    next run replaces it without ``--overwrite``.
    """
    files = expand_inputs(cfg.inputs)
    parquet = [str(f) for f in files if input_format(f) == "parquet"]
    if parquet:
        raise ValueError(f"{parquet[0]}: sft-prepare reads chat JSONL(.gz/.zst), not Parquet")
    refuse_inputs_as_outputs(files, cfg.output_paths())
    for directory in {Path(cfg.output_prefix).parent, cfg.rejects_path.parent}:
        if not directory.is_dir():
            raise FileNotFoundError(f"output directory {directory} does not exist")
    with output_lock(cfg.output_prefix):
        # Left by runs that were killed (their pid is gone): never read, only removed.
        remove_stale_partials(cfg.output_prefix)
        remove_stale_partials(cfg.rejects_path)
        return _prepare_sft_locked(cfg, files)


def _prepare_sft_locked(cfg: SFTPrepareConfig, files: list[Path]) -> dict:
    start_time = time.time()
    existing = [str(p) for p in existing_outputs(cfg.dataset_paths(), [cfg.rejects_path])]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the dataset")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if not chat.has_chat_template(tokenizer):
        raise ValueError(f"the tokenizer at {cfg.tokenizer} has no chat template")
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    token_dtype = np.dtype(optimal_dtype(len(tokenizer)))

    tmp = f"{cfg.output_prefix}.partial-{os.getpid()}"
    packed_suffixes = (".bin", ".idx", f"{LOSS_MASK_SUFFIX}.bin", f"{LOSS_MASK_SUFFIX}.idx")
    rejects_tmp = Path(f"{cfg.rejects_path}.partial-{os.getpid()}")
    store = None
    try:
        store = _SampleStore(Path(tmp), token_dtype)
        with rejects_tmp.open("w", encoding="utf-8") as rejects_out:
            run = _Preparer(cfg, tokenizer, store, rejects_out)
            try:
                for where, error in iter_input_lines(
                    files, max_line_bytes=cfg.max_line_bytes, allow_truncated=cfg.allow_truncated
                ):
                    run.add_line(where, error)
                run.flush()
            finally:
                run.close()
        store.close()
        lengths = np.asarray(store.lengths, dtype=np.int64)
        if not len(lengths):
            if not existing:  # nothing to keep: the rejects say why every line failed
                os.replace(rejects_tmp, cfg.rejects_path)
            raise ValueError(
                f"no usable SFT sample in {len(files)} input file(s) ({run.lines} lines; "
                f"rejects: {dict(run.rejects)}); "
                + (f"see {cfg.rejects_path}" if not existing else "the earlier dataset is kept")
            )
        bins = pack_first_fit_decreasing(lengths, cfg.seq_length)
        tokens, masks = store.arrays()
        _write_packed(tmp, tokens, masks, lengths, bins, token_dtype)
        stats = packing_stats(lengths, bins, cfg.seq_length)
        rejected = sum(run.rejects.values())
        if len(lengths) + rejected != run.lines:  # every line ends in exactly one place
            raise RuntimeError(f"{run.lines} lines but {len(lengths)} samples + {rejected} rejects")
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
            "truncate": cfg.truncate,
            "default_system": cfg.default_system,
            "max_line_bytes": cfg.max_line_bytes,
            "allow_truncated": cfg.allow_truncated,
            "packing": "first_fit_decreasing",
            "lines": run.lines,
            "samples": len(lengths),
            "rejected": rejected,
            "rejects": {r: run.rejects.get(r, 0) for r in SFT_REJECT_REASONS},
            "rejects_file": str(cfg.rejects_path),
            "truncated": run.truncated,
            "trained_tokens": run.trained_tokens,
            **stats.to_dict(),
            "max_sample_tokens": int(lengths.max()),
            "mean_sample_tokens": round(float(lengths.mean()), 2),
            "seconds": round(time.time() - start_time, 3),
        }
        Path(f"{tmp}{REPORT_SUFFIX}").write_text(json.dumps(report, indent=2) + "\n")
        # Everything new is complete: replace the old dataset, its report first (an
        # interrupted swap never looks complete) and the new report last.
        Path(f"{cfg.output_prefix}{REPORT_SUFFIX}").unlink(missing_ok=True)
        for suffix in packed_suffixes:
            os.replace(f"{tmp}{suffix}", f"{cfg.output_prefix}{suffix}")
        os.replace(rejects_tmp, cfg.rejects_path)
        os.replace(f"{tmp}{REPORT_SUFFIX}", f"{cfg.output_prefix}{REPORT_SUFFIX}")
    finally:
        if store is not None:
            store.close()
            store.remove()
        for suffix in (*packed_suffixes, REPORT_SUFFIX):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
    return report
