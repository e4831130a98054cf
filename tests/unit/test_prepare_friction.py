"""Friction in the chat-data tools (issue 22 item 18): a line over ``max_line_bytes`` is
rejected before it is parsed (sft-prepare, rm-prepare, rl-prompts), its rejects entry
holding only a prefix; a run that wrote only its rejects file does not block the rerun;
``allow_truncated`` reads a cut ``.gz`` / ``.zst`` in sft-prepare and rm-prepare."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import zstandard

from qmath_megatron.cli import main
from qmath_megatron.data.readers import REJECT_RAW_PREFIX, iter_raw_lines
from qmath_megatron.rl.prompts import RLPromptsConfig, output_paths, run_rl_prompts
from qmath_megatron.tokenizer.qwen import load_tokenizer
from tests.unit.test_data_safety import _conv, _one_line, _rm_argv, _rm_lines, _sft_argv
from tests.unit.test_rl_prompts import ExactChecker, ScriptedEngine, _problem

LIMIT = 1000


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _rejects(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _check_too_long(entry: dict, big: str) -> None:
    """The entry of the over-long line: reason, size and limit, only a prefix (cut on a
    character boundary) and the full length."""
    size = len(big.encode())
    assert size > 4 * LIMIT
    assert entry["reason"] == "line_too_long" and entry["line"] == 3
    assert f"{size:,} bytes" in entry["detail"] and f"{LIMIT:,}" in entry["detail"]
    assert entry["raw_bytes"] == size
    prefix = entry["raw"].encode()
    assert 0 < len(prefix) <= REJECT_RAW_PREFIX and big.encode().startswith(prefix)
    assert "\ufffd" not in entry["raw"]


def _big_conv() -> dict:
    # 2-byte UTF-8 characters: the kept prefix must not end inside one.
    return {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "é" * 2500}]
    }


# --------------------------------------------------------------------------- max_line_bytes


def test_sft_prepare_rejects_a_line_over_the_byte_limit(tiny_instruct, tmp_path, capsys):
    rows = [_conv(0), _conv(1), _big_conv(), _conv(3)]
    src = tmp_path / "in.jsonl"
    src.write_text(_jsonl(rows) + "\n", encoding="utf-8")  # and a blank line
    big = json.dumps(rows[2], ensure_ascii=False)
    prefix = tmp_path / "sft"
    assert main([*_sft_argv(src, prefix, tiny_instruct, "--json"), f"max_line_bytes={LIMIT}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_line_bytes"] == LIMIT
    assert report["lines"] == 5 and report["samples"] == 3 and report["rejected"] == 2
    assert report["rejects"]["line_too_long"] == 1 and report["rejects"]["empty"] == 1
    entries = _rejects(Path(report["rejects_file"]))
    assert [e["reason"] for e in entries] == ["line_too_long", "empty"]  # input order
    _check_too_long(entries[0], big)
    # The default limit (16 MiB) keeps the line: it is parsed, and too long in tokens.
    assert main([*_sft_argv(src, prefix, tiny_instruct, "--json", "--overwrite")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rejects"]["line_too_long"] == 0 and report["rejects"]["too_long"] == 1


def test_sft_prepare_rejects_stay_in_input_order(tiny_instruct, tmp_path, capsys):
    # An over-long line is rejected before its batch is encoded; its entry still comes
    # between those of the lines around it (so the rejects file does not depend on
    # --workers or the batch size).
    rows = [_conv(0), {"id": 1}, _big_conv(), _conv(3), {"messages": "x"}]
    src = tmp_path / "in.jsonl"
    src.write_text(_jsonl(rows), encoding="utf-8")
    argv = _sft_argv(src, tmp_path / "sft", tiny_instruct, "--json")
    assert main([*argv, f"max_line_bytes={LIMIT}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] + report["rejected"] == report["lines"] == 5
    entries = _rejects(Path(report["rejects_file"]))
    assert [(e["line"], e["reason"]) for e in entries] == [
        (2, "missing_messages"),
        (3, "line_too_long"),
        (5, "missing_messages"),
    ]


def test_rm_prepare_rejects_a_line_over_the_byte_limit(tiny_instruct, tmp_path, capsys):
    lines = _rm_lines(4).splitlines()
    big_group = {"prompt": "1+1?", "responses": [{"text": "é" * 2500, "correct": True}]}
    big = json.dumps(big_group, ensure_ascii=False)
    lines.insert(2, big)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = tmp_path / "rm"
    assert main([*_rm_argv(src, prefix, tiny_instruct, "--json"), f"max_line_bytes={LIMIT}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_line_bytes"] == LIMIT
    assert report["lines"] == 5 and report["kept"] == 4 and report["rejected"] == 1
    assert report["kept"] + report["dropped"] + report["rejected"] == report["lines"]
    assert report["rejects"]["line_too_long"] == 1
    (entry,) = _rejects(tmp_path / "rm.rejects.jsonl")
    _check_too_long(entry, big)


def test_rl_prompts_rejects_a_line_over_the_byte_limit(tiny_instruct, tmp_path):
    rows = [_problem(k, "x") for k in range(4)]
    rows.insert(2, _problem(9, "big", note="é" * 2500))
    src = tmp_path / "problems.jsonl"
    src.write_text(_jsonl(rows), encoding="utf-8")
    big = json.dumps(rows[2], ensure_ascii=False)
    out = tmp_path / "rl" / "prompts.jsonl"
    cfg = RLPromptsConfig(
        problems=str(src), model="m", output=str(out), batch_size=4, max_line_bytes=LIMIT
    )
    engine = ScriptedEngine(load_tokenizer(tiny_instruct))
    r = run_rl_prompts(cfg, engine=engine, checker=ExactChecker(), log=lambda m: None)
    assert r["lines"] == 5 and r["rejected"] == 1 and r["rejects"] == {"line_too_long": 1}
    paths = output_paths(out)
    kept = len(paths.kept.read_text().splitlines())
    removed = len(paths.removed.read_text().splitlines())
    (entry,) = _rejects(paths.rejects)
    assert kept + removed + 1 == 5
    _check_too_long(entry, big)
    with pytest.raises(ValueError, match="max_line_bytes"):
        RLPromptsConfig(problems=str(src), model="m", output=str(out), max_line_bytes=0)


# --------------------------------------------------------------------------- failed runs


def test_sft_prepare_rerun_after_a_run_without_dataset(tiny_instruct, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    prefix = tmp_path / "sft"
    _one_line(capsys, _sft_argv(bad, prefix, tiny_instruct), "no usable SFT sample", "rejects")
    rejects = tmp_path / "sft.rejects.jsonl"
    assert [e["reason"] for e in _rejects(rejects)] == ["no_assistant_turn"]
    assert not (tmp_path / "sft.bin").exists()
    # The same failure again: not "exists; pass --overwrite", the rejects say why again.
    _one_line(capsys, _sft_argv(bad, prefix, tiny_instruct), "no usable SFT sample")
    good = tmp_path / "good.jsonl"
    good.write_text(_jsonl([_conv(i) for i in range(3)]))
    assert main(_sft_argv(good, prefix, tiny_instruct)) == 0  # no --overwrite needed
    assert rejects.read_text() == "" and (tmp_path / "sft.report.json").exists()
    # With its dataset, the rejects file is an output again: --overwrite needed.
    _one_line(capsys, _sft_argv(good, prefix, tiny_instruct), "exists; pass --overwrite")


def test_rm_prepare_rerun_after_a_run_without_dataset(tiny_instruct, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    one_sided = {"prompt": "1+1?", "responses": [{"text": "2", "correct": True}]}
    bad.write_text("{not json\n" + json.dumps(one_sided) + "\n")
    prefix = tmp_path / "rm"
    _one_line(capsys, _rm_argv(bad, prefix, tiny_instruct), "no usable group", "rm.rejects")
    assert [e["reason"] for e in _rejects(tmp_path / "rm.rejects.jsonl")] == ["invalid_json"]
    assert [e["reason"] for e in _rejects(tmp_path / "rm.dropped.jsonl")] == ["no_negative"]
    assert not (tmp_path / "rm.bin").exists() and not (tmp_path / "rm.report.json").exists()
    good = tmp_path / "good.jsonl"
    good.write_text(_rm_lines(3))
    assert main(_rm_argv(good, prefix, tiny_instruct)) == 0  # no --overwrite needed
    assert (tmp_path / "rm.rejects.jsonl").read_text() == ""
    _one_line(capsys, _rm_argv(good, prefix, tiny_instruct), "exists; pass --overwrite")


# --------------------------------------------------------------------------- allow_truncated


def _cut(path: Path, data: bytes) -> None:
    """``data`` compressed by the path's suffix, only its first two thirds written."""
    blob = gzip.compress(data) if path.suffix == ".gz" else zstandard.compress(data)
    path.write_bytes(blob[: len(blob) * 2 // 3])


def _readable(path: Path) -> int:
    return sum(raw is not None for _, _, raw in iter_raw_lines(path, allow_truncated=True))


def _filler(rng: random.Random) -> str:
    return rng.randbytes(120).hex()  # incompressible: the stream spans several blocks


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_sft_prepare_truncated_input(tiny_instruct, tmp_path, capsys, suffix):
    rng = random.Random(0)
    rows = [{**_conv(i), "pad": _filler(rng)} for i in range(700)]
    src = tmp_path / f"in.jsonl{suffix}"
    _cut(src, _jsonl(rows).encode())
    readable = _readable(src)
    assert 0 < readable < len(rows)
    prefix = tmp_path / "sft"
    _one_line(capsys, _sft_argv(src, prefix, tiny_instruct), "truncated", src.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing written
    argv = _sft_argv(src, prefix, tiny_instruct, "--json")
    assert main([*argv, "allow_truncated=true"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["allow_truncated"] is True
    assert report["samples"] == readable and report["rejected"] == 1
    assert report["rejects"]["truncated_input"] == 1 and report["lines"] == readable + 1
    (entry,) = _rejects(tmp_path / "sft.rejects.jsonl")
    assert entry["reason"] == "truncated_input" and entry["raw"] is None
    assert entry["line"] == readable + 1


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_rm_prepare_truncated_input(tiny_instruct, tmp_path, capsys, suffix):
    rng = random.Random(1)
    rows = [{**json.loads(x), "pad": _filler(rng)} for x in _rm_lines(700).splitlines()]
    src = tmp_path / f"in.jsonl{suffix}"
    _cut(src, _jsonl(rows).encode())
    readable = _readable(src)
    assert 0 < readable < len(rows)
    prefix = tmp_path / "rm"
    _one_line(capsys, _rm_argv(src, prefix, tiny_instruct), "truncated", src.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
    assert main([*_rm_argv(src, prefix, tiny_instruct, "--json"), "allow_truncated=true"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == readable and report["rejected"] == 1
    assert report["rejects"]["truncated_input"] == 1 and report["lines"] == readable + 1
    (entry,) = _rejects(tmp_path / "rm.rejects.jsonl")
    assert entry["reason"] == "truncated_input" and entry["raw"] is None


@pytest.mark.parametrize("command", ["sft-prepare", "rm-prepare", "rl-prompts"])
def test_flags_set_the_byte_limit_and_truncated_inputs(command):
    """--max-line-bytes (and --allow-truncated where the tool had none) reach the config."""
    from qmath_megatron.cli import build_parser
    from qmath_megatron.config.cli import build_config

    required = {
        "sft-prepare": ["--input", "a.jsonl", "--output-prefix", "p", "--tokenizer", "t"],
        "rm-prepare": ["--input", "a.jsonl", "--output-prefix", "p", "--tokenizer", "t"],
        "rl-prompts": ["--problems", "a.jsonl", "--model", "m", "--output", "o.jsonl"],
    }[command]
    argv = ["data", command, *required, "--max-line-bytes", "4096", "--allow-truncated"]
    cfg = build_config(build_parser(argv).parse_args(argv))
    assert cfg.max_line_bytes == 4096 and cfg.allow_truncated is True
    default = build_config(build_parser(argv[:-3]).parse_args(argv[:-3]))
    assert default.max_line_bytes == 16 << 20 and default.allow_truncated is False
