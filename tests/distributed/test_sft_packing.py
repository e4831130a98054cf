"""Packing equivalence: through megatron-core's GPTModel at TP=2 and at PP=2
(CPU, gloo), the logits and per-token losses of packed sequences (block-diagonal causal
mask, per-sample position ids, labels within samples; :func:`packed_microbatch`) equal
those of each sample run alone, to 1e-5 in fp32. The same rows without the block mask
differ, so the check can fail."""

from __future__ import annotations

import numpy as np
import torch

from qmath_megatron.parallel.runtime import launch
from qmath_megatron.sft.dataset import PackedSequence, packed_microbatch

SEQ, PAD = 40, 0
# Two packed rows of samples (lengths): 3 samples + padding, 2 samples filling the row.
ROWS = [(13, 7, 9), (17, 23)]


def _samples(vocab: int) -> list[list[PackedSequence]]:
    gen = np.random.default_rng(0)
    rows = []
    for lengths in ROWS:
        tokens = gen.integers(1, vocab, sum(lengths))
        mask = (gen.random(sum(lengths)) < 0.7).astype(np.uint8)
        rows.append(PackedSequence(tokens, mask, np.array(lengths)))
    return rows


def _forward(chunks, batch: dict, *, losses: bool) -> torch.Tensor | None:
    """One forward-only schedule call: per-token losses ``[b, s]`` (labels given) or full
    logits ``[b, s, V]`` (gathered over TP); None off the last pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = batch["tokens"].shape

    def step(data_iterator, model):
        mb = next(data_iterator)
        out = model(
            mb["tokens"],
            mb["position_ids"],
            mb.get("attention_mask"),
            labels=mb["labels"] if losses else None,
        )

        def collect(output, non_loss_data=False):
            return (
                output.detach()
                if losses
                else gather_from_tensor_model_parallel_region(output).detach()
            )

        return out, collect

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([batch]),
            model=chunks[0],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]


def packing_worker(layouts: list[tuple[int, int]]) -> list[dict | None]:
    """Each (TP, PP) layout in turn on the same 2 processes (one spawn for both)."""
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.parallel.runtime import initialize, set_parallel_layout, set_seed

    results = []
    for i, (tp, pp) in enumerate(layouts):
        parallel = ParallelConfig(tp=tp, pp=pp)
        if i == 0:
            initialize(parallel, seed=11)
        else:
            set_parallel_layout(parallel)
            set_seed(11)
        results.append(_check_layout(parallel))
    return results


def _check_layout(parallel) -> dict | None:
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_model, build_transformer_config
    from qmath_megatron.models.flavors import get_flavor

    flavor = get_flavor("tiny-untied")  # 4 layers, 6 heads / 2 KV groups, RoPE base 1e4
    config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
    chunks = build_model(flavor, config)
    for c in chunks:
        c.eval()
    rows = _samples(flavor.vocab_size)
    packed = packed_microbatch(rows, SEQ, PAD)
    logits = _forward(chunks, packed, losses=False)
    loss = _forward(chunks, packed, losses=True)
    unmasked = _forward(chunks, {**packed, "attention_mask": None}, losses=False)
    worst = {"logits": 0.0, "loss": 0.0, "unmasked_logits": 0.0, "max_abs_logit": 0.0}
    checked = 0
    for r, row in enumerate(rows):
        start = 0
        for n in row.sample_lengths.tolist():
            tokens = torch.as_tensor(row.tokens[start : start + n]).unsqueeze(0)
            alone = {
                "tokens": tokens,
                "position_ids": torch.arange(n).unsqueeze(0),
                "labels": torch.roll(tokens, -1, dims=1),
            }
            a_logits = _forward(chunks, alone, losses=False)
            a_loss = _forward(chunks, alone, losses=True)
            if logits is not None:
                part = logits[r, start : start + n]
                worst["logits"] = max(worst["logits"], float((part - a_logits[0]).abs().max()))
                worst["max_abs_logit"] = max(worst["max_abs_logit"], float(part.abs().max()))
                # The last position's label is the next sample's token when packed (masked).
                diff = loss[r, start : start + n - 1] - a_loss[0, : n - 1]
                worst["loss"] = max(worst["loss"], float(diff.abs().max()))
                if start:  # later samples see earlier ones without the block mask
                    leak = unmasked[r, start : start + n] - a_logits[0]
                    worst["unmasked_logits"] = max(
                        worst["unmasked_logits"], float(leak.abs().max())
                    )
                checked += 1
            start += n
    if logits is None:
        return None
    return {**worst, "samples": checked, "padding_loss": float(packed["loss_mask"][0, 29:].sum())}


def test_packed_equals_alone_at_tp2_and_pp2():
    layouts = [(2, 1), (1, 2)]
    per_rank = launch(packing_worker, 2, layouts)
    for (tp, pp), results in zip(layouts, zip(*per_rank)):
        last_stage = [r for r in results if r is not None]
        assert len(last_stage) == tp, (tp, pp)  # every last-stage rank reports
        for r in last_stage:
            assert r["samples"] == 5 and r["padding_loss"] == 0
            assert r["logits"] <= 1e-5, (tp, pp, r)
            assert r["loss"] <= 1e-5, (tp, pp, r)
            assert r["max_abs_logit"] > 0.05, (tp, pp, r)  # real logits, not zeros
            assert r["unmasked_logits"] > 1e-3, (tp, pp, r)  # without the block mask samples leak
