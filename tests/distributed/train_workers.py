"""Workers for the shared-loop tests (SFT, preemption, CP reduction); spawn-importable."""

from __future__ import annotations

import torch


def sft_worker(overrides: list[str]) -> list[dict]:
    """`qmath train sft --recipe tiny_cpu_sft OVERRIDES` inside a spawned rank."""
    from qmath_megatron.training.cli import load_stage, resolve_job
    from qmath_megatron.training.loop import train

    job = resolve_job("tiny_cpu_sft", None, overrides, stage="sft")
    return train(job, load_stage("sft").task(job))


def positionwise_loss(tokens, position_ids, labels):
    """Per-token "loss" of :class:`_PositionwiseModel`: a fixed function of each position."""
    x = (tokens * 7 + position_ids * 3 + labels).float()
    return torch.sin(x) ** 2 + 0.01 * position_ids.float()


def cp_eval_microbatches() -> list[dict]:
    """Three fixed microbatches [2, 16] with unequal loss masks (token weighting matters)."""
    gen = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(3):
        tokens = torch.randint(0, 100, (2, 16), generator=gen)
        mbs.append(
            {
                "tokens": tokens,
                "labels": torch.roll(tokens, -1, 1),
                "loss_mask": (torch.rand(2, 16, generator=gen) < 0.6).float(),
                "position_ids": torch.arange(16).expand(2, 16).contiguous(),
            }
        )
    return mbs


class _PositionwiseModel(torch.nn.Module):
    """A per-token "model" without attention (so it runs at CP > 1 on CPU): the loss of
    token t is a fixed function of (token, position, label). Validation loss at CP=2 then
    equals CP=1 only if the batch is sliced consistently and the sums are reduced over
    the CP group: exactly what the shared schedule call and reduction must do."""

    def __init__(self, cp: int):
        from megatron.core.transformer.transformer_config import TransformerConfig

        super().__init__()
        self.config = TransformerConfig(
            num_layers=1,
            hidden_size=8,
            num_attention_heads=1,
            context_parallel_size=cp,
            use_cpu_initialization=True,
        )
        from megatron.core.enums import ModelType

        self.weight = torch.nn.Parameter(torch.ones(1))
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, tensor) -> None:  # the schedule's hook; one stage only
        pass

    def forward(self, tokens, position_ids, attention_mask, labels):
        return positionwise_loss(tokens, position_ids, labels) * self.weight


def cp_eval_worker(cp: int) -> dict[str, tuple[float, float]]:
    """Validation-style forward-only pass at CP=``cp`` (world = cp) through run_schedule +
    reduce_reports with the LM loss; unequal loss masks so token weighting matters."""
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.parallel.schedule import reduce_reports, run_schedule
    from qmath_megatron.training.step import lm_forward_step

    initialize(ParallelConfig(cp=cp), seed=1)
    mbs = cp_eval_microbatches()
    reports = run_schedule([_PositionwiseModel(cp)], lm_forward_step, mbs, forward_only=True)
    return reduce_reports(reports)  # (sum, count): a missing CP slice would double the count


def te_cp_eval_worker(cp: int) -> float:
    """GPU: validation LM loss of a small Transformer-Engine GPTModel at CP=``cp`` on fixed
    data, through the shared schedule call and reduction (what evaluate() runs)."""
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_model, build_transformer_config
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.parallel.schedule import reduce_reports, report_means, run_schedule
    from qmath_megatron.training.step import lm_forward_step

    flavor = get_flavor("qwen2.5-0.5b").replace(num_layers=2)
    parallel = ParallelConfig(cp=cp)
    initialize(parallel, seed=5)
    config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
    chunks = build_model(flavor, config, use_te=True)
    gen = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(2):
        seq = torch.randint(0, 1000, (2, 257), generator=gen)
        mbs.append(
            {
                "tokens": seq[:, :-1],
                "labels": seq[:, 1:],
                "loss_mask": (torch.rand(2, 256, generator=gen) < 0.7).float(),
                "position_ids": torch.arange(256).expand(2, 256).contiguous(),
            }
        )
    reports = run_schedule(chunks, lm_forward_step, mbs, forward_only=True)
    return report_means(reduce_reports(reports))["lm loss"]
