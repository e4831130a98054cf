"""`qmath convert` reports the time its work took (the conversion itself, not just set-up)."""

from __future__ import annotations

from types import SimpleNamespace

from qmath_megatron.convert import commands


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def test_export_time_includes_the_write(monkeypatch, tmp_path):
    clock = _Clock()

    def slow_launch(worker, nprocs, *args):
        clock.now += 7.5  # the conversion work "takes" 7.5 s
        return [3]

    monkeypatch.setattr(commands, "time", SimpleNamespace(time=clock.time))
    monkeypatch.setattr(commands, "_cpu_launch", slow_launch)
    result = commands.export_hf_dir(
        tmp_path / "ckpt",
        tmp_path / "out",
        worker=lambda *a: 0,
        dtype=None,
        tokenizer=None,
        overwrite=False,
        files={"config.json": {}},
    )
    assert result.tensors == 3
    assert result.seconds == 7.5
    assert (tmp_path / "out" / "config.json").is_file()


def test_import_time_includes_the_write(monkeypatch, tmp_path):
    clock = _Clock()
    flavor = SimpleNamespace(to_dict=lambda: {})

    def slow_launch(worker, nprocs, *args):
        clock.now += 4.0
        return [2] * nprocs

    monkeypatch.setattr(commands, "time", SimpleNamespace(time=clock.time))
    monkeypatch.setattr(commands, "_cpu_launch", slow_launch)
    monkeypatch.setattr(commands, "check_parallel_fits", lambda flavor, parallel: None)
    result = commands.convert_hf_dir(
        tmp_path / "hf",
        tmp_path / "out",
        validate=lambda d: (flavor, commands.torch.float32),
        worker=lambda *a: 0,
        tp=1,
        pp=1,
        vpp=None,
        dtype="auto",
        overwrite=False,
    )
    assert result.tensors == 2
    assert result.seconds == 4.0
