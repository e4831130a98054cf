"""Qwen2.5 architecture hyper-parameters: the published flavors and tiny test flavors.

Every value of the published flavors is taken from the model's Hugging Face
``config.json``; ``published_params`` is the size printed on the model card and is checked
against :func:`count_parameters` by the unit tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QwenFlavor:
    """The architecture of one Qwen2/Qwen2.5 model (dense, GQA, SwiGLU, RoPE, QKV bias)."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # HF config vocab_size (embedding rows), before Megatron's TP padding
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rms_norm_eps: float
    published_params: str | None = None  # e.g. "7.61B", from the model card

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{self.name}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{self.name}: num_attention_heads {self.num_attention_heads} is not divisible "
                f"by num_query_groups {self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> QwenFlavor:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QwenFlavor:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown flavor fields {sorted(unknown)}")
        return cls(**data)


def count_parameters(flavor: QwenFlavor, *, vocab_size: int | None = None) -> int:
    """Exact parameter count of the HF model (unpadded vocab unless ``vocab_size`` is given)."""
    h, f, d = flavor.hidden_size, flavor.ffn_hidden_size, flavor.head_dim
    v = vocab_size if vocab_size is not None else flavor.vocab_size
    kv = flavor.num_query_groups * d
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h  # q(+bias), k/v(+bias), o
    mlp = 3 * h * f  # gate, up, down
    per_layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = v * h * (1 if flavor.tie_word_embeddings else 2)
    return flavor.num_layers * per_layer + h + embeddings


def format_billions(n: int) -> str:
    """``72_706_203_648 -> '72.71B'`` (the style of model cards and ``--dry-run``)."""
    return f"{n / 1e9:.2f}B"


def _q(
    name: str,
    layers: int,
    hidden: int,
    ffn: int,
    heads: int,
    groups: int,
    vocab: int,
    theta: float,
    max_pos: int,
    tied: bool,
    eps: float,
    published: str | None,
) -> QwenFlavor:
    return QwenFlavor(
        name, layers, hidden, ffn, heads, groups, vocab, theta, max_pos, tied, eps, published
    )


# fmt: off
# name, layers, hidden, ffn, heads, kv groups, vocab, rope base, max positions, tied, eps, card
_PUBLISHED = [
    _q("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, 1e6, 32768, True, 1e-6, "0.49B"),
    _q("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 151936, 1e6, 131072, True, 1e-6, "1.54B"),
    _q("qwen2.5-3b", 36, 2048, 11008, 16, 2, 151936, 1e6, 32768, True, 1e-6, "3.09B"),
    _q("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064, 1e6, 131072, False, 1e-6, "7.61B"),
    _q("qwen2.5-14b", 48, 5120, 13824, 40, 8, 152064, 1e6, 131072, False, 1e-5, "14.7B"),
    _q("qwen2.5-32b", 64, 5120, 27648, 40, 8, 152064, 1e6, 131072, False, 1e-5, "32.5B"),
    _q("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, 1e6, 131072, False, 1e-5, "72.7B"),
    _q("qwen2.5-math-1.5b", 28, 1536, 8960, 12, 2, 151936, 1e4, 4096, True, 1e-6, "1.54B"),
    _q("qwen2.5-math-7b", 28, 3584, 18944, 28, 4, 152064, 1e4, 4096, False, 1e-6, "7.61B"),
    _q("qwen2.5-math-72b", 80, 8192, 29568, 64, 8, 152064, 1e4, 4096, False, 1e-5, "72.7B"),
]
# Tiny flavors for tests and the CPU demo: GQA (groups < heads), a vocab that is not a
# multiple of 128 (exercises Megatron's padding), tied and untied embeddings.
_TINY = [
    _q("tiny-tied", 2, 64, 176, 4, 2, 1000, 1e6, 512, True, 1e-6, None),
    _q("tiny-untied", 4, 96, 256, 6, 2, 1000, 1e4, 512, False, 1e-6, None),
    # Fewer KV groups than TP ranks (TP=2 / TP=4), as Qwen2.5-1.5B at TP=4: head_dim 32.
    _q("tiny-kv1", 2, 128, 256, 4, 1, 1000, 1e6, 512, True, 1e-6, None),
    _q("tiny-kv2", 2, 128, 256, 4, 2, 1000, 1e4, 512, False, 1e-6, None),
    # The Qwen2.5 tokenizer's real vocabulary (151,665 tokens) in a small body: the demo.
    _q("tiny-qwen-vocab", 2, 64, 192, 4, 2, 151936, 1e6, 1024, True, 1e-6, None),
    # The same body with 2 heads of 32: vLLM's CPU attention refuses head_dim 16, so this
    # is the tiny Qwen-vocabulary model real CPU rollouts can run (GRPO's math task).
    _q("tiny-qwen-vocab-hd32", 2, 64, 192, 2, 2, 151936, 1e6, 1024, True, 1e-6, None),
    # GRPO's toy task on CPU with real vLLM (head_dim 32: vLLM's CPU attention refuses 16);
    # a 64-token vocabulary so "first token in the lower half" is learnable in few steps.
    _q("tiny-rl-toy", 2, 128, 256, 4, 2, 64, 1e4, 512, False, 1e-6, None),
]
# fmt: on

FLAVORS: dict[str, QwenFlavor] = {f.name: f for f in _PUBLISHED + _TINY}

# Model cards whose size disagrees with their own config.json. The exact count from the
# config is what the weights hold (and what `qmath info` prints); the card is quoted.
CARD_DISCREPANCIES: dict[str, str] = {
    "qwen2.5-32b": (
        "the model card says 32.5B (31.0B non-embedding), but its config.json (64 layers, "
        "hidden 5120, FFN 27648, 40 heads, 8 KV groups, vocab 152064, untied) gives "
        "32,763,876,352 (31.21B non-embedding)"
    ),
}


def get_flavor(name: str) -> QwenFlavor:
    """Look up a flavor by name (case-insensitive, ``_`` and ``-`` interchangeable)."""
    key = name.lower().replace("_", "-")
    if key not in FLAVORS:
        raise KeyError(f"unknown flavor {name!r}; known flavors: {', '.join(FLAVORS)}")
    return FLAVORS[key]


def matches_published(count: int, published: str) -> bool:
    """Whether an exact count agrees with a model card's figure at the card's precision.

    Qwen's cards truncate rather than round (7,615,616,512 is printed "7.61B"), so both
    truncation and rounding to the card's number of decimals are accepted.
    """
    if not published.endswith("B"):
        raise ValueError(f"published size {published!r} is not in billions ('7.61B')")
    figure = published[:-1]
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    scale = 10**decimals
    value = count / 1e9 * scale
    target = round(float(figure) * scale)
    return int(value) == target or round(value) == target
