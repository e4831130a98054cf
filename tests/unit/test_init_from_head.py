"""`model.init_from` must hold a head the stage can start from: the LM stages (pretrain,
SFT, GRPO) refuse a reward-model checkpoint; the reward-model stage takes an SFT (LM)
checkpoint as its backbone or a reward-model one. Checked from the metadata alone, before
the model is built; so is a checkpoint of another size."""

from __future__ import annotations

import pytest

from qmath_megatron.checkpoint import model_checkpoint
from qmath_megatron.checkpoint.model_checkpoint import (
    MODEL_META_FILE,
    CheckpointError,
    ModelMeta,
)
from qmath_megatron.config.overrides import apply_overrides
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.pretrain.recipes import get_recipe
from qmath_megatron.pretrain.task import PretrainTask
from qmath_megatron.reward_model.recipes import RECIPES as RM_RECIPES
from qmath_megatron.reward_model.task import RewardModelTask
from qmath_megatron.rl.recipes import RECIPES as GRPO_RECIPES
from qmath_megatron.rl.task import GRPOTask
from qmath_megatron.sft.recipes import RECIPES as SFT_RECIPES
from qmath_megatron.sft.task import SFTTask


def _checkpoint(tmp_path, head: str, flavor: str, name: str | None = None):
    """An iteration directory holding only its metadata (the shards are not read here)."""
    d = tmp_path / (name or head)
    d.mkdir()
    meta = ModelMeta(get_flavor(flavor), 512, "fp32", "local", 1, 1, head=head)
    (d / MODEL_META_FILE).write_text(meta.to_json())
    return str(d)


@pytest.fixture(autouse=True)
def _metadata_only(monkeypatch):
    monkeypatch.setattr(model_checkpoint, "check_checkpoint_files", lambda d: None)


def _with_init(job, path):
    return apply_overrides(job, [f"model.init_from={path}"])


def _flavor(job) -> str:
    return job().model.flavor


@pytest.mark.parametrize(
    ("task_cls", "job"),
    [
        (PretrainTask, lambda: get_recipe("tiny_cpu")),
        (SFTTask, lambda: SFT_RECIPES["tiny_cpu_sft"]()),
    ],
)
def test_lm_stages_refuse_a_reward_model_checkpoint(tmp_path, task_cls, job):
    rm = _checkpoint(tmp_path, "score", _flavor(job))
    task = task_cls(_with_init(job(), rm))
    with pytest.raises(CheckpointError) as err:
        task.init_padded_vocab()
    message = str(err.value)
    assert "\n" not in message
    assert rm in message and "'score'" in message and task_cls.name in message
    with pytest.raises(CheckpointError, match="'score' head"):
        task.load_initial_weights([], rm)  # refused before any weight is read
    lm = _checkpoint(tmp_path, "lm", _flavor(job))
    assert task_cls(_with_init(job(), lm)).init_padded_vocab() == 512


def test_grpo_refuses_a_reward_model_checkpoint(tmp_path):
    rm = _checkpoint(tmp_path, "score", _flavor(GRPO_RECIPES["tiny_cpu_grpo"]))
    task = GRPOTask(_with_init(GRPO_RECIPES["tiny_cpu_grpo"](), rm))
    with pytest.raises(CheckpointError, match=r"'score' head; the grpo stage"):
        task.init_padded_vocab()


def test_reward_model_stage_takes_an_lm_or_a_reward_model_checkpoint(tmp_path):
    flavor = _flavor(RM_RECIPES["tiny_cpu_rm"])
    for head in ("lm", "score"):
        path = _checkpoint(tmp_path, head, flavor)
        task = RewardModelTask(_with_init(RM_RECIPES["tiny_cpu_rm"](), path))
        assert task.init_padded_vocab() == 512
    other = _checkpoint(tmp_path, "value", flavor)
    task = RewardModelTask(_with_init(RM_RECIPES["tiny_cpu_rm"](), other))
    with pytest.raises(CheckpointError, match=r"'value' head; the rm stage"):
        task.init_padded_vocab()


def test_a_checkpoint_of_another_size_is_refused_naming_both_sizes(tmp_path):
    job = SFT_RECIPES["tiny_cpu_sft"]()
    other = "qwen2.5-0.5b" if job.model.flavor != "qwen2.5-0.5b" else "qwen2.5-1.5b"
    path = _checkpoint(tmp_path, "lm", other)
    task = SFTTask(_with_init(job, path))
    with pytest.raises(CheckpointError) as err:
        task.init_padded_vocab()
    message = str(err.value)
    theirs, mine = get_flavor(other), get_flavor(job.model.flavor)
    assert "\n" not in message and path in message
    assert f"{theirs.num_layers} layers, hidden {theirs.hidden_size}" in message
    assert f"{mine.num_layers} layers, hidden {mine.hidden_size}" in message
