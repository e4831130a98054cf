"""GRPO end to end on CPU with real vLLM, beyond the toy learning curve and its resume
(test_grpo.py): one math step in TIR mode with a reward model in the loop. The policy writes
a Python block, the real sandbox runs it, its output comes back as tool tokens that are
masked out of the trained loss, and the logged reward is the report's shaping of the
verifier's verdicts and the reward model's scores, recomputed here independently.

A random tiny model never writes a code block, so the TIR policy is a tiny Qwen2 whose
weights are set by hand (``_code_writing_model``): attention and the second layer are
switched off and the first MLP is a bigram table over a few token ids, so the policy
writes a python block that prints 3**5 and, after the tool's output, a boxed 7 or 8 with
equal probability. Nothing else is scripted: the engine samples it, the sandbox executes it
(the policy cannot write 243 itself: none of its digits' tokens leads anywhere in the
table), the trainer recomputes its log-probs and takes a step.
"""

from __future__ import annotations

import json
import math
import re

from qmath_megatron.parallel.runtime import launch
from tests.tiny_models import copy_tokenizer_files, make_tiny_hf_rm


def _grpo(recipe: str, overrides: list[str], spy: bool = False) -> dict:
    from tests.distributed.rl_e2e_workers import grpo_run

    return launch(grpo_run, 1, recipe, overrides, spy, [POLICY_FLAVOR])[0]


# The bigram table of the code-writing policy: after token x it writes SUCCESSORS[x]
# (a uniform choice where there are two). Token ids of the Qwen2.5 tokenizer (checked below).
CHAIN = [
    "\n",
    "```",
    "python",
    " \n",
    "print",
    "(",
    "3",
    "**",
    "5",
    ")\n",
    "``",
    "`\n",
    "\\",
    "boxed",
    "{",
]
ANSWERS = ["7", "8"]
CODE_TEXT = "```python \nprint(3**5)\n```\n"
TOOL_BLOCK = "```output\n243\n```\n"


