"""The Qwen2.5-Math reward model on Megatron-Core: a ``GPTModel`` backbone and a score head.

Architecture (as the published ``Qwen2ForRewardModel`` of Qwen2.5-Math-RM-72B): the Qwen2.5
decoder with its final RMSNorm and no LM head, then ``score = Linear(h, h) -> ReLU ->
Linear(h, 1)`` (both with bias) applied to the hidden state of the last token of each
(prompt, response) sequence.

Megatron layout:

- :class:`RewardGPTModel` subclasses ``GPTModel`` and is built by
  :func:`qmath_megatron.models.builder.build_model` (``model_class=``), so TP/PP/VPP,
  the layer spec and precision are the policy's. The backbone never ties or builds an LM
  head: the output layer is removed, ``share_embeddings_and_output_weights`` is False (so
  Megatron's embedding-group gradient all-reduce is skipped) and ``_postprocess`` returns
  the final-normed hidden states ``[s, b, h]``.
- The head lives on the last pipeline stage only (``post_process``), sharded across TP
  ranks like Megatron's MLP: ``score.0`` is a ``ColumnParallelLinear`` (rows and bias
  split), ``score.2`` a ``RowParallelLinear`` (input columns split, the bias replicated and
  added after the all-reduce). Gradients are therefore consistent across TP ranks by
  Megatron's own layers (no hand-written all-reduce), and checkpoints store the head as
  sharded tensors ``score.0.weight`` etc., loadable at any TP/PP.
- With sequence parallelism the last stage all-gathers the sequence before picking each
  row's last token (``tensor_parallel_output_grad=False``: every TP rank then computes the
  head on the full batch, so the backward only splits the gradient back). Context
  parallelism is refused (a row's last token would live on one CP rank only).

The forward of the last stage returns scores ``[b]`` in float32; other stages return their
hidden states for the pipeline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from qmath_megatron.checkpoint.model_checkpoint import (
    load_model,
    model_sharded_state_dict,
    remap_spec_keys,
    resolve_checkpoint,
)
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.models.builder import build_model, build_transformer_config, layer_spec
from qmath_megatron.models.flavors import QwenFlavor
from qmath_megatron.reward_model import SCORE_HEAD

HEAD_PREFIX = "score."


class ScoreHead(MegatronModule):
    """``Linear(h, h) -> ReLU -> Linear(h, 1)``, tensor-parallel; children ``0``, ``1``,
    ``2`` so that parameter names are the published ``score.0.weight`` ... ``score.2.bias``."""

    def __init__(self, config: Any):
        from megatron.core import tensor_parallel
        from megatron.core.utils import init_method_normal

        # The head sees one token per row: no sequence parallelism inside it (its input was
        # gathered), whatever the backbone uses.
        head_config = copy.copy(config)
        head_config.sequence_parallel = False
        super().__init__(config=head_config)
        h = config.hidden_size
        init = init_method_normal(config.init_method_std)  # HF: normal(0, initializer_range)
        self.add_module(
            "0",
            tensor_parallel.ColumnParallelLinear(
                h,
                h,
                config=head_config,
                init_method=init,
                bias=True,
                gather_output=False,
                skip_bias_add=False,
            ),
        )
        self.add_module("1", torch.nn.ReLU())
        self.add_module(
            "2",
            tensor_parallel.RowParallelLinear(
                h,
                1,
                config=head_config,
                init_method=init,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            ),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden``: ``[b, h]`` (the same on every TP rank) -> scores ``[b]``."""
        x, _ = getattr(self, "0")(hidden.unsqueeze(0))  # [1, b, h/tp]
        x = getattr(self, "1")(x)
        out, _ = getattr(self, "2")(x)  # [1, b, 1], all-reduced over TP
        return out[0, :, 0]


