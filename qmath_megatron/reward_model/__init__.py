"""The reward model (Qwen2.5-Math-RM): its Megatron model and HF layout, data, listwise
loss, training task, recipes, conversion and scoring.

Importing the package registers the reward model's head with ``qmath convert``
(:mod:`qmath_megatron.convert.heads`: conversion dispatches to
:mod:`qmath_megatron.reward_model.convert` without importing this package).
"""

from qmath_megatron.convert.heads import HeadConverter, register_head

SCORE_HEAD = "score"  # ModelMeta.head of a reward-model checkpoint
RM_ARCHITECTURE = "Qwen2ForRewardModel"  # architectures[0] of its HF config.json

register_head(
    HeadConverter(
        head=SCORE_HEAD,
        hf_architecture=RM_ARCHITECTURE,
        module="qmath_megatron.reward_model.convert",
    )
)