def _code_writing_model(out, tokenizer_dir, tok):
    """A tiny Qwen2 (``POLICY_FLAVOR``: tied embeddings, hidden 64, head_dim 32 as vLLM's CPU
    attention needs) turned into a bigram table: ``CHAIN[i] -> CHAIN[i + 1]``,
    ``{ -> 7 | 8``, ``7, 8 -> }``, ``} -> <|im_end|>``; the Qwen2.5 tokenizer beside it.

    Each table token's embedding is ``s * e_k`` (distinct basis vectors); attention output
    and layer 1's MLP are zero, so the residual is the last token's embedding; MLP unit k
    of layer 0 fires only for token k (gate and up rows along ``e_k``) and adds ``c`` times
    its successors' directions. After the final norm the successor's logit is ~``8 s``
    (32) and every other token's is below 1, so sampling at temperature 1 follows the table.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from qmath_megatron.models.flavors import QwenFlavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.tokenizer.chat import IM_END

    make_random_hf_model(QwenFlavor(**POLICY_FLAVOR), out, seed=0)
    copy_tokenizer_files(tokenizer_dir, out)
    ids = {}
    for text in [*CHAIN, *ANSWERS, "}"]:
        (ids[text],) = tok(text, add_special_tokens=False)["input_ids"]
    succ = {ids[a]: [ids[b]] for a, b in zip(CHAIN, CHAIN[1:])}
    succ[ids["{"]] = [ids[a] for a in ANSWERS]
    for a in ANSWERS:
        succ[ids[a]] = [ids["}"]]
    succ[ids["}"]] = [tok.convert_tokens_to_ids(IM_END)]
    table = sorted({t for k, v in succ.items() for t in (k, *v)})
    basis = {t: k for k, t in enumerate(table)}
    w = load_file(out / "model.safetensors")
    emb, s, c = w["model.embed_tokens.weight"], 4.0, 400.0
    emb[table] = 0.0
    for t, k in basis.items():
        emb[t, k] = s
    for name in list(w):
        if "layernorm" in name or name == "model.norm.weight":
            w[name] = torch.ones_like(w[name])
        elif name.endswith(
            ("o_proj.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")
        ):
            w[name] = torch.zeros_like(w[name])
    gate, up, down = (w[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
    for t, nxt in succ.items():
        k = basis[t]  # unit k: silu(8) * 8 ~ 64 for token t (its normed input is 8 e_k)
        gate[k, k] = up[k, k] = 1.0
        for n in nxt:
            down[basis[n], k] = c / 64
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _boxed(text: str) -> str | None:
    m = re.search(r"\\boxed\{([^}]*)\}", text)
    return m.group(1) if m else None


def test_tir_step_with_the_sandbox_and_a_reward_model(tmp_path, tiny_instruct):
    from qmath_megatron.convert.commands import hf_to_mcore
    from qmath_megatron.reward_model.scoring import RewardModelScorer
    from qmath_megatron.tokenizer.chat import build_prompt
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    tok = load_tokenizer(tiny_instruct)
    policy = _code_writing_model(tmp_path / "policy", tiny_instruct, tok)
    hf_to_mcore(policy, tmp_path / "mcore", tp=1)
    rm = make_tiny_hf_rm(tmp_path / "rm", tiny_instruct, seed=3)
    problems = [
        {"problem": "What is 1+6?", "answer": "7"},
        {"problem": "What is 2+6?", "answer": "8"},
    ]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    save = tmp_path / "run"
    out = _grpo(
        "tiny_cpu_grpo",
        [
            "model.flavor=tiny-qwen-vocab-hd32",
            "model.seq_length=72",
            f"model.init_from={tmp_path / 'mcore'}",
            "rl.task=math",
            "rl.mode=tir",
            f"rl.engine_model={policy}",
            f"rl.rm_model={rm}",
            "rl.group_size=4",
            "rl.max_new_tokens=32",
            "data.micro_batch_size=2",
            "data.global_batch_size=2",
            f"data.prompts={tmp_path / 'prompts.jsonl'}",
            "train.train_iters=1",
            f"checkpoint.save={save}",
        ],
        spy=True,
    )
    (row,) = out["history"]
    ((call),) = out["rewards"]
    texts, chosen = call["texts"], call["problems"]
    assert sorted(p["problem"] for p in chosen) == sorted(p["problem"] for p in problems)

    # The sandbox ran every rollout's program and fed its output back.
    for g in call["executions"]:
        assert g == [[("print(3**5)", "ok", "243")]] * len(g)
    for group in texts:
        for text in group:
            assert text.startswith("```python \nprint(3**5)\n```\n```output\n243\n```\n"), text
            assert _boxed(text) in ANSWERS
    # In the trained batch the tool output's tokens sit after the code and are masked out.
    s = out["samples"]
    code = tok(CODE_TEXT, add_special_tokens=False)["input_ids"]
    tool = tok(TOOL_BLOCK, add_special_tokens=False)["input_ids"]
    answer = tok("\\boxed{7}", add_special_tokens=False)["input_ids"]
    for i in range(len(s["tokens"])):
        p = chosen[i // 4]
        prompt = tok(build_prompt(tok, p["problem"], "tir"), add_special_tokens=False)["input_ids"]
        n, first = len(prompt), len(prompt) - 1
        resp = s["tokens"][i][n : n + len(code) + len(tool)]
        assert resp == code + tool
        assert "```output\n243\n```" in tok.decode(s["tokens"][i])
        mask = s["loss_mask"][i]
        width = len(code) + len(tool) + len(answer) + 1  # + <|im_end|>
        assert mask[first : first + width] == [1.0] * len(code) + [0.0] * len(tool) + [1.0] * (
            len(answer) + 1
        )
        assert sum(mask) == width - len(tool)

    # The reward, recomputed: verdicts by the boxed answer, the RM's scores of the same
    # (problem, response) pairs, r = sigmoid(0.5 r_m) + (r_v - 1).
    verdict = [
        [float(_boxed(t) == p["answer"]) for t in g] for p, g in zip(chosen, texts, strict=True)
    ]
    assert verdict == call["verdict"]
    scorer = RewardModelScorer(rm, mode="tir")
    try:
        scores = [scorer.score([p["problem"]], [g])[0] for p, g in zip(chosen, texts, strict=True)]
    finally:
        scorer.close()
    flat = [
        (s_, v)
        for srow, vrow in zip(scores, verdict, strict=True)
        for s_, v in zip(srow, vrow, strict=True)
    ]
    expected = [1 / (1 + math.exp(-0.5 * s_)) + (v - 1) for s_, v in flat]
    n = len(flat)
    assert math.isclose(row["reward"], sum(expected) / n, rel_tol=1e-5)
    assert math.isclose(row["reward_model"], sum(s_ for s_, _ in flat) / n, rel_tol=1e-5)
    assert row["reward_verifier"] == row["accuracy"] == sum(v for _, v in flat) / n
    assert 0 < row["accuracy"] < 1  # both answers sampled: the groups have a reward spread
    assert row["zero_variance_groups"] < 2 and row["grad_norm"] > 0
    assert abs(row["logprob_mismatch"] - 1.0) < 1e-3  # engine and trainer hold the same policy
    assert row["weight_version"] == 1


# The TIR policy's architecture: the registered `tiny-qwen-vocab-hd32` (tiny-qwen-vocab with
# 2 heads of 32, a head_dim vLLM's CPU attention accepts), spelled out because the hand-wired
# policy (_code_writing_model) depends on this exact shape; rl_e2e_workers.grpo_run
# registers it under that name in the spawned rank, so the trainer builds this shape.
POLICY_FLAVOR = dict(
    name="tiny-qwen-vocab-hd32",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=192,
    num_attention_heads=2,
    num_query_groups=2,
    vocab_size=151936,
    rope_theta=1e6,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
