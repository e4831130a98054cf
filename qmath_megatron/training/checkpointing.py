"""Training checkpoints: model, optimizer, LR scheduler, RNG and data position, in
Megatron's torch_dist format and Megatron-LM's directory layout.

A save writes ``iter_N.tmp/`` on all ranks, then rank 0 adds ``qmath_model.json``, renames
it to ``iter_N/`` and only then moves ``latest_checkpointed_iteration.txt``: a crash at any
point leaves the previous checkpoint as the one that loads. Leftover ``*.tmp`` directories
are removed at the next start. ``keep_last`` prunes older iterations after publishing.

A save that fails on the storage (disk full, quota, read-only), synchronous or asynchronous
(the forked writer's error surfaces when the save is finalized: at the next save,
:meth:`Checkpointer.poll` or :meth:`Checkpointer.finalize`), is one
:class:`~qmath_megatron.checkpoint.model_checkpoint.CheckpointError` line naming the
checkpoint and the cause; its ``iter_N.tmp`` is removed and the published ones are untouched.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmath_megatron.checkpoint.model_checkpoint import (
    MODEL_META_FILE,
    TRACKER_FILE,
    CheckpointError,
    ModelMeta,
    exception_causes,
    iteration_dirname,
    model_sharded_state_dict,
    write_tracker,
)
from qmath_megatron.training.resume import DATA_FILE, JOB_FILE

logger = logging.getLogger(__name__)
# Test-only fault injection: exit hard after the shards of this iteration are written and
# before they are published (see tests/distributed/test_pretrain.py).
_CRASH_ENV = "QMATH_TEST_CRASH_DURING_SAVE"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    nonfinite_skipped: int = 0
    consecutive_nonfinite: int = 0


def latest_iteration(root: str | Path) -> int | None:
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    tag = tracker.read_text().strip()
    return None if tag == "release" else int(tag)


def clean_partial_saves(root: str | Path) -> None:
    for tmp in Path(root).glob("iter_*.tmp"):
        logger.warning("removing incomplete checkpoint %s (an earlier save did not finish)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _rng_sharded_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=ps.get_data_parallel_rank())


def _restore_rng(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dict(
    modules: list,
    optimizer,
    scheduler,
    state: TrainState | None,
    loading: bool,
    optimizer_format: str,
    task_state: dict | None = None,
) -> dict:
    sd = model_sharded_state_dict(modules)
    metadata = {"distrib_optim_sharding_type": optimizer_format}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=loading, metadata=metadata)
    sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["rng_state"] = _rng_sharded_object()
    sd["train_state"] = asdict(state or TrainState())
    if not loading:
        sd["task_state"] = task_state or {}  # common (rank 0) state of the stage's task
    return sd


def _die_with_parent(parent_pid: int) -> None:
    """Initializer of the checkpoint helper process: end with the trainer, not before.

    It ignores the exit signals: torchrun and Slurm signal the trainer's whole process
    group, and the trainer still needs this process to write the preemption checkpoint.
    It receives SIGKILL when the trainer dies (Linux ``PR_SET_PDEATHSIG``) and is shut down
    normally when the trainer exits.
    """
    import ctypes
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to bind to
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)


def bind_checkpoint_children() -> None:
    """Make megatron's checkpoint helper process end with the trainer.

    ``dist_checkpointing`` (torch_dist) starts a multiprocessing ``Manager`` (a spawned
    server process, ~270 MB) at the first save and keeps it for the process lifetime; if
    the trainer is killed (SIGKILL, OOM killer) that server lived on as an orphan. Start it
    here instead, with a parent-death signal, and hand its queue to megatron.
    """
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    # What megatron does (``ctx.Manager()``), plus the initializer.
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_die_with_parent, (os.getpid(),))
    global _MANAGER
    _MANAGER = manager  # keep it referenced: collecting it would shut the server down
    filesystem_async._results_queue = manager.Queue()


_MANAGER = None


def check_save_dir(root: str | Path) -> None:
    """Refuse a ``checkpoint.save`` directory this process cannot create or write, at
    start-up and naming it, rather than with a traceback at the first save."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write_test."):
            pass
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.save {root} is not writable: {exc.strerror or exc}"
        ) from exc


