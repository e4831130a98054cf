"""Faults and bad input in the data tools: truncated/corrupt compressed
inputs, stale resume state, invalid values, refusals, dead workers, corrupt indexed
datasets. Errors are one `qmath: error:` line naming the file, never a traceback."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from qmath_megatron.cli import main
from qmath_megatron.data.readers import CorruptInputError, Record, Reject, iter_records


def _docs(n: int, tag: str = "d") -> bytes:
    return "".join(
        json.dumps(
            {"id": f"{tag}{i}", "text": f"{tag} document number {i} about the value {i * 7}"}
        )
        + "\n"
        for i in range(n)
    ).encode()


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qmath: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, last


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tok") / "wl"
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "document": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return path


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    import zstandard

    # zstd: several blocks, so a cut file still has a readable part (gzip streams by byte).
    data = _docs(20000)
    gz, zst = gzip.compress(data[: len(data) // 10]), zstandard.ZstdCompressor().compress(data)
    files = {
        "gz": root / "cut.jsonl.gz",
        "zst": root / "cut.jsonl.zst",
        "bad_zst": root / "bad.jsonl.zst",
    }
    files["gz"].write_bytes(gz[: len(gz) // 2])
    files["zst"].write_bytes(zst[: len(zst) // 2])
    files["bad_zst"].write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(200))
    files["data"] = data  # type: ignore[assignment]
    return files


def test_truncated_or_corrupt_compressed_input_is_an_error_naming_the_file(broken):
    for key, what in (
        ("gz", "truncated gzip"),
        ("zst", "truncated zstd"),
        ("bad_zst", "corrupt zstd"),
    ):
        with pytest.raises(CorruptInputError, match=f"{broken[key].name}: {what}"):
            list(iter_records(broken[key]))
    # On request: the readable part, then one truncated_input reject for the rest.
    for key in ("gz", "zst"):
        items = list(iter_records(broken[key], allow_truncated=True))
        good = [i for i in items if isinstance(i, Record)]
        assert 0 < len(good) < 20000 and isinstance(items[-1], Reject)
        assert items[-1].reason == "truncated_input"
        # Every good record is a true prefix record; the cut line itself is a reject.
        assert [g.obj["id"] for g in good] == [f"d{i}" for i in range(len(good))]


@pytest.mark.parametrize("tool", ["tokenize", "decontaminate", "dedup", "classify", "score"])
def test_cli_one_line_error_for_truncated_gz_and_corrupt_zst(tool, broken, tok, tmp_path, capsys):
    (tmp_path / "b.jsonl").write_text(json.dumps({"problem": "x y z"}) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.bin").write_bytes(b"not a model")  # never loaded: input fails first
    extra = {
        "tokenize": ["--tokenizer", str(tok), "--no-progress"],
        "decontaminate": ["--benchmark", f"{tmp_path / 'b.jsonl'}:problem"],
        "dedup": [],
        "classify": ["--model", str(tmp_path / "m" / "model.bin"), "--threshold", "0.5"],
        "score": ["--model", str(tmp_path / "m"), "--engine", "transformers"],
    }[tool]
    for key, needle in (("gz", "truncated gzip"), ("bad_zst", "corrupt zstd")):
        out = (
            ["--output-prefix", str(tmp_path / key / "ds")]
            if tool == "tokenize"
            else ["--output", str(tmp_path / key)]
        )
        if tool in ("classify", "score"):  # these load a model first: check the reader path only
            from qmath_megatron.data.shards import discover, plan

            with pytest.raises(CorruptInputError, match=needle):
                list(plan(discover([str(broken[key])]))[0].records())
            continue
        rc, err = _cli(capsys, "data", tool, "--input", str(broken[key]), *out, *extra)
        _one_line_error(rc, err, str(broken[key]), needle)


def test_allow_truncated_keeps_the_readable_part_with_a_reject(broken, tok, tmp_path, capsys):
    rc, err = _cli(
        capsys,
        "data",
        "dedup",
        "--input",
        str(broken["gz"]),
        "--output",
        str(tmp_path / "o"),
        "--allow-truncated",
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["rejected"].get("truncated_input") == 1 and 0 < report["documents"] < 20000


def test_invalid_values_fail_before_any_work(tok, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_docs(5))
    for flags, needle in (
        (["--ngram", "0"], "--ngram must be >= 1"),
        (["--ngram", "-1"], "--ngram"),
        (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (["--partitions", "0"], "--partitions must be >= 1"),
        (["--num-perm", "0"], "--num-perm"),
    ):
        rc, err = _cli(
            capsys, "data", "dedup", "--input", str(src), "--output", str(tmp_path / "d"), *flags
        )
        _one_line_error(rc, err, needle)
    assert not (tmp_path / "d").exists()
    rc, err = _cli(
        capsys,
        "data",
        "tokenize",
        "--input",
        str(src),
        "--output-prefix",
        "",
        "--tokenizer",
        str(tok),
    )
    _one_line_error(rc, err, "--output-prefix ''")
    rc, err = _cli(
        capsys,
        "data",
        "tokenize",
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "t" / "ds"),
        "--tokenizer",
        str(tok),
        "--rejects-file",
        str(tmp_path / "missing" / "r.jsonl"),
    )
    _one_line_error(rc, err, "does not exist")
    assert not (tmp_path / "t").exists()
    rc, err = _cli(
        capsys,
        "data",
        "classify",
        "--input",
        str(src),
        "--output",
        str(tmp_path / "c"),
        "--top-fraction",
        "0",
        "--positive",
        str(src),
        "--negative",
        str(src),
    )
    _one_line_error(rc, err, "--top-fraction must be in (0, 1]")
    assert not (tmp_path / "c").exists()  # found before training or scoring anything


def test_read_only_output_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_docs(3))
    if os.geteuid() == 0:  # root writes through mode bits: sysfs refuses everyone
        target = Path("/sys/qmath-test-output")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = tmp_path / "ro" / "out"
    rc, err = _cli(capsys, "data", "dedup", "--input", str(src), "--output", str(target))
    _one_line_error(rc, err, "cannot create output directory", str(target))


def test_benchmark_line_that_is_a_string(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_docs(3))
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"problem": "ok"}) + "\n" + json.dumps("just a string") + "\n"
    )
    rc, err = _cli(
        capsys,
        "data",
        "decontaminate",
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o"),
        "--benchmark",
        f"{tmp_path / 'b.jsonl'}:problem",
    )
    _one_line_error(rc, err, "b.jsonl:2 is a JSON str")


def test_tokenize_refusals(tok, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_docs(4) + b"{bad\n")
    prefix = str(tmp_path / "ds")
    base = ["data", "tokenize", "--input", str(src), "--tokenizer", str(tok), "--no-progress"]
    # Every line bad, or the wrong --text-key: an error, not an empty dataset.
    rc, err = _cli(capsys, *base, "--output-prefix", prefix, "--text-key", "body")
    _one_line_error(rc, err, "all 5 records were rejected", "--text-key")
    assert not Path(f"{prefix}.idx").exists()
    # A partial run (stopped by --max-bad-fraction); the rerun with --rejects-file added holds
    # the rejects of the shards done before, too.
    rc, err = _cli(
        capsys, *base, "--output-prefix", prefix, "--max-bad-fraction", "0", "--overwrite"
    )
    _one_line_error(rc, err, "rejected")
    rc, err = _cli(
        capsys, *base, "--output-prefix", prefix, "--rejects-file", str(tmp_path / "rej.jsonl")
    )
    assert rc == 0, err
    assert [json.loads(x)["reason"] for x in (tmp_path / "rej.jsonl").read_text().splitlines()] == [
        "invalid_json"
    ]
    assert "resumed" in err
    # An existing PREFIX.bin/.idx is not replaced without --overwrite.
    before = Path(f"{prefix}.bin").read_bytes()
    rc, err = _cli(capsys, *base, "--output-prefix", prefix)
    _one_line_error(rc, err, f"{prefix}.bin exists", "--overwrite")
    rc, err = _cli(capsys, *base, "--output-prefix", prefix, "--overwrite", "--no-eod")
    assert rc == 0 and Path(f"{prefix}.bin").read_bytes() != before


def test_stale_resume_state_is_refused(tmp_path, capsys):
    """dedup: an input edited in place (same line count and size, mtime kept as by cp -p);
    decontaminate: another input with the same name; classify/score: another --model."""
    src = tmp_path / "in" / "x.jsonl"
    src.parent.mkdir()
    src.write_bytes(_docs(6))
    rc, err = _cli(capsys, "data", "dedup", "--input", str(src), "--output", str(tmp_path / "d"))
    assert rc == 0, err
    st = src.stat()
    src.write_bytes(_docs(6).replace(b"number 1 ", b"number 9 "))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, err = _cli(capsys, "data", "dedup", "--input", str(src), "--output", str(tmp_path / "d"))
    _one_line_error(rc, err, "input x.jsonl changed", "--overwrite")

    (tmp_path / "b.jsonl").write_text(json.dumps({"problem": "unrelated words here"}) + "\n")
    other = tmp_path / "other" / "x.jsonl"
    other.parent.mkdir()
    other.write_bytes(_docs(3, "o"))
    bench = ["--benchmark", f"{tmp_path / 'b.jsonl'}:problem", "--output", str(tmp_path / "dc")]
    assert _cli(capsys, "data", "decontaminate", "--input", str(src), *bench)[0] == 0
    rc, err = _cli(capsys, "data", "decontaminate", "--input", str(other), *bench)
    _one_line_error(rc, err, "input x.jsonl changed")

    from qmath_megatron.curation.classify import ClassifyConfig, classify, train_classifier
    from tests.unit.test_classify import SMALL, general_docs, math_docs

    train_classifier(math_docs(40, 3), general_docs(40, 3), tmp_path / "m1.bin", SMALL)
    shutil.copy(tmp_path / "m1.bin", tmp_path / "m2.bin")
    with open(tmp_path / "m2.bin", "ab") as f:
        f.write(b"\0")  # another model file: refused before it is loaded
    report = classify(
        ClassifyConfig(
            inputs=[str(src)],
            output=str(tmp_path / "c"),
            model=str(tmp_path / "m1.bin"),
            threshold=0.5,
        ),
        log=lambda m: None,
    )
    assert report["scored"] == 6
    with pytest.raises(ValueError, match="setting model"):
        classify(
            ClassifyConfig(
                inputs=[str(src)],
                output=str(tmp_path / "c"),
                model=str(tmp_path / "m2.bin"),
                threshold=0.5,
            )
        )

    from qmath_megatron.curation.llm_runner import LLMStepConfig, score
    from tests.unit.test_data_conservation import Scripted

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
    score(
        LLMStepConfig(inputs=[str(src)], output=str(tmp_path / "s"), model=str(tmp_path / "a")),
        engine=Scripted(),
    )
    with pytest.raises(ValueError, match="setting model"):
        score(
            LLMStepConfig(inputs=[str(src)], output=str(tmp_path / "s"), model=str(tmp_path / "b")),
            engine=Scripted(),
        )


def test_inspect_and_validate_corrupt_indexed_datasets(tmp_path, capsys):
    from qmath_megatron.data.indexed import validate_indexed_dataset, write_index

    (tmp_path / "r.idx").write_bytes(os.urandom(300))
    (tmp_path / "r.bin").write_bytes(os.urandom(30))
    rc, err = _cli(capsys, "data", "inspect", str(tmp_path / "r"))
    _one_line_error(rc, err, "r.idx is not a Megatron indexed-dataset index")
    rc, err = _cli(capsys, "data", "inspect", str(tmp_path / "missing"))
    _one_line_error(rc, err, "missing.idx")
    lengths = np.array([3, 4, 5], dtype=np.int32)
    write_index(tmp_path / "ok.idx", np.int32, lengths, np.arange(4))
    (tmp_path / "ok.bin").write_bytes(np.arange(12, dtype=np.int32).tobytes())
    assert validate_indexed_dataset(tmp_path / "ok", deep=True)["tokens"] == 12
    (tmp_path / "ok.bin").write_bytes(
        np.arange(10, dtype=np.int32).tobytes()
    )  # shorter than the .idx says
    with pytest.raises(ValueError, match=r"ok.bin: 40 bytes, but .* describes 48 \(truncated\)"):
        validate_indexed_dataset(tmp_path / "ok")
    data = (tmp_path / "ok.idx").read_bytes()
    (tmp_path / "ok.idx").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="ok.idx: .* truncated or corrupt"):
        validate_indexed_dataset(tmp_path / "ok")


@pytest.mark.parametrize("tool", ["tokenize", "dedup", "decontaminate"])
def test_a_killed_worker_fails_the_run_instead_of_hanging(tool, tok, tmp_path, capsys):
    """kill -9 one worker (as the OOM killer does): a clear one-line error, no hang. The
    command runs in a thread of this process (a subprocess would pay the CLI's torch import)."""
    import threading

    import psutil

    for i in range(6):
        (tmp_path / f"p{i}.jsonl").write_bytes(_docs(400, f"p{i}-"))
    (tmp_path / "b.jsonl").write_text(json.dumps({"problem": "unrelated"}) + "\n")
    inputs = ["--input", str(tmp_path / "p*.jsonl"), "--workers", "2"]
    extra = {
        "tokenize": [
            "--output-prefix",
            str(tmp_path / "o" / "ds"),
            "--tokenizer",
            str(tok),
            "--no-progress",
        ],
        "dedup": ["--output", str(tmp_path / "o")],
        "decontaminate": [
            "--output",
            str(tmp_path / "o"),
            "--benchmark",
            f"{tmp_path / 'b.jsonl'}:problem",
        ],
    }[tool]
    me, start = psutil.Process(), time.time() - 1
    before = {c.pid for c in me.children(recursive=True)}
    capsys.readouterr()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(["data", tool, *inputs, *extra])))
    thread.start()
    victim, deadline = None, time.time() + 60
    while victim is None and time.time() < deadline and thread.is_alive():
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if (
                    child.pid not in before
                    and child.create_time() >= start
                    and any("spawn_main" in part for part in child.cmdline())
                ):
                    victim = child
                    break
        time.sleep(0.01)
    assert victim is not None, "no worker seen"
    victim.kill()
    thread.join(timeout=60)
    assert not thread.is_alive(), f"{tool} hung after a worker was killed"
    _one_line_error(
        result[0],
        capsys.readouterr().err,
        "worker process died",
        "rerun the same command to resume",
    )


