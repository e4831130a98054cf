"""The shared JSONL reader's byte limit: a line over ``max_line_bytes`` is one reject that
is never decoded or parsed, its rejects entry holds only a prefix and the full length, and
every line of the file still ends as exactly one record or reject."""

from __future__ import annotations

import json

from qmath_megatron.data import readers
from qmath_megatron.data.readers import (
    LINE_TOO_LONG,
    REJECT_RAW_PREFIX,
    Record,
    Reject,
    count_lines,
    iter_records,
    parse_json_line,
)

BIG = 5 * 1024 * 1024


def _big_line() -> bytes:
    return json.dumps({"text": "x" * BIG}).encode("utf-8")


def test_a_line_over_the_byte_limit_is_one_short_reject_and_never_parsed(tmp_path, monkeypatch):
    big = _big_line()
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n' + big + b'\n{"text": "b"}\n')
    real_loads = json.loads
    parsed: list[int] = []

    def loads(s, *args, **kwargs):
        parsed.append(len(s))
        assert len(s) < BIG, "json.loads was called on the over-long line"
        return real_loads(s, *args, **kwargs)

    monkeypatch.setattr(readers.json, "loads", loads)
    items = list(iter_records(path, max_line_bytes=1 << 20))
    assert len(parsed) == 2  # the two short lines only

    # Line conservation: one item per line, in file order.
    assert len(items) == count_lines(path) == 3
    assert [type(x) for x in items] == [Record, Reject, Record]
    assert [x.text for x in items if isinstance(x, Record)] == ["a", "b"]
    reject = items[1]
    assert reject.reason == LINE_TOO_LONG and reject.line == 2
    assert reject.offset == len(b'{"text": "a"}\n')
    assert reject.raw == big[:REJECT_RAW_PREFIX] and reject.raw_bytes == len(big)

    entry = reject.to_json()
    assert len(entry) < 2 * REJECT_RAW_PREFIX
    decoded = real_loads(entry)
    assert decoded["raw_bytes"] == len(big) and decoded["line"] == 2
    assert decoded["raw"] == big[:REJECT_RAW_PREFIX].decode("utf-8")


def test_without_a_limit_the_long_line_is_read_and_rejects_keep_their_format(tmp_path):
    big = _big_line()
    path = tmp_path / "in.jsonl"
    path.write_bytes(big + b"\nnot json\n")
    items = list(iter_records(path))
    assert isinstance(items[0], Record) and len(items[0].text) == BIG
    assert items[0].raw_bytes == len(big) + 1
    assert isinstance(items[1], Reject) and items[1].reason == "invalid_json"
    assert set(json.loads(items[1].to_json())) == {"reason", "source", "line", "offset", "raw"}


def test_a_line_exactly_at_the_limit_is_parsed():
    line = b'{"text": "abc"}'
    assert parse_json_line(line, max_bytes=len(line)) == ({"text": "abc"}, None, "")
    obj, reason, detail = parse_json_line(line, max_bytes=len(line) - 1)
    assert obj is None and reason == LINE_TOO_LONG
    assert detail == f"{len(line)} bytes > the limit of {len(line) - 1}"
