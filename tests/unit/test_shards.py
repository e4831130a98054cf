"""The one resumable-shard mechanism (qmath_megatron/data/shards.py): output naming,
fingerprints (refuse / --overwrite / resume), done markers under failures and kill -9,
and a dead worker failing the run instead of hanging."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmath_megatron.data.readers import Reject
from qmath_megatron.data.shards import ShardJob, WorkerDiedError, discover, output_name, plan

ROOT = Path(__file__).resolve().parents[2]


def copy_shard(shard, out, state) -> dict:
    """Good records to ``kept`` (with their shard), bad lines to ``rejects``; test hooks:
    sleep per shard, raise on one shard, or die like an OOM-killed worker on one."""
    state = state or {}
    if shard.name == state.get("die_on"):
        os.kill(os.getpid(), signal.SIGKILL)
    kept = rejected = 0
    with out.open("kept") as fk, out.open("rejects") as fr:
        for item in shard.records(["text"]):
            if isinstance(item, Reject):
                fr.write(item.to_json() + "\n")
                rejected += 1
            else:
                fk.write(json.dumps({**item.obj, "shard": shard.name}) + "\n")
                kept += 1
            if shard.name == state.get("fail_on") and kept == 2:
                raise RuntimeError(f"boom in {shard.name}")
    time.sleep(state.get("sleep", 0))
    return {"kept": kept, "rejected": rejected}


def _lines(n: int, tag: str) -> str:
    return "".join(json.dumps({"text": f"{tag} document {i}"}) + "\n" for i in range(n))


def _tree(root: Path) -> dict[str, bytes]:
    """Every output file (not the run state) by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".qmath" not in p.parts
    }


def _job(out: Path, settings: dict | None = None, logs: list | None = None, **kw) -> ShardJob:
    log = logs.append if logs is not None else (lambda m: None)
    return ShardJob("copy", out, ("kept", "rejects"), settings or {"k": 1}, log=log, **kw)


def test_output_names_keep_inputs_apart(tmp_path):
    names = [
        "a/x.jsonl",
        "b/x.jsonl",
        "shard.0.jsonl",
        "shard.1.jsonl",
        "x.jsonl",
        "x.jsonl.gz",
        "x.json",
        "deep/er/x.ndjson",
    ]
    for rel in names:
        path = tmp_path / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _lines(2, rel).encode()
        path.write_bytes(gzip.compress(data) if rel.endswith(".gz") else data)
    files = discover([str(tmp_path / "in" / "**" / "*")])
    assert sorted(f.rel for f in files) == sorted(names)  # relative to the common root
    outs = [output_name(f.rel) for f in files]
    assert len(set(outs)) == len(outs)
    assert (
        output_name("x.jsonl.gz") == "x.jsonl.gz.jsonl" and output_name("a/x.jsonl") == "a/x.jsonl"
    )
    # One file alone is named by its base name (its folder is the root).
    assert [f.rel for f in discover([str(tmp_path / "in" / "a" / "x.jsonl")])] == ["x.jsonl"]
    # Names that would still collide are refused before any work.
    (tmp_path / "clash").mkdir()
    (tmp_path / "clash" / "y.json").write_text(_lines(1, "a"))
    (tmp_path / "clash" / "y.json.jsonl").write_text(_lines(1, "b"))
    with pytest.raises(ValueError, match="same output file"):
        discover([str(tmp_path / "clash" / "*")])
    # Byte ranges of one file get distinct part names.
    big = tmp_path / "big.jsonl"
    big.write_text(_lines(200, "big"))
    parts = plan(discover([str(big)]), chunk_bytes=1000)
    assert len(parts) > 3 and len({s.name for s in parts}) == len(parts)
    assert parts[0].name == "big.jsonl.part-00000"


