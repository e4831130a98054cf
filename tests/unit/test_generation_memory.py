"""The transformers engine's memory and bounds: the sampled tokens' log-probs are taken one
step at a time (equal to those of the full score history, which is never kept), a completion
stops at the model's positions, and long calls print progress lines with an ETA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from qmath_megatron.inference.engine import (
    SamplingParams,
    TransformersEngine,
    position_limits,
)
from qmath_megatron.inference.progress import (
    Progress,
    ShardProgress,
    format_duration,
    format_rate,
)

VOCAB = 151936


@pytest.fixture(scope="module")
def engine(tiny_instruct):
    return TransformersEngine(tiny_instruct, batch_size=2)


def score_history_generate(engine, prompts, params):
    """The engine's former method: ``output_scores`` kept for every step, stacked, then
    ``log_softmax`` over the vocabulary; the reference the step-wise log-probs must equal."""
    out = []
    end_ids = tuple(dict.fromkeys([*engine.eos_ids, *params.stop_token_ids]))
    extra = (
        {"stop_strings": list(params.stop), "tokenizer": engine.tokenizer} if params.stop else {}
    )
    torch.manual_seed(params.seed)
    for start in range(0, len(prompts), engine.batch_size):
        batch = prompts[start : start + engine.batch_size]
        enc = engine._pad([engine._ids(p) for p in batch])
        with torch.no_grad():
            gen = engine.model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                do_sample=params.temperature > 0,
                temperature=params.temperature if params.temperature > 0 else None,
                top_p=params.top_p if params.temperature > 0 else None,
                num_return_sequences=params.n,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=engine.tokenizer.pad_token_id,
                eos_token_id=list(end_ids),
                **extra,
            )
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        logps = torch.stack(gen.scores, dim=1).log_softmax(-1)
        for i in range(len(batch)):
            group = []
            for j in range(params.n):
                row = i * params.n + j
                c = engine._finish(new[row].tolist(), end_ids, params, params.max_new_tokens)
                c.logprobs = [float(logps[row, t, tok]) for t, tok in enumerate(c.token_ids)]
                group.append(c)
            out.append(group)
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=10, seed=3),
        SamplingParams(max_new_tokens=8),  # greedy
        SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=1, stop=("a",)),
    ],
    ids=["sampled", "greedy", "stop-string"],
)
def test_stepwise_logprobs_equal_the_score_history(engine, params):
    prompts = ["The answer is", "Compute 2+2:", [101, 202, 303]]  # 2 batches, one short
    new, old = engine.generate(prompts, params), score_history_generate(engine, prompts, params)
    pairs = [(a, b) for ga, gb in zip(new, old, strict=True) for a, b in zip(ga, gb, strict=True)]
    assert len(pairs) == 3 * params.n
    for a, b in pairs:
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (
            b.token_ids,
            b.text,
            b.finish_reason,
            b.stop_reason,
        )
        assert len(a.logprobs) == len(a.token_ids)
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0) <= 1e-6
    if params.stop:  # the case exercises stop strings
        assert any(a.stop_reason == "a" for a, _ in pairs)


def test_no_score_history_is_kept(engine, monkeypatch):
    """Every step's [rows, vocab] scores are released as soon as the chosen token's log-prob
    is read: what generate returns holds empty tensors only."""
    returned = []
    original = engine.model.generate

    def spy(*args, **kwargs):
        gen = original(*args, **kwargs)
        returned.append([s.numel() for s in gen.scores])
        return gen

    monkeypatch.setattr(engine.model, "generate", spy)
    (group,) = engine.generate(["Hi"], SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    ((*sizes,),) = returned
    assert len(sizes) == max(len(c.token_ids) for c in group) and set(sizes) == {0}


PEAK_SCRIPT = """
import json, resource, sys
from qmath_megatron.inference.engine import SamplingParams, TransformersEngine

engine = TransformersEngine(sys.argv[1], batch_size={batch}, progress_every_s=1e9)
engine.eos_ids = ()  # no early end: every row runs all its steps
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
groups = engine.generate(
    [[100 + i, 7] for i in range({batch})],
    SamplingParams(max_new_tokens={steps}),
)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lengths = [len(c.token_ids) for g in groups for c in g]
print(json.dumps({{"growth_kb": after - before, "lengths": lengths}}))
"""


def test_peak_memory_stays_far_below_the_score_history(tiny_instruct):
    """The score history of this call would be rows x steps x vocab x 4 bytes (622 MB, and
    the former method copied it twice more); the process's peak may not grow by a quarter
    of it. Run in a fresh process: ru_maxrss is a process's peak since it started."""
    batch, steps = 8, 128
    history = batch * steps * VOCAB * 4
    script = PEAK_SCRIPT.format(batch=batch, steps=steps)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tiny_instruct)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["lengths"] == [steps] * batch
    assert result["growth_kb"] * 1024 < history / 4, (result["growth_kb"], history)


# --------------------------------------------------------------------------- positions


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, tiny_instruct):
    """The tiny Qwen-vocabulary model with 48 positions."""
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model

    root = tmp_path_factory.mktemp("short")
    flavor = get_flavor("tiny-qwen-vocab").replace(name="tiny-48", max_position_embeddings=48)
    model = make_random_hf_model(flavor, root / "model", seed=1)
    for f in tiny_instruct.iterdir():  # the tokenizer's files
        if not (model / f.name).exists():
            shutil.copy2(f, model / f.name)
    return model


