"""Run unmodified Megatron-Core on a machine without CUDA.

megatron-core assumes CUDA in many places: ``torch.cuda.current_device()``, literal
``device="cuda"`` tensor creation, CUDA RNG state get/set in ``tensor_parallel.random``,
and ``tensor.type() == "torch.cuda.FloatTensor"`` checks in the optimizer. This module is
how the project runs its *real* distributed code path (GPTModel, TP/PP schedules, DDP,
the distributed optimizer, torch_dist checkpoints) in CI on CPU with gloo, instead of a
hand-written stand-in model (see ``shared/notes-megatron-on-cpu.md`` for what was measured).

It is a no-op when CUDA is available. Nothing outside :mod:`qmath_megatron.parallel`
should import it: :func:`qmath_megatron.parallel.runtime.initialize` activates it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ACTIVE_MODE: TorchFunctionMode | None = None

# Tensor.type() names for CPU dtypes, reported as their CUDA equivalents so that
# megatron's `param.type() == "torch.cuda.FloatTensor"` checks keep their meaning.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int16: "torch.cuda.ShortTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


def _to_cpu(value: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(value) else value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites every CUDA device request to CPU, at the torch-function level."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            name = _CUDA_TYPE_NAMES.get(tensor.dtype)
            if name is not None and tensor.device.type == "cpu":
                return name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        # Tensor.to("cuda") / Tensor.to(torch.device("cuda"), dtype) / new_empty(..., "cuda")
        if func in (torch.Tensor.to,) and len(args) > 1:
            args = (args[0],) + tuple(_to_cpu(a) for a in args[1:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, *_a: Any, **_k: Any) -> None:
    torch.set_rng_state(new_state)


def _megatron_get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop_factory():
    def noop(*_args: Any, **_kwargs: Any) -> None:
        return None

    return noop


def _zero_factory():
    def zero(*_args: Any, **_kwargs: Any) -> int:
        return 0

    return zero


def _cover_custom_backwards() -> None:
    """Keep the mode in force inside custom autograd backwards.

    ``loss.backward()`` itself goes through ``__torch_function__``, and a mode is switched
    off while its handler runs, so everything the autograd engine calls (e.g. Megatron's
    activation-recompute ``CheckpointFunction.backward``, which re-runs the forward) would
    run without it. The engine calls Python backwards through ``BackwardCFunction.apply``,
    which is not itself dispatched, so entering the mode there is safe.
    """
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        with _CudaToCpuMode():
            return original(self, *args)

    BackwardCFunction.apply = apply  # type: ignore[method-assign]


def _l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's CPU fallback for ``amp_C.multi_tensor_l2norm``, accumulating in float64.

    megatron's own fallback takes ``torch.norm`` of each fp32 tensor, and on CPU that loses
    ~3e-4 (relative) on a 10M-element embedding gradient; the gradient norm (and with it
    the clip factor) then depends on how the distributed optimizer shards the gradients,
    so DP=2 and DP=1 report different norms for identical gradients. The CUDA kernel
    reduces in a tree and does not have this problem.
    """
    squares = [torch.sum(t.double() ** 2) for tensors in tensor_lists for t in tensors]
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
    return torch.tensor([float(total)], dtype=torch.float), None


def is_active() -> bool:
    """Whether the CPU compatibility layer is in force in this process."""
    return _ACTIVE_MODE is not None


def activate() -> bool:
    """Install the CPU compatibility layer once per process; returns whether it is active.

    Does nothing (and returns False) when CUDA is available: on a GPU the real CUDA paths
    must run.
    """
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE_MODE is not None:
        return True

    cpu = torch.device("cpu")
    # Every patched attribute gets its own function object: torch.compile (used by
    # megatron's jit_fuser) builds a table keyed by the functions of torch.cuda and refuses
    # one object registered under two names.
    patches = {
        "current_device": lambda: cpu,
        "synchronize": _noop_factory(),
        "get_rng_state": _cpu_get_rng_state,
        "set_rng_state": _cpu_set_rng_state,
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU
        # generator directly to avoid recursion.
        "manual_seed": _cpu_manual_seed,
        "manual_seed_all": _noop_factory(),
        "empty_cache": _noop_factory(),
        "set_device": _noop_factory(),
        "device_count": lambda: 0,
        "memory_allocated": _zero_factory(),
        "max_memory_allocated": _zero_factory(),
        "memory_reserved": _zero_factory(),
        "max_memory_reserved": _zero_factory(),
        "reset_peak_memory_stats": _noop_factory(),
    }
    for name, fn in patches.items():
        setattr(torch.cuda, name, fn)
    torch.cuda.random.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
    torch.cuda.random.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _megatron_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state

    from megatron.core.optimizer import clip_grads

    clip_grads.l2_norm_impl = _l2_norm_fp64

    _ACTIVE_MODE = _CudaToCpuMode()
    _ACTIVE_MODE.__enter__()
    _cover_custom_backwards()
    logger.info("CUDA not available: Megatron-Core CPU compatibility layer active")
    return True
