"""Reward model end to end on CPU (issue 13): the published HF layout <-> Megatron, score
parity with a plain PyTorch Qwen2ForRewardModel at TP=2 and PP=2, TP=2 == TP=1 for an
optimizer step, `qmath rm score` -> `qmath eval metrics` rm@k, and a tiny training run
whose held-out pairwise accuracy rises well above chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmath_megatron.cli import main


# Qwen's vocabulary (the real tokenizer) and head_dim 32, which vLLM's CPU attention supports.
RM_FLAVOR = dict(name="tiny-rm", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                 num_attention_heads=2, num_query_groups=2, vocab_size=151936, rope_theta=1e6,
                 max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-6)  # fmt: skip


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory, tiny_instruct):
    """A random HF reward model (the real tokenizer copied in), its Megatron checkpoint at
    TP=2 (`qmath convert hf-to-mcore`) and the export back (`qmath convert mcore-to-hf`)."""
    import shutil

    from qmath_megatron.models.flavors import QwenFlavor
    from qmath_megatron.reward_model.hf import make_random_hf_reward_model

    root = tmp_path_factory.mktemp("rm")
    hf = make_random_hf_reward_model(QwenFlavor(**RM_FLAVOR), root / "hf", seed=5)
    for f in tiny_instruct.iterdir():  # the tokenizer files, not the LM's weights/config
        if f.is_file() and not f.name.startswith(("config", "generation_config", "model")):
            shutil.copy2(f, hf / f.name)
    ckpt, back = root / "ckpt", root / "hf_back"
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--tp", "2"]) == 0
    assert main(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--tokenizer", str(hf)]) == 0  # fmt: skip
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
    """vLLM's own Qwen2ForRewardModel reads the export unchanged: its reward at the last
    token equals the PyTorch reference's (fp32)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from qmath_megatron.reward_model.hf import Qwen2RewardModelReference

    _, _, export = rm_dirs
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 151643, (n,), generator=gen).tolist() for n in (7, 19, 33)]
    llm = LLM(model=str(export), runner="pooling", dtype="float32", enforce_eager=True,
              max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=64 << 20, seed=0)  # fmt: skip
    try:
        outs = llm.encode([TokensPrompt(prompt_token_ids=s) for s in seqs], pooling_task="token_classify")  # fmt: skip
        ours = [float(o.outputs.data.reshape(len(s), -1)[-1, 0]) for o, s in zip(outs, seqs, strict=True)]  # fmt: skip
    finally:
        del llm
    ref = Qwen2RewardModelReference.from_pretrained(export).score_ids(seqs)
    assert np.allclose(ours, ref, atol=1e-4), (ours, ref)


def test_score_parity_tp2_pp2_and_tp2_equals_tp1_step(rm_dirs):
    from qmath_megatron.parallel.runtime import launch
    from qmath_megatron.reward_model.data import RMGroup

    hf, ckpt, _ = rm_dirs
    gen = torch.Generator().manual_seed(1)
    groups = []
    for size in (3, 4, 2, 5):  # unequal groups, 2 per microbatch
        seqs = [torch.randint(0, 150000, (int(torch.randint(10, 60, (1,), generator=gen)),), generator=gen).numpy()
                for _ in range(size)]  # fmt: skip
        groups.append(RMGroup(seqs, np.array([i % 2 == 0 for i in range(size)])))
    results = launch(_worker(), 2, str(hf), str(ckpt), groups)
    parity = {k: v for r in results for k, v in r.items() if k in ("tp2", "pp2")}
    assert set(parity) == {"tp2", "pp2"}
    for name, r in parity.items():
        assert r["max_abs_diff"] <= 1e-4, (name, r["max_abs_diff"])
        assert r["sequences"] == 6 and len(set(np.round(r["scores"], 4))) == 6  # not constant
    loss2, norm2, rep2 = results[0]["step_tp2"]
    loss1, norm1, rep1 = results[0]["step_tp1"]
    assert results[1]["step_tp2"][:2] == results[0]["step_tp2"][:2]  # same on every rank
    assert abs(loss2 - loss1) <= 1e-6 and abs(norm2 - norm1) <= 1e-6, (loss2, loss1, norm2, norm1)
    assert norm1 > 0 and 0.0 <= rep1["pairwise accuracy"] <= 1.0
    assert rep2["pairwise accuracy"] == pytest.approx(rep1["pairwise accuracy"])


