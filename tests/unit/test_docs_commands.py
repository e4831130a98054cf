"""Every command in README.md and docs/*.md works as written.

Commands are taken from the fenced shell blocks (```bash, ```sh, ```shell, ```console) of
README.md and docs/*.md, continuation lines joined and ``#`` comments dropped:
``qmath ...``, ``python -m qmath_megatron ...``, ``torchrun ... -m qmath_megatron ...``,
``python tools/preprocess_data.py ...`` (= ``qmath data tokenize``), ``RECIPE=X sbatch
... slurm/S.sbatch OVERRIDES`` (= ``qmath train STAGE --recipe X OVERRIDES``),
``python bench/*.py`` / ``python examples/*.py``, ``bash bench/*.sh`` and ``make TARGET``.

Checks:

- every qmath command parses with the real parser
  (``qmath_megatron.cli.build_parser().parse_args``): the subcommand and every flag exist,
  and every flag is spelled in full (argparse accepts a unique prefix, which a renamed flag
  could still match);
- the cheap ones run for real, in one subprocess: ``--help``, ``qmath info``,
  ``qmath tokenizer build`` / ``encode`` (in a temporary directory), and every training
  command, Slurm lines included, as a dry run (``--dry-run`` added where the docs leave it
  out: the recipe and every ``key=value`` override are resolved and validated, nothing is
  trained);
- scripts named in the docs exist, and their flags appear in their ``--help``; ``make``
  targets exist in the Makefile; relative links (and their ``#anchors``) resolve.

Commands that need big models, data sets, GPUs or minutes (conversion, the data tools,
``qmath eval``, ``qmath rm score``, ``qmath engine serve``, ``qmath exec``, ``qmath
demo``) are parse-checked only; those that other tests run at tiny size are listed in
:data:`EXERCISED_ELSEWHERE` with the test that runs them. Placeholders such as ``DIR`` or
``ckpt/`` in the docs are fine: nothing reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# `qmath train` stage of each Slurm script; grpo.sbatch passes rl.engine_handles before the
# user's overrides.
SBATCH_STAGES = {
    "slurm/pretrain.sbatch": ("pretrain", []),
    "slurm/pretrain_single_node.sbatch": ("pretrain", []),
    "slurm/sft.sbatch": ("sft", []),
    "slurm/grpo.sbatch": ("grpo", ["rl.engine_handles=engines"]),
}
# Documented commands that other tests run at tiny size (the command itself, or the
# function it calls with its config): a command prefix, then the test (under tests/).
EXERCISED_ELSEWHERE_TABLE = """
demo
    distributed/test_demo.py::test_demo_pipeline
exec --self-test
    unit/test_sandbox.py::test_hostile_corpus_strongest_backend_via_self_test
exec
    unit/test_sandbox.py::test_qmath_exec_prints_json
train pretrain --recipe tiny_cpu
    distributed/test_pretrain.py::test_tp2_under_torchrun_matches_tp1_step_for_step
train sft --recipe tiny_cpu_sft
    distributed/test_sft.py::test_tp2_matches_tp1_and_a_sigterm_preempted_run_resumes_exactly
train rm --recipe tiny_cpu_rm
    distributed/test_reward_model.py::test_tiny_rm_training_learns_the_synthetic_preference
train grpo --recipe tiny_cpu_grpo
    distributed/test_grpo.py::test_reward_rises_and_falls_with_the_sign_flipped
engine serve
    distributed/test_grpo.py::test_reward_rises_and_falls_with_the_sign_flipped
convert hf-to-mcore
    unit/test_convert_errors.py::test_cli_refuses_to_overwrite_and_names_non_checkpoints
convert mcore-to-hf
    unit/test_convert_errors.py::test_cli_refuses_to_overwrite_and_names_non_checkpoints
convert verify
    distributed/test_conversion.py::test_logit_parity_with_transformers
data tokenize
    unit/test_tokenize_data.py::test_resume_after_kill_is_byte_identical
data inspect
    unit/test_tokenize_data.py::test_inspect_cli
data decontaminate
    unit/test_data_conservation.py::test_every_line_ends_in_exactly_one_output
data dedup
    unit/test_dedup.py::test_cli_and_bad_band_settings
data classify
    unit/test_classify.py::test_classify_cli
