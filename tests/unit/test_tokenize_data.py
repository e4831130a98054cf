"""`qmath data tokenize`: same bytes as the straightforward reference, readable by
megatron-core, independent of the worker count, resumable, and honest about bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qmath_megatron.data.synthetic import generate_documents
from qmath_megatron.data.tokenize import TokenizeConfig, tokenize_corpus

EOD = 151643


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer

    return build_qwen25_tokenizer(tmp_path_factory.mktemp("tok") / "qwen")


def _texts() -> list[str]:
    """Generated math prose with LaTeX (~0.4 MB: several 50 KB work units, and enough that a
    2-worker run can be killed midway) + edge cases. The project's own text, so the tests
    run the same with or without the shared benchmarks (real prose: a test of its own)."""
    texts = [d["text"] for d in generate_documents(450, seed=1)]
    texts += [
        "中文数学：求 $x^2=4$ 的解。😀 e\u0301",
        "a document that mentions <|endoftext|> and <|im_start|> literally",
        "x",
        "   padded   \n",
    ]
    random.Random(0).shuffle(texts)
    return texts


def _write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, key: t}, ensure_ascii=False) + "\n")
    return path


def _reference(texts: list[str], tok_dir: Path, prefix: Path) -> Path:
    """The straightforward way: per-document encode + <|endoftext|> + megatron's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from qmath_megatron.tokenizer.qwen import load_tokenizer

    tok = load_tokenizer(tok_dir)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        builder.add_document(np.array(ids, dtype=np.int32), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def _run(inputs, prefix, tok_dir, **kw) -> dict:
    cfg = TokenizeConfig(
        inputs=[str(i) for i in inputs],
        output_prefix=str(prefix),
        tokenizer=str(tok_dir),
        progress=False,
        **kw,
    )
    return tokenize_corpus(cfg)


def _same_files(a: Path, b: Path) -> bool:
    return all(
        Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".bin", ".idx")
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("corpus")
    texts = _texts()
    jsonl = _write_jsonl(root / "part-0.jsonl", texts)
    ref = _reference(texts, tok_dir, root / "reference")
    return {"root": root, "texts": texts, "jsonl": jsonl, "reference": ref}


def test_bytes_equal_reference_for_1_and_2_workers(corpus, tok_dir, tmp_path):
    one = _run([corpus["jsonl"]], tmp_path / "w1", tok_dir, workers=1, chunk_mb=0.05)
    two = _run([corpus["jsonl"]], tmp_path / "w2", tok_dir, workers=2, chunk_mb=0.05)
    assert one["units"] == two["units"] > 3  # the file really was split into parallel units
    assert one["backend"] == "tiktoken" and one["dtype"] == "int32"
    assert _same_files(tmp_path / "w1", corpus["reference"])
    assert _same_files(tmp_path / "w2", corpus["reference"])
    assert one["documents"] == len(corpus["texts"]) and one["rejected"] == 0
    assert not (tmp_path / "w1.work").exists()


def test_real_math_prose_bytes_equal_reference(shared_benchmark, tok_dir, tmp_path):
    """MATH-500 and GSM8K problems with their solutions (real LaTeX-heavy prose): the verified
    tiktoken fast path, split over 2 workers, gives the reference's bytes."""
    texts = []
    for name, keys in (("math500", ("problem", "solution")), ("gsm8k", ("question", "answer"))):
        rows = [json.loads(line) for line in shared_benchmark(name).open()][:200]
        texts += ["\n\n".join(r[k] for k in keys) for r in rows]
    jsonl = _write_jsonl(tmp_path / "real.jsonl", texts)
    out = _run([jsonl], tmp_path / "ours", tok_dir, workers=2, chunk_mb=0.05)
    assert out["units"] > 3 and out["backend"] == "tiktoken"
    assert out["documents"] == len(texts) == 400 and out["rejected"] == 0
    assert _same_files(tmp_path / "ours", _reference(texts, tok_dir, tmp_path / "reference"))


def test_hf_backend_gives_the_same_bytes(corpus, tok_dir, tmp_path):
    out = _run([corpus["jsonl"]], tmp_path / "hf", tok_dir, fast_path=False)
    assert out["backend"] == "hf" and _same_files(tmp_path / "hf", corpus["reference"])


def test_compressed_and_parquet_inputs(corpus, tok_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = corpus["texts"]
    half = len(texts) // 2
    data = corpus["jsonl"].read_bytes().splitlines(keepends=True)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(data[:half])))
    (tmp_path / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(data[half:]))
    )
    out = _run([tmp_path / "*.jsonl.*"], tmp_path / "compressed", tok_dir, workers=2)
    assert out["documents"] == len(texts) and _same_files(
        tmp_path / "compressed", corpus["reference"]
    )

    pq.write_table(pa.table({"content": texts}), tmp_path / "c.parquet", row_group_size=100)
    out = _run(
        [tmp_path / "c.parquet"], tmp_path / "pq", tok_dir, text_keys=["text", "content"], workers=2
    )
    assert out["units"] == (len(texts) + 99) // 100
    assert _same_files(tmp_path / "pq", corpus["reference"])


