from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

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


# --------------------------------------------------------------------------- settings


def _parse(argv):
    from qmath_megatron.config.cli import build_config

    return build_config(build_parser().parse_args(argv))


def test_data_tool_settings_yaml_then_flags_then_overrides(tmp_path):
    """Defaults < --config < the flags given (also at their default value) < key=value;
    a required flag may come from the file; a flag left alone does not beat the file."""
    import yaml

    config = tmp_path / "dedup.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inputs": ["a.jsonl"],
                "output": "out",
                "threshold": 0.5,
                "num_perm": 64,
                "ngram": 3,
                "bands": 4,
                "rows": 5,
                "partitions": 8,
            }
        )
    )
    argv = ["data", "dedup", "--config", str(config), "--num-perm", "32", "--ngram", "7"]
    cfg = _parse([*argv, "--partitions", "16", "ngram=9", "rows=2"])
    assert (cfg.inputs, cfg.output) == (["a.jsonl"], "out")  # required flags from the file
    assert cfg.threshold == 0.5 and cfg.bands == 4  # the file beats the defaults
    assert cfg.num_perm == 32 and cfg.partitions == 16  # a flag given beats the file
    assert cfg.ngram == 9 and cfg.rows == 2  # an override beats the flag
    assert cfg.seed == 1  # no flag: the dataclass default
    # Without a file the required flags stay required.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "dedup", "--output", "o"])
    # A list flag given replaces the file's list; repeated, it collects.
    cfg = _parse(["data", "dedup", "--config", str(config), "--input", "b", "--input", "c"])
    assert cfg.inputs == ["b", "c"]


