"""MinHash dedup: precision and recall on a generated labelled near-duplicate set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qmath_megatron.curation.dedup import DedupConfig, UnionFind, dedup, shingles
from qmath_megatron.curation.neardups import labelled_corpus, pairwise_precision_recall


def test_pairwise_metrics_by_hand():
    # truth pairs: (0,1); predicted pairs: (0,1), (2,3) -> precision 0.5, recall 1.0
    assert pairwise_precision_recall(["a", "a", "b", "c"], [0, 0, 1, 1]) == (0.5, 1.0)
    assert pairwise_precision_recall(["a", "a", "a"], [0, 0, 1]) == (1.0, 1 / 3)


def test_union_find_keeps_first_document():
    uf = UnionFind(5)
    uf.union(3, 1)
    uf.union(4, 3)
    assert [uf.find(i) for i in range(5)] == [0, 1, 2, 1, 1]


def test_shingles_normalise_case_and_punctuation():
    assert shingles("A b, C d!", 2) == {b"a b", b"b c", b"c d"}
    assert shingles("one two", 5) == {b"one two"} and shingles("", 5) == set()
    assert shingles("A b, C", 2, normalize="none") == {b"A b,", b"b, C"}
    with pytest.raises(ValueError, match="unknown normalisation"):
        shingles("x", 2, normalize="stem")


def test_precision_recall_on_labelled_near_duplicates(tmp_path, capsys):
    records = labelled_corpus(300, seed=0)
    shards = [records[: len(records) // 2], records[len(records) // 2 :]]
    for i, shard in enumerate(shards):
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard))
    (tmp_path / "part-1.jsonl").open("a").write("{broken\n")
    report = dedup(
        DedupConfig(
            inputs=[str(tmp_path / "part-*.jsonl")], output=str(tmp_path / "out"), workers=2
        )
    )
    kept = [
        json.loads(x)
        for f in sorted((tmp_path / "out" / "kept").glob("*.jsonl"))
        for x in f.read_text().splitlines()
    ]
    removed = [
        json.loads(x)
        for f in sorted((tmp_path / "out" / "removed").glob("*.jsonl"))
        for x in f.read_text().splitlines()
    ]
    assert len(kept) + len(removed) == len(records) and report["bad_lines"] == 1
    # Reconstruct the predicted clusters in input order and score them as pairs.
    ordered = [r["id"] for r in records]
    cluster_of = {r["id"]: ordered.index(r["id"]) for r in kept}
    cluster_of.update({r["id"]: r["dedup_cluster"] for r in removed})
    precision, recall = pairwise_precision_recall(
        [r["label"] for r in records], [cluster_of[r["id"]] for r in records]
    )
    print(f"dedup precision {precision:.3f} recall {recall:.3f} ({report['clusters']} clusters)")
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # Deterministic rule: the kept member of each cluster is its first record in input order.
    first = {}
    for i, r in enumerate(records):
        first.setdefault(cluster_of[r["id"]], i)
    assert all(first[cluster_of[r["id"]]] == ordered.index(r["id"]) for r in kept)


def test_cli_and_bad_band_settings(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in labelled_corpus(20, seed=1))
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "data",
            "dedup",
            "--input",
            str(tmp_path / "a.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--bands",
            "20",
            "--rows",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "report.json").read_text())["bands"] == 20
    with pytest.raises(ValueError, match="exceeds num_perm"):
        DedupConfig(inputs=[], output="", bands=40, rows=5).band_rows()
    with pytest.raises(ValueError, match="both"):
        DedupConfig(inputs=[], output="", bands=10).band_rows()


def test_interrupted_signature_stage_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Shard 0's signatures are done, shard 1 fails half-way (its spills half written): the
    rerun reuses the first, redoes the second, and gives what an uninterrupted run gives."""
    import qmath_megatron.curation.dedup as dedup_module

    records = labelled_corpus(60, seed=2)
    for i in range(2):
        (tmp_path / f"s-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[i::2]))
    straight = dedup(DedupConfig(inputs=[str(tmp_path / "s-*.jsonl")], output=str(tmp_path / "a")))
    cfg = DedupConfig(inputs=[str(tmp_path / "s-*.jsonl")], output=str(tmp_path / "b"))
    real = dedup_module._signatures_shard

    def failing(shard, out, state):
        if shard.index == 1:
            out.path("signatures", ".p000").write_bytes(b"partial garbage")
            raise OSError("disk full")
        return real(shard, out, state)

    monkeypatch.setattr(dedup_module, "_signatures_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        dedup(cfg)
    assert not list((tmp_path / "b" / "signatures").glob(".*.tmp"))  # temporaries removed
    monkeypatch.setattr(dedup_module, "_signatures_shard", real)
    resumed = dedup(cfg)
    assert resumed["resumed_shards"] == 1
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "resumed_shards")} == {
        k: v for k, v in straight.items() if k not in ("seconds", "resumed_shards")
    }
    for kind in ("kept", "removed"):
        for f in (tmp_path / "a" / kind).glob("*.jsonl"):
            assert f.read_text() == (tmp_path / "b" / kind / f.name).read_text()