def test_readable_by_megatron_indexed_and_gpt_dataset(corpus, tok_dir):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from qmath_megatron.tokenizer.qwen import MegatronTokenizer, load_tokenizer

    prefix = corpus["root"] / "ours"
    _run([corpus["jsonl"]], prefix, tok_dir, workers=2)
    ds = IndexedDataset(str(prefix))
    hf = load_tokenizer(tok_dir)
    assert len(ds) == len(corpus["texts"])
    for i in (0, 7, len(ds) - 1):
        ids = ds[i].tolist()
        assert ids[-1] == EOD and hf.decode(ids[:-1]) == corpus["texts"][i]

    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=128,
        blend=([str(prefix)], None),
        split="90,10,0",
        tokenizer=MegatronTokenizer(tok_dir),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(corpus["root"] / "cache"),
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [40, 8, None], lambda: True, config
    ).build()
    sample = train[0]
    assert sample["tokens"].shape == (128,) and sample["labels"].shape == (128,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert int(sample["tokens"].max()) < 151665 and len(valid) >= 8


def test_bad_input_is_counted_by_reason_and_never_crashes(tok_dir, tmp_path):
    good = ["first good document", "second good document"]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b"{not json",
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "no text key"}).encode(),
        json.dumps({"text": 42}).encode(),
        b'{"text": "bad \xff\xfe utf8"}',
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": ""}).encode(),
        b'{"text": "a lone surrogate \\ud800 here"}',
        json.dumps({"text": good[1]}).encode(),
        b"",  # a blank line is a line: rejected as empty, never skipped silently
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejects = tmp_path / "rejects.jsonl"
    out = _run([path], tmp_path / "out", tok_dir, rejects_file=str(rejects))
    assert out["documents"] == 2
    assert out["rejects"] == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_text": 1,
        "non_string_text": 1,
        "invalid_utf8": 1,
        "invalid_unicode": 1,
        "empty": 3,
        "truncated_input": 0,
    }
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted(r["reason"] for r in written) == sorted(
        [
            "invalid_json",
            "not_an_object",
            "missing_text",
            "non_string_text",
            "invalid_utf8",
            "invalid_unicode",
            "empty",
            "empty",
            "empty",
        ]
    )
    assert sum(out["rejects"].values()) + out["documents"] == len(lines)  # line by line
    # The HF path gives the same reason for the lone surrogate (it used to crash there,
    # while the fast path replaced it silently).
    hf = _run([path], tmp_path / "hf", tok_dir, fast_path=False)
    assert hf["rejects"] == out["rejects"] and hf["backend"] == "hf"
    assert _same_files(tmp_path / "hf", tmp_path / "out")
    assert _same_files(tmp_path / "out", _reference(good, tok_dir, tmp_path / "ref"))
    with pytest.raises(ValueError, match="rejected"):
        _run([path], tmp_path / "strict", tok_dir, max_bad_fraction=0.5)
    assert not Path(f"{tmp_path / 'strict'}.idx").exists()


