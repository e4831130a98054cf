"""A disk that fills up during an ASYNCHRONOUS checkpoint save (checkpoint.async_save: the
forked writer's ENOSPC surfaces when megatron finalizes the save) is one `qmath: error:`
line naming the checkpoint, as for a synchronous save: its iter_N.tmp is removed and the
previous checkpoint stays the one that loads. Megatron's real AsyncCallsQueue runs the
request; only the writer's outcome is simulated (its CUDA-device all-reduces run on CPU)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from qmath_megatron.checkpoint.model_checkpoint import (
    CheckpointError,
    ModelMeta,
    iteration_dirname,
    write_tracker,
)
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.training import checkpointing
from qmath_megatron.training.checkpointing import Checkpointer, TrainState, latest_iteration


def _disk_full(tmp: str) -> CheckpointException:
    """What megatron's save_state_dict_async_finalize raises when the forked writer hit
    ENOSPC (FileSystemWriterAsync.retrieve_write_results: "Worker failure", wrapped)."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{tmp}/__0_0.distcp")
    try:
        raise RuntimeError(f"Worker failure: {full}") from full
    except RuntimeError as wrapped:
        return CheckpointException("async save failed", {0: _wrap_exception(wrapped)})


@pytest.fixture
def gloo_world(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    # megatron's queue all-reduces its bookkeeping on the current CUDA device.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    yield
    dist.destroy_process_group()


def _meta() -> ModelMeta:
    return ModelMeta(get_flavor("tiny-untied"), 512, "fp32", "local", 1, 1)


@pytest.fixture
def root(tmp_path):
    """A checkpoint root whose iteration 1 is published."""
    root = tmp_path / "ck"
    (root / iteration_dirname(1)).mkdir(parents=True)
    (root / iteration_dirname(1) / "weights").write_text("iteration 1")
    write_tracker(root, 1)
    return root


def _async_writer(monkeypatch, failure):
    """dist_checkpointing.save(..., async_sharded_save=True) returning a request whose
    finalize step raises ``failure(tmp)`` (the write itself ran in the forked writer)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    def save(sd, path, async_sharded_save=False, **kwargs):
        assert async_sharded_save
        assert os.path.isdir(path)  # the trainer made iter_N.tmp

        def finalize():
            raise failure(path)

        return AsyncRequest(None, (), [finalize])

    monkeypatch.setattr(checkpointing, "_state_dict", lambda *a, **k: {})
    monkeypatch.setattr(dist_checkpointing, "save", save)


@pytest.mark.parametrize("where", ["poll", "finalize", "next save"])
def test_disk_full_in_the_async_writer_is_one_line(root, monkeypatch, gloo_world, where):
    _async_writer(monkeypatch, _disk_full)
    saver = Checkpointer(root, async_save=True)
    final = saver.save([], None, None, TrainState(iteration=2), _meta())
    assert final == root / iteration_dirname(2)
    assert (root / (iteration_dirname(2) + ".tmp")).is_dir()  # being written
    with pytest.raises(CheckpointError) as err:
        if where == "poll":
            saver.poll()
        elif where == "finalize":
            saver.finalize()
        else:
            saver.save([], None, None, TrainState(iteration=3), _meta())
    message = str(err.value)
    assert "\n" not in message
    assert f"asynchronous save of checkpoint {final} failed: No space left on device" in message
    assert "__0_0.distcp" in message
    assert f"the previous checkpoint {root / iteration_dirname(1)} is unchanged" in message
    assert sorted(p.name for p in root.iterdir()) == [
        iteration_dirname(1),
        "latest_checkpointed_iteration.txt",
    ]  # the temporary directory is gone, nothing was published
    assert latest_iteration(root) == 1
    assert (root / iteration_dirname(1) / "weights").read_text() == "iteration 1"
    saver.finalize()  # nothing left in flight: the run's normal exit path passes


def test_other_async_failures_keep_their_traceback(root, monkeypatch, gloo_world):
    def bug(tmp):
        return RuntimeError("a bug in the writer")

    _async_writer(monkeypatch, bug)
    saver = Checkpointer(root, async_save=True)
    saver.save([], None, None, TrainState(iteration=2), _meta())
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        saver.finalize()


def test_a_successful_async_save_is_published(root, monkeypatch, gloo_world):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    monkeypatch.setattr(checkpointing, "_state_dict", lambda *a, **k: {})
    monkeypatch.setattr(
        dist_checkpointing, "save", lambda sd, path, **kw: AsyncRequest(None, (), [])
    )
    saver = Checkpointer(root, async_save=True)
    saver.save([], None, None, TrainState(iteration=2), _meta())
    saver.finalize()
    assert latest_iteration(root) == 2 and (root / iteration_dirname(2)).is_dir()
