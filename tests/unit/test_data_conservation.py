"""No data tool loses a record.

Inputs with identical base names in different folders, names that differ only in a suffix
or after the first dot, and gzip / zstd / plain files mixed, with bad lines of every kind
(invalid JSON and UTF-8, a lone surrogate, blank lines, records holding U+2028/U+2029/U+0085).
For every tool, every input line ends in exactly one of its kept / removed / rejects
outputs, counted line by line per input, and the report's counts equal the files' line
counts. A rerun with the same settings resumes (and says so); with a changed setting it is
refused with a clear message, and ``overwrite`` redoes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from qmath_megatron.curation.classify import ClassifyConfig, RecallConfig, classify, recall
from qmath_megatron.curation.dedup import DedupConfig, dedup
from qmath_megatron.curation.llm_runner import LLMStepConfig, score, synthesize
from qmath_megatron.curation.run_decontaminate import DecontamConfig, decontaminate
from qmath_megatron.data.indexed import read_index
from qmath_megatron.data.readers import count_lines
from qmath_megatron.data.shards import discover, output_name
from qmath_megatron.data.tokenize import TokenizeConfig, tokenize_corpus
from qmath_megatron.inference.engine import Completion
from tests.unit.jsonl_files import write_jsonl
from tests.unit.test_classify import SMALL, general_docs, math_docs

BENCH = [
    "Let $f(x) = 3x^2 - 5$ and find the value of $f(f(1))$ when the function is applied "
    "twice in a row",
    "How many positive whole-number divisors does 196 have if we count one and the number "
    "itself too",
]
BAD_LINES = [
    b"{not json",
    b'{"text": "bad \xff\xfe utf8"}',
    b"[1, 2]",
    b'{"body": "no text"}',
    b'{"text": 7}',
    b'{"text": "   "}',
    b"",
    b'{"text": "lone \\ud800 surrogate"}',
]


def _records(tag: str, n: int, seed: int) -> list[dict]:
    texts = [t for pair in zip(math_docs(n, seed), general_docs(n, seed)) for t in pair]
    rows = [
        {
            "id": f"{tag}-{i}",
            "text": t,
            "url": f"https://{('m' if i % 2 == 0 else 'g')}.example/{tag}/{i}",
        }
        for i, t in enumerate(texts)
    ]
    rows[0]["text"] += " line\u2028separator, paragraph\u2029separator and next-line\u0085inside"
    rows[1]["text"] = "Q: pair question? " + rows[1]["text"]
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("conservation")
    src = root / "in"
    shared = _records("dup", 2, 99)  # the same documents in several files: dedup removes some
    names = [
        "a/x.jsonl",
        "b/x.jsonl",
        "a/x.jsonl.gz",
        "a/x.jsonl.zst",
        "shard.0.jsonl",
        "shard.1.jsonl",
    ]
    for k, rel in enumerate(names):
        rows = _records(f"f{k}", 4, k) + [dict(r, id=f"{r['id']}-{k}") for r in shared]
        rows.append({"id": f"bench-{k}", "text": f"Copied: {BENCH[k % 2]}."})
        write_jsonl(src / rel, rows, BAD_LINES[k % 3 :: 2] + [b""], bad_at=1)
    (root / "bench.jsonl").write_text("".join(json.dumps({"problem": p}) + "\n" for p in BENCH))
    for name, docs in (("pos", math_docs(60, 50)), ("neg", general_docs(60, 50))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    tok = _word_tokenizer(root / "tok")
    inputs = [str(src / "**" / "*.jsonl*")]
    files = discover(inputs)
    assert len(files) == len(names)
    return {"root": root, "inputs": inputs, "files": files, "model": model, "tok": tok}


def _word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "the": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "unk_token": "[UNK]"})
    )
    return path


class Scripted:
    """A generation engine answering by keyword (no model): scores 3, pairs for 'pair'."""

    tokenizer = None

    def generate(self, prompts, params):
        def answer(p: str) -> str:
            if "Rewrite the answer" in p:
                return "Step 1. \\boxed{1}"
            if "Extract every question" in p:
                return "Q: pair question?\nA: yes" if "pair question" in p else "NONE"
            return "Score: 3"

        return [[Completion(answer(p))] for p in prompts]


def _jsonl_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


# Per tool: run(corpus, out, overwrite, changed) -> report; the per-input counter; the
# report's (records accounted for, rejected) totals; a setting to change.
def _run_tokenize(c, out, overwrite=False, changed=False):
    cfg = TokenizeConfig(
        inputs=c["inputs"],
        output_prefix=str(out / "ds"),
        tokenizer=str(c["tok"]),
        keep_shards=True,
        progress=False,
        overwrite=overwrite,
        append_eod=not changed,
    )
    return tokenize_corpus(cfg)


def _count_tokenize(out, name):
    work = out / "ds.work"
    docs = len(read_index(work / "shards" / f"{name}.idx")[1])
    return docs + _jsonl_count(work / "rejects" / name)


def _run_decontaminate(c, out, overwrite=False, changed=False):
    return decontaminate(
        DecontamConfig(
            inputs=c["inputs"],
            output=str(out),
            overwrite=overwrite,
            benchmarks=[f"{c['root'] / 'bench.jsonl'}:problem"],
            lcs_threshold=0.9 if changed else 0.6,
        )
    )


def _run_dedup(c, out, overwrite=False, changed=False):
    return dedup(
        DedupConfig(
            inputs=c["inputs"],
            output=str(out),
            overwrite=overwrite,
            ngram=4 if changed else 5,
            partitions=3,
        )
    )


def _run_classify(c, out, overwrite=False, changed=False):
    return classify(
        ClassifyConfig(
            inputs=c["inputs"],
            output=str(out),
            overwrite=overwrite,
            positive=[str(c["root"] / "pos.jsonl")],
            negative=[str(c["root"] / "neg.jsonl")],
            top_fraction=0.3 if changed else 0.5,
            fasttext=SMALL,
        ),
        log=lambda m: None,
    )


def _run_recall(c, out, overwrite=False, changed=False):
    reports = recall(
        RecallConfig(
            positive=[str(c["root"] / "pos.jsonl")],
            negative=[str(c["root"] / "neg.jsonl")],
            pool=c["inputs"],
            output=str(out),
            rounds=1,
            overwrite=overwrite,
            threshold=0.7 if changed else 0.5,
            fasttext=SMALL,
        ),
        log=lambda m: None,
    )
    return json.loads((out / "report.json").read_text()) | {"rounds": reports}


def _run_score(c, out, overwrite=False, changed=False):
    return score(
        LLMStepConfig(
            inputs=c["inputs"],
            output=str(out),
            model=str(c["model"]),
            batch_size=3 if changed else 4,
            overwrite=overwrite,
        ),
        engine=Scripted(),
    )


def _run_synthesize(c, out, overwrite=False, changed=False):
    return synthesize(
        LLMStepConfig(
            inputs=c["inputs"],
            output=str(out),
            model=str(c["model"]),
            id_key="none" if changed else "id",
            overwrite=overwrite,
        ),
        engine=Scripted(),
    )


def _kinds(*kinds: str) -> Callable[[Path, str], int]:
    return lambda out, name: sum(_jsonl_count(out / k / name) for k in kinds)


def _count_synthesize(out, name):
    sources = {
        json.loads(line)["source_id"] for line in (out / "qa" / name).read_text().splitlines()
    }
    return (
        len(sources) + _jsonl_count(out / "no_pairs" / name) + _jsonl_count(out / "rejects" / name)
    )


def _rej(report, key="rejected") -> int:
    value = report[key]
    return sum(value.values()) if isinstance(value, dict) else value


TOOLS = {
    "tokenize": (_run_tokenize, _count_tokenize, lambda r: r["documents"] + r["rejected"]),
    "decontaminate": (
        _run_decontaminate,
        _kinds("kept", "removed", "rejects"),
        lambda r: r["kept"] + r["removed"] + _rej(r),
    ),
    "dedup": (
        _run_dedup,
        _kinds("kept", "removed", "rejects"),
        lambda r: r["documents"] + r["bad_lines"],
    ),
    "classify": (
        _run_classify,
        _kinds("kept", "dropped", "rejects"),
        lambda r: r["kept"] + r["dropped"] + _rej(r),
    ),
    "recall": (
        _run_recall,
        _kinds("round_1/selected", "round_1/dropped", "rejects"),
        lambda r: r["rounds"][0]["pool"] + _rej(r),
    ),
    "score": (_run_score, _kinds("scored", "rejects"), lambda r: r["scored"] + _rej(r)),
    "synthesize": (_run_synthesize, _count_synthesize, lambda r: r["documents"] + _rej(r)),
}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_line_ends_in_exactly_one_output(tool, corpus, tmp_path, capsys):
    run, count, accounted = TOOLS[tool]
    out = tmp_path / tool
    report = run(corpus, out)
    lines = {f.rel: count_lines(f.path) for f in corpus["files"]}
    got = {f.rel: count(out, output_name(f.rel)) for f in corpus["files"]}
    assert got == lines, f"{tool}: per-input line counts differ"
    assert accounted(report) == sum(lines.values()), f"{tool}: report counts differ"
    if tool == "dedup":
        assert report["removed"] > 0  # the shared documents were found across files
    if tool == "decontaminate":
        assert report["removed"] >= len(corpus["files"])  # each file's benchmark copy
    if tool == "tokenize":  # empty shards would get weight 0 in the blend: none listed
        blend = (out / "ds.blend.txt").read_text().split()
        assert all(int(w) > 0 for w in blend[::2]) and len(blend) == 2 * len(corpus["files"])
        return  # the finished output exists: the rerun contract is tested in test_tokenize_data
    # Same settings: resumed, and it says so on stderr.
    capsys.readouterr()
    assert accounted(run(corpus, out)) == sum(lines.values())
    assert "resumed" in capsys.readouterr().err
    # A changed setting is refused with a clear message; --overwrite redoes it.
    with pytest.raises(ValueError, match=r"other inputs or settings \(setting .*--overwrite"):
        run(corpus, out, changed=True)
    again = run(corpus, out, overwrite=True, changed=True)
    assert accounted(again) == sum(lines.values())
    assert {f.rel: count(out, output_name(f.rel)) for f in corpus["files"]} == lines
