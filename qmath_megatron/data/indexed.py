"""Megatron indexed-dataset files (``.bin`` + ``.idx``) written with NumPy.

The format is megatron-core's (``megatron.core.datasets.indexed_dataset``): header
``MMIDIDX\\0\\0``, version 1 (<Q), dtype code (<B), sequence count (<Q), document count
(<Q), then int32 sequence lengths, int64 byte pointers and int64 document indices. We
write it ourselves because megatron's writer walks every sequence in a Python loop and
its builder keeps Python lists (memory and time grow badly at 10^9 documents), and because
importing megatron-core costs seconds in every worker. The tests check byte equality with
files written by megatron's ``IndexedDatasetBuilder`` and reading by its
``IndexedDataset``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def write_index(
    idx_path: str | Path, dtype: np.dtype | type, lengths: np.ndarray, document_indices: np.ndarray
) -> None:
    """Write an ``.idx`` for sequences of ``lengths`` tokens of ``dtype``."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes(order="C"))


def read_index(idx_path: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(token dtype, int32 sequence lengths, int64 document indices) of an ``.idx``."""
    with open(idx_path, "rb") as f:
        if f.read(9) != INDEX_HEADER:
            raise ValueError(f"{idx_path} is not a Megatron indexed-dataset index")
        (version,) = struct.unpack("<Q", f.read(8))
        if version != 1:
            raise ValueError(f"{idx_path}: unsupported index version {version}")
        (code,) = struct.unpack("<B", f.read(1))
        (n_seq,) = struct.unpack("<Q", f.read(8))
        (n_doc,) = struct.unpack("<Q", f.read(8))
        lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
        f.seek(8 * n_seq, os.SEEK_CUR)
        docs = np.frombuffer(f.read(8 * n_doc), dtype=np.int64)
    return _CODE_DTYPES[code], lengths, docs


def merge_datasets(
    prefixes: Sequence[str | Path], out_prefix: str | Path, dtype: np.dtype | type
) -> None:
    """Concatenate datasets in order into ``out_prefix.bin/.idx`` (as megatron's
    ``IndexedDatasetBuilder.add_index`` does, in O(1) Python operations per shard)."""
    dtype = np.dtype(dtype)
    all_lengths, all_docs, offset = [], [np.zeros(1, dtype=np.int64)], 0
    with open(f"{out_prefix}.bin", "wb") as out:
        for prefix in prefixes:
            shard_dtype, lengths, docs = read_index(f"{prefix}.idx")
            if shard_dtype != dtype:
                raise ValueError(f"{prefix}: dtype {shard_dtype} differs from {dtype}")
            all_lengths.append(lengths)
            all_docs.append(docs[1:] + offset)
            offset += len(lengths)
            with open(f"{prefix}.bin", "rb") as src:
                shutil.copyfileobj(src, out, length=16 * 1024**2)
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int32)
    write_index(f"{out_prefix}.idx", dtype, lengths, np.concatenate(all_docs))


_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def validate_indexed_dataset(prefix: str | Path, *, deep: bool = False) -> dict:
    """Check ``PREFIX.bin`` / ``PREFIX.idx`` before anything reads them; returns
    ``{"dtype", "sequences", "documents", "tokens"}``.

    Raises ValueError naming the file when either is missing, unreadable, not a Megatron
    index, or inconsistent: the ``.idx`` size must equal its header's counts, the document
    index must run from 0 to the sequence count, and the ``.bin`` must hold exactly the
    tokens the lengths add up to (a ``.bin`` shorter than its ``.idx`` says otherwise fails
    at the first read of its end, possibly hours into training). ``deep`` also checks every
    length, pointer and document boundary (O(sequences); ``qmath data inspect`` does).
    """
    prefix = str(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise ValueError(f"indexed dataset file missing: {p}")
        if not os.access(p, os.R_OK):
            raise ValueError(f"indexed dataset file not readable: {p}")
    idx_size, bin_size = idx.stat().st_size, bin_.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise ValueError(f"{idx} is not a Megatron indexed-dataset index (bad header)")
    (version,) = struct.unpack_from("<Q", head, 9)
    (code,) = struct.unpack_from("<B", head, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", head, 18)
    if version != 1:
        raise ValueError(f"{idx}: unsupported index version {version}")
    if code not in _CODE_DTYPES:
        raise ValueError(f"{idx}: unknown token dtype code {code}")
    dtype = _CODE_DTYPES[code]
    expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_size != expected:
        raise ValueError(
            f"{idx}: {idx_size} bytes, but its header ({n_seq} sequences, {n_doc} document "
            f"boundaries) needs {expected}: truncated or corrupt"
        )
    if n_doc < 1:
        raise ValueError(f"{idx}: no document index (corrupt)")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=_HEADER_BYTES + 4 * n_seq)
    docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
    if docs[0] != 0 or docs[-1] != n_seq:
        raise ValueError(
            f"{idx}: document index runs {docs[0]}..{docs[-1]}, not 0..{n_seq} (corrupt)"
        )
    need = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if n_seq else 0
    if n_seq and (pointers[0] != 0 or lengths[-1] < 0):
        raise ValueError(
            f"{idx}: first pointer {pointers[0]} / last length {lengths[-1]} (corrupt)"
        )
    if bin_size != need:
        raise ValueError(
            f"{bin_}: {bin_size} bytes, but {idx} describes {need} "
            f"({'truncated' if bin_size < need else 'extra bytes'}); the pair does not match"
        )
    tokens = need // dtype.itemsize
    if n_seq == 0:
        raise ValueError(f"{prefix}: the dataset holds no documents (.bin/.idx are empty)")
    if deep and n_seq:
        if (lengths < 0).any():
            raise ValueError(f"{idx}: negative sequence lengths (corrupt)")
        step = lengths[:-1].astype(np.int64) * dtype.itemsize
        if not np.array_equal(pointers[1:] - pointers[:-1], step):
            raise ValueError(f"{idx}: byte pointers do not follow the lengths (corrupt)")
        if (np.diff(docs) < 0).any():
            raise ValueError(f"{idx}: document boundaries are not increasing (corrupt)")
    del mm
    return {
        "dtype": dtype,
        "sequences": int(n_seq),
        "documents": int(n_doc - 1),
        "tokens": int(tokens),
    }


def read_dataset_report(
    prefix: str | Path, *, format: str, version: int, missing: str, suffix: str = ".report.json"
) -> dict:
    """The JSON report ``PREFIX<suffix>`` a prepare tool writes last, checked for its
    ``format`` and ``version`` keys.

    FileNotFoundError when the report is absent (the message ends with ``missing``, which
    says what that means for this kind of dataset, e.g. "sft-prepare did not finish");
    ValueError naming the file when it is not JSON, not an object of ``format`` or of
    another ``version``.
    """
    path = Path(f"{prefix}{suffix}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {missing}")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable report ({exc})") from None
    if not isinstance(report, dict) or report.get("format") != format:
        raise ValueError(f"{path} is not a {format} report")
    if report.get("version") != version:
        raise ValueError(
            f"{path}: unsupported version {report.get('version')} (expected {version})"
        )
    return report
