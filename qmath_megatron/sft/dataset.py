"""The packed SFT dataset training reads (written by ``qmath data sft-prepare``,
:mod:`qmath_megatron.sft.prepare`) and the microbatches built from it.

On-disk layout of a packed dataset at ``PREFIX``
    - ``PREFIX.bin/.idx``: a Megatron indexed dataset of token ids (the format of
      ``megatron.core.datasets.indexed_dataset``, read with its ``IndexedDataset``). Each
      *sequence* of the index is one sample; each *document* is one packed sequence (its
      samples, in packing order), so the sample boundaries are the index's own sequence
      lengths and ``document_indices``.
    - ``PREFIX.loss_mask.bin/.idx``: the same structure, uint8 per token: 1 where the token
      is a training target (the assistant's), 0 elsewhere.
    - ``PREFIX.report.json``: format/version, seq_length, mode, pad id, tokenizer, counts
      (input lines, samples, rejects by reason, truncated), packing efficiency. Written last:
      a dataset without it is incomplete.
    - ``PREFIX.rejects.jsonl`` (default; ``--rejects-file``): one line per rejected input
      line, with its reason.

Training inputs (:func:`packed_microbatch`)
    Within each sample, position ``t`` predicts token ``t + 1``: ``labels[t] = tokens[t+1]``
    and ``loss_mask[t] = mask[t+1]``; the last position of every sample and padding have
    ``loss_mask`` 0, so no sample predicts the next one. ``position_ids`` restart at 0 per
    sample; ``attention_mask`` is block-diagonal causal (True = masked out, Megatron's
    convention); ``cu_seqlens`` are the sample boundaries for Transformer Engine's THD
    ``PackedSeqParams`` on GPU. Note: megatron-core's ``GPTModel`` computes rotary
    embeddings for positions ``0..s-1`` of the whole row (it does not read
    ``position_ids`` for RoPE); with the block-diagonal mask that is exact up to float
    rounding, because RoPE attention depends only on the distance between two positions
    (the packing-equivalence test checks logits to 1e-5). With THD, TE restarts RoPE
    positions at each ``cu_seqlens`` boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qmath_megatron.data.indexed import read_dataset_report, validate_indexed_dataset

FORMAT = "qmath-packed-sft"
VERSION = 1
LOSS_MASK_SUFFIX = ".loss_mask"
REPORT_SUFFIX = ".report.json"


class PackedSequence(NamedTuple):
    """One packed sequence: token ids (int64 ``[n]``), loss mask (uint8 ``[n]``, 1 on
    tokens that are training targets) and its samples' lengths (int64, summing to n)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    sample_lengths: np.ndarray


def read_report(prefix: str | Path) -> dict:
    """The checked ``PREFIX.report.json`` of a packed SFT dataset."""
    return read_dataset_report(
        prefix,
        format=FORMAT,
        version=VERSION,
        suffix=REPORT_SUFFIX,
        missing="not a packed SFT dataset, or sft-prepare did not finish",
    )


