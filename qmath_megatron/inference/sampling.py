"""How responses are sampled, in one place: :class:`SamplingConfig` for evaluation (the eval
job's ``sampling`` section), rejection sampling (``qmath data rft``), the RL query filter
(``qmath data rl-prompts``) and GRPO rollouts (``rl.*``), and the CoT/TIR sampling of math
problems they share.

Each tool keeps its own keys and defaults (``--n``, ``--temperature``, ``rl.group_size``,
``rl.temperature``, ...) and builds its :class:`SamplingConfig` from them in one method
(:meth:`SamplingConfig.from_keys`), so a setting no engine can sample with is refused by
the same checks everywhere, each message naming the key the user set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qmath_megatron.inference.engine import GenerationEngine, Prompt, SamplingParams
from qmath_megatron.tokenizer import chat

# The user's name of each checked field: the eval job's section, and the data tools' flags.
SECTION_KEYS: Mapping[str, str] = {
    "n": "sampling.n",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "max_new_tokens": "sampling.max_new_tokens",
}
CLI_KEYS: Mapping[str, str] = {
    "n": "--n",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "max_new_tokens": "--max-new-tokens",
}

# A TIR loop: ``params.n`` trajectories of each prompt, the code they write run between
# rounds (evaluation's text-level ``run_tir`` or RL's token-level ``tir_rollouts``, with the
# sandbox bound); results carry ``.text`` and ``.finish_reason`` like completions.
TIRLoop = Callable[[GenerationEngine, Sequence[Prompt], SamplingParams], list[list[Any]]]


def check_sampling(
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    keys: Mapping[str, str] = SECTION_KEYS,
) -> None:
    """Raise ``ValueError`` on settings no engine samples with; ``keys`` maps each field
    to the name the user sets it by (a config key or a flag)."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"{keys['n']} and {keys['max_new_tokens']} must be >= 1")
    if n > 1 and temperature <= 0:
        raise ValueError(
            f"{keys['n']}={n} needs {keys['temperature']} > 0, e.g. 0.7 (greedy decoding "
            "repeats one response)"
        )
    if temperature < 0:
        raise ValueError(f"{keys['temperature']} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"{keys['top_p']} must be in (0, 1], got {top_p}")


@dataclass
class SamplingConfig:
    n: int = 1  # responses per prompt
    temperature: float = 0.0  # 0: greedy (then n must be 1)
    top_p: float = 1.0
    max_new_tokens: int = 2048  # per generation call (per TIR round in evaluation)
    seed: int = 0  # the base seed (tools derive one per request chunk or step from it)

    def __post_init__(self) -> None:
        check_sampling(self.n, self.temperature, self.top_p, self.max_new_tokens)

    @classmethod
    def from_keys(
        cls,
        keys: Mapping[str, str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int = 0,
    ) -> SamplingConfig:
        """The config of a tool that keeps these settings under its own ``keys`` (flat
        fields or flags); errors name those keys."""
        check_sampling(n, temperature, top_p, max_new_tokens, keys)
        return cls(n, temperature, top_p, max_new_tokens, seed)

    def params(
        self,
        *,
        seed: int | None = None,
        stop_token_ids: tuple[int, ...] = (),
        stop: tuple[str, ...] = (),
    ) -> SamplingParams:
        """The engines' per-call parameters (``seed``: this call's, default ``self.seed``)."""
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            seed=self.seed if seed is None else seed,
        )


def sample(
    engine: GenerationEngine,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    mode: str,
    tir: TIRLoop | None = None,
) -> list[list[Any]]:
    """``[P][params.n]`` responses, in sampling order: the engine's completions in ``cot``
    mode, the ``tir`` loop's trajectories in ``tir`` mode."""
    if mode == "cot":
        return engine.generate(prompts, params)
    if mode == "tir":
        if tir is None:
            raise ValueError("TIR sampling needs a TIR loop (and a sandbox to run the code)")
        return tir(engine, prompts, params)
    raise ValueError(f"mode must be one of {', '.join(chat.MODES)}, got {mode!r}")


def sample_problems(
    engine: GenerationEngine,
    problems: Sequence[str],
    mode: str,
    sampling: SamplingConfig,
    seed: int,
    tir: TIRLoop | None = None,
) -> list[list[Any]]:
    """``[P][sampling.n]`` responses to math problems prompted as evaluation prompts them
    (the mode's system prompt, the chat template; generation ends at the assistant turn's
    end), sampled with ``seed``."""
    tok = engine.tokenizer
    params = sampling.params(seed=seed, stop_token_ids=chat.chat_stop_token_ids(tok))
    prompts = [chat.build_prompt(tok, p, mode) for p in problems]
    return sample(engine, prompts, params, mode, tir)
