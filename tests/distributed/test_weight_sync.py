"""Megatron -> vLLM weight sync for real: a random Megatron policy at TP=2 (untied, 2 KV
groups) and at PP=2 (tied, 1 KV group) pushed into a real vLLM engine on CPU (in its own
process, as the remote placement): the engine's prompt log-probs differ from Megatron's
before the sync and equal them (fp32, <= 1e-4) after it; versions advance; a later change
of the Megatron weights is stale until the next sync."""

from __future__ import annotations

import pytest

from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
from qmath_megatron.inference.remote import RemoteEngine
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.models.hf_reference import make_random_hf_model
from qmath_megatron.parallel.runtime import launch

# head_dim 32 (vLLM's CPU attention refuses 16); untied with 2 KV groups, tied with 1.
UNTIED = get_flavor("tiny-tied").replace(
    name="rl-untied",
    hidden_size=128,
    ffn_hidden_size=256,
    num_attention_heads=4,
    num_query_groups=2,
    tie_word_embeddings=False,
)
TIED = UNTIED.replace(name="rl-tied", num_query_groups=1, tie_word_embeddings=True)
PROMPT = [3, 17, 250, 999, 42, 7, 512, 100, 64, 1]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One engine per architecture, started together (start-up is mostly waiting)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("wsync")
    # The engines start from other random weights than the Megatron policies.
    dirs = [make_random_hf_model(f, root / f.name, seed=99) for f in (UNTIED, TIED)]
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda d: RemoteEngine(d, seed=0, **CPU_VLLM_DEFAULTS), dirs))
    try:
        yield dict(zip((UNTIED.name, TIED.name), started, strict=True))
    finally:
        for engine in started:
            engine.close()


@pytest.mark.parametrize(
    ("flavor", "tp", "pp"), [(UNTIED, 2, 1), (TIED, 1, 2)], ids=["untied-tp2", "tied-pp2"]
)
def test_sync_makes_engine_logprobs_equal_megatron(engines, flavor, tp, pp):
    from tests.distributed.rl_workers import weight_sync_worker

    engine = engines[flavor.name]
    results = launch(
        weight_sync_worker, 2, flavor.to_dict(), tp, pp, engine.handle, PROMPT, "qmath_shm", 1 / 16
    )
    assert engine.weight_version() == 2
    r0 = results[0]
    assert [r["sender"] for r in results] == [True, False]  # TP rank 0 of stage 0
    assert r0["before"] > 1e-2 and r0["before_version"] == 0
    assert r0["after1"] <= 1e-4 and r0["after1_version"] == 1
    assert r0["stale"] > 1e-2  # Megatron moved on, the engine did not
    assert r0["after2"] <= 1e-4 and r0["after2_version"] == 2
    version, nbytes, nbuckets, n_engines = r0["stats1"]
    vocab_rows = flavor.vocab_size * flavor.hidden_size * 4  # embed + lm_head, trimmed
    assert version == 1 and n_engines == 1 and nbuckets > 1  # 1/16 MiB = 64 KiB buckets
    assert nbytes > 2 * vocab_rows
    assert r0["stats2"][0] == 2
