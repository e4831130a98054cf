"""SFT data: loss masks on hand-built CoT/TIR conversations with the real
Qwen2.5 tokenizer, first-fit-decreasing packing, packed microbatches, and
`qmath data sft-prepare` (every line a sample or a reject, truncation, refusals)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qmath_megatron.cli import main
from qmath_megatron.data.packing import pack_first_fit_decreasing, packing_stats
from qmath_megatron.sft.dataset import (
    LOSS_MASK_SUFFIX,
    PackedSequence,
    PackedSFTDataset,
    packed_microbatch,
)
from qmath_megatron.sft.prepare import (
    SampleError,
    SFTPrepareConfig,
    encode_conversation,
    prepare_sft,
)
from qmath_megatron.tokenizer.chat import COT_SYSTEM_PROMPT, TIR_SYSTEM_PROMPT

IM_START, IM_END, NL, ASSISTANT = 151644, 151645, 198, 77091


@pytest.fixture(scope="module")
def tok(tiny_instruct):
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    return load_tokenizer(tiny_instruct)


def expected(tok, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Token ids and mask built piece by piece: each piece encoded on its own, every token
    of it given the piece's mask (pieces end where the full text's tokens end)."""
    ids, mask = [], []
    for text, m in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [m] * len(piece)
    return ids, mask


def header(role: str) -> str:
    return f"<|im_start|>{role}\n"


def test_cot_loss_mask_by_hand(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "2 + 3 = 5, so the answer is $\\boxed{5}$."},
        ]
    }
    ids, mask = encode_conversation(tok, conv, "cot")
    want_ids, want_mask = expected(
        tok,
        [
            (
                header("system") + COT_SYSTEM_PROMPT + "<|im_end|>\n",
                0,
            ),  # the mode's system prompt added
            (header("user") + "What is 2+3?<|im_end|>\n", 0),
            (header("assistant"), 0),  # role header: not trained
            ("2 + 3 = 5, so the answer is $\\boxed{5}$.", 1),
            ("<|im_end|>", 1),  # the end of turn is trained
            ("\n", 0),
        ],
    )
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    # Spot checks on literal ids: the header and the end of the assistant turn.
    start = want_ids.index(ASSISTANT) - 1
    assert ids[start : start + 3].tolist() == [IM_START, ASSISTANT, NL]
    assert mask[start : start + 3].tolist() == [0, 0, 0]
    assert ids[-2:].tolist() == [IM_END, NL] and mask[-2:].tolist() == [1, 0]
    assert mask.sum() == len(tok.encode("2 + 3 = 5, so the answer is $\\boxed{5}$.")) + 1


def test_tir_loss_mask_by_hand_output_blocks_masked(tok):
    step1 = "Let me compute.\n```python\nprint(sum([1, 2, 3]))\n```\n"
    out1 = "```output\n6\n```\n"
    step2 = "Check with a list:\n```python\nprint([6, 7])\n```\n"
    # The output ends in punctuation and a blank line follows the fence: the byte-level
    # token "`\n\n" straddles the block's end, so it is not trained (no untrained character
    # is ever a target).
    out2 = "```output\n[6, 7]\n```\n\n"
    final = "The sum is $\\boxed{6}$."
    conv = {
        "messages": [
            {"role": "system", "content": TIR_SYSTEM_PROMPT},
            {"role": "user", "content": "Sum 1, 2, 3."},
            {"role": "assistant", "content": step1 + out1 + step2 + out2 + final},
            {"role": "user", "content": "Thanks. And 2*3?"},
            {"role": "assistant", "content": "Also $\\boxed{6}$."},
        ]
    }
    ids, mask = encode_conversation(tok, conv, "tir")
    want_ids, want_mask = expected(
        tok,
        [
            (header("system") + TIR_SYSTEM_PROMPT + "<|im_end|>\n", 0),
            (header("user") + "Sum 1, 2, 3.<|im_end|>\n", 0),
            (header("assistant"), 0),
            (step1, 1),
            (out1, 0),
            (step2, 1),
            (out2, 0),
            (final, 1),
            ("<|im_end|>", 1),
            ("\n", 0),
            (header("user") + "Thanks. And 2*3?<|im_end|>\n", 0),
            (header("assistant"), 0),
            ("Also $\\boxed{6}$.", 1),
            ("<|im_end|>", 1),
            ("\n", 0),
        ],
    )
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    decoded = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "```output" not in decoded and "[6, 7]\n" not in decoded and "6\n```" not in decoded
    assert "print([6, 7])" in decoded and decoded.count("<|im_end|>") == 2
    # The same conversation in CoT mode trains the output blocks too.
    _, cot_mask = encode_conversation(tok, conv, "cot")
    assert cot_mask.sum() > mask.sum()


