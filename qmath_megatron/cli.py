"""``qmath``: the one command-line entry point (``python -m qmath_megatron`` is the same).

Each stage registers its own subcommand; this module only assembles them, so that
``torchrun ... -m qmath_megatron <stage> ...`` and the console script behave identically.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from qmath_megatron.config.cli import CommandParser
from qmath_megatron.utils.quiet import quiet_third_party_warnings

# Subcommand modules: each has `register(subparsers)`. Imported lazily so that `qmath info`
# does not pay for importing Megatron when it is not needed.
_COMMAND_MODULES = (
    "qmath_megatron.commands.info",
    "qmath_megatron.convert.cli",
    "qmath_megatron.tokenizer.cli",
    "qmath_megatron.data.cli",
    "qmath_megatron.training.cli",
    "qmath_megatron.demo",
    "qmath_megatron.evaluation.cli",
    "qmath_megatron.sandbox.cli",
    "qmath_megatron.reward_model.cli",
    "qmath_megatron.inference.serve",
)
# The steps other packages add to `qmath data`, in this order: each module's
# `register_data(subparsers)` (the data package imports neither curation nor the stages).
_DATA_STEP_MODULES = (
    "qmath_megatron.curation.cli",
    "qmath_megatron.sft.cli",
    "qmath_megatron.rl.cli",
    "qmath_megatron.reward_model.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="qmath",
        description="Qwen2.5-Math on Megatron-Core: conversion, data, training, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        if name == "qmath_megatron.data.cli":
            steps = [importlib.import_module(m).register_data for m in _DATA_STEP_MODULES]
            module.register(subparsers, steps)
        else:
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_third_party_warnings()
    parser = build_parser()
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
        # ChildProcessError: a data tool's worker died (data/shards.py WorkerDiedError).
        if not isinstance(exc, (*one_line, ChildProcessError)):
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