data recall
    unit/test_classify.py::test_recall_loop_expands_math_domains
data score
    unit/test_llm_steps.py::test_score_cli_with_a_tiny_random_model
data synthesize
    unit/test_data_conservation.py::test_every_line_ends_in_exactly_one_output
data sft-prepare
    unit/test_sft_data.py::test_sft_prepare_every_line_ends_once
data rft
    unit/test_rft.py::test_rft_cli_with_a_tiny_model
data rm-prepare
    unit/test_rm_data.py::test_rm_prepare_accounts_for_every_line
data rl-prompts
    unit/test_rl_prompts.py::test_the_engine_path_on_the_tiny_model
rm score
    distributed/test_reward_model.py::test_rm_score_fills_rm_at_k
eval metrics
    unit/test_eval_pipeline.py::test_eval_metrics_cli_matches_hand_computed_values
pipeline run
    distributed/test_pipeline_tiny.py::test_tiny_pipeline_runs_every_stage
pipeline status
    unit/test_pipeline.py::test_status_json_and_report
pipeline report
    distributed/test_pipeline_tiny.py::test_tiny_pipeline_runs_every_stage
data generate
    unit/test_pipeline.py::test_local_run_skips_done_stages_and_refuses_changes
eval
    unit/test_eval_pipeline.py::test_qmath_eval_end_to_end_with_a_tiny_random_model
"""
EXERCISED_ELSEWHERE = dict(
    zip(
        (
            tuple(line.split())
            for line in EXERCISED_ELSEWHERE_TABLE.split("\n")
            if line[:1].isalpha()
        ),
        (line.strip() for line in EXERCISED_ELSEWHERE_TABLE.split("\n") if line[:1] == " "),
        strict=True,
    )
)


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/x.md:12"
    line: str  # the command as written (continuations joined)
    kind: str  # "qmath", "script" (python/bash FILE ARGS) or "make"
    argv: tuple[str, ...]  # qmath arguments, or the script path + arguments, or the targets


def _shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced block in a shell language."""
    blocks: list[tuple[int, list[str]]] = []
    fence, lines = "", None  # the open block's fence; its lines when it is a shell block
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if not fence:
            if match:
                fence = match.group(1)
                lines = [] if match.group(2).lower() in SHELL_LANGUAGES else None
                blocks += [(number + 1, lines)] if lines is not None else []
        elif match and match.group(1).startswith(fence) and not match.group(2):
            fence, lines = "", None
        elif lines is not None:
            lines.append(line)
    return blocks


def _join_continuations(start: int, lines: list[str]) -> list[tuple[int, str]]:
    out, pending, pending_at = [], "", 0
    for offset, line in enumerate(lines):
        if not pending:
            pending_at = start + offset
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((pending_at, pending + stripped))
        pending = ""
    if pending:
        out.append((pending_at, pending))
    return out


def parse_command(where: str, line: str) -> DocCommand | None:
    """What a shell line of the docs runs, or None for lines that are not ours (pip, ...)."""
    tokens = shlex.split(line, comments=True)
    env = {}
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    if not tokens:
        return None
    head = Path(tokens[0]).name
    if head == "qmath":
        return DocCommand(where, line, "qmath", tuple(tokens[1:]))
    if "-m" in tokens and "qmath_megatron" in tokens:
        at = tokens.index("qmath_megatron")
        if at > 0 and tokens[at - 1] == "-m" and head in ("python", "python3", "torchrun"):
            return DocCommand(where, line, "qmath", tuple(tokens[at + 1 :]))
    if head in ("python", "python3") and tokens[1:2] == ["tools/preprocess_data.py"]:
        return DocCommand(where, line, "qmath", ("data", "tokenize", *tokens[2:]))
    if head == "sbatch":
        script = next((t for t in tokens if t.endswith(".sbatch")), None)
        assert script in SBATCH_STAGES, f"{where}: unknown Slurm script {script!r}"
        assert "RECIPE" in env, f"{where}: {script} needs RECIPE=..."
        stage, fixed = SBATCH_STAGES[script]
        overrides = tokens[tokens.index(script) + 1 :]
        argv = ("train", stage, "--recipe", env["RECIPE"], *fixed, *overrides)
        return DocCommand(where, line, "qmath", argv)
    scripts = ("bench/", "examples/", "tools/")
    if head in ("python", "python3", "bash") and tokens[1:2] and tokens[1].startswith(scripts):
        return DocCommand(where, line, "script", tuple(tokens[1:]))
    if head == "make":
        return DocCommand(where, line, "make", tuple(tokens[1:]))
    return None


