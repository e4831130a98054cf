"""Numerical precision of a model: parameter dtype and optional FP8 through Transformer Engine.

torch is imported only where a ``torch.dtype`` is needed: the command line builds its flags
from these config dataclasses, and ``qmath --help`` must not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qmath_megatron.config.overrides import RESUME_SAFE

if TYPE_CHECKING:
    import torch

DType = Literal["fp32", "bf16", "fp16"]
Fp8Format = Literal["hybrid", "e4m3"]
# "current" is accepted as a synonym of Megatron's "tensorwise" (per-tensor current scaling).
Fp8Recipe = Literal["delayed", "tensorwise", "current", "blockwise", "mxfp8"]

# The torch dtype of each DType (names of torch attributes).
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class PrecisionConfig:
    """Parameter/compute dtype and FP8 settings.

    FP8 needs Transformer Engine on a GPU; the fields map one to one onto Megatron's
    ``TransformerConfig.fp8*`` fields (see :func:`qmath_megatron.models.builder.precision_kwargs`).
    """

    dtype: DType = "bf16"
    fp8: Fp8Format | None = None
    fp8_recipe: Fp8Recipe = "delayed"
    fp8_margin: int = 0
    # Delayed scaling: Megatron-LM's published large-model runs use a 1024-step amax
    # history with "max" (the defaults of TE itself are 1 / most_recent). Resume-safe
    # (RESUME_SAFE): the scaling statistics, not the run.
    fp8_amax_history_len: int = field(default=1024, metadata=RESUME_SAFE)
    fp8_amax_compute_algo: Literal["max", "most_recent"] = field(
        default="max", metadata=RESUME_SAFE
    )
    fp8_wgrad: bool = True
    fp8_param: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(
                f"precision.dtype must be one of {list(_TORCH_DTYPES)}, got {self.dtype!r}"
            )
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ValueError(f"precision.fp8 must be None, 'hybrid' or 'e4m3', got {self.fp8!r}")
        if self.fp8_recipe == "current":
            self.fp8_recipe = "tensorwise"
        if self.fp8_recipe not in ("delayed", "tensorwise", "blockwise", "mxfp8"):
            raise ValueError(
                "precision.fp8_recipe must be one of delayed, tensorwise (alias current), "
                f"blockwise, mxfp8; got {self.fp8_recipe!r}"
            )
        if self.fp8 is not None and self.dtype == "fp32":
            raise ValueError("FP8 training needs precision.dtype=bf16 (or fp16), not fp32")
        if self.fp8 is None and (self.fp8_param or self.first_last_layers_bf16):
            raise ValueError("fp8_param / first_last_layers_bf16 need precision.fp8 to be set")
        if self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ValueError(
                "first_last_layers_bf16 is not supported with the delayed FP8 recipe "
                "(Megatron-Core restriction); use fp8_recipe=tensorwise or blockwise"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _TORCH_DTYPES[self.dtype])