def test_cli_defaults_come_from_the_config_dataclasses():
    """One place for defaults (dedup --threshold was 0.7 in the CLI and
    0.6 in DedupConfig)."""
    import dataclasses

    from qmath_megatron.cli import build_parser
    from qmath_megatron.curation.classify import ClassifyConfig, FastTextConfig, RecallConfig
    from qmath_megatron.curation.dedup import DedupConfig
    from qmath_megatron.curation.llm_runner import LLMStepConfig
    from qmath_megatron.curation.run_decontaminate import DecontamConfig
    from qmath_megatron.data.tokenize import TokenizeConfig

    parser = build_parser()
    io = ["--input", "x.jsonl", "--output", "o"]
    commands = {
        "tokenize": (
            ["--input", "x", "--output-prefix", "p", "--tokenizer", "t"],
            [TokenizeConfig],
        ),
        "decontaminate": ([*io, "--benchmark", "b:f"], [DecontamConfig]),
        "dedup": (io, [DedupConfig]),
        "classify": ([*io, "--threshold", "0.5"], [ClassifyConfig, FastTextConfig]),
        "recall": (
            ["--positive", "p", "--negative", "n", "--pool", "x", "--output", "o"],
            [RecallConfig, FastTextConfig],
        ),
        "score": ([*io, "--model", "m"], [LLMStepConfig]),
        "synthesize": ([*io, "--model", "m"], [LLMStepConfig]),
    }
    checked = 0
    for command, (argv, classes) in commands.items():
        args = vars(parser.parse_args(["data", command, *argv]))
        for cls in classes:
            for f in dataclasses.fields(cls):
                given = cls is ClassifyConfig and f.name == "threshold"  # set in argv above
                if f.name not in args or f.default is dataclasses.MISSING or given:
                    continue
                assert args[f.name] == f.default, f"{command} --{f.name}"
                checked += 1
    assert checked >= 25
    assert vars(parser.parse_args(["data", "dedup", *io]))["threshold"] == 0.6