def extract_commands(path: Path) -> list[DocCommand]:
    rel = path.relative_to(ROOT)
    commands = []
    for start, lines in _shell_blocks(path.read_text(encoding="utf-8")):
        for number, line in _join_continuations(start, lines):
            command = parse_command(f"{rel}:{number}", line)
            if command is not None:
                commands.append(command)
    return commands


ALL = [c for doc in DOCS for c in extract_commands(doc)]
QMATH = [c for c in ALL if c.kind == "qmath"]


def _ids(commands: list[DocCommand]) -> list[str]:
    return [f"{c.where} {' '.join(c.argv[:3])}" for c in commands]


# --- the parse check -------------------------------------------------------------------


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from qmath_megatron.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public way to list a parser's subcommands or options.
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def check_parses(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> str | None:
    """None when ``qmath ARGV`` parses and spells every flag in full; else the problem."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(list(argv))
        except SystemExit as exc:
            if exc.code not in (0, None):  # 0: --help
                return err.getvalue().strip().splitlines()[-1] if err.getvalue() else str(exc)
    # The flags each parser on the way to the subcommand accepts, spelled in full.
    known, current = set(), parser
    for token in argv:
        known |= {s for a in current._actions for s in a.option_strings}
        sub = _subparsers(current)
        if not token.startswith("-") and token in sub:
            current = sub[token]
    known |= {s for a in current._actions for s in a.option_strings}
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in known:
            return f"flag {flag} is not spelled as the parser defines it"
    return None


@pytest.mark.parametrize("command", QMATH, ids=_ids(QMATH))
def test_command_parses(parser, command):
    problem = check_parses(parser, command.argv)
    assert problem is None, f"{command.where}: `{command.line.strip()}`: {problem}"


@pytest.mark.parametrize(
    "argv,problem",
    [
        (("train", "pretrain", "--recipe", "tiny_cpu", "--no-such-flag"), "unrecognized"),
        (("no-such-command",), "invalid choice"),
        (("data", "tokenize", "--inp", "a", "--output-prefix", "p", "--tokenizer", "t"), "--inp"),
        (("convert", "hf-to-mcore", "--hf", "h", "--out", "o", "--tp", "two"), "invalid int"),
    ],
)
def test_a_command_that_does_not_exist_fails_the_check(parser, argv, problem):
    found = check_parses(parser, argv)
    assert found is not None and problem in found


# --- running the cheap ones --------------------------------------------------------------

DRIVER = """
import contextlib, io, json, sys
from qmath_megatron.cli import main
results = []
for argv in json.loads(open(sys.argv[1]).read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception as exc:
            code, _ = 1, print(f"{type(exc).__name__}: {exc}", file=err)
    results.append({"code": code, "out": out.getvalue()[-1500:], "err": err.getvalue()[-1500:]})
open(sys.argv[2], "w").write(json.dumps(results))
"""


def runnable(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """The argv to run for real (a training command becomes its dry run), or None."""
    if "--help" in argv or "-h" in argv or argv[:1] == ("info",):
        return argv
    if argv[:2] in (("tokenizer", "build"), ("tokenizer", "encode")):
        return argv
    if argv[:1] == ("train",):
        return argv if "--dry-run" in argv else (*argv, "--dry-run")
    return None


def run_in_subprocess(commands: list[tuple[str, ...]], cwd: Path) -> list[dict]:
    """Each argv through ``qmath_megatron.cli.main``, in order, in one fresh interpreter."""
    todo, done = cwd / "commands.json", cwd / "results.json"
    todo.write_text(json.dumps([list(c) for c in commands]))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(todo), str(done)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(done.read_text())


RUNNABLE = [c for c in QMATH if runnable(c.argv) is not None]
# Building the tokenizer first lets the commands that read `tok/` run after it.
RUN_ORDER = sorted(
    {runnable(c.argv) for c in RUNNABLE}, key=lambda a: (a[:2] != ("tokenizer", "build"), a)
)


@pytest.fixture(scope="module")
def run_results(tmp_path_factory) -> dict[tuple[str, ...], dict]:
    results = run_in_subprocess(RUN_ORDER, tmp_path_factory.mktemp("docs_commands"))
    return dict(zip(RUN_ORDER, results))


@pytest.mark.parametrize("command", RUNNABLE, ids=_ids(RUNNABLE))
def test_cheap_command_runs(run_results, command):
    result = run_results[runnable(command.argv)]
    assert result["code"] == 0, (
        f"{command.where}: `{command.line.strip()}` exited {result['code']}:\n"
        f"{result['err'] or result['out']}"
    )


def test_the_runner_reports_failures(tmp_path):
    """A dry run with an override that does not exist fails, as does an unknown recipe."""
    bad = [
        ("train", "pretrain", "--recipe", "tiny_cpu", "optim.no_such_key=1", "--dry-run"),
        ("train", "sft", "--recipe", "no_such_recipe", "--dry-run"),
        ("info", "--flavor", "no-such-flavor"),
    ]
    results = run_in_subprocess(bad, tmp_path)
    assert [r["code"] for r in results] == [1, 1, 1], results
    assert "no_such_key" in results[0]["err"]


def test_the_docs_show_the_runnable_kinds():
    """The run check is not empty: the docs hold training dry runs, info and the tokenizer."""
    kinds = {argv[:2] for argv in RUN_ORDER}
    assert {("train", s) for s in ("pretrain", "sft", "rm", "grpo")} <= kinds
    assert ("tokenizer", "build") in kinds and any(a[:1] == ("info",) for a in RUN_ORDER)
    assert any(c.where.startswith("README.md") for c in QMATH)


# --- commands run elsewhere, scripts, make targets, links --------------------------------


@pytest.mark.parametrize("prefix,test", sorted(EXERCISED_ELSEWHERE.items()))
def test_commands_exercised_elsewhere_name_real_tests(prefix, test):
    path, _, name = test.partition("::")
    source = (ROOT / "tests" / path).read_text()
    assert re.search(rf"^def {name}\(", source, re.M), f"{test} not found"


def test_every_parse_only_command_is_exercised_somewhere():
    """A documented command that neither runs here nor is listed with a test that runs it
    would be checked only for its spelling."""
    loose = [
        c
        for c in QMATH
        if runnable(c.argv) is None and not any(c.argv[: len(p)] == p for p in EXERCISED_ELSEWHERE)
    ]
    assert not loose, [f"{c.where}: {c.line.strip()}" for c in loose]


SCRIPTS = [c for c in ALL if c.kind == "script"]


@pytest.mark.parametrize("command", SCRIPTS, ids=_ids(SCRIPTS))
def test_scripts_exist_and_take_their_flags(command):
    script, *args = command.argv
    assert (ROOT / script).is_file(), f"{command.where}: {script} does not exist"
    own = args[: args.index("--")] if "--" in args else args  # after `--`: the trainer's
    flags = sorted({a.split("=", 1)[0] for a in own if a.startswith("--")})
    if not flags or not script.endswith(".py"):
        return
    helped = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", helped.stdout)]
    assert not missing, f"{command.where}: {script} has no {missing}"


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    used = {(c.where, t) for c in ALL if c.kind == "make" for t in c.argv if "=" not in t}
    assert used, "the docs show make targets"
    assert not [u for u in used if u[1] not in targets], sorted(used)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        checks_anchor = anchor and path.suffix == ".md" and path.exists()
        if not path.exists() or (checks_anchor and anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, broken


def test_extraction_joins_continuations_and_drops_comments():
    text = (
        "text\n```bash\nqmath data tokenize --input a \\\n    --workers 2   # comment\n"
        "pip install x\nRECIPE=tiny_cpu sbatch --nodes 2 slurm/pretrain.sbatch parallel.tp=2\n"
        "torchrun --nproc-per-node 2 -m qmath_megatron info\n"
        "```\n```text\nqmath not a command\n```\n"
    )
    found = [
        command.argv
        for start, lines in _shell_blocks(text)
        for _, line in _join_continuations(start, lines)
        if (command := parse_command("x.md", line)) is not None
    ]
    assert found == [
        ("data", "tokenize", "--input", "a", "--workers", "2"),
        ("train", "pretrain", "--recipe", "tiny_cpu", "parallel.tp=2"),
        ("info",),
    ]