def test_fingerprint_refuses_changes_resumes_and_overwrite_redoes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.jsonl").write_text(_lines(5, "x"))
    (src / "y.jsonl").write_text(_lines(3, "y") + "not json\n")
    shards = plan(discover([str(src / "*.jsonl")]))
    out = tmp_path / "out"
    logs: list[str] = []
    first = _job(out, logs=logs).open(shards).map("copy", copy_shard)
    assert first == [{"kept": 5, "rejected": 0}, {"kept": 3, "rejected": 1}]
    before = _tree(out)
    # Same inputs and settings: resumed, and it says so.
    run = _job(out, logs=logs).open(shards)
    assert run.map("copy", copy_shard) == first and run.resumed["copy"] == 2
    assert any("resumed copy: 2 of 2" in m for m in logs)
    # A touch (same content, new mtime/ctime) is not a change: the content hash decides.
    os.utime(src / "x.jsonl")
    _job(out).open(shards)
    # A changed setting is refused, naming it.
    with pytest.raises(ValueError, match=r"setting k: 1 -> 2.*--overwrite"):
        _job(out, {"k": 2}).open(shards)
    # A same-size edit that keeps the mtime (cp -p, rsync -t) is refused.
    st = (src / "x.jsonl").stat()
    (src / "x.jsonl").write_text(_lines(5, "z"))
    os.utime(src / "x.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src / "x.jsonl").stat().st_size == st.st_size
    with pytest.raises(ValueError, match="input x.jsonl changed"):
        _job(out).open(shards)
    # Another input under the same name elsewhere is refused too.
    (tmp_path / "other").mkdir()
    shutil.copy(src / "y.jsonl", tmp_path / "other" / "y.jsonl")
    with pytest.raises(ValueError, match="is new"):
        _job(out).open(plan(discover([str(src / "*.jsonl"), str(tmp_path / "other" / "*")])))
    # --overwrite redoes everything with the new content.
    run = _job(out, overwrite=True).open(shards)
    assert run.map("copy", copy_shard) == first and run.resumed["copy"] == 0
    after = _tree(out)
    assert after.keys() == before.keys() and after["kept/x.jsonl"] != before["kept/x.jsonl"]
    # Outputs that no resumable run wrote are never replaced silently.
    foreign = tmp_path / "foreign"
    (foreign / "kept").mkdir(parents=True)
    (foreign / "kept" / "x.jsonl").write_text("mine\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _job(foreign).open(shards)


def test_failing_shard_is_never_marked_done(tmp_path):
    for i in range(3):
        (tmp_path / f"s{i}.jsonl").write_text(_lines(4, f"s{i}"))
    shards = plan(discover([str(tmp_path / "s*.jsonl")]))
    straight = tmp_path / "straight"
    _job(straight).open(shards).map("copy", copy_shard)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom in s1.jsonl"):
        _job(out).open(shards).map(
            "copy", copy_shard, init=dict, init_args=({"fail_on": "s1.jsonl"},)
        )
    assert sorted(p.name for p in (out / ".qmath" / "done" / "copy").iterdir()) == ["000000.json"]
    assert not [p for p in out.rglob("*.tmp")] and not (out / "kept" / "s1.jsonl").exists()
    run = _job(out).open(shards)
    run.map("copy", copy_shard)
    assert run.resumed["copy"] == 1 and _tree(out) == _tree(straight)


def _drive(out: str, pattern: str, workers: int, sleep: float) -> None:
    """Run the copy job (entry point of the kill -9 test's subprocess)."""
    shards = plan(discover([pattern]))
    _job(Path(out)).open(shards).map(
        "copy", copy_shard, workers=workers, init=dict, init_args=({"sleep": sleep},)
    )


def test_kill_9_mid_run_then_rerun_is_byte_identical(tmp_path):
    for i in range(8):
        (tmp_path / f"p{i}.jsonl").write_text(_lines(20, f"p{i}") + "{broken\n")
    pattern = str(tmp_path / "p*.jsonl")
    _drive(str(tmp_path / "straight"), pattern, 1, 0)
    out = tmp_path / "out"
    code = f"from tests.unit.test_shards import _drive; _drive({str(out)!r}, {pattern!r}, 2, 0.4)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL
    )
    done = out / ".qmath" / "done" / "copy"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and len(list(done.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-shard
    proc.wait()
    n_done = len(list(done.glob("*.json")))
    assert 3 <= n_done < 8
    logs: list[str] = []
    run = _job(out, logs=logs).open(plan(discover([pattern])))
    run.map("copy", copy_shard)
    assert run.resumed["copy"] == n_done
    assert _tree(out) == _tree(tmp_path / "straight")


def test_dead_worker_fails_clearly_instead_of_hanging(tmp_path):
    for i in range(4):
        (tmp_path / f"w{i}.jsonl").write_text(_lines(3, f"w{i}"))
    shards = plan(discover([str(tmp_path / "w*.jsonl")]))
    run = _job(tmp_path / "out").open(shards)
    start = time.time()
    with pytest.raises(WorkerDiedError, match=r"worker process died.*w2.jsonl.*out-of-memory"):
        run.map("copy", copy_shard, workers=2, init=dict, init_args=({"die_on": "w2.jsonl"},))
    assert time.time() - start < 60
    assert not (tmp_path / "out" / ".qmath" / "done" / "copy" / "000002.json").exists()


def _bad_init(path: str) -> dict:
    raise ValueError(f"cannot load model {path}")


def test_worker_setup_errors_reach_the_caller(tmp_path):
    """An init that fails in a spawned worker (e.g. a bad --model) is that error, not a
    'worker died'; in-process runs raise it too."""
    for i in range(2):
        (tmp_path / f"i{i}.jsonl").write_text(_lines(2, f"i{i}"))
    shards = plan(discover([str(tmp_path / "i*.jsonl")]))
    for workers in (1, 2):
        run = _job(tmp_path / f"out{workers}").open(shards)
        with pytest.raises(ValueError, match="cannot load model /nope"):
            run.map("copy", copy_shard, workers=workers, init=_bad_init, init_args=("/nope",))
        assert not list((tmp_path / f"out{workers}" / ".qmath" / "done" / "copy").iterdir())
