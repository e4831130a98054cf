"""`qmath --help` and `qmath <group> [<command>] --help` start without the heavy libraries.

Each help runs in a fresh interpreter (nothing imported by an earlier test); the interpreter
reports which of torch, Megatron, vLLM and transformers ended up in ``sys.modules``.
bench/cli_startup.py measures the time this saves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "megatron", "vllm", "transformers", "transformer_engine")

_PROBE = """
import contextlib, io, json, sys
from qmath_megatron.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(sys.argv[1:] + ["--help"])
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(HEAVY)))
print(json.dumps({"help": out.getvalue(), "heavy": heavy, "modules": sorted(sys.modules)}))
"""


def _help(command: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.replace("HEAVY", repr(json.dumps(HEAVY))), *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["data"],
        ["data", "tokenize"],
        ["data", "dedup"],
        ["data", "sft-prepare"],
        ["data", "rft"],
        ["data", "rl-prompts"],
        ["data", "rm-prepare"],
        ["data", "inspect"],
        ["eval"],
        ["eval", "metrics"],
        ["train"],
        ["train", "pretrain"],
        ["train", "grpo"],
        ["train", "rm"],
        ["convert", "hf-to-mcore"],
        ["convert", "verify"],
        ["exec"],
        ["rm", "score"],
        ["engine", "serve"],
        ["tokenizer", "encode"],
        ["info"],
        ["demo"],
    ],
    ids=lambda c: " ".join(c) or "qmath",
)
def test_help_imports_no_heavy_library(command):
    result = _help(command)
    assert "usage: qmath" in result["help"]
    assert result["heavy"] == [], f"qmath {' '.join(command)} --help imported {result['heavy']}"


def test_top_level_help_imports_no_command_module():
    """`qmath --help` lists the commands from the table in qmath_megatron/cli.py: none of
    their modules (nor the sandbox, nor numpy) is imported."""
    result = _help([])
    for name in ("info", "convert", "data", "train", "demo", "eval", "exec", "rm", "engine"):
        assert f"    {name}" in result["help"], name
    imported = set(result["modules"])
    assert not {"numpy", "qmath_megatron.sandbox", "qmath_megatron.data.cli"} & imported


def test_importtime_of_qmath_help_lists_no_heavy_library():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qmath_megatron", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert imported, "no -X importtime output"
    assert not {name.split(".")[0] for name in imported} & set(HEAVY)