def test_eval_settings_yaml_then_flags_then_overrides(tmp_path):
    import yaml

    from qmath_megatron.evaluation.config import EvalJob

    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "m", "batch_size": 3},
                "benchmarks": ["toy"],
                "output": "y",
                "sampling": {"n": 4, "temperature": 0.7, "seed": 1},
                "sandbox": {"workers": 2},
            }
        )
    )
    spec = "name=extra,path=p.jsonl,problem=q,answer=a"
    job = _parse(
        ["eval", "--config", str(config), "--n", "2", "--top-p", "0.9", "--benchmark", spec]
        + ["--output", "z", "sampling.seed=5", "sandbox.timeout_s=3"]
    )
    assert isinstance(job, EvalJob)
    assert (job.model.path, job.model.batch_size, job.model.engine) == ("m", 3, "auto")
    assert job.benchmarks == ["toy", "extra"] and job.benchmark_specs == [spec]
    assert (job.sampling.n, job.sampling.temperature, job.sampling.top_p) == (2, 0.7, 0.9)
    assert job.sampling.seed == 5 and job.output == "z"
    assert (job.sandbox.workers, job.sandbox.timeout_s, job.sandbox.memory_mb) == (2, 3.0, 1024)
    assert job.rm.path is None  # no --rm: no rm@k
    # The subcommand still parses (the overrides positional does not swallow its name).
    args = build_parser().parse_args(["eval", "metrics", "--samples", "s.jsonl", "k=2"])
    assert args.eval_command == "metrics" and args.overrides == ["k=2"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["bogus=1"], "unknown config key(s) bogus (DedupConfig has: inputs, output,"),
        (["num_perm=abc"], "num_perm: expected an integer, got 'abc'"),
        (["normalize=[1]"], "normalize: expected a string, got [1]"),
        (["threshold"], "override 'threshold' is not of the form key.sub=value"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(tmp_path, capsys, extra, message):
    argv = ["data", "dedup", "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path)]
    assert main([*argv, *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qmath: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "report.json").exists()  # refused before any work


def test_bad_settings_in_the_yaml_file_are_refused(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("model: {path: m}\nbenchmarks: [toy]\nsampling: {n: two}\n")
    assert main(["eval", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qmath: error: sampling.n: expected an integer"), err
    config.write_text("model: {path: m}\nbenchmarks: [toy]\nsampling: {bogus: 1}\n")
    assert main(["eval", "--config", str(config)]) == 1
    assert "unknown config key(s) sampling.bogus" in capsys.readouterr().err
    config.write_text("[1, 2]\n")
    assert main(["eval", "--config", str(config)]) == 1
    assert "top level must be a mapping" in capsys.readouterr().err


def test_every_leaf_command_takes_config_and_overrides():
    """Every command (but `qmath train`, whose job comes from a recipe) is built from a
    config dataclass: --config and KEY=VALUE are there, and its flags map to the fields."""
    parser = build_parser()
    leaves = []

    def walk(p, path):
        p.build()
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if p.get_default("func") is not None:
            leaves.append((path, p))
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*path, name])

    walk(parser, [])
    assert len(leaves) >= 25
    for path, p in leaves:
        options = {o for a in p._actions for o in a.option_strings}
        assert "--config" in options, path
        dests = {a.dest for a in p._actions}
        assert "overrides" in dests, path


def test_the_command_table_matches_the_registered_commands():
    """`qmath --help` lists the commands from cli.COMMANDS without importing them: the table
    says what each module registers."""
    from qmath_megatron.cli import COMMANDS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    registered = [(a.dest, a.help) for a in sub._choices_actions]
    assert registered == [(c.name, c.help) for c in COMMANDS]
    lazy = build_parser(["--help"])
    sub = next(a for a in lazy._actions if a.dest == "command")
    assert [(a.dest, a.help) for a in sub._choices_actions] == registered


def test_the_stage_table_matches_the_stages():
    import importlib

    from qmath_megatron.training.cli import STAGES, load_stage

    for entry in STAGES:
        stage = load_stage(entry.name)
        assert (stage.name, stage.help) == (entry.name, entry.help)
        assert stage.recipes is importlib.import_module(entry.recipes).RECIPES


def test_trailing_overrides_are_told_from_flag_values():
    """A key=value word is an override unless it is the value of the option before it; a
    list option's values end at the first override after at least one value."""
    argv = ["data", "rft", "--model", "m", "--output", "o", "--problems", "a", "b", "n=4"]
    cfg = _parse([*argv, "seed=3"])
    assert (cfg.problems, cfg.n, cfg.seed) == (["a", "b"], 4, 3)
    args = build_parser().parse_args(["eval", "--model", "m", "--tokenizer", "output=x"])
    assert args.tokenizer == "output=x" and args.overrides == []


def test_eval_reward_model_settings_are_part_of_the_job(tmp_path):
    """rm@k's reward model is the job's ``rm`` section: --rm* flags, YAML and key=value all
    set it, with the same precedence as every other key, and a bad value is refused."""
    import yaml

    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"rm": {"path": "rm_a", "batch_size": 4, "engine": "vllm"}}))
    base = ["eval", "--model", "m", "--benchmarks", "gsm8k", "--config", str(config)]
    job = _parse(base + ["--rm", "rm_b", "rm.tokenizer=tok"])
    assert (job.rm.path, job.rm.tokenizer, job.rm.batch_size, job.rm.engine) == (
        "rm_b",
        "tok",
        4,
        "vllm",
    )
    flags = ["--rm-batch-size", "2", "--rm-engine", "transformers", "--rm-tokenizer", "t2"]
    job = _parse(["eval", "--model", "m", "--benchmarks", "gsm8k", "--rm", "r", *flags])
    assert (job.rm.path, job.rm.tokenizer, job.rm.batch_size, job.rm.engine) == (
        "r",
        "t2",
        2,
        "transformers",
    )
    assert job.to_dict()["rm"]["path"] == "r"  # written into the run's config.json
    with pytest.raises(ValueError, match="rm.batch_size"):
        _parse(["eval", "--model", "m", "--benchmarks", "gsm8k", "rm.batch_size=0"])
