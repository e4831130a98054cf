"""Reward model end to end on CPU: the published HF layout <-> Megatron, score
parity with a plain PyTorch Qwen2ForRewardModel at TP=2 and PP=2, TP=2 == TP=1 for an
optimizer step, `qmath rm score` -> `qmath eval metrics` rm@k, and a tiny training run
whose held-out pairwise accuracy rises well above chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmath_megatron.cli import main
from tests.tiny_models import make_tiny_hf_rm

# Qwen's vocabulary (the real tokenizer) and head_dim 32, which vLLM's CPU attention supports.


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory, tiny_instruct):
    """A random HF reward model (the real tokenizer copied in), its Megatron checkpoint at
    TP=2 (`qmath convert hf-to-mcore`) and the export back (`qmath convert mcore-to-hf`)."""

    root = tmp_path_factory.mktemp("rm")
    hf = make_tiny_hf_rm(root / "hf", tiny_instruct, seed=5, max_positions=1024, layers=2)
    ckpt, back = root / "ckpt", root / "hf_back"
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--tp", "2"]) == 0
    assert (
        main(
            [
                "convert",
                "mcore-to-hf",
                "--ckpt",
                str(ckpt),
                "--out",
                str(back),
                "--tokenizer",
                str(hf),
            ]
        )
        == 0
    )
    return hf, ckpt, back


def test_conversion_round_trip_is_exact_and_keeps_the_published_layout(rm_dirs):
    from safetensors.torch import load_file

    from qmath_megatron.checkpoint.model_checkpoint import resolve_checkpoint

    hf, ckpt, out = rm_dirs
    assert resolve_checkpoint(ckpt)[1].head == "score"
    a, b = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= set(b)
    assert not any(k.startswith("lm_head") for k in b) and all(
        k.startswith(("model.", "score.")) for k in b
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForRewardModel"] and config["model_type"] == "qwen2"


def test_vllm_builtin_reward_model_loads_the_export(rm_dirs, monkeypatch):
    """vLLM's own Qwen2ForRewardModel reads the export unchanged (`qmath rm score --engine
    vllm`): its reward at the last token equals the PyTorch reference's (fp32)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from qmath_megatron.reward_model.hf import Qwen2RewardModelReference
    from qmath_megatron.reward_model.scoring import RewardModelScorer

    _, _, export = rm_dirs
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 151643, (n,), generator=gen).tolist() for n in (7, 19, 33)]
    scorer = RewardModelScorer(export, engine="vllm")
    try:
        ours = scorer.score_ids(seqs)
    finally:
        scorer.close()
    ref = Qwen2RewardModelReference.from_pretrained(export).score_ids(seqs)
    assert np.allclose(ours, ref, atol=1e-4), (ours, ref)


PROBLEMS = [
    ("What is 2+3?", "5", ["The sum is \\boxed{5}.", "It is \\boxed{6}.", "\\boxed{5}"]),
    ("What is 4*4?", "16", ["\\boxed{8}", "So \\boxed{16}.", "\\boxed{12}"]),
]
ROWS = [
    {"id": f"{i}-{j}", "prompt": q, "response": c}
    for i, (q, _, comps) in enumerate(PROBLEMS)
    for j, c in enumerate(comps)
] + [
    {
        "id": "chat",
        "messages": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "\\boxed{2}"},
        ],
    }
]


@pytest.fixture(scope="module")
def parallel_results(rm_dirs, tiny_instruct):
    """One 2-process run: parity at TP=2 and PP=2, Megatron scores of ROWS, TP=2 and TP=1
    optimizer steps, the tiny training run at DP=2 (see rm_workers.rm_parallel_worker)."""
    from qmath_megatron.parallel.runtime import launch
    from qmath_megatron.reward_model.data import RMGroup
    from qmath_megatron.reward_model.rendering import encode_for_rm, rm_messages
    from qmath_megatron.tokenizer.qwen import load_tokenizer
    from tests.distributed.rm_workers import rm_parallel_worker

    hf, ckpt, _ = rm_dirs
    gen = torch.Generator().manual_seed(1)
    groups = []
    for size in (3, 4, 2, 5):  # unequal groups, 2 per microbatch
        seqs = [
            torch.randint(
                0, 150000, (int(torch.randint(10, 60, (1,), generator=gen)),), generator=gen
            ).numpy()
            for _ in range(size)
        ]
        groups.append(RMGroup(seqs, np.array([i % 2 == 0 for i in range(size)])))
    ids = encode_for_rm(load_tokenizer(hf), [rm_messages(r) for r in ROWS])
    save = ckpt.parent / "tiny_run"
    overrides = [
        f"checkpoint.save={save}",
        "train.train_iters=10",
        "train.eval_interval=10",
        "data.synthetic_groups=80",
        "data.synthetic_valid_groups=32",
        "checkpoint.save_interval=10",
        f"data.tokenizer={tiny_instruct}",
    ]
    return launch(rm_parallel_worker, 2, str(hf), str(ckpt), groups, ids, overrides)


def test_score_parity_tp2_pp2_and_tp2_equals_tp1_step(parallel_results):
    results = parallel_results
    parity = {k: v for r in results for k, v in r.items() if k in ("tp2", "pp2")}
    assert set(parity) == {"tp2", "pp2"}
    for name, r in parity.items():
        assert r["max_abs_diff"] <= 1e-4, (name, r["max_abs_diff"])
        assert r["sequences"] == 6 and len(set(np.round(r["scores"], 4))) == 6  # not constant
    loss2, norm2, rep2 = results[0]["step_tp2"]
    loss1, norm1, rep1 = results[0]["step_tp1"]
    assert results[1]["step_tp2"][:2] == results[0]["step_tp2"][:2]  # same on every rank
    # 1e-6, relative for the norm (~7.5 here, where one float32 ulp is ~5e-7)
    assert abs(loss2 - loss1) <= 1e-6, (loss2, loss1)
    assert abs(norm2 - norm1) <= 1e-6 * max(1.0, norm1), (norm2, norm1)
    assert norm1 > 0 and 0.0 <= rep1["pairwise accuracy"] <= 1.0
    assert rep2["pairwise accuracy"] == pytest.approx(rep1["pairwise accuracy"])


def test_rm_score_fills_rm_at_k(rm_dirs, parallel_results, tmp_path, capsys):
    hf, ckpt, _ = rm_dirs
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(hf), "--input", str(src), "--output", str(out)]) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "rm_score"} for r in scored] == ROWS  # row per row
    # the Megatron checkpoint at TP=2 (what `qmath rm score --model CKPT` runs) agrees
    megatron = parallel_results[0]["rows"]
    assert np.allclose([r["rm_score"] for r in scored], megatron, atol=1e-4)
    # bad input: one clear line naming the row, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "only a prompt"}) + "\n")
    assert (
        main(
            [
                "rm",
                "score",
                "--model",
                str(hf),
                "--input",
                str(bad),
                "--output",
                str(tmp_path / "b.jsonl"),
            ]
        )
        == 1
    )
    assert (
        "bad.jsonl:2: needs `messages`, or string `prompt` and `response`"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "b.jsonl").exists()
    assert main(["rm", "score", "--model", str(hf), "--input", str(src), "--output", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass --tokenizer"):
        from qmath_megatron.reward_model.scoring import RewardModelScorer

        RewardModelScorer(ckpt)

    # the scorer (RewardScorer protocol) gives the same numbers for (problem, completions)
    from qmath_megatron.reward_model.scoring import load_scorer

    grid = load_scorer(hf).score([p[0] for p in PROBLEMS], [p[2] for p in PROBLEMS])
    assert np.allclose(np.array(grid).ravel(), [r["rm_score"] for r in scored[:6]], atol=1e-5)

    # rm@k from these scores through `qmath eval metrics`
    samples = tmp_path / "samples.jsonl"
    by_problem = [[r["rm_score"] for r in scored[3 * i : 3 * i + 3]] for i in range(2)]
    samples.write_text(
        "".join(
            json.dumps({"gt": gt, "completions": comps, "rm_scores": s}) + "\n"
            for (_, gt, comps), s in zip(PROBLEMS, by_problem, strict=True)
        )
    )
    assert main(["eval", "metrics", "--samples", str(samples), "--check-workers", "1"]) == 0
    metrics = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    correct = [[True, False, True], [False, True, False]]
    expected = 100.0 * np.mean(
        [c[int(np.argmax(s))] for c, s in zip(correct, by_problem, strict=True)]
    )
    assert metrics["rm@3"] == pytest.approx(expected)


def test_tiny_rm_training_learns_the_synthetic_preference(rm_dirs, parallel_results):
    """`qmath train rm --recipe tiny_cpu_rm` (10 steps, DP=2, ``model.init_from`` a random
    LM checkpoint saved at TP=2): held-out pairwise accuracy from about chance to well above."""
    from qmath_megatron.checkpoint.model_checkpoint import resolve_checkpoint

    save = rm_dirs[1].parent / "tiny_run"
    history = parallel_results[0]["train"]
    metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    initial = metrics[0]["initial_val_pairwise_accuracy"]
    final = [m for m in metrics if "val_pairwise_accuracy" in m][-1]["val_pairwise_accuracy"]
    assert 0.3 <= initial <= 0.7, initial  # ~chance before training
    assert final >= 0.85, (initial, final)
    assert history[-1]["loss"] < history[0]["loss"]
    assert resolve_checkpoint(save)[1].head == "score"  # self-describing RM checkpoint


def test_init_from_an_sft_checkpoint_loads_the_backbone_and_keeps_a_fresh_head(parallel_results):
    for rank in parallel_results:  # both TP ranks
        r = rank["init_from"]
        assert r["backbone_equal"] and r["head_kept"], r
        assert r["head_params"] == [
            "score.0.bias",
            "score.0.weight",
            "score.2.bias",
            "score.2.weight",
        ]
        assert r["lm_only"] == ["output_layer.weight"] or r["lm_only"] == []  # tied flavor: none