def test_position_limits():
    assert position_limits([10, 40], 30, None) == [30, 30]
    assert position_limits([10, 40], 30, 48) == [30, 8]
    with pytest.raises(ValueError, match=r"prompt 1 has 48 tokens: the model has 48 positions"):
        position_limits([10, 48, 47], 30, 48)
    with pytest.raises(ValueError, match=r"max_model_len"):
        position_limits([60], 1, 48, "max_model_len")


def test_generation_stops_at_the_model_positions(short_model, monkeypatch):
    engine = TransformersEngine(short_model, batch_size=2)
    assert engine.max_positions == 48
    engine.eos_ids = ()  # the random model must not end early: each row runs to its limit
    prompts = [list(range(100, 110)), list(range(200, 240))]  # 10 and 40 tokens
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=30))
    assert [[len(c.token_ids) for c in g] for g in groups] == [[30, 30], [8, 8]]
    assert all(c.finish_reason == "length" for g in groups for c in g)
    assert all(len(c.logprobs) == len(c.token_ids) for g in groups for c in g)
    # A prompt with no position left is refused by index before anything is generated.
    calls = []
    monkeypatch.setattr(engine.model, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"prompt 1 has 48 tokens.*48 positions"):
        engine.generate([[5] * 3, [6] * 48], SamplingParams(max_new_tokens=4))
    assert calls == []


# --------------------------------------------------------------------------- progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_carry_rate_and_eta():
    clock, lines = Clock(), []
    p = Progress(100, "problems", label="gen: ", log=lines.append, every_s=10, clock=clock)
    clock.now = 5
    assert not p.update(10)  # not due yet
    clock.now = 20
    assert p.update(25, "batch 2/4")
    assert lines == ["gen: 25/100 problems, 20s elapsed, 1.2 problems/s, ETA 1m00s (batch 2/4)"]
    clock.now = 25
    assert not p.update(30) and p.update(30, force=True)
    assert lines[-1] == "gen: 30/100 problems, 25s elapsed, 1.2 problems/s, ETA 58s"
    assert Progress(None, "rows", clock=clock).status(0) == "0 rows, 0s elapsed"
    assert format_duration(3725) == "1h02m" and format_rate(0.5, "x") == "30.0 x/min"


def test_shard_progress_by_byte_offsets(tmp_path):
    clock = Clock()
    plain = SimpleNamespace(format="jsonl", path=str(tmp_path / "f.jsonl"))
    shard = SimpleNamespace(file=plain, start=1000, end=2000, size=lambda: 1000)
    sp = ShardProgress(shard, clock=clock)
    clock.now = 60
    record = SimpleNamespace(offset=1240, raw_bytes=10)
    assert sp.fraction(record) == 0.25
    assert sp.status(30, record) == ", 30.0 problems/min, 25% of the shard, shard ETA 3m00s"
    packed = SimpleNamespace(file=SimpleNamespace(format="jsonl.gz"), start=0, end=-1)
    assert ShardProgress(packed, clock=clock).fraction(record) is None  # offsets not bytes


def test_engine_prints_progress_with_an_eta_during_a_call(engine, monkeypatch):
    lines = []
    monkeypatch.setattr(engine, "log", lines.append)
    monkeypatch.setattr(engine, "progress_every_s", 0.0)
    engine.generate(["a", "b", "c"], SamplingParams(max_new_tokens=3))
    assert len(lines) == 2 * 3  # a line per step: 2 batches of 3 steps
    assert lines[0].startswith("transformers engine (n=1): 0/3 prompts, ")
    assert "ETA" in lines[0] and lines[0].endswith("(batch 1/2, step 1/3)")
    assert lines[-1].startswith("transformers engine (n=1): 3/3 prompts, ")
    assert lines[-1].endswith("ETA 0s (batch 2/2, step 3/3)")


def test_tools_print_rate_and_eta_per_chunk(tmp_path, tiny_instruct):
    """`qmath data rl-prompts` after each chunk of a shard (by the bytes read: plain JSONL),
    `qmath eval` after each chunk of problems."""
    from qmath_megatron.evaluation.config import EvalJob, EvalModelConfig
    from qmath_megatron.evaluation.runner import Generator
    from qmath_megatron.inference.engine import Completion
    from qmath_megatron.rl.prompts import RLPromptsConfig, run_rl_prompts
    from qmath_megatron.tokenizer.qwen import load_tokenizer
    from tests.unit.test_rl_prompts import ExactChecker, ScriptedEngine, _problem

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(_problem(k % 4, f"t{k}")) + "\n" for k in range(5)))
    cfg = RLPromptsConfig(
        problems=str(data), model="m", output=str(tmp_path / "o.jsonl"), n=4, batch_size=2
    )
    lines = []
    engine = ScriptedEngine(load_tokenizer(tiny_instruct))
    run_rl_prompts(cfg, engine=engine, checker=ExactChecker(), log=lines.append)
    chunks = [x for x in lines if "problems sampled" in x]
    assert len(chunks) == 3 and all("problems/" in x and "shard ETA" in x for x in chunks)
    assert "100% of the shard, shard ETA 0s" in chunks[-1]

    class Echo:
        def generate(self, prompts, params):
            return [[Completion("x", [0], None, "stop")] for _ in prompts]

    job = EvalJob(model=EvalModelConfig(path=str(tiny_instruct)), benchmarks=["b"])
    lines = []
    Generator(Echo(), job, (), log=lines.append, chunk_size=2).generate(["a"] * 3, "cot")
    assert len(lines) == 2 and lines[0].startswith("  generated 2/3 problems, ")
    assert "ETA" in lines[0] and lines[-1].endswith("ETA 0s")