class RewardGPTModel(GPTModel):
    """``GPTModel`` without the LM head, with :class:`ScoreHead` on the last stage.

    ``forward(input_ids, position_ids, attention_mask, *, score_index, **kwargs)``:
    ``score_index`` ``[b]`` int64 is the position of each row's last real token (rows are
    right-padded; with a causal mask the padding after it does not change its hidden
    state). Returns float32 scores ``[b]`` on the last stage, hidden states elsewhere.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        if self.config.mtp_num_layers:
            raise ValueError("the reward model does not support multi-token prediction")
        if self.config.context_parallel_size > 1:
            raise ValueError("the reward model does not support context parallelism (cp > 1)")
        if self.post_process:
            del self.output_layer  # the backbone has no LM head
            self.score = ScoreHead(self.config)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        # GPTModel/LanguageModule only add output-layer (tying, padding) and MTP handling on
        # top of MegatronModule's recursive implementation; this model has neither.
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def _postprocess(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # The decoder of the last stage has applied the final RMSNorm; no output layer.
        return hidden_states

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        score_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        hidden = super().forward(input_ids, position_ids, attention_mask, **kwargs)
        if not self.post_process:
            return hidden
        if score_index is None:
            raise ValueError("the reward model's last stage needs score_index (last token per row)")
        return self.score_hidden(hidden, score_index)

    def score_hidden(self, hidden: torch.Tensor, score_index: torch.Tensor) -> torch.Tensor:
        """Scores ``[b]`` (float32) from final hidden states ``[s, b, h]`` (``[s/tp, b, h]``
        with sequence parallelism) at positions ``score_index`` ``[b]``."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        seq, batch = hidden.shape[:2]
        index = score_index.to(device=hidden.device, dtype=torch.long)
        if index.shape != (batch,) or bool(((index < 0) | (index >= seq)).any()):
            raise ValueError(f"score_index must be [{batch}] positions in [0, {seq})")
        last = hidden[index, torch.arange(batch, device=hidden.device)]  # [b, h]
        return self.score(last).float()


def build_reward_model(flavor: Any, config: Any, **kwargs: Any) -> list:
    """This rank's reward-model chunks (one per virtual pipeline stage), through the one
    model builder; ``kwargs`` as :func:`qmath_megatron.models.builder.build_model`."""
    return build_model(flavor, config, model_class=RewardGPTModel, **kwargs)


def build_rm(
    flavor: QwenFlavor,
    parallel: ParallelConfig,
    dtype: str,
    padded_vocab: int,
    *,
    initialize_weights: bool = False,
) -> list:
    """Reward-model chunks of this rank with the local layer spec (conversion, verify and
    checkpoint scoring), weights uninitialised unless ``initialize_weights``."""
    config = build_transformer_config(
        flavor, parallel, PrecisionConfig(dtype=dtype), perform_initialization=initialize_weights
    )
    return build_reward_model(flavor, config, padded_vocab=padded_vocab, use_te=False)


def load_initial_weights(chunks: list, checkpoint: str, flavor_name: str | None = None) -> None:
    """Collective: ``model.init_from`` for a reward model.

    A reward-model checkpoint (``head: "score"``) loads completely. A language-model
    checkpoint (SFT) loads the backbone only: the score head keeps its fresh initialisation
    and the checkpoint's LM head is not read. Any other missing tensor is an error.
    """
    iter_dir, meta = resolve_checkpoint(checkpoint)
    spec = layer_spec()
    config = chunks[0].config
    if (meta.flavor.hidden_size, meta.flavor.num_layers) != (config.hidden_size, config.num_layers):
        raise ValueError(
            f"model.init_from {checkpoint} holds {meta.flavor.name} (hidden "
            f"{meta.flavor.hidden_size}, {meta.flavor.num_layers} layers), not "
            f"{flavor_name or 'the job flavor'}"
        )
    if meta.head == SCORE_HEAD:
        load_model(chunks, iter_dir, meta, current_spec=spec)
        return
    sharded = model_sharded_state_dict(chunks)
    for chunk_sd in sharded.values():
        for name in [n for n in chunk_sd if n.startswith(HEAD_PREFIX)]:
            del chunk_sd[name]
    remap_spec_keys(sharded, meta.layer_spec, spec)
    state = dist_checkpointing.load(sharded, str(iter_dir))
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys, strict=True):
        missing, unexpected = chunk.load_state_dict(state[key], strict=False)
        missing = [
            m for m in missing if not m.startswith(HEAD_PREFIX) and not m.endswith("_extra_state")
        ]
        if missing or unexpected:
            raise ValueError(
                f"model.init_from {checkpoint}: backbone tensors missing {missing[:5]} / "
                f"unexpected {unexpected[:5]}"
            )
