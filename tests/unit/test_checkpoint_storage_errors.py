"""Storage problems with checkpoints are one `qmath: error:` line, not a traceback: a save
directory that cannot be written is refused at start-up; a disk that fills up during a save
names the checkpoint and the cause."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile

import pytest
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from qmath_megatron.checkpoint.model_checkpoint import CheckpointError, ModelMeta
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.training import checkpointing
from qmath_megatron.training.checkpointing import (
    Checkpointer,
    TrainState,
    check_save_dir,
    storage_error,
)


def test_a_save_dir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=f"checkpoint.save {blocker}/ck is not writable"):
        check_save_dir(blocker / "ck")


def test_a_read_only_save_dir_is_refused(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(CheckpointError, match="not writable: Read-only file system"):
        check_save_dir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_directory_without_write_permission_is_refused(tmp_path):
    (tmp_path / "ck").mkdir(mode=0o555)
    with pytest.raises(CheckpointError, match="Permission denied"):
        check_save_dir(tmp_path / "ck")


def test_writable_save_dir_passes_and_leaves_nothing(tmp_path):
    check_save_dir(tmp_path / "new" / "ck")
    assert list((tmp_path / "new" / "ck").iterdir()) == []


def test_train_cli_refuses_an_unwritable_save_dir_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", "train", "pretrain", "--recipe", "tiny_cpu"]
        + [f"checkpoint.save={blocker}/ck"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"qmath: error: checkpoint.save {blocker}/ck is not writable: Not a directory"
    )


def _disk_full() -> CheckpointException:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ck/iter_0000002.tmp/__0_0.distcp")
    try:
        raise RuntimeError("write failed") from full
    except RuntimeError as wrapped:
        return CheckpointException("save failed", {0: _wrap_exception(wrapped)})


def test_storage_error_finds_the_cause_inside_dcp_failures():
    assert storage_error(_disk_full()).errno == errno.ENOSPC
    assert storage_error(RuntimeError("a bug")) is None
    assert storage_error(CheckpointException("x", {0: _wrap_exception(KeyError("k"))})) is None


@pytest.fixture
def gloo_world(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _meta() -> ModelMeta:
    return ModelMeta(get_flavor("tiny-untied"), 512, "fp32", "local", 1, 1)


def test_disk_full_during_a_save_is_one_line(tmp_path, monkeypatch, gloo_world):
    from megatron.core import dist_checkpointing

    def full_disk(sd, path, **kwargs):
        raise _disk_full()

    monkeypatch.setattr(checkpointing, "_state_dict", lambda *a, **k: {})
    monkeypatch.setattr(dist_checkpointing, "save", full_disk)
    saver = Checkpointer(tmp_path / "ck")
    with pytest.raises(CheckpointError) as err:
        saver.save([], None, None, TrainState(iteration=2), _meta())
    message = str(err.value)
    assert "\n" not in message
    assert f"saving checkpoint {tmp_path / 'ck' / 'iter_0000002'} failed" in message
    assert "No space left on device" in message and "__0_0.distcp" in message
    assert not (tmp_path / "ck" / "iter_0000002").exists()  # nothing published


def test_other_save_failures_keep_their_traceback(tmp_path, monkeypatch, gloo_world):
    from megatron.core import dist_checkpointing

    def bug(sd, path, **kwargs):
        raise RuntimeError("a bug in the save")

    monkeypatch.setattr(checkpointing, "_state_dict", lambda *a, **k: {})
    monkeypatch.setattr(dist_checkpointing, "save", bug)
    with pytest.raises(RuntimeError, match="a bug in the save"):
        Checkpointer(tmp_path / "ck").save([], None, None, TrainState(iteration=2), _meta())


def test_a_failed_set_up_gives_back_the_signal_handlers(tmp_path):
    """Ctrl-C saves while training; once train() has failed, it interrupts again."""
    import signal

    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.pretrain.recipes import get_recipe
    from qmath_megatron.pretrain.task import PretrainTask
    from qmath_megatron.training.loop import train

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    job = apply_overrides(get_recipe("tiny_cpu"), [f"checkpoint.save={blocker}/ck"])
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(CheckpointError, match="not writable"):
        train(job, PretrainTask(job))
    assert signal.getsignal(signal.SIGINT) is before
