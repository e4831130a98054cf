"""Resume refuses a dataset regenerated under the same path: the checkpoint stores the
task's data fingerprint (``qmath_data.json``) and the resume compares it."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from qmath_megatron.pretrain.recipes import get_recipe
from qmath_megatron.pretrain.task import PretrainTask
from qmath_megatron.sft.recipes import RECIPES as SFT_RECIPES
from qmath_megatron.sft.task import SFTTask
from qmath_megatron.training.resume import DATA_FILE, changed_data, check_data


def _write_dataset(prefix, n_sequences: int) -> None:
    """Stand-in files of a packed dataset: the index grows with the sequences."""
    for suffix, unit in ((".idx", 8), (".bin", 64), (".report.json", 0)):
        path = prefix.parent / f"{prefix.name}{suffix}"
        if unit:
            path.write_bytes(bytes(range(7)) * unit * n_sequences)
        else:
            path.write_text(json.dumps({"sequences": n_sequences}))


def _sft_task(prefix) -> SFTTask:
    job = SFT_RECIPES["tiny_cpu_sft"]()
    return SFTTask(replace(job, data=replace(job.data, prefix=str(prefix))))


def test_fingerprint_changes_when_regenerated_and_stays_when_untouched(tmp_path):
    prefix = tmp_path / "math"
    _write_dataset(prefix, 22)
    task = _sft_task(prefix)
    first = task.data_fingerprint()
    assert set(first) == {f"data.prefix {prefix}"}
    assert set(first[f"data.prefix {prefix}"]) == {"math.idx", "math.bin"}
    assert task.data_fingerprint() == first  # untouched
    _write_dataset(prefix, 700)  # regenerated under the same prefix
    assert task.data_fingerprint() != first


def test_same_size_different_content_changes_the_fingerprint(tmp_path):
    prefix = tmp_path / "math"
    _write_dataset(prefix, 22)
    task = _sft_task(prefix)
    first = task.data_fingerprint()
    (tmp_path / "math.idx").write_bytes(b"\xff" * (tmp_path / "math.idx").stat().st_size)
    lines = changed_data(first, task.data_fingerprint())
    assert lines == [
        f"data.prefix {prefix}: math.idx changed (same size, different content) "
        "since the checkpoint"
    ]


def test_pretrain_blend_prefixes_are_fingerprinted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_dataset(a, 3)
    _write_dataset(b, 4)
    job = get_recipe("tiny_cpu")
    job = replace(job, data=replace(job.data, blend=["0.3", str(a), "0.7", str(b)]))
    prints = PretrainTask(job).data_fingerprint()
    assert set(prints) == {f"data.blend prefix {a}", f"data.blend prefix {b}"}
    assert set(prints[f"data.blend prefix {a}"]) == {"a.idx", "a.bin"}


def test_resume_refuses_changed_data_naming_it(tmp_path):
    prefix = tmp_path / "math"
    _write_dataset(prefix, 22)
    task = _sft_task(prefix)
    iter_dir = tmp_path / "ckpt" / "iter_0000010"
    iter_dir.mkdir(parents=True)
    (iter_dir / DATA_FILE).write_text(json.dumps(task.data_fingerprint()))
    check_data(iter_dir, task.data_fingerprint(), allow_changed=False)  # unchanged: accepted

    _write_dataset(prefix, 700)
    size_old, size_new = 8 * 7 * 22, 8 * 7 * 700
    with pytest.raises(ValueError) as err:
        check_data(iter_dir, task.data_fingerprint(), allow_changed=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"data.prefix {prefix}: math.idx changed (size {size_old} -> {size_new})" in message
    assert "math.bin changed" in message
    assert "checkpoint.allow_changed_settings=true" in message
    # the escape hatch of the settings check resumes anyway
    check_data(iter_dir, task.data_fingerprint(), allow_changed=True)


def test_checkpoint_without_fingerprint_resumes_unchecked(tmp_path, caplog):
    prefix = tmp_path / "math"
    _write_dataset(prefix, 22)
    iter_dir = tmp_path / "iter_0000010"
    iter_dir.mkdir()
    with caplog.at_level(logging.WARNING):
        check_data(iter_dir, _sft_task(prefix).data_fingerprint(), allow_changed=False)
    assert [r.message for r in caplog.records] == [
        f"{iter_dir} has no {DATA_FILE}: cannot check that the data is unchanged"
    ]