# Errors of the storage rather than of the program: reported in one line.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(exc: BaseException) -> OSError | None:
    """The storage ``OSError`` (disk full, quota, read-only, permission) behind a failed
    save, if any (also inside torch DCP's per-rank failures)."""
    return next(
        (e for e in exception_causes(exc) if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS),
        None,
    )


class Checkpointer:
    """Saves the full training state under ``root``: synchronously, or with megatron's
    asynchronous torch_dist writer (``async_save``: tensors are written by a forked
    process while training continues; publishing happens when the write has finished on
    every rank, in :meth:`poll` or :meth:`finalize`). One save is in flight at a time."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int | None = None,
        optimizer_format: str = "dp_reshardable",
        async_save: bool = False,
    ):
        self.root = Path(root)
        self.keep_last = keep_last
        self.optimizer_format = optimizer_format
        self.queue = None
        # (iter_N.tmp, iter_N) of the asynchronous save in flight: named when it fails.
        self._in_flight: tuple[Path, Path] | None = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def save(
        self,
        modules: list,
        optimizer,
        scheduler,
        state: TrainState,
        meta: ModelMeta,
        job_json: str | None = None,
        task_state: dict | None = None,
        data_json: str | None = None,
    ) -> Path:
        """Collective. Returns the directory the checkpoint will be published as.

        ``job_json``: the resolved job config, written as ``qmath_job.json`` (checked on
        resume); ``task_state``: the task's extra state (saved once, by rank 0); ``data_json``:
        the task's data fingerprint, written as ``qmath_data.json`` (checked on resume)."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        if self.queue is not None:
            self._finalize_async(blocking=True)  # the previous save first
        final = self.root / iteration_dirname(state.iteration)
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        sd = _state_dict(
            modules,
            optimizer,
            scheduler,
            state,
            loading=False,
            optimizer_format=self.optimizer_format,
            task_state=task_state,
        )
        publish = functools.partial(
            self._publish, tmp, final, state.iteration, meta.to_json(), job_json, data_json
        )
        if self.queue is None:
            try:
                dist_checkpointing.save(sd, str(tmp))
            except BaseException as exc:  # DCP's CheckpointException is a BaseException
                error = self._storage_failure(exc, tmp, final)
                if error is None:
                    raise
                raise error from exc
            dist.barrier()
            publish()
        else:
            try:
                request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True)
            except BaseException as exc:  # planning (and metadata) write synchronously
                error = self._storage_failure(exc, tmp, final)
                if error is None:
                    raise
                raise error from exc
            request.add_finalize_fn(publish)
            self._in_flight = (tmp, final)
            self.queue.schedule_async_request(request)
        return final

    def _storage_failure(
        self, exc: BaseException, tmp: Path, final: Path, asynchronous: bool = False
    ) -> CheckpointError | None:
        """A save that failed on the storage (disk full, quota, read-only, permission) as
        one line naming the checkpoint and the cause, its ``iter_N.tmp`` removed (the
        published checkpoints are untouched); None for any other failure."""
        import torch.distributed as dist

        cause = storage_error(exc)
        if cause is None:
            return None
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({cause.filename})" if cause.filename else ""
        latest = latest_iteration(self.root)
        previous = (
            f"the previous checkpoint {self.root / iteration_dirname(latest)} is unchanged"
            if latest is not None
            else "the previous checkpoint is unchanged"
        )
        kind = "asynchronous save of checkpoint" if asynchronous else "saving checkpoint"
        return CheckpointError(
            f"{kind} {final} failed: {cause.strerror or cause}{where}; {previous}"
        )

    def _finalize_async(self, blocking: bool) -> None:
        """Publish the asynchronous save(s) that finished (all of them: ``blocking``). A
        write that failed on the storage (ENOSPC in the forked writer, gathered into DCP's
        CheckpointException by megatron's finalize step) is a :class:`CheckpointError`."""
        assert self.queue is not None
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as exc:
            # The failed call has left megatron's queue (it pops a call before finalizing).
            tmp, final = self._in_flight or (None, None)
            self._in_flight = None
            error = None if tmp is None else self._storage_failure(exc, tmp, final, True)
            if error is None:
                raise
            raise error from exc
        if not self.queue.get_num_unfinalized_calls():
            self._in_flight = None

    def _publish(
        self,
        tmp: Path,
        final: Path,
        iteration: int,
        meta_json: str,
        job_json: str | None = None,
        data_json: str | None = None,
    ) -> None:
        import torch.distributed as dist

        if os.environ.get(_CRASH_ENV) == str(iteration):
            os._exit(13)  # test-only: die after the shards are written, before publishing
        if dist.get_rank() == 0:
            if job_json is not None:
                (tmp / JOB_FILE).write_text(job_json)
            if data_json is not None:
                (tmp / DATA_FILE).write_text(data_json)
            (tmp / MODEL_META_FILE).write_text(meta_json)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_tracker(self.root, iteration)
            if self.keep_last:
                _prune(self.root, self.keep_last, iteration)
        dist.barrier()

    def poll(self) -> None:
        """Publish a finished asynchronous save, if any (cheap; call every step)."""
        if self.queue is not None:
            self._finalize_async(blocking=False)

    def finalize(self) -> None:
        """Wait for and publish any save in flight."""
        if self.queue is None:
            return
        try:
            self._finalize_async(blocking=True)
        except BaseException:
            self.queue.close(abort=True)  # the failed call has left it: nothing to wait for
            self.queue = None
            raise
        self.queue.close()
        self.queue = None


