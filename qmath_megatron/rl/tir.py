"""TIR rollouts for RL: the evaluation's TIR loop (``evaluation/tir.py``) on token ids.

The evaluation loop re-sends text, which is fine for scoring but not for training: the
trainer must see exactly the tokens the engine sampled, with their log-probs. Here every
round sends the prompt's token ids plus everything so far as token ids, and a sample is

    [model tokens..., tool-output tokens..., model tokens..., ...]

with ``tool_mask`` 1 on model tokens and 0 on the fed-back output block (the tokens the
policy did not choose; :func:`qmath_megatron.rl.rollout.build_samples` keeps them
out of the loss) and behaviour log-probs only meaningful where the mask is 1 (0.0 on tool
tokens, never read).

The decisions (when a code block asks to run, fences of other blocks, the boxed-answer
stop, the execution cap) and the output formatting are the evaluation's own
(``advance_trajectory``, :func:`format_output`), so RL and eval run the same TIR protocol.

Departures from the text-level loop, on purpose:
- the model's tokens are kept as sampled, including the stop string's tokens (vLLM keeps
  them in ``token_ids`` and cuts only the text); the output block appended after them
  therefore starts where the stop string ended (``"\\n{output}\\n```\\n"`` after
  ```` ```output ````, ``"```output\\n{output}\\n```\\n"`` after a closing fence);
- ``params.max_new_tokens`` bounds the whole response (model and tool tokens together), so
  a rollout always fits the engine's context and the trainer's ``seq_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from qmath_megatron.evaluation.tir import (
    CODE_STOPS,
    CONTINUE,
    OUTPUT_STOP,
    CodeExecutor,
    Execution,
    TIRConfig,
    Trajectory,
    advance_trajectory,
    format_output,
)
from qmath_megatron.inference.engine import GenerationEngine, SamplingParams


@dataclass
class TIRSample:
    """One TIR rollout; ``token_ids``, ``logprobs`` and ``tool_mask`` have equal lengths."""

    text: str = ""  # the trajectory as the evaluation writes it (for the answer checker)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)  # 1: sampled by the model; 0: tool output
    finish_reason: str = ""
    weight_version: int | None = None
    executions: list[Execution] = field(default_factory=list)


def _append(
    sample: TIRSample, ids: Sequence[int], logprobs: Sequence[float] | None, model: bool
) -> None:
    if model and (logprobs is None or len(logprobs) != len(ids)):
        raise ValueError("TIR rollouts need the engine's log-prob of every sampled token")
    sample.token_ids += list(ids)
    sample.logprobs += list(logprobs) if model else [0.0] * len(ids)
    sample.tool_mask += [1 if model else 0] * len(ids)


def tir_rollouts(
    engine: GenerationEngine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    executor: CodeExecutor,
    config: TIRConfig | None = None,
) -> list[list[TIRSample]]:
    """``params.n`` TIR rollouts of each token-id prompt, in sampling order."""
    config = config or TIRConfig()
    tok = engine.tokenizer
    budget = params.max_new_tokens
    stops = tuple(dict.fromkeys((*params.stop, *CODE_STOPS)))
    prompts = [list(p) for p in prompts]
    groups = engine.generate(prompts, replace(params, stop=stops))
    samples = [[TIRSample() for _ in g] for g in groups]
    trajs = [[Trajectory() for _ in g] for g in groups]
    pending = [(i, j, c) for i, g in enumerate(groups) for j, c in enumerate(g)]
    round_no = 0
    while pending:
        round_no += 1
        runs: list[tuple[int, int, str, str | None]] = []
        live: list[tuple[int, int]] = []
        for i, j, c in pending:
            s = samples[i][j]
            _append(s, c.token_ids, c.logprobs, model=True)
            if s.weight_version is None or (c.weight_version or 0) < s.weight_version:
                s.weight_version = c.weight_version  # the oldest round's (stale: refused)
            action = advance_trajectory(trajs[i][j], c, config)
            if action is None:
                s.finish_reason = trajs[i][j].finish_reason
            elif len(s.token_ids) >= budget:
                s.finish_reason = "length"
            elif action == CONTINUE:
                live.append((i, j))
            else:
                runs.append((i, j, action, c.stop_reason))
        results = executor.run_many([r[2] for r in runs]) if runs else []
        for (i, j, code, stop), result in zip(runs, results, strict=True):
            s, traj = samples[i][j], trajs[i][j]
            output = format_output(result, config.max_output_chars)
            traj.executions.append(Execution(code, result.status, output, result.seconds))
            traj.text = traj.text.rstrip() + f"\n```output\n{output}\n```\n"
            block = f"\n{output}\n```\n" if stop == OUTPUT_STOP else f"```output\n{output}\n```\n"
            _append(s, tok(block, add_special_tokens=False)["input_ids"], None, model=False)
            if len(s.token_ids) >= budget:
                s.finish_reason = "length"
            else:
                live.append((i, j))
        if not live:
            break
        live.sort()
        # One request per live trajectory; the remaining budget bounds every round.
        by_room: dict[int, list[tuple[int, int]]] = {}
        for i, j in live:
            by_room.setdefault(budget - len(samples[i][j].token_ids), []).append((i, j))
        pending = []
        for k, (room, members) in enumerate(sorted(by_room.items())):
            # Distinct seeds per round and per call (requests within a call are spaced).
            seed = params.seed + round_no * 1_000_003 + k * 10_007
            outs = engine.generate(
                [prompts[i] + samples[i][j].token_ids for i, j in members],
                replace(params, n=1, stop=stops, max_new_tokens=room, seed=seed),
            )
            pending += [(i, j, out[0]) for (i, j), out in zip(members, outs, strict=True)]
    for i, group in enumerate(samples):
        for j, s in enumerate(group):
            s.text, s.executions = trajs[i][j].text, trajs[i][j].executions
    return samples


def tir_rollouts_from_text(
    engine: GenerationEngine,
    prompts: Sequence[str],
    params: SamplingParams,
    executor: CodeExecutor,
    config: TIRConfig | None = None,
) -> list[list[TIRSample]]:
    """:func:`tir_rollouts` of text prompts, tokenized as the GRPO trainer tokenizes its
    prompts (no special tokens added), so the query filter samples what GRPO would."""
    tok = engine.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return tir_rollouts(engine, ids, params, executor, config)