def _worker():
    from tests.distributed.rm_workers import rm_parallel_worker

    return rm_parallel_worker


def test_rm_score_fills_rm_at_k(rm_dirs, tmp_path, capsys):
    hf, ckpt, _ = rm_dirs
    problems = [("What is 2+3?", "5", ["The sum is \\boxed{5}.", "It is \\boxed{6}.", "\\boxed{5}"]),
                ("What is 4*4?", "16", ["\\boxed{8}", "So \\boxed{16}.", "\\boxed{12}"])]  # fmt: skip
    rows = [{"id": f"{i}-{j}", "prompt": q, "response": c}
            for i, (q, _, comps) in enumerate(problems) for j, c in enumerate(comps)]  # fmt: skip
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "1+1?"},
                                            {"role": "assistant", "content": "\\boxed{2}"}]})  # fmt: skip
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_hf, out_mc = tmp_path / "hf.jsonl", tmp_path / "mc.jsonl"
    assert main(["rm", "score", "--model", str(hf), "--input", str(src), "--output", str(out_hf)]) == 0  # fmt: skip
    assert main(["rm", "score", "--model", str(ckpt), "--tokenizer", str(hf), "--input", str(src),
                 "--output", str(out_mc), "--tp", "1"]) == 0  # fmt: skip
    scored_hf = [json.loads(x) for x in out_hf.read_text().splitlines()]
    scored_mc = [json.loads(x) for x in out_mc.read_text().splitlines()]
    assert [r["id"] for r in scored_hf] == [r["id"] for r in rows]  # one row per input row
    for a, b in zip(scored_hf, scored_mc, strict=True):
        assert abs(a["rm_score"] - b["rm_score"]) <= 1e-4
        assert {k: v for k, v in a.items() if k != "rm_score"} == next(r for r in rows if r["id"] == a["id"])  # fmt: skip

    # the scorer (RewardScorer protocol) gives the same numbers for (problem, completions)
    from qmath_megatron.reward_model.scoring import load_scorer

    scorer = load_scorer(hf)
    grid = scorer.score([p[0] for p in problems], [p[2] for p in problems])
    assert np.allclose(np.array(grid).ravel(), [r["rm_score"] for r in scored_hf[:6]], atol=1e-5)

    # rm@k from these scores through `qmath eval metrics`
    samples = tmp_path / "samples.jsonl"
    by_problem = [[r["rm_score"] for r in scored_hf[3 * i : 3 * i + 3]] for i in range(2)]
    samples.write_text("".join(
        json.dumps({"gt": gt, "completions": comps, "rm_scores": s}) + "\n"
        for (_, gt, comps), s in zip(problems, by_problem, strict=True)
    ))  # fmt: skip
    assert main(["eval", "metrics", "--samples", str(samples), "--check-workers", "1"]) == 0
    metrics = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    correct = [[True, False, True], [False, True, False]]
    expected = 100.0 * np.mean([c[int(np.argmax(s))] for c, s in zip(correct, by_problem, strict=True)])  # fmt: skip
    assert metrics["rm@3"] == pytest.approx(expected)


def test_tiny_rm_training_learns_the_synthetic_preference(tmp_path):
    from qmath_megatron.parallel.runtime import launch
    from tests.distributed.rm_workers import tiny_rm_train_worker

    save = tmp_path / "run"
    overrides = [f"checkpoint.save={save}", "train.train_iters=12", "train.eval_interval=12",
                 "data.synthetic_groups=96", "data.synthetic_valid_groups=32",
                 "checkpoint.save_interval=12"]  # fmt: skip
    (history,) = launch(tiny_rm_train_worker, 1, overrides)
    metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    initial = metrics[0]["initial_val_pairwise_accuracy"]
    final = [m for m in metrics if "val_pairwise_accuracy" in m][-1]["val_pairwise_accuracy"]
    assert 0.3 <= initial <= 0.7, initial  # ~chance before training
    assert final >= 0.85, (initial, final)
    assert history[-1]["loss"] < history[0]["loss"]
    from qmath_megatron.checkpoint.model_checkpoint import resolve_checkpoint

    assert resolve_checkpoint(save)[1].head == "score"  # self-describing RM checkpoint