def test_template_default_system_and_bad_conversations(tok):
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ids, _ = encode_conversation(tok, conv, "cot", default_system=False)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen")
    user = {"role": "user", "content": "x"}
    bad = [
        ("not_an_object", [1, 2]),
        ("missing_messages", {"text": "x"}),
        ("bad_message", {"messages": [{"role": "tool", "content": "x"}]}),
        ("bad_message", {"messages": [user, {"role": "assistant", "content": "a<|im_end|>b"}]}),
        ("no_assistant_turn", {"messages": [user]}),
        (
            "unclosed_output_block",
            {"messages": [user, {"role": "assistant", "content": "```output\n1\n"}]},
        ),
    ]
    for reason, obj in bad:
        with pytest.raises(SampleError) as err:
            encode_conversation(tok, obj, "tir")
        assert err.value.reason == reason
    late_system = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
        ]
    }
    with pytest.raises(SampleError, match="system turn after"):
        encode_conversation(tok, late_system, "cot")


def _naive_ffd(lengths, capacity):
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, f in enumerate(free):
            if f >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def test_first_fit_decreasing():
    assert pack_first_fit_decreasing([5, 3, 4, 2, 6], 10) == [[4, 2], [0, 1, 3]]
    rng = random.Random(0)
    for _ in range(20):
        cap = rng.randint(8, 200)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(0, 300))]
        bins = pack_first_fit_decreasing(lengths, cap)
        assert bins == _naive_ffd(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    with pytest.raises(ValueError, match="outside 1..10"):
        pack_first_fit_decreasing([3, 11], 10)
    stats = packing_stats([5, 3, 4, 2, 6], [[4, 2], [0, 1, 3]], 10)
    assert (stats.efficiency, stats.naive_efficiency, stats.lower_bound_sequences) == (1.0, 0.4, 2)


def test_packed_microbatch_by_hand():
    a = PackedSequence(np.array([10, 11, 12]), np.array([0, 1, 1], np.uint8), np.array([3]))
    b = PackedSequence(
        np.array([20, 21, 30, 31, 32]), np.array([0, 1, 0, 0, 1], np.uint8), np.array([2, 3])
    )
    mb = packed_microbatch([a, b], 6, pad_id=0)
    assert mb["tokens"].tolist() == [[10, 11, 12, 0, 0, 0], [20, 21, 30, 31, 32, 0]]
    assert mb["labels"].tolist() == [[11, 12, 0, 0, 0, 0], [21, 0, 31, 32, 0, 0]]
    assert mb["loss_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]]
    assert mb["loss_mask"].dtype == torch.float32
    assert mb["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 0]]
    assert mb["cu_seqlens"].tolist() == [0, 3, 6, 8, 11, 12] and mb["max_seqlen"] == 3
    allowed = ~mb["attention_mask"][1, 0]  # True = may attend
    want = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        want[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert mb["attention_mask"].shape == (2, 1, 6, 6) and torch.equal(allowed, want)
    assert "attention_mask" not in packed_microbatch([a], 6, 0, attention_mask=False)
    with pytest.raises(ValueError, match="longer than seq_length"):
        packed_microbatch([b], 4, 0)


def _conv(i: int, words: int = 3) -> dict:
    return {
        "id": i,
        "messages": [
            {"role": "user", "content": f"Problem {i}?"},
            {"role": "assistant", "content": " ".join(["step"] * words) + f" {i}"},
        ],
    }


def test_sft_prepare_every_line_ends_once(tok, tiny_instruct, tmp_path, capsys):
    good = [_conv(i, words=1 + 7 * i) for i in range(12)]
    long = _conv(99, words=400)
    lines_a = [json.dumps(c) for c in good[:6]] + [
        "",
        "not json",
        json.dumps(long),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
    ]
    lines_b = [json.dumps(c) for c in good[6:]] + ['{"messages": "x"}', "[1]"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "chat.jsonl").write_text("\n".join(lines_a) + "\n")
    with gzip.open(tmp_path / "chat.jsonl.gz", "wt") as f:
        f.write("\n".join(lines_b))  # no final newline: still a line
    prefix = str(tmp_path / "out" / "sft")
    (tmp_path / "out").mkdir()
    argv = [
        "data",
        "sft-prepare",
        "--input",
        str(tmp_path / "a" / "chat.jsonl"),
        str(tmp_path / "chat.jsonl.gz"),
        "--output-prefix",
        prefix,
        "--tokenizer",
        str(tiny_instruct),
        "--seq-length",
        "256",
    ]
    assert main(argv) == 0
    report = json.loads(Path(prefix + ".report.json").read_text())
    n_lines = len(lines_a) + len(lines_b)
    rejects = [json.loads(x) for x in Path(prefix + ".rejects.jsonl").read_text().splitlines()]
    assert report["lines"] == n_lines == report["samples"] + report["rejected"]
    assert report["samples"] == 12 and len(rejects) == report["rejected"] == 6
    assert {k: v for k, v in report["rejects"].items() if v} == {
        "empty": 1,
        "invalid_json": 1,
        "too_long": 1,
        "no_assistant_turn": 1,
        "missing_messages": 1,
        "not_an_object": 1,
    }
    assert sorted(r["line"] for r in rejects if r["source"].endswith("chat.jsonl")) == [7, 8, 9, 10]
    ds = PackedSFTDataset(prefix)
    assert len(ds) == report["sequences"] and ds.seq_length == 256 and ds.pad_id == 151643
    got = sorted(
        tuple(seq.tokens[s : s + n].tolist())
        for seq in (ds[i] for i in range(len(ds)))
        for s, n in zip(np.cumsum([0, *seq.sample_lengths[:-1]]), seq.sample_lengths)
    )
    want = sorted(tuple(encode_conversation(tok, c, "cot")[0].tolist()) for c in good)
    assert got == want  # every good conversation exactly once, tokens unchanged
    assert report["tokens"] == sum(map(len, want)) and report["sequences"] < 12
    assert report["packing_efficiency"] == pytest.approx(
        report["tokens"] / (report["sequences"] * 256), abs=1e-6
    )
    masks = [ds[i].loss_mask for i in range(len(ds))]
    assert report["trained_tokens"] == sum(int(m.sum()) for m in masks)
    # A rerun is refused; --overwrite replaces; --truncate keeps the long sample (cut).
    assert main(argv) == 1 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--truncate"]) == 0
    report = json.loads(Path(prefix + ".report.json").read_text())
    assert (report["samples"], report["truncated"], report["rejects"]["too_long"]) == (13, 1, 0)
    assert max(len(PackedSFTDataset(prefix)[i].tokens) for i in range(report["sequences"])) <= 256


def test_sft_prepare_refusals(tiny_instruct, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    base = ["data", "sft-prepare", "--input", str(src), "--tokenizer", str(tiny_instruct)]
    for extra, message in [
        (["--output-prefix", str(tmp_path / "p")], "no usable SFT sample"),
        (["--output-prefix", str(tmp_path / "missing" / "p")], "does not exist"),
        (["--output-prefix", ""], "--output-prefix"),
        (["--output-prefix", str(tmp_path / "q"), "--seq-length", "1"], "--seq-length"),
    ]:
        assert main([*base, *extra]) != 0
        assert message in capsys.readouterr().err
    assert json.loads((tmp_path / "p.rejects.jsonl").read_text())["reason"] == "no_assistant_turn"
    assert not (tmp_path / "p.report.json").exists()


def test_packed_dataset_checks_its_files(tiny_instruct, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join([*(json.dumps(_conv(i)) for i in range(3)), "oops", json.dumps(_conv(7))]) + "\n"
    )
    prefix = str(tmp_path / "d")
    report = prepare_sft(SFTPrepareConfig([str(src)], prefix, str(tiny_instruct), seq_length=64))
    assert len(PackedSFTDataset(prefix)) == report["sequences"] == 4  # ~40 tokens each
    # Worker processes (one line per batch, several batches in flight) write the same bytes.
    other = str(tmp_path / "w")
    prepare_sft(
        SFTPrepareConfig(
            [str(src)], other, str(tiny_instruct), seq_length=64, workers=2, batch_size=1
        )
    )
    for suffix in (".bin", ".idx", f"{LOSS_MASK_SUFFIX}.bin", f"{LOSS_MASK_SUFFIX}.idx"):
        assert Path(prefix + suffix).read_bytes() == Path(other + suffix).read_bytes()
    assert (
        Path(prefix + ".rejects.jsonl").read_text()
        == Path(other + ".rejects.jsonl").read_text()
        != ""
    )
    # The files are what megatron-core's own builder writes for the same packs.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    ds = PackedSFTDataset(prefix)
    for suffix, field, dtype in (
        ("", "tokens", np.int32),
        (LOSS_MASK_SUFFIX, "loss_mask", np.uint8),
    ):
        builder = IndexedDatasetBuilder(str(tmp_path / f"ref{suffix}.bin"), dtype=dtype)
        for i in range(len(ds)):
            builder.add_document(getattr(ds[i], field), ds[i].sample_lengths.tolist())
        builder.finalize(str(tmp_path / f"ref{suffix}.idx"))
        for ext in (".bin", ".idx"):
            assert (
                Path(prefix + suffix + ext).read_bytes()
                == (tmp_path / f"ref{suffix}{ext}").read_bytes()
            )
    bin_path = Path(prefix + ".bin")
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"d\.bin"):
        PackedSFTDataset(prefix)
    bin_path.write_bytes(data)
    Path(prefix + LOSS_MASK_SUFFIX + ".idx").unlink()
    with pytest.raises(ValueError, match="loss_mask.idx"):
        PackedSFTDataset(prefix)
    with pytest.raises(FileNotFoundError, match="report.json not found"):
        PackedSFTDataset(str(tmp_path / "nothing"))


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_dataset_reports_are_checked_by_one_reader(kind, tmp_path):
    """`read_dataset_report` (data/indexed.py) serves the SFT and RM datasets: a missing
    report says which prepare tool did not finish; bad JSON, a wrong format or version is a
    ValueError naming the file."""
    from qmath_megatron.reward_model import data as rm
    from qmath_megatron.sft import dataset as sft

    mod, tool = (sft, "sft-prepare") if kind == "sft" else (rm, "rm-prepare")
    prefix = str(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=rf"d\.report\.json not found: .*{tool} did not"):
        mod.read_report(prefix)
    path = Path(prefix + ".report.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"d\.report\.json: unreadable report"):
        mod.read_report(prefix)
    other = rm.FORMAT if kind == "sft" else sft.FORMAT
    for bad in ([], {"format": other, "version": 1}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"is not a {mod.FORMAT} report"):
            mod.read_report(prefix)
    path.write_text(json.dumps({"format": mod.FORMAT, "version": 99}))
    with pytest.raises(ValueError, match=rf"unsupported version 99 \(expected {mod.VERSION}\)"):
        mod.read_report(prefix)
    path.write_text(json.dumps({"format": mod.FORMAT, "version": mod.VERSION, "x": 1}))
    assert mod.read_report(prefix)["x"] == 1
