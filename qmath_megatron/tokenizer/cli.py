"""``qmath tokenizer {build, encode}``.

Each action's settings are one dataclass (flags, ``--config FILE.yaml`` and ``key=value``
through :mod:`qmath_megatron.config.cli`); transformers is imported inside the run
functions, so that ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from qmath_megatron.config.cli import ConfigArgs, build_config


@dataclass
class BuildConfig:
    out: str  # the HF tokenizer directory to write
    overwrite: bool = False


@dataclass
class EncodeConfig:
    tokenizer: str  # HF tokenizer directory


def _build(args: argparse.Namespace) -> int:
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer, load_tokenizer

    cfg = build_config(args)
    out = build_qwen25_tokenizer(cfg.out, overwrite=cfg.overwrite)
    tok = load_tokenizer(out)
    print(
        f"wrote Qwen2.5 tokenizer to {out}: {len(tok)} tokens, eos {tok.eos_token!r} = "
        f"{tok.eos_token_id}"
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    tok = load_tokenizer(build_config(args).tokenizer)
    print(json.dumps(tok.encode(args.text, add_special_tokens=False)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="build or try the Qwen2.5 tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build the Qwen2.5 tokenizer offline as an HF directory")
    a = ConfigArgs(b, BuildConfig)
    a.add("out", required=True)
    a.add("overwrite")
    a.finish()
    b.set_defaults(func=_build)
    e = sub.add_parser("encode", help="print the token ids of TEXT")
    a = ConfigArgs(e, EncodeConfig)
    a.add("tokenizer", required=True, help="HF tokenizer directory")
    e.add_argument("text")  # the input, not a setting
    a.finish()
    e.set_defaults(func=_encode)
