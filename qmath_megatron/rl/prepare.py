"""What the GRPO task checks and prepares before any rollout engine starts (the task's
``prepare``, rank 0): a job that cannot run fails in seconds with one line, not after the
engines and the model are up or, worse, trains on with every reward 0.

:func:`validate_job` checks, in order:

1. the configuration: settings the task refuses (``rl.mode=tir`` or ``rl.rm_model`` for
   the toy task); a problem task names its engines' model (``rl.engine_model``); a
   token-prompt task without one has a ``checkpoint.save`` to write the engines' start
   weights to; on CPU the model's head_dim is one vLLM's CPU attention runs
   (:func:`~qmath_megatron.rl.engines.check_cpu_attention`);
2. the paths the job names exist (``data.prompts``, ``data.tokenizer``,
   ``rl.engine_model``, ``rl.rm_model``, ``rl.rm_tokenizer``, ``model.init_from`` unless
   the run resumes, ``rl.reference`` with a KL term);
3. the prompts file (:func:`load_problems`): not empty, every row a JSON object with a
   non-empty ``problem`` and ``answer`` (a null answer would be compared as the text
   "None": every response wrong, every reward 0), at least ``data.global_batch_size``
   problems (each step samples that many distinct ones);
4. each prompt, rendered with the chat template in ``rl.mode`` and tokenized as the
   rollouts do (tokenizer: ``data.tokenizer``, default ``rl.engine_model``), leaves room to
   generate within ``model.seq_length`` (the training rows; the engines' context is at
   least as long). Prompts that leave less than ``rl.max_new_tokens`` are reported in
   one line: their responses are cut there.

Errors name the setting or the file and line; several bad rows: their count and the
first line numbers.

:func:`write_synthetic_prompts`: ``data.synthetic_problems`` generated math problems
(:mod:`qmath_megatron.data.synthetic`, the generator of the tiny SFT recipe's data) with
their reference answers, for the tiny CPU math recipe.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qmath_megatron.data.synthetic import generate_problems
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.rewards.extract import extract_answer, reference_answer
from qmath_megatron.rl.config import GRPOJob
from qmath_megatron.rl.engines import check_cpu_attention
from qmath_megatron.rl.reward import get_reward
from qmath_megatron.tokenizer.chat import build_prompt
from qmath_megatron.tokenizer.qwen import load_tokenizer

SHOWN_LINES = 5  # line numbers quoted per kind of bad row
SYNTHETIC_SEED = 1  # the tiny SFT recipe's conversations use seed 0: other problems here

# Why a missing path matters, per setting (the error's hint).
_PATH_HINTS = {
    "data.prompts": "JSONL of {problem, answer}: qmath data rl-prompts writes it",
    "data.tokenizer": "a tokenizer directory with the chat template",
    "rl.engine_model": "the SFT model's HF directory: qmath convert mcore-to-hf writes it",
    "rl.rm_model": "a reward model: HF directory or Megatron checkpoint",
    "rl.rm_tokenizer": "the reward model's tokenizer directory",
    "model.init_from": "the SFT model's Megatron checkpoint",
    "rl.reference": "the frozen reference model's Megatron checkpoint",
}


def note(message: str) -> None:
    """One line in the trainer's log (rank 0)."""
    print(f"grpo: {message}", file=sys.stderr, flush=True)


def _lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(map(str, numbers[:SHOWN_LINES]))
    more = ", ..." if len(numbers) > SHOWN_LINES else ""
    return f"line {shown}" if len(numbers) == 1 else f"lines {shown}{more}"


def load_problems(path: str | None, task: str) -> tuple[list[dict], list[int]]:
    """The problems of ``data.prompts`` (JSONL of {"problem", "answer"}) and their line
    numbers, every row checked: ValueError (one line, naming the file and the bad lines)
    for an empty file or any row that is not a JSON object with a non-empty ``problem``
    string and a non-empty ``answer`` (:func:`reference_answer`: not null, blank, a list
    or an object)."""
    if not path:
        raise ValueError(f"rl.task={task} needs data.prompts (qmath data rl-prompts output)")
    problems: list[dict] = []
    numbers: list[int] = []
    bad: dict[str, list[int]] = {}
    rows = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                reason = "not a JSON object"
            elif not isinstance(obj.get("problem"), str) or not obj["problem"].strip():
                reason = 'no "problem" text'
            elif reference_answer(obj, "answer") is None:
                reason = 'no "answer" (absent, null, blank, a list or an object)'
            else:
                problems.append(obj)
                numbers.append(number)
                continue
            bad.setdefault(reason, []).append(number)
    if not rows:
        raise ValueError(f"data.prompts {path} is empty: no problems to sample")
    if bad:
        count = sum(map(len, bad.values()))
        kinds = "; ".join(f"{reason} at {_lines(lines)}" for reason, lines in bad.items())
        raise ValueError(
            f"data.prompts {path}: {count} of {rows} rows unusable ({kinds}); a null or "
            "missing answer would score every response 0: fix or drop these rows"
        )
    return problems, numbers


