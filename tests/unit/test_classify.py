"""fastText math classifier and the recall loop, on generated math vs general text."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from qmath_megatron.curation.classify import (
    FastTextConfig,
    RecallConfig,
    domain_of,
    math_probabilities,
    recall,
    select,
    train_classifier,
)
from qmath_megatron.data.synthetic import generate_documents

# DeepSeekMath's settings except a smaller hash table (2M x 256 floats = 2 GB per model).
SMALL = FastTextConfig(bucket=50_000)

_TOPICS = {
    "cooking": [
        "Preheat the oven and whisk the eggs with sugar.",
        "Simmer the sauce with garlic, basil and olive oil.",
        "Serve the soup warm with fresh bread.",
        "Let the dough rest overnight in the fridge.",
    ],
    "travel": [
        "The old town is best explored on foot in the early morning.",
        "Our train left the station late again.",
        "Pack a light jacket because evenings by the coast are windy.",
        "The museum is closed on Mondays.",
    ],
    "sports": [
        "The striker scored twice in the second half.",
        "Fans cheered as the runners crossed the finish line.",
        "The coach praised the defense after the match.",
        "She won the tournament without dropping a set.",
    ],
}


def general_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        topic = rng.choice(list(_TOPICS))
        docs.append(" ".join(rng.choice(_TOPICS[topic]) for _ in range(rng.randint(4, 9))))
    return docs


def math_docs(n: int, seed: int) -> list[str]:
    return [d["text"] for d in generate_documents(n, seed=seed, problems_per_doc=2)]


def test_classifier_separates_math_from_general_text(tmp_path):
    model = train_classifier(math_docs(200, 1), general_docs(200, 1), tmp_path / "m.bin", SMALL)
    test_math, test_general = math_docs(50, 99), general_docs(50, 99)
    p_math = math_probabilities(model, test_math)
    p_general = math_probabilities(model, test_general)
    accuracy = (sum(p >= 0.5 for p in p_math) + sum(p < 0.5 for p in p_general)) / 100
    assert accuracy >= 0.95, accuracy
    assert (tmp_path / "m.bin").is_file()


def test_select_by_threshold_and_top_fraction():
    scores = [0.2, 0.9, 0.5, 0.9, 0.1]
    assert select(scores, threshold=0.5) == [False, True, True, True, False]
    assert select(scores, top_fraction=0.4) == [
        False,
        True,
        False,
        True,
        False,
    ]  # ties: input order
    with pytest.raises(ValueError, match="exactly one"):
        select(scores)
    with pytest.raises(ValueError):
        select(scores, top_fraction=1.5)


def test_domain_of():
    assert domain_of("https://www.Math.Example.org/a?b=1") == "math.example.org"
    assert domain_of("forum.example.com/t/5") == "forum.example.com" and domain_of(None) is None


def test_recall_loop_expands_math_domains(tmp_path):
    pool = (
        [
            {"text": t, "url": f"https://mathforum.example/p/{i}"}
            for i, t in enumerate(math_docs(20, 7))
        ]
        + [
            {"text": t, "url": f"https://food.example/r/{i}"}
            for i, t in enumerate(general_docs(20, 7))
        ]
        + [
            {"text": t, "url": f"https://blog.example/{i}"}
            for i, t in enumerate(general_docs(45, 8) + math_docs(5, 8))
        ]
    )
    files = {}
    for name, rows in (
        ("pos", [{"text": t} for t in math_docs(100, 1)]),
        ("neg", [{"text": t} for t in general_docs(100, 1)]),
        ("pool", pool),
    ):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = RecallConfig(
        positive=[str(files["pos"])],
        negative=[str(files["neg"])],
        pool=[str(files["pool"])],
        output=str(out),
        rounds=2,
        fasttext=SMALL,
    )
    reports = recall(cfg)
    first = reports[0]
    assert (
        "mathforum.example" in first["math_domains"] and "food.example" not in first["math_domains"]
    )
    assert "blog.example" in first["math_domains"]  # 5 of 50 pages = the 10% ratio
    assert first["selected"] >= 25 and first["pages_added_to_seeds"] >= 20
    saved = json.loads((out / "report.json").read_text())
    assert saved["rounds"] == reports
    # A rerun (e.g. after a crash in round 2) reuses finished rounds instead of retraining.
    (out / "round_1" / "model.bin").unlink()
    again = recall(cfg)
    assert again[0]["resumed"] and again[0]["math_domains"] == first["math_domains"]
    assert again[0]["pages_added_to_seeds"] == first["pages_added_to_seeds"]
    assert not (out / "round_1" / "model.bin").exists()
    selected = [
        json.loads(x)
        for x in (out / "round_1" / "selected" / "pool.jsonl").read_text().splitlines()
    ]
    assert len(selected) == first["selected"]
    assert all("math_score" in r and r["recall_round"] == 1 for r in selected)


def test_classify_cli(tmp_path):
    for name, docs in (("pos", math_docs(150, 2)), ("neg", general_docs(150, 2))):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in docs)
        )
    mixed = [{"id": f"m{i}", "text": t} for i, t in enumerate(math_docs(10, 5))] + [
        {"id": f"g{i}", "text": t} for i, t in enumerate(general_docs(10, 5))
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed) + "not json\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "data",
            "classify",
            "--positive",
            str(tmp_path / "pos.jsonl"),
            "--negative",
            str(tmp_path / "neg.jsonl"),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--top-fraction",
            "0.5",
            "--bucket",
            "50000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    kept = [
        json.loads(x) for x in (tmp_path / "out" / "kept" / "in.jsonl").read_text().splitlines()
    ]
    assert len(kept) == 10 and sum(r["id"].startswith("m") for r in kept) >= 9
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rejected"] == {"invalid_json": 1}
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resumed_shards"] == 1
