"""Tool-integrated reasoning (TIR): generate until a Python code block closes, run the code
in the sandbox, append its output as an ```` ```output ```` block, continue.

One trajectory per sample. Each round batches every live trajectory into one engine call
(vLLM's prefix cache makes the re-sent prefix cheap) and every pending program into one
``executor.run_many`` call. A round ends at a stop string:

- ```` ```output ````: the model asks for the output of the block it just closed (how
  Qwen2.5-Math-Instruct writes TIR);
- ``"\\n```\\n"``: a fence line. If it closes an open ```` ```python ```` block the code
  runs; if it opens or closes any other block, the fence is put back and generation
  continues (at most ``max_continuations`` times per trajectory).

Departures from Qwen2.5-Math's evaluation script, on purpose:
- the model gets one more round after its last allowed execution, so it can use that
  output (Qwen's loop stops right after the 4th execution);
- a program is the last code block only (as Qwen's); execution is stateless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from qmath_megatron.inference.engine import Completion, GenerationEngine, SamplingParams

OUTPUT_STOP = "```output"
FENCE_STOP = "\n```\n"
CODE_STOPS = (OUTPUT_STOP, FENCE_STOP)
_PYTHON = {"python", "py", "python3"}
CONTINUE = "continue"


class CodeExecutor(Protocol):
    """What the loop needs from :class:`qmath_megatron.sandbox.SandboxExecutor`."""

    def run_many(self, codes: list[str]) -> list: ...


@dataclass(frozen=True)
class TIRConfig:
    max_executions: int = 4
    max_output_chars: int = 1024  # of each execution's output fed back to the model
    max_continuations: int = 4  # fences of non-Python blocks that generation continues past

    def __post_init__(self) -> None:
        if self.max_executions < 1 or self.max_output_chars < 1 or self.max_continuations < 0:
            raise ValueError(
                "tir.max_executions and tir.max_output_chars must be >= 1, "
                "tir.max_continuations >= 0"
            )


@dataclass
class Execution:
    code: str
    status: str  # the sandbox's status: ok, error, timeout, memory, output_limit, killed
    output: str  # what was fed back to the model
    seconds: float = 0.0


@dataclass
class Trajectory:
    text: str = ""  # everything after the prompt: model text and the fed-back outputs
    executions: list[Execution] = field(default_factory=list)
    finish_reason: str = ""  # stop | length | max_executions | max_continuations
    generated_tokens: int = 0
    rounds: int = 0
    continuations: int = 0


def code_blocks(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Closed fenced blocks ``[(language, code)]`` of ``text`` and the language of a block
    still open at its end (None when every block is closed; "" for a bare fence)."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in text.split("\n"):
        fence = line.strip()
        if lang is None and fence.startswith("```"):
            lang, body = fence[3:].strip().lower(), []
        elif lang is not None and fence == "```":
            blocks.append((lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks, lang


def format_output(result, max_chars: int) -> str:
    """The text fed back for one execution: stdout, or the error line a Python user sees."""
    status = result.status
    if status == "ok":
        text = result.stdout
    elif status == "timeout":
        text = "TimeoutError: the program exceeded its time limit"
    elif status == "memory":
        text = "MemoryError: the program exceeded its memory limit"
    else:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else f"Error: the program ended with status {status}"
        if status == "output_limit":
            text = result.stdout
    text = text.strip()
    if len(text) > max_chars:
        text = text[:max_chars] + "\n... (output truncated)"
    return text


def advance_trajectory(traj: Trajectory, completion: Completion, config: TIRConfig) -> str | None:
    """Take one generated segment; return the code to run, ``CONTINUE`` or None (done)."""
    traj.rounds += 1
    traj.generated_tokens += len(completion.token_ids)
    traj.text += completion.text
    stop = completion.stop_reason
    if stop not in CODE_STOPS:
        traj.finish_reason = completion.finish_reason
        return None
    blocks, open_lang = code_blocks(traj.text)
    if stop == FENCE_STOP and open_lang not in _PYTHON:
        traj.text += FENCE_STOP  # an ordinary block's fence: put it back, keep going
        traj.continuations += 1
        if traj.continuations > config.max_continuations:
            traj.finish_reason = "max_continuations"
            return None
        return CONTINUE
    if stop == FENCE_STOP:
        traj.text += "\n```"
        blocks, open_lang = code_blocks(traj.text)
    wants_run = (
        open_lang is None
        and blocks
        and blocks[-1][0] in _PYTHON
        and traj.text.rstrip().endswith("```")
    )
    # A segment that already states a boxed answer is final (as in Qwen's loop).
    if not wants_run or "\\boxed" in completion.text:
        traj.finish_reason = "stop"
        return None
    if len(traj.executions) >= config.max_executions:
        traj.finish_reason = "max_executions"
        return None
    return blocks[-1][1]


def run_tir(
    engine: GenerationEngine,
    prompts: Sequence[str],
    params: SamplingParams,
    executor: CodeExecutor,
    config: TIRConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> list[list[Trajectory]]:
    """``params.n`` TIR trajectories for each prompt, in sampling order."""
    config = config or TIRConfig()
    stops = tuple(dict.fromkeys((*params.stop, *CODE_STOPS)))
    groups = engine.generate(list(prompts), replace(params, stop=stops))
    trajs = [[Trajectory() for _ in group] for group in groups]
    pending = [(i, j, c) for i, group in enumerate(groups) for j, c in enumerate(group)]
    round_no = 0
    while pending:
        round_no += 1
        runs: list[tuple[int, int, str]] = []
        live: list[tuple[int, int]] = []
        for i, j, completion in pending:
            action = advance_trajectory(trajs[i][j], completion, config)
            if action == CONTINUE:
                live.append((i, j))
            elif action is not None:
                runs.append((i, j, action))
        results = executor.run_many([code for _, _, code in runs]) if runs else []
        for (i, j, code), result in zip(runs, results, strict=True):
            traj = trajs[i][j]
            output = format_output(result, config.max_output_chars)
            traj.executions.append(Execution(code, result.status, output, result.seconds))
            traj.text = traj.text.rstrip() + f"\n```output\n{output}\n```\n"
            live.append((i, j))
        if not live:
            break
        if log:
            log(
                f"  TIR round {round_no}: {len(runs)} programs run, "
                f"{len(live)} trajectories continue"
            )
        live.sort()
        outs = engine.generate(
            [prompts[i] + trajs[i][j].text for i, j in live],
            replace(params, n=1, stop=stops, seed=params.seed + round_no),
        )
        pending = [(i, j, out[0]) for (i, j), out in zip(live, outs, strict=True)]
    return trajs
