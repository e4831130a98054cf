"""Packing efficiency of `qmath data sft-prepare` on MATH-500 solutions.

Each MATH-500 problem and its reference solution become one SFT conversation (system: the
CoT prompt, user: the problem, assistant: the solution), rendered with the Qwen2.5 chat
template and tokenized with the real Qwen2.5 tokenizer (built offline), then packed by
`sft-prepare` at the given sequence length. Printed against one sample per sequence
(padding) and against next-fit packing in input order (concatenate until the next sample
does not fit, a common simple packer).

    python bench/packing.py [--seq-length 4096] [--benchmarks ../shared/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qmath_megatron.data.packing import pack_first_fit_decreasing
from qmath_megatron.sft.dataset import PackedSFTDataset
from qmath_megatron.sft.prepare import SFTPrepareConfig, encode_conversation, prepare_sft
from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def next_fit(lengths: list[int], capacity: int) -> int:
    """Sequences used by next-fit in input order."""
    sequences, free = 0, 0
    for n in lengths:
        if n > free:
            sequences, free = sequences + 1, capacity
        free -= n
    return sequences


def conversation(row: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": row["solution"]},
        ]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", default=str(ROOT.parent / "shared" / "benchmarks"))
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: build Qwen2.5 offline)"
    )
    args = ap.parse_args()
    cap = args.seq_length

    src = Path(args.benchmarks) / "math500" / "test.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok_dir = args.tokenizer or str(build_qwen25_tokenizer(tmp_path / "tok"))
        chat_file = tmp_path / "math500_sft.jsonl"
        chat_file.write_text("".join(json.dumps(conversation(r)) + "\n" for r in rows))
        prefix = str(tmp_path / "packed")
        start = time.time()
        report = prepare_sft(SFTPrepareConfig([str(chat_file)], prefix, tok_dir, seq_length=cap))
        seconds = time.time() - start
        ds = PackedSFTDataset(prefix)
        packed_lengths = sorted(int(n) for i in range(len(ds)) for n in ds[i].sample_lengths)
        tok = load_tokenizer(tok_dir)
        # Lengths in file order (what next-fit sees), from the same rendering code.
        lengths = [len(encode_conversation(tok, conversation(r), "cot")[0]) for r in rows]
    assert sorted(lengths) == packed_lengths  # the dataset holds exactly these samples
    lens = np.array(lengths)
    tokens = int(lens.sum())
    ffd = len(pack_first_fit_decreasing(lengths, cap))
    assert ffd == report["sequences"]
    nf = next_fit(lengths, cap)
    print(
        f"MATH-500 solutions as SFT samples ({report['samples']} samples, {report['rejected']} "
        f"rejected), seq length {cap}, Qwen2.5 tokenizer + chat template, CoT system prompt"
    )
    print(
        f"  sample tokens: mean {lens.mean():.0f}, p50 {np.percentile(lens, 50):.0f}, "
        f"p90 {np.percentile(lens, 90):.0f}, max {lens.max()}; total {tokens:,}; trained "
        f"{report['trained_tokens']:,} ({report['trained_tokens'] / tokens:.1%})"
    )
    table = [
        ("one sample per sequence (padding)", len(lengths)),
        ("next-fit, input order", nf),
        ("first-fit decreasing (sft-prepare)", ffd),
        ("lower bound ceil(tokens / seq)", report["lower_bound_sequences"]),
    ]
    print(f"  {'packing':<36}{'sequences':>10}{'efficiency':>12}")
    for name, n in table:
        print(f"  {name:<36}{n:>10}{tokens / (n * cap):>12.2%}")
    print(f"  sft-prepare wall time {seconds:.1f} s (render, tokenize, pack, write)")


if __name__ == "__main__":
    main()
