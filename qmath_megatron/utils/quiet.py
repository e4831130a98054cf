"""Silence known third-party noise (Megatron/TE/torch import-time and deprecation warnings).

They fire on every command and in every worker process and carry no information for our
users; set QMATH_SHOW_WARNINGS=1 to see them.
"""

from __future__ import annotations

import os
import warnings

_PATTERNS = (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r".*full scope is deprecated.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
    r".*`load_state_dict` is deprecated.*",
    r".*all_gather_into_tensor. is deprecated.*",
    r".*reduce_scatter_tensor. is deprecated.*",
    r".*pad token id in the tokenizer collides.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
)


def quiet_third_party_warnings() -> None:
    if os.environ.get("QMATH_SHOW_WARNINGS"):
        return
    for pattern in _PATTERNS:
        warnings.filterwarnings("ignore", message=pattern)