def test_input_errors_are_clear(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files match"):
        _run([tmp_path / "missing-*.jsonl"], tmp_path / "o", tok_dir)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported input file"):
        _run([tmp_path / "x.csv"], tmp_path / "o", tok_dir)


def test_resume_after_kill_is_byte_identical(corpus, tok_dir, tmp_path):
    """Kill the CLI at a random point after some shards are done; rerun; same bytes."""
    prefix = tmp_path / "resumed"
    big = _write_jsonl(tmp_path / "big.jsonl", corpus["texts"] * 3)
    cmd = [
        sys.executable,
        "-m",
        "qmath_megatron",
        "data",
        "tokenize",
        "--input",
        str(big),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tok_dir),
        "--workers",
        "2",
        "--chunk-mb",
        "0.02",
        "--json",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    work = Path(f"{prefix}.work")
    wanted = random.Random(os.getpid()).randint(1, 6)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if work.is_dir() and len(list(work.glob(".qmath/done/tokenize/*.json"))) >= wanted:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed; make the corpus bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Path(f"{prefix}.idx").exists()  # never a final file from a killed run
    done_before = len(list(work.glob(".qmath/done/tokenize/*.json")))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["resumed_units"] == done_before >= 1
    _run([big], tmp_path / "straight", tok_dir, workers=1, chunk_mb=0.02)
    assert _same_files(prefix, tmp_path / "straight")


def test_changed_inputs_refuse_to_resume(corpus, tok_dir, tmp_path):
    """A partial run (here: --max-bad-fraction stopped it before the merge) is resumed
    only with the same inputs and settings; an edit that keeps size and mtime is seen."""
    path = _write_jsonl(tmp_path / "in.jsonl", corpus["texts"][:20] + [""])
    with pytest.raises(ValueError, match="rejected"):
        _run([path], tmp_path / "out", tok_dir, max_bad_fraction=0.0)
    with pytest.raises(ValueError, match=r"other inputs or settings \(setting append_eod"):
        _run([path], tmp_path / "out", tok_dir, append_eod=False)
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(data.replace(b"a", b"b", 1))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime kept, as cp -p does
    with pytest.raises(ValueError, match="input in.jsonl changed"):
        _run([path], tmp_path / "out", tok_dir)
    out = _run([path], tmp_path / "out", tok_dir, overwrite=True)
    assert out["documents"] == 20 and out["resumed_units"] == 0


def test_inspect_cli(corpus, tok_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "data",
            "inspect",
            str(corpus["reference"]),
            "--doc",
            "2",
            "--tokenizer",
            str(tok_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"{len(corpus['texts'])} documents" in out.stdout.replace(",", "")
    assert corpus["texts"][2].strip()[:40] in out.stdout


def _word_level_tokenizer(path: Path) -> Path:
    """A small non-BPE tokenizer: no tiktoken fast path, vocab < 65,500 (uint16 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(
        {w for t in ["the answer is 42 and x equals 7", "solve for x"] for w in t.split()}
    )
    vocab = {"[UNK]": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "</s>",
                "unk_token": "[UNK]",
            }
        )
    )
    return path


def test_non_bpe_tokenizer_uses_hf_backend_and_uint16(tmp_path):
    from qmath_megatron.data.fast_tokenizer import tiktoken_spec_from_hf

    tok_dir = _word_level_tokenizer(tmp_path / "wl")
    assert tiktoken_spec_from_hf(json.loads((tok_dir / "tokenizer.json").read_text())) is None
    texts = ["the answer is 42", "solve for x and unknown words", "x equals 7"]
    path = _write_jsonl(tmp_path / "in.jsonl", texts)
    out = _run([path], tmp_path / "wl_out", tok_dir, workers=2)
    assert out["backend"] == "hf" and out["dtype"] == "uint16"
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    builder = IndexedDatasetBuilder(str(tmp_path / "wl_ref.bin"), dtype=np.uint16)
    for t in texts:
        ids = hf.encode(t, add_special_tokens=False) + [1]
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(str(tmp_path / "wl_ref.idx"))
    assert _same_files(tmp_path / "wl_out", tmp_path / "wl_ref")
    ds = IndexedDataset(str(tmp_path / "wl_out"))  # keep it alive: items are views of its mmap
    assert ds[1].tolist()[-1] == 1