def _open_indexed(prefix: str):
    """megatron-core's reader on ``prefix``, after the project's checks (missing files, a
    header that does not match the sizes, a ``.bin`` shorter than its ``.idx``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    validate_indexed_dataset(prefix)
    return IndexedDataset(prefix, mmap=True)


class PackedSFTDataset:
    """A packed SFT dataset written by ``qmath data sft-prepare``: item ``i`` is packed
    sequence ``i`` as a :class:`PackedSequence` (total length <= :attr:`seq_length`)."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.report = read_report(self.prefix)
        self.seq_length: int = int(self.report["seq_length"])
        self.pad_id: int = int(self.report["pad_id"])
        self.tokens = _open_indexed(self.prefix)
        self.masks = _open_indexed(self.prefix + LOSS_MASK_SUFFIX)
        if not (
            np.array_equal(self.tokens.sequence_lengths, self.masks.sequence_lengths)
            and np.array_equal(self.tokens.document_indices, self.masks.document_indices)
        ):
            raise ValueError(
                f"{self.prefix}{LOSS_MASK_SUFFIX}.idx does not match {self.prefix}.idx"
            )
        docs = self.tokens.document_indices
        totals = (
            np.add.reduceat(self.tokens.sequence_lengths.astype(np.int64), docs[:-1])
            if len(docs) > 1
            else np.zeros(0)
        )
        if len(totals) and totals.max() > self.seq_length:
            raise ValueError(
                f"{self.prefix}.idx: a packed sequence is longer than seq_length {self.seq_length}"
            )
        self._docs = docs

    def __len__(self) -> int:
        return len(self._docs) - 1

    def __getitem__(self, index: int) -> PackedSequence:
        if not -len(self) <= index < len(self):
            raise IndexError(f"packed sequence {index} out of range ({len(self)})")
        index %= len(self)
        lo, hi = int(self._docs[index]), int(self._docs[index + 1])
        tokens = np.concatenate(self.tokens[lo:hi]).astype(np.int64)
        mask = np.concatenate(self.masks[lo:hi]).astype(np.uint8)
        return PackedSequence(tokens, mask, self.tokens.sequence_lengths[lo:hi].astype(np.int64))


def packed_microbatch(
    items: Sequence[PackedSequence], seq_length: int, pad_id: int, *, attention_mask: bool = True
) -> dict:
    """Torch tensors for ``GPTModel`` from packed sequences (``b = len(items)``, ``s =
    seq_length``):

    - ``tokens`` ``[b, s]`` int64, padded with ``pad_id``;
    - ``labels`` ``[b, s]`` int64: the next token within the same sample, ``pad_id`` at the
      last position of each sample and on padding;
    - ``loss_mask`` ``[b, s]`` float32: 1 where ``labels`` is an assistant token;
    - ``position_ids`` ``[b, s]`` int64, restarting at 0 for every sample (and for the
      padding tail, which is a segment of its own);
    - ``attention_mask`` ``[b, 1, s, s]`` bool, True = masked out: causal within each
      segment, nothing across segments (omitted with ``attention_mask=False``, e.g. on GPU
      with THD);
    - ``cu_seqlens`` int32 ``[segments + 1]``: segment boundaries in the flattened
      ``[b * s]`` token stream (every row's padding tail is a segment), and
      ``max_seqlen`` (int): for ``PackedSeqParams(qkv_format="thd")``.
    """
    import torch

    b = len(items)
    tokens = np.full((b, seq_length), pad_id, dtype=np.int64)
    labels = np.full((b, seq_length), pad_id, dtype=np.int64)
    loss = np.zeros((b, seq_length), dtype=np.float32)
    positions = np.zeros((b, seq_length), dtype=np.int64)
    segment = np.zeros((b, seq_length), dtype=np.int64)
    bounds = [0]
    for row, item in enumerate(items):
        n = len(item.tokens)
        if n > seq_length:
            raise ValueError(
                f"packed sequence of {n} tokens is longer than seq_length {seq_length}"
            )
        if int(np.sum(item.sample_lengths)) != n or len(item.loss_mask) != n:
            raise ValueError("sample_lengths and loss_mask must match the tokens")
        tokens[row, :n] = item.tokens
        lengths = [int(x) for x in item.sample_lengths] + (
            [seq_length - n] if n < seq_length else []
        )
        start = 0
        for k, length in enumerate(lengths):
            end = start + length
            positions[row, start:end] = np.arange(length)
            segment[row, start:end] = k
            if start < n:  # a real sample: predict the next token of the same sample
                labels[row, start : end - 1] = item.tokens[start + 1 : end]
                loss[row, start : end - 1] = item.loss_mask[start + 1 : end]
            bounds.append(row * seq_length + end)
            start = end
    lengths_all = np.diff(bounds)
    out = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss),
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": int(lengths_all.max()) if len(lengths_all) else 0,
    }
    if attention_mask:
        seg = torch.from_numpy(segment)
        same = seg[:, :, None] == seg[:, None, :]
        causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
        out["attention_mask"] = ~(same & causal).unsqueeze(1)
    return out
