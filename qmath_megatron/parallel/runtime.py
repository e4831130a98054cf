"""Distributed runtime: the one place that touches ``torch.distributed`` set-up and
Megatron's ``parallel_state``.

- :func:`initialize` reads the torchrun environment (or defaults to a single process),
  picks NCCL on GPU and gloo on CPU, activates the CPU compatibility layer when there is
  no CUDA, builds Megatron's parallel state from a :class:`ParallelConfig` and seeds
  every RNG.
- :func:`launch` starts N local worker processes (spawn-safe) for commands such as
  ``qmath convert`` that need TP x PP ranks but are started as a plain command.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing as mp
import os
import pickle
import random
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.parallel import cpu_compat
from qmath_megatron.utils.quiet import quiet_third_party_warnings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_process_group(timeout_minutes: int = 30) -> DistributedContext:
    """Initialise ``torch.distributed`` from the torchrun environment (idempotent)."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.activate()
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def initialize(
    parallel: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30
) -> DistributedContext:
    """Process group + Megatron parallel state + seeds. Call once per process."""
    ctx = init_process_group(timeout_minutes)
    set_parallel_layout(parallel)
    set_seed(seed)
    return ctx


def set_parallel_layout(parallel: ParallelConfig) -> None:
    """(Re)build Megatron's model-parallel groups for ``parallel`` on the current world."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    parallel.data_parallel_size(world)  # raises with a clear message if it does not factor
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
    )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker.

    As in Megatron-LM, each pipeline stage gets a different seed (layers on different
    stages must not be initialised identically); TP ranks share it and Megatron's tracker
    forks a per-TP-rank stream for partitioned weights.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def shutdown() -> None:
    """Tear down parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallel_ranks() -> dict[str, int]:
    """This rank's coordinates, for logging and for code that must not import parallel_state."""
    from megatron.core import parallel_state as ps

    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "pp_size": ps.get_pipeline_model_parallel_world_size(),
        "dp_size": ps.get_data_parallel_world_size(),
    }


def pipeline_stage() -> tuple[bool, bool]:
    """``(is_first_stage, is_last_stage)`` of this rank's pipeline position (any VPP chunk)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(
        ignore_virtual=True
    )


# ----------------------------------------------------------------------------- launching


class WorkerError(RuntimeError):
    """A worker process of :func:`launch` failed; carries the worker's own traceback."""

    def __init__(self, rank: int, report: str):
        self.rank = rank
        self.summary = report.splitlines()[0] if report else "unknown error"
        self.details = report
        super().__init__(f"rank {rank} failed: {self.summary}")


def _worker(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, queue) -> None:
    quiet_third_party_warnings()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Two cores shared by N ranks: more intra-op threads only oversubscribe.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        result = fn(*args)
        # Plain pickle: tensors travel inline. The queue's own pickler (torch's reductions)
        # would pass their storage as a file descriptor that the parent fetches from this
        # process later, and this process may have exited by then (FileNotFoundError).
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        # The group may already be broken by the error being reported.
        with contextlib.suppress(Exception):
            shutdown()


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 3600) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh local processes forming one process group.

    ``fn`` must be importable (module level). Returns each rank's return value in rank
    order; a failure in any rank stops all of them and raises :class:`WorkerError` with
    that rank's traceback. For commands that start their own workers (``qmath convert``,
    ``qmath demo``); jobs started by torchrun call :func:`initialize` directly instead.
    """
    if nprocs < 1:
        raise ValueError("nprocs must be >= 1")
    if "TORCHELASTIC_RUN_ID" in os.environ and _env_int("WORLD_SIZE", 1) > 1:
        raise RuntimeError(
            "this command starts its own worker processes; run it as a plain command, "
            "not under torchrun"
        )
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, nprocs, port, args, queue), daemon=False)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while len(results) + len(errors) < nprocs:
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"workers did not finish within {timeout_s:.0f}s")
            if not queue.empty():
                rank, status, payload = queue.get()
                if status == "ok":
                    payload = pickle.loads(payload)
                (results if status == "ok" else errors)[rank] = payload
                if errors:
                    break
                continue
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and queue.empty():
                for p in dead:
                    idx = procs.index(p)
                    errors.setdefault(idx, f"worker {idx} died with exit code {p.exitcode}")
                break
            procs[0].join(timeout=0.05)
    finally:
        if errors or len(results) < nprocs:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=30)
    if errors:
        rank = min(errors)
        raise WorkerError(rank, errors[rank])
    return [results[r] for r in range(nprocs)]
