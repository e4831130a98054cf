"""Throughput and utilisation figures, and where per-step metrics go.

Model FLOPs of one training token for a Qwen2 decoder (GQA, SwiGLU, untied or tied head),
counting a multiply-add as 2 FLOPs and training as 3x forward (forward + backward for
activations + backward for weights); activation recompute is *not* counted (MFU counts
model FLOPs, as in the PaLM paper and Megatron-LM):

    per layer: 2h(nd + 2gd)          QKV projection (n heads, g KV groups, head dim d)
             + 2 * s * n * d         QK^T and attention x V, causal (half of 2 x 2snd)
             + 2ndh                  output projection
             + 6hf                   SwiGLU gate, up, down
    head:      2hV                   logits
    train FLOPs / token = 3 * (L * per_layer + 2hV)

Departure from Megatron-LM's ``num_floating_point_operations``: attention is counted as
causal (half of the full s x s product), which is what FlashAttention computes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from qmath_megatron.models.flavors import QwenFlavor

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU (no sparsity), from NVIDIA's datasheets.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.4,
    ("H100", "fp8"): 1978.9,
    ("H200", "bf16"): 989.4,
    ("H200", "fp8"): 1978.9,
    ("A100", "bf16"): 312.0,
    ("B200", "bf16"): 2250.0,
    ("B200", "fp8"): 4500.0,
}


def train_flops_per_token(
    flavor: QwenFlavor, seq_length: int, vocab_size: int | None = None
) -> float:
    """Model FLOPs to train on one token (forward + backward), see the module docstring."""
    h, f, n, g, d = (
        flavor.hidden_size,
        flavor.ffn_hidden_size,
        flavor.num_attention_heads,
        flavor.num_query_groups,
        flavor.head_dim,
    )
    v = vocab_size or flavor.vocab_size
    per_layer = 2 * h * (n * d + 2 * g * d) + 2 * seq_length * n * d + 2 * n * d * h + 6 * h * f
    return 3.0 * (flavor.num_layers * per_layer + 2 * h * v)


def peak_tflops(precision: str) -> float | None:
    """Peak dense TFLOP/s of this GPU for bf16 or fp8 math; None on CPU or unknown GPUs."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for (model, prec), value in PEAK_TFLOPS.items():
        if model in name and prec == precision:
            return value
    return None


def memory_gb() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {
            "mem_alloc_gb": torch.cuda.max_memory_allocated() / 1e9,
            "mem_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        }
    import psutil

    return {"mem_rss_gb": psutil.Process().memory_info().rss / 1e9}


def drop_records_after(jsonl: Path, iteration: int) -> None:
    """Remove the records of iterations after ``iteration`` from ``jsonl`` (atomically).

    A resumed run recomputes the iterations after its checkpoint; without this the file would
    hold them twice. Lines without an integer ``iteration`` (not written here) are kept.
    """
    if not jsonl.is_file():
        return
    lines = jsonl.read_text().splitlines()
    kept = [line for line in lines if not _after(line, iteration)]
    if len(kept) == len(lines):
        return
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, jsonl)
    logger.info(
        "%s: dropped %d record(s) after iteration %d", jsonl, len(lines) - len(kept), iteration
    )


def _after(line: str, iteration: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    step = record.get("iteration") if isinstance(record, dict) else None
    return isinstance(step, int) and step > iteration


class MetricsSink:
    """stdout + JSONL always; TensorBoard and Weights & Biases when configured (rank 0)."""

    def __init__(
        self,
        jsonl: str | None,
        tensorboard_dir: str | None,
        wandb_project: str | None,
        wandb_mode: str,
        run_name: str,
        config: dict[str, Any],
        resumed_iteration: int | None = None,
    ):
        self.jsonl = Path(jsonl) if jsonl else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            if resumed_iteration is not None:
                drop_records_after(self.jsonl, resumed_iteration)
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError(
                    "logging.tensorboard_dir is set but tensorboard is not installed "
                    "(extra `logging`)"
                ) from None
            self.tb = SummaryWriter(tensorboard_dir)
        self.wandb = None
        if wandb_project and wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed (extra `logging`)"
                ) from None
            import os

            mode = (
                wandb_mode
                if (wandb_mode == "offline" or os.environ.get("WANDB_API_KEY"))
                else "offline"
            )
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, mode=mode)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"iter {step:>6}"]
        for key, value in metrics.items():
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}" if math.isfinite(value) else f"{key} {value}")
            else:
                parts.append(f"{key} {value}")
        print(" | ".join(parts), flush=True)
        if self.jsonl:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"iteration": step, **metrics}) + "\n")
        if self.tb:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
