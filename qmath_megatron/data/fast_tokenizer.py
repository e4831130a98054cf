"""Batch tokenization for preprocessing: a tiktoken fast path, verified against the HF
tokenizer before use, with the HF tokenizer itself as the fallback.

Byte-level BPE tokenizers whose merge order equals their vocabulary rank (Qwen2/2.5,
Llama 3, GPT-4-style, all derived from tiktoken) can be run by tiktoken's BPE, measured
here at ~3.4x the per-document speed of HF ``tokenizers`` on math text (4.8M vs 1.4M
tokens/s on one core). The fast path is used only when it reproduces the HF tokenizer's
ids exactly on a probe set that includes the caller's own documents; otherwise the HF
tokenizer runs. Either way the ids are those of
``AutoTokenizer.from_pretrained(dir).encode(text, add_special_tokens=False)``.

Start-up matters at corpus scale x worker count, so the HF side is loaded with
``tokenizers.Tokenizer.from_file`` (0.3 s) rather than ``AutoTokenizer`` (1.6 s), and
workers receive the verified BPE ranks instead of rebuilding and re-verifying.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def tiktoken_spec_from_hf(tokenizer_json: dict) -> dict[str, Any] | None:
    """(pattern, ranks, special tokens, nfc) for an HF byte-level BPE tokenizer.json, or None."""
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
    return {"pattern": pattern, "ranks": ranks, "special": special, "nfc": normalizer is not None}


def _eos_token(tokenizer_dir: Path) -> str | None:
    config = tokenizer_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


@dataclass
class TokenizerSpec:
    """What a worker needs to rebuild the verified tokenizer cheaply (picklable)."""

    backend: str  # "tiktoken" | "hf"
    tokenizer_json: str
    eod: int
    vocab_size: int
    tiktoken: dict[str, Any] | None = None


class BatchTokenizer:
    """``encode_batch(texts) -> list[list[int]]`` equal to HF
    ``encode(..., add_special_tokens=False)``."""

    def __init__(self, spec: TokenizerSpec):
        # Worker processes parallelise across documents; nested Rust threads only contend.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.spec = spec
        self.backend = spec.backend
        self.eod = spec.eod
        self.vocab_size = spec.vocab_size
        self._hf = None
        self._fast = None
        self._nfc = False
        if spec.backend == "tiktoken":
            import tiktoken

            t = spec.tiktoken
            assert t is not None
            self._fast = tiktoken.Encoding(
                name="qmath-fast",
                pat_str=t["pattern"],
                mergeable_ranks=t["ranks"],
                special_tokens=t["special"],
            )
            self._nfc = t["nfc"]
        else:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(spec.tokenizer_json)

    @classmethod
    def from_dir(
        cls, tokenizer_dir: str | Path, probe: Sequence[str] = (), allow_fast: bool = True
    ) -> BatchTokenizer:
        """Load a local HF tokenizer directory; choose and verify the fast path."""
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir)
        tjson = path / "tokenizer.json"
        if not tjson.is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json (a fast HF tokenizer directory is needed; "
                f"`qmath tokenizer build --out DIR` builds Qwen2.5's)"
            )
        hf = Tokenizer.from_file(str(tjson))
        eos = _eos_token(path)
        eod = hf.token_to_id(eos) if eos else None
        if eod is None:
            raise ValueError(
                f"tokenizer {path} has no eos_token in tokenizer_config.json: "
                "cannot mark document ends"
            )
        vocab = hf.get_vocab_size(with_added_tokens=True)
        spec = TokenizerSpec("hf", str(tjson), int(eod), int(vocab))
        if allow_fast:
            fast = tiktoken_spec_from_hf(json.loads(tjson.read_text(encoding="utf-8")))
            if fast is None:
                logger.info("tokenizer is not tiktoken-compatible; using the HF tokenizer")
            else:
                candidate = cls(TokenizerSpec("tiktoken", str(tjson), int(eod), int(vocab), fast))
                texts = list(_PROBE_TEXTS) + list(probe)
                expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
                if candidate.encode_batch(texts) == expected:
                    return candidate
                logger.warning(
                    "tiktoken fast path disagrees with the HF tokenizer on the probe; using HF"
                )
        return cls(spec)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            encode = self._fast.encode
            if self._nfc:
                return [
                    encode(unicodedata.normalize("NFC", t), allowed_special="all") for t in texts
                ]
            return [encode(t, allowed_special="all") for t in texts]
        assert self._hf is not None
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