def check_prompt_lengths(
    problems: Sequence[dict],
    numbers: Sequence[int],
    tokenizer: Any,
    job: GRPOJob,
    log: Callable[[str], None] = note,
) -> list[int]:
    """The prompts' token counts (chat template in ``rl.mode``, tokenized as the rollouts
    do). ValueError naming the lines of the prompts that leave no room to generate within
    ``model.seq_length``; one logged line for those that leave less than
    ``rl.max_new_tokens`` (their responses are cut at ``model.seq_length``)."""
    rl, seq, path = job.rl, job.model.seq_length, job.data.prompts
    texts = [build_prompt(tokenizer, p["problem"], rl.mode) for p in problems]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    full = [n for n, k in zip(numbers, lengths, strict=True) if k >= seq]
    if full:
        longest = max(lengths)
        raise ValueError(
            f"data.prompts {path}: {len(full)} prompts leave no room to generate within "
            f"model.seq_length={seq} (the longest: {longest} tokens with the {rl.mode} chat "
            f"template) at {_lines(full)}: raise model.seq_length or drop them"
        )
    cut = [n for n, k in zip(numbers, lengths, strict=True) if k + rl.max_new_tokens > seq]
    if cut:
        log(
            f"{len(cut)} of {len(problems)} prompts in {path} leave fewer than "
            f"rl.max_new_tokens={rl.max_new_tokens} tokens within model.seq_length={seq} "
            f"({_lines(cut)}): their responses are cut there"
        )
    return lengths


def _check_paths(job: GRPOJob, resuming: bool, problems_task: bool) -> None:
    rl, external = job.rl, bool(job.rl.engine_handles)
    paths = {
        "data.prompts": job.data.prompts if problems_task else None,
        "data.tokenizer": job.data.tokenizer,
        # External engines load their model where they run.
        "rl.engine_model": None if external else rl.engine_model,
        "rl.rm_model": rl.rm_model,
        "rl.rm_tokenizer": rl.rm_tokenizer,
        "model.init_from": None if resuming else job.model.init_from,
        "rl.reference": rl.reference if rl.kl_coef else None,
    }
    missing = [
        f"{key}={value} ({_PATH_HINTS[key]})"
        for key, value in paths.items()
        if value and not Path(value).exists()
    ]
    if missing:
        raise FileNotFoundError(f"not found: {'; '.join(missing)}")


def check_config(job: GRPOJob, *, on_gpu: bool) -> None:
    """The checks that read no file: what the task refuses (``RewardTask.check``), the
    engines' model (or where their random start weights go) and, for engines the trainer
    starts on CPU, the model's head_dim."""
    rl = job.rl
    reward = get_reward(rl.task)
    reward.check(rl.mode, reward_model=bool(rl.rm_model))  # rl.mode=tir, rl.rm_model
    if not rl.engine_handles and not rl.engine_model:
        if reward.problems:
            raise ValueError(
                f"rl.task={rl.task} needs rl.engine_model (the SFT model's HF directory, "
                "with its tokenizer and chat template)"
            )
        if not job.checkpoint.save:
            raise ValueError(
                f"rl.task={rl.task} without rl.engine_model writes the engines' random start "
                "weights under checkpoint.save (engine_init/): set checkpoint.save or "
                "rl.engine_model"
            )
    if not on_gpu and not rl.engine_handles:
        check_cpu_attention(get_flavor(job.model.flavor))


def validate_job(
    job: GRPOJob,
    *,
    on_gpu: bool,
    resuming: bool,
    tokenizer_loader: Callable[[str], Any] = load_tokenizer,
    log: Callable[[str], None] = note,
) -> list[dict] | None:
    """Every check of the module docstring, in its order (rank 0, before any engine);
    returns the problems of a problem task (None for a token-prompt task). ``resuming``:
    a checkpoint will be resumed (``model.init_from`` is then not read);
    ``tokenizer_loader``: directory -> tokenizer (default: the project's HF loader)."""
    reward = get_reward(job.rl.task)
    check_config(job, on_gpu=on_gpu)
    _check_paths(job, resuming, reward.problems)
    if not reward.problems:
        return None
    problems, numbers = load_problems(job.data.prompts, job.rl.task)
    gbs = job.data.global_batch_size
    if len(problems) < gbs:
        raise ValueError(
            f"data.prompts {job.data.prompts} has {len(problems)} problems but each step "
            f"samples data.global_batch_size={gbs} distinct ones: add problems or lower "
            "data.global_batch_size"
        )
    tok_dir = job.data.tokenizer or job.rl.engine_model
    if tok_dir and Path(tok_dir).is_dir():
        check_prompt_lengths(problems, numbers, tokenizer_loader(str(tok_dir)), job, log)
    else:  # external engines, no local tokenizer: their tokenizer is not here to count with
        log("prompt lengths not checked: set data.tokenizer to check them before the rollouts")
    return problems


def synthetic_prompts_path(job: GRPOJob) -> Path:
    """Where ``data.synthetic_problems`` are written: ``<checkpoint.save>/data/``."""
    if not job.checkpoint.save:
        raise ValueError("data.synthetic_problems needs checkpoint.save (its work directory)")
    return Path(job.checkpoint.save) / "data" / "prompts.jsonl"


def with_synthetic_prompts(job: GRPOJob) -> GRPOJob:
    """The job with ``data.prompts`` at the synthetic problems' file when it is unset and
    ``data.synthetic_problems > 0`` (every rank computes the same path)."""
    if job.data.prompts or job.data.synthetic_problems <= 0:
        return job
    path = synthetic_prompts_path(job)
    return replace(job, data=replace(job.data, prompts=str(path)))


def write_synthetic_prompts(path: str | Path, n: int, seed: int = SYNTHETIC_SEED) -> Path:
    """``n`` generated problems as ``{"id", "problem", "answer"}`` JSONL (the answer: the
    boxed result of the generated worked solution), written atomically (a resumed run
    writes the same file again: the same ``n`` and seed give the same rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in generate_problems(n, seed):
            answer = extract_answer(row["solution"])
            record = {"id": row["id"], "problem": row["problem"], "answer": answer}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