def _prune(root: Path, keep_last: int, current: int) -> None:
    iters = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    for it in iters[:-keep_last]:
        if it != current:
            shutil.rmtree(root / iteration_dirname(it), ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """Create Adam's (empty, lazily created) state so the checkpoint has tensors to load
    into: one step with zero gradients at lr 0 and weight decay 0, which changes nothing."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        saved = [(g.get("lr"), g.get("weight_decay")) for g in inner.param_groups]
        for group in inner.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
            for param in group["params"]:
                if param.numel():
                    param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, (lr, wd) in zip(inner.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, wd


def _restore_adam_steps(optimizer, optimizer_state: dict) -> None:
    """Work around megatron-core 0.16 on the torch-AdamW path (no TE/apex, e.g. CPU).

    Its DistributedOptimizer stores the Adam step count in ``param_groups[i]["step"]`` but,
    on a dp_reshardable load, then copies each parameter's ``step`` from the state of the
    *loading* optimizer (the placeholder), and elsewhere puts one shared tensor into every
    parameter's state (torch's AdamW increments it in place once per parameter). Either way
    Adam's bias correction after a resume would differ from the uninterrupted run. Set every
    parameter's own step from the checkpoint's param groups.
    """
    groups = (
        optimizer_state.get("optimizer", {}).get("param_groups", [])
        if isinstance(optimizer_state, dict)
        else []
    )
    steps = {g["step"] for g in groups if "step" in g}
    if len(steps) != 1:
        return
    (step,) = steps
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)


def load(
    iter_dir: str | Path,
    modules: list,
    optimizer,
    scheduler,
    optimizer_format: str = "dp_reshardable",
    task_state: dict | None = None,
) -> TrainState:
    """Collective load of a full training state (see ``CheckpointConfig.optimizer_format``
    for which layout changes the optimizer state survives). The task's extra state, if
    the checkpoint has one, is put into ``task_state`` (a dict, updated in place)."""
    from megatron.core import dist_checkpointing

    _materialize_optimizer_state(optimizer)
    sd = _state_dict(
        modules, optimizer, scheduler, None, loading=True, optimizer_format=optimizer_format
    )
    loaded = dist_checkpointing.load(sd, str(iter_dir))
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    for module, key in zip(modules, keys, strict=True):
        module.load_state_dict(loaded[key], strict=True)
    with torch.no_grad():  # the state is copied into parameter views that require grad
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    _restore_rng(loaded["rng_state"])
    if task_state is not None:
        task_state.update(loaded.get("task_state") or {})
    return TrainState(**loaded["train_state"])
