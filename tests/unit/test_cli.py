from __future__ import annotations

import json
import subprocess
import sys

from qmath_megatron.cli import build_parser, main


def test_subcommands_are_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"info", "convert", "tokenizer"} <= set(sub.choices)
    convert = sub.choices["convert"]
    directions = next(a for a in convert._actions if a.dest == "convert_command")
    assert set(directions.choices) == {"hf-to-mcore", "mcore-to-hf", "verify"}


def test_info_flavor_json(capsys):
    assert main(["info", "--flavor", "qwen2.5-math-72b", "--tp", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_billions"] == "72.71B" and info["published_params"] == "72.7B"
    assert info["padded_vocab_size"] == 152576 and info["num_query_groups"] == 8


def test_unknown_flavor_is_a_clean_error(capsys):
    assert main(["info", "--flavor", "llama-7b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qmath: error:") and "known flavors" in err


def test_python_dash_m_is_the_same_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "qwen2.5-math-7b" in json.loads(proc.stdout)["flavors"]


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "convert" in capsys.readouterr().out
