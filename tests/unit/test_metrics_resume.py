"""A resumed run's metrics.jsonl holds each iteration once: the records after the
checkpoint's iteration (recomputed by the resumed run) are dropped before it appends."""

from __future__ import annotations

import json

from qmath_megatron.training.metrics import MetricsSink


def _sink(path, resumed_iteration):
    return MetricsSink(str(path), None, None, "disabled", "run", {}, resumed_iteration)


def _iterations(path):
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def test_resume_drops_the_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"iteration": i, "lm loss": 10.0 - i / 3} for i in range(1, 11)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = path.read_text().splitlines()
    sink = _sink(path, 8)
    assert path.read_text().splitlines() == before[:8]  # 1..8 unchanged, in order
    sink.log(9, {"lm loss": 1.5})
    sink.close()
    assert _iterations(path) == list(range(1, 10))
    assert json.loads(path.read_text().splitlines()[-1]) == {"iteration": 9, "lm loss": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left


def test_a_fresh_run_and_a_missing_file_are_left_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 5}\n')
    _sink(path, None).close()  # not a resume: the file is appended to as before
    assert _iterations(path) == [5]
    _sink(tmp_path / "new.jsonl", 3).close()
    assert not (tmp_path / "new.jsonl").exists()
