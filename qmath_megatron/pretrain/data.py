"""Training data: Megatron ``GPTDataset`` blends and a resumable global-batch order.

The sample order is a pure function of the dataset (Megatron's seeded shuffle) and the
number of samples consumed, which the checkpoint stores: global batch ``i`` is samples
``[i * G, (i + 1) * G)``, split evenly over data-parallel ranks and then into
microbatches. Resuming from ``consumed_samples`` therefore continues with exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qmath_megatron.data.indexed import validate_indexed_dataset
from qmath_megatron.data.synthetic import write_jsonl
from qmath_megatron.data.tokenize import TokenizeConfig, tokenize_corpus
from qmath_megatron.pretrain.config import DataConfig
from qmath_megatron.tokenizer.qwen import MegatronTokenizer, build_qwen25_tokenizer

logger = logging.getLogger(__name__)


def parse_blend(blend: list[str]) -> tuple[list[str], list[float] | None]:
    """``["a"]`` or ``["0.7", "a", "0.3", "b"]`` -> (prefixes, weights)."""
    if not blend:
        raise ValueError("data.blend is empty: give indexed-dataset prefixes (optionally weighted)")
    try:
        float(blend[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return list(blend), None
    if len(blend) % 2:
        raise ValueError(f"weighted data.blend needs weight/prefix pairs, got {blend}")
    weights = [float(w) for w in blend[0::2]]
    if any(w <= 0 for w in weights):
        raise ValueError(f"data.blend weights must be positive: {weights}")
    return list(blend[1::2]), weights


def check_prefixes(prefixes: list[str]) -> None:
    """Fail at start-up, naming the file, when a dataset is missing or inconsistent (e.g. a
    ``.bin`` shorter than its ``.idx`` says, which would otherwise crash at the first read
    of its end, possibly at the first eval)."""
    missing = [
        p for p in prefixes if not (Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file())
    ]
    if missing:
        raise FileNotFoundError(
            f"indexed dataset(s) not found (need PREFIX.bin and PREFIX.idx): {', '.join(missing)}; "
            "build them with `qmath data tokenize`"
        )
    for prefix in prefixes:
        validate_indexed_dataset(prefix)


@dataclass
class Datasets:
    train: object
    valid: object | None


def build_datasets(
    cfg: DataConfig, seq_length: int, seed: int, train_samples: int, valid_samples: int
) -> Datasets:
    """Megatron ``GPTDataset`` train/valid splits of the blend (built on every rank)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not cfg.tokenizer:
        raise ValueError("data.tokenizer (a local HF tokenizer directory) is required")
    prefixes, weights = parse_blend(cfg.blend)
    check_prefixes(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        tokenizer=MegatronTokenizer(cfg.tokenizer),
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.reset_attention_mask,
        path_to_cache=cfg.cache_dir,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples or None, None], lambda: True, config
    ).build()
    return Datasets(train, valid)


def _to_microbatch(samples: list[dict]) -> dict:
    batch = {
        k: torch.stack([torch.as_tensor(s[k]) for s in samples])
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    if "attention_mask" in samples[0] and samples[0]["attention_mask"] is not None:
        batch["attention_mask"] = torch.stack(
            [torch.as_tensor(s["attention_mask"]) for s in samples]
        )
    return batch


def global_batch_microbatches(
    dataset, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[dict]:
    """This DP rank's microbatches of the global batch that starts at ``consumed_samples``."""
    if global_batch % (micro_batch * dp_size):
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} "
            f"x DP {dp_size}"
        )
    per_rank = global_batch // dp_size
    start = consumed_samples + dp_rank * per_rank
    n = len(dataset)
    indices = [(start + i) % n for i in range(per_rank)]  # epochs wrap, as Megatron's sampler
    samples = [dataset[i] for i in indices]
    return [_to_microbatch(samples[i : i + micro_batch]) for i in range(0, per_rank, micro_batch)]


def prepare_synthetic_data(cfg: DataConfig, workdir: Path) -> DataConfig:
    """Build the tokenizer and a tokenized generated corpus under ``workdir`` (rank 0 only)."""
    from dataclasses import replace

    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_qwen25_tokenizer(tok_dir, overwrite=True)
    prefix = workdir / "synthetic_math"
    if not Path(f"{prefix}.idx").is_file():
        corpus = write_jsonl(workdir / "synthetic_math.jsonl", cfg.synthetic_documents, seed=0)
        tokenize_corpus(
            TokenizeConfig(
                inputs=[str(corpus)],
                output_prefix=str(prefix),
                tokenizer=str(tok_dir),
                progress=False,
            )
        )
    return replace(
        cfg,
        blend=[str(prefix)],
        tokenizer=str(tok_dir),
        cache_dir=cfg.cache_dir or str(workdir / "index_cache"),
    )
