"""``qmath``: the one command-line entry point (``python -m qmath_megatron`` is the same).

Each package registers its own subcommand; this module only assembles them, so that
``torchrun ... -m qmath_megatron <stage> ...`` and the console script behave identically.
Only the command being run is imported and built (:func:`build_parser`): ``qmath --help``
and ``qmath <command> --help`` start without torch, Megatron or vLLM.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from qmath_megatron.config.cli import CommandParser
from qmath_megatron.utils.quiet import quiet_third_party_warnings


@dataclass(frozen=True)
class Command:
    """A top-level command: ``module``'s ``register(subparsers)`` adds the ``name`` parser
    (with this ``help``). The module is imported only when the command is used, or for
    :func:`build_parser` without ``argv``: ``qmath --help`` lists every command from this
    table alone (tests/unit/test_cli.py checks that each module registers this help)."""

    name: str
    help: str
    module: str


COMMANDS = (
    Command("info", "flavors, parameter counts, environment", "qmath_megatron.commands.info"),
    Command("convert", "Hugging Face <-> Megatron checkpoints", "qmath_megatron.convert.cli"),
    Command("tokenizer", "build or try the Qwen2.5 tokenizer", "qmath_megatron.tokenizer.cli"),
    Command("data", "data preparation: tokenize, inspect", "qmath_megatron.data.cli"),
    Command(
        "train", "training stages (launch with torchrun for >1 rank)", "qmath_megatron.training.cli"
    ),
    Command("demo", "run the tiny end-to-end demo on CPU", "qmath_megatron.demo"),
    Command(
        "eval",
        "evaluate a model on math benchmarks (CoT / TIR; greedy, pass@k, maj@k, rm@k)",
        "qmath_megatron.evaluation.cli",
    ),
    Command(
        "exec",
        "run a Python file in the sandbox (or --self-test the sandbox)",
        "qmath_megatron.sandbox.cli",
    ),
    Command(
        "rm",
        "reward model: scoring (train with `qmath train rm`)",
        "qmath_megatron.reward_model.cli",
    ),
    Command(
        "pipeline",
        "the Qwen2.5-Math loop as one resumable command (run, status, report)",
        "qmath_megatron.pipeline.cli",
    ),
    Command(
        "engine",
        "rollout engines outside the trainer (qmath engine serve)",
        "qmath_megatron.inference.serve",
    ),
)
# The steps other packages add to `qmath data`, in this order: each module's
# `register_data(subparsers)` (the data package imports neither curation nor the stages).
DATA_STEP_MODULES = (
    "qmath_megatron.curation.cli",
    "qmath_megatron.sft.cli",
    "qmath_megatron.rl.cli",
    "qmath_megatron.reward_model.cli",
)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``qmath`` parser. Given the command line ``argv``, only the command it names is
    built in full (the others are listed by name and help): a command imports its own
    modules only. Without ``argv``, every command is built."""
    parser = CommandParser(
        prog="qmath",
        description="Qwen2.5-Math on Megatron-Core: conversion, data, training, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for command in COMMANDS:
        if wanted is not None and command.name != wanted:
            subparsers.add_parser(command.name, help=command.help)
            continue
        module = importlib.import_module(command.module)
        if command.name == "data":
            steps = [importlib.import_module(m).register_data for m in DATA_STEP_MODULES]
            module.register(subparsers, steps)
        else:
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_third_party_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # megatron-core logs every index it opens and every import-time fallback at INFO.
        logging.getLogger("megatron").setLevel(logging.WARNING)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from qmath_megatron.parallel.runtime import WorkerError

        one_line = (ValueError, FileNotFoundError, FileExistsError, KeyError, WorkerError)
        # ChildProcessError: a data tool's worker died (data/shards.py WorkerDiedError); a
        # full disk or quota is the user's to fix, not a bug.
        disk_full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not isinstance(exc, (*one_line, ChildProcessError)) and not disk_full:
            raise
        # Input problems: one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            if isinstance(exc, WorkerError):
                print(exc.details, file=sys.stderr)
            raise
        print(f"qmath: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
