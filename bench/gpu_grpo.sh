#!/usr/bin/env bash
# One GPU, <= 8 minutes: a few GRPO steps of a Qwen2.5-Math-1.5B-shaped policy (random
# weights: no hub here) with its vLLM rollout engine on the same GPU, on the toy verifiable
# task of tiny_cpu_grpo (reward 1 when the first sampled token is in the lower half of the
# vocabulary), 512-token responses. Prints sync seconds, tokens/s per GPU and the engine vs
# trainer log-prob mismatch from metrics.jsonl; record them in bench/RESULTS.md.
#
# What it exercises: the trainer on GPU (bf16, TE when installed), WeightSync every step,
# the engine's processed log-probs. What it does not: the engine runs in its own process
# and receives weights through /dev/shm files (qmath_shm backend); the CUDA-IPC sender
# (inference/weight_transfer.py IPCSender) and sleep/wake around the train step are not
# wired into the trainer yet, so the engine keeps its memory (gpu_memory_utilization 0.35).
#
# UNRUN: no GPU was available in the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_grpo}
rm -rf "$OUT"
start=$(date +%s)
timeout 480 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m qmath_megatron \
  train grpo --recipe tiny_cpu_grpo \
  model.flavor=qwen2.5-math-1.5b model.seq_length=640 precision.dtype=bf16 \
  data.global_batch_size=16 data.micro_batch_size=8 data.toy_prompt_tokens=64 \
  rl.max_new_tokens=512 rl.gpu_memory_utilization=0.35 rl.bucket_mb=1024 \
  optim.min_lr=1e-6 optim.lr=1e-6 train.train_iters=4 checkpoint.save="$OUT"
"$PY" - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "sync_s" in r]
for r in rows:
    print(f"step {r['iteration']}: sync_s {r['sync_s']:.2f} ({r['sync_bytes']/1e9:.2f} GB), "
          f"rollout_s {r['rollout_s']:.2f}, train_s {r['train_s']:.2f}, "
          f"tokens_per_s_per_gpu {r['tokens_per_s_per_gpu']:.0f}, "
          f"logprob_mismatch {r['logprob_mismatch']:.4f} (max {r['logprob_mismatch_max']:.3f}), "
          f"reward {r['reward']:.3f}")
PYEOF
echo "total $(( $(date +%s) - start )) s"
