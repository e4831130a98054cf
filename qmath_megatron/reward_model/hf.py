"""The published Hugging Face layout of Qwen2.5-Math-RM, and a plain PyTorch reference.

Layout (Qwen2.5-Math-RM-72B): ``config.json`` with ``architectures:
["Qwen2ForRewardModel"]`` and ``model_type: "qwen2"``; the Qwen2 backbone's tensors under
``model.`` (exactly as in ``Qwen2ForCausalLM``, without ``lm_head.weight``); the head as
``score.0.weight`` ``[h, h]``, ``score.0.bias`` ``[h]``, ``score.2.weight`` ``[1, h]``,
``score.2.bias`` ``[1]`` (``nn.Sequential(Linear, ReLU, Linear)``). vLLM's built-in
``Qwen2ForRewardModel`` and the published modeling code read this layout.

:class:`Qwen2RewardModelReference` re-implements the published model with
``transformers.Qwen2Model`` and the two-layer head: the reference for parity tests and the
scorer's backend for HF directories. The published model card scores a conversation at
its last token; so does :meth:`Qwen2RewardModelReference.score`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.convert.hf_io import SafetensorsReader, read_hf_config
from qmath_megatron.models.hf_config import hf_config_from_flavor
from qmath_megatron.reward_model import RM_ARCHITECTURE

HEAD_TENSORS = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


def head_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "score.0.weight": (hidden, hidden),
        "score.0.bias": (hidden,),
        "score.2.weight": (1, hidden),
        "score.2.bias": (1,),
    }


def is_reward_model_config(config: dict[str, Any]) -> bool:
    return (config.get("architectures") or [None])[0] == RM_ARCHITECTURE


def is_reward_model_dir(path: str | Path) -> bool:
    """True for an HF directory whose config.json names ``Qwen2ForRewardModel``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return is_reward_model_config(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        return False


def backbone_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the backbone as a ``Qwen2ForCausalLM`` (for the shared flavor reader)."""
    return {**config, "architectures": ["Qwen2ForCausalLM"]}


def reward_model_hf_config(flavor: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of an exported reward model."""
    config = hf_config_from_flavor(flavor, dtype)
    config["architectures"] = [RM_ARCHITECTURE]
    config["num_labels"] = 1
    return config


class Qwen2RewardModelReference(torch.nn.Module):
    """``transformers.Qwen2Model`` + ``score = Sequential(Linear(h, h), ReLU, Linear(h, 1))``."""

    def __init__(self, config: Any):
        from transformers import Qwen2Model

        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = torch.nn.Sequential(
            torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 1)
        )

    @classmethod
    def hf_config(cls, config_dict: dict[str, Any]):
        from transformers import Qwen2Config

        fields = dict(config_dict)
        for key in (
            "architectures",
            "model_type",
            "rope_parameters",
            "torch_dtype",
            "dtype",
            "auto_map",
        ):
            fields.pop(key, None)
        return Qwen2Config(**fields)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32
    ) -> Qwen2RewardModelReference:
        """Load an HF reward-model directory strictly (every tensor present and used)."""
        config = read_hf_config(path)
        if not is_reward_model_config(config):
            raise ValueError(f"{path} is not a {RM_ARCHITECTURE} directory (see its config.json)")
        model = cls(cls.hf_config(config))
        reader = SafetensorsReader(path)
        state = {name: reader.get(name) for name in reader.names()}
        # A tied backbone stores no lm_head; nothing else may be missing or left over.
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for "
                f"{RM_ARCHITECTURE}"
            )
        return model.to(dtype).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Per-token rewards ``[b, s]`` (what vLLM's ``token_classify`` pooling returns)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score(hidden)[..., 0]

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """Reward of each token sequence at its last token (right padding, masked)."""
        scores: list[float] = []
        for start in range(0, len(sequences), batch_size):
            batch = [list(s) for s in sequences[start : start + batch_size]]
            if any(not s for s in batch):
                raise ValueError("cannot score an empty token sequence")
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            rewards = self(ids, mask)
            last = torch.tensor([len(s) - 1 for s in batch])
            scores.extend(rewards[torch.arange(len(batch)), last].float().tolist())
        return scores


def save_reward_model(model: Qwen2RewardModelReference, out_dir: str | Path, flavor: Any) -> Path:
    """Write ``model`` in the published layout (single safetensors file + config.json)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = reward_model_hf_config(flavor, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_random_hf_reward_model(
    flavor: Any, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A randomly initialised reward model of ``flavor`` in the published layout (tests):
    norms and biases randomised too, so a dropped or swapped tensor changes the scores."""
    torch.manual_seed(seed)
    model = Qwen2RewardModelReference(
        Qwen2RewardModelReference.hf_config(reward_model_hf_config(flavor, dtype))
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name.startswith("score."):
                param.normal_(0.0, 0.1)
    return save_reward_model(model.to(dtype), out_dir, flavor)
