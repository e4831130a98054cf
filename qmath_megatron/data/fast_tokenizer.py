"""Batch tokenization for preprocessing: a tiktoken fast path, verified against the HF
tokenizer before use, with the HF tokenizer itself as the fallback.

Byte-level BPE tokenizers whose merge order equals their vocabulary rank (Qwen2/2.5,
Llama 3, GPT-4-style, all derived from tiktoken) can be run by tiktoken's BPE, which is
~2x faster than HF ``tokenizers`` here (see ``shared/notes-tokenization.md``). The fast
path is used only when it reproduces the HF tokenizer's ids exactly on a probe set that
includes the caller's own documents; otherwise the HF tokenizer runs. Either way the ids
are the ones ``AutoTokenizer(...).encode(text, add_special_tokens=False)`` gives.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PROBE_TEXTS = (
    "Hello world! The answer is $\\boxed{42}$.",
    "Solve $x^2 - 5x + 6 = 0$.\n\n解方程：\\frac{1}{2} + \\sqrt{3} ≈ 2.232 😀\n\t  tabs",
    "  leading spaces and trailing\n\n\n",
    "Über naïve café — “quotes”, 100% of 1,234.5 e\u0301 (combining)",
    "special tokens <|endoftext|> inside <|im_start|>user\ntext<|im_end|>",
    "1234567890 12 345 6789 0.000001 -3.5e+10",
)


def _bytes_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _tiktoken_from_hf(tokenizer_json: dict):
    """A tiktoken Encoding equivalent to an HF byte-level BPE tokenizer.json, or None."""
    import tiktoken

    model = tokenizer_json.get("model", {})
    pre = tokenizer_json.get("pre_tokenizer") or {}
    normalizer = tokenizer_json.get("normalizer")
    if model.get("type") != "BPE" or (normalizer and normalizer.get("type") != "NFC"):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(splits) != 1 or len(levels) != 1 or levels[0].get("add_prefix_space"):
        return None
    pattern = splits[0].get("pattern", {}).get("Regex")
    if not pattern:
        return None
    decoder = _bytes_decoder()
    try:
        ranks = {bytes(decoder[c] for c in token): rank for token, rank in model["vocab"].items()}
    except KeyError:
        return None
    special = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    return tiktoken.Encoding(
        name="qmath-fast", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
    )


class BatchTokenizer:
    """``encode_batch(texts) -> list[list[int]]`` equal to HF ``encode(..., add_special_tokens=False)``."""

    def __init__(
        self, tokenizer_dir: str | Path, probe: Sequence[str] = (), allow_fast: bool = True
    ):
        # Worker processes parallelise across documents; nested Rust threads only contend.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from qmath_megatron.tokenizer.qwen import load_tokenizer

        self.dir = Path(tokenizer_dir)
        self.hf = load_tokenizer(self.dir)
        self.vocab_size = len(self.hf)
        if self.hf.eos_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer_dir} has no eos_token: cannot mark document ends"
            )
        self.eod = int(self.hf.eos_token_id)
        self._fast = None
        self._nfc = False
        self.backend = "hf"
        if allow_fast:
            self._try_fast(list(_PROBE_TEXTS) + list(probe))

    def _try_fast(self, probe: list[str]) -> None:
        path = self.dir / "tokenizer.json"
        if not path.is_file():
            return
        spec = json.loads(path.read_text(encoding="utf-8"))
        enc = _tiktoken_from_hf(spec)
        if enc is None:
            logger.info("tokenizer is not tiktoken-compatible; using the HF tokenizer")
            return
        self._fast, self._nfc = enc, spec.get("normalizer") is not None
        expected = [self.hf.encode(t, add_special_tokens=False) for t in probe]
        if self._encode_fast(probe) != expected:
            logger.warning("tiktoken fast path disagrees with the HF tokenizer; using HF")
            self._fast = None
            return
        self.backend = "tiktoken"

    def _encode_fast(self, texts: Sequence[str]) -> list[list[int]]:
        assert self._fast is not None
        if self._nfc:
            texts = [unicodedata.normalize("NFC", t) for t in texts]
        return self._fast.encode_batch(list(texts), num_threads=1, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return self._encode_fast(texts)
        return [
            e.ids
            for e in self.hf.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ]
