"""Text generation engines behind one interface: batched prompts in, n completions out
(text, token ids, per-token log-probs). vLLM when it is installed and a GPU is present;
``transformers`` otherwise (slow, for CPU tests and small models). Curation (scoring,
synthesis), evaluation (CoT and the TIR loop) and RL rollouts use this interface.

Stop strings follow vLLM's semantics in both engines, so code written against one behaves
the same on the other: generation ends at the first stop string, the returned ``text``
excludes it, ``token_ids`` / ``logprobs`` cover every generated token up to and including
the ones that produced it, and ``stop_reason`` names the stop string that matched (None
when generation ended on an end-of-sequence token or on the length limit).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    # Extra token ids that end generation, besides the model's own end-of-sequence ids
    # (e.g. <|im_end|> when a base model is prompted with the chat template).
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                "n > 1 with greedy decoding gives n identical samples; set temperature > 0"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # log-prob of each generated token
    finish_reason: str = "length"  # "stop" (EOS or a stop string) | "length"
    stop_reason: str | None = None  # the stop string that ended generation, if any


class GenerationEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]: ...


def request_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed for request ``index`` of a call seeded with ``seed``."""
    return (seed * 1_000_003 + index) % (2**31 - 1)


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in ``text``, or None."""
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits, key=lambda h: (h[0], -len(h[1]))) if hits else None


class TransformersEngine:
    """``transformers`` generation on CPU (or one GPU), batched with left padding."""

    def __init__(
        self,
        model_dir: str | Path,
        batch_size: int = 8,
        dtype: str = "float32",
        tokenizer: str | Path | None = None,  # default: the model directory's tokenizer
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer or path), local_files_only=True, padding_side="left"
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                          dtype=getattr(torch, dtype)).eval()  # fmt: skip
        configured = self.model.generation_config.eos_token_id
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        self.eos_ids = tuple(dict.fromkeys([*configured, self.tokenizer.eos_token_id]))
        self.batch_size = batch_size

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        import torch

        out: list[list[Completion]] = []
        end_ids = tuple(dict.fromkeys([*self.eos_ids, *params.stop_token_ids]))
        extra = (
            {"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}
        )
        torch.manual_seed(params.seed)
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc, max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
                    temperature=params.temperature if params.temperature > 0 else None,
                    top_p=params.top_p if params.temperature > 0 else None,
                    num_return_sequences=params.n, output_scores=True, return_dict_in_generate=True,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=list(end_ids), **extra,
                )  # fmt: skip
            new = gen.sequences[:, enc["input_ids"].shape[1] :]
            logps = torch.stack(gen.scores, dim=1).log_softmax(-1) if gen.scores else None
            for i in range(len(batch)):
                group = []
                for j in range(params.n):
                    row = i * params.n + j
                    completion = self._finish(new[row].tolist(), end_ids, params)
                    if logps is not None:
                        completion.logprobs = [
                            float(logps[row, t, tok]) for t, tok in enumerate(completion.token_ids)
                        ]
                    group.append(completion)
                out.append(group)
        return out

    def _finish(
        self, ids: list[int], end_ids: tuple[int, ...], params: SamplingParams
    ) -> Completion:
        """Cut one generated row at its end: EOS (dropped, as vLLM does) or a stop string."""
        ended = next((k for k, tok in enumerate(ids) if tok in end_ids), None)
        if ended is not None:
            ids = ids[:ended]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hit = first_stop(text, params.stop)
        if hit is None:
            finished = ended is not None or len(ids) < params.max_new_tokens
            return Completion(text, ids, None, "stop" if finished else "length")
        pos, stop = hit
        # Keep the tokens up to the one that completed the stop string (vLLM keeps them in
        # token_ids too). The shortest such prefix is found by bisection: "the decoded
        # prefix contains a stop at or before `pos`" is monotone in the prefix length.
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            found = first_stop(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), (stop,))
            if found is not None and found[0] <= pos:
                hi = mid
            else:
                lo = mid + 1
        return Completion(text[:pos], ids[:lo], None, "stop", stop)


class VLLMEngine:
    """vLLM on GPU (imported lazily; the `rollout` extra)."""

    def __init__(self, model_dir: str | Path, **kwargs):
        from vllm import LLM

        self.llm = LLM(model=str(model_dir), **kwargs)

    @property
    def tokenizer(self):
        """The tokenizer vLLM loaded (the model's, or ``tokenizer=`` passed to the engine):
        prompts are rendered with its chat template, as with :class:`TransformersEngine`."""
        return self.llm.get_tokenizer()

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VParams

        # One SamplingParams per prompt, each with its own seed: vLLM seeds every request
        # with the seed it is given, so one shared seed would make identical prompts (the
        # TIR loop re-sends n trajectories of a problem as separate n=1 requests) continue
        # identically, and correlate the samples of different prompts.
        vparams = [
            VParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                    max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                    stop_token_ids=list(params.stop_token_ids) or None,
                    seed=request_seed(params.seed, i), logprobs=0)
            for i in range(len(prompts))
        ]  # fmt: skip
        results = self.llm.generate(prompts, vparams)
        out = []
        for res in results:
            group = []
            for c in res.outputs:
                # Each position's dict holds the sampled token (plus any top-k alternatives).
                lps = (
                    [d[tok].logprob for d, tok in zip(c.logprobs, c.token_ids, strict=True)]
                    if c.logprobs
                    else None
                )
                stop = c.stop_reason if isinstance(c.stop_reason, str) else None
                group.append(
                    Completion(c.text, list(c.token_ids), lps, c.finish_reason or "length", stop)
                )
            out.append(group)
        return out


def resolve_backend(backend: str = "auto") -> str:
    """ "vllm" when asked for, or for "auto" when vLLM is installed and a GPU is present."""
    import torch

    if backend == "auto":
        use_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
        return "vllm" if use_vllm else "transformers"
    if backend not in ("vllm", "transformers"):
        raise ValueError(f"unknown engine backend {backend!r} (auto, vllm, transformers)")
    return backend


def make_engine(model_dir: str | Path, backend: str = "auto", **kwargs) -> GenerationEngine:
    """vLLM when installed with a GPU (or asked for), transformers otherwise."""
    backend = resolve_backend(backend)
    if backend == "vllm":
        return VLLMEngine(model_dir, **kwargs)
    return TransformersEngine(model_dir, **kwargs)
