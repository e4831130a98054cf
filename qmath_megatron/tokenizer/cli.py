"""``qmath tokenizer {build, encode}``."""

from __future__ import annotations

import argparse
import json


def _build(args: argparse.Namespace) -> int:
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer, load_tokenizer

    out = build_qwen25_tokenizer(args.out, overwrite=args.overwrite)
    tok = load_tokenizer(out)
    print(
        f"wrote Qwen2.5 tokenizer to {out}: {len(tok)} tokens, eos {tok.eos_token!r} = "
        f"{tok.eos_token_id}"
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(json.dumps(tok.encode(args.text, add_special_tokens=False)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="build or try the Qwen2.5 tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build the Qwen2.5 tokenizer offline as an HF directory")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_build)
    e = sub.add_parser("encode", help="print the token ids of TEXT")
    e.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    e.add_argument("text")
    e.set_defaults(func=_encode)
