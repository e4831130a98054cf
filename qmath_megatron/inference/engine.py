"""Text generation engines behind one interface: batched prompts in, n completions out
(text, token ids, per-token log-probs). vLLM when it is installed and a GPU is present;
``transformers`` otherwise (slow, for CPU tests and small models). Curation (scoring,
synthesis), evaluation and RL rollouts use this interface.
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


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # log-prob of each generated token
    finish_reason: str = "length"  # "stop" | "length"


class GenerationEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]: ...


def _truncate_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersEngine:
    """``transformers`` generation on CPU (or one GPU), batched with left padding."""

    def __init__(self, model_dir: str | Path, batch_size: int = 8, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, padding_side="left"
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                          dtype=getattr(torch, dtype)).eval()  # fmt: skip
        self.batch_size = batch_size

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        import torch

        out: list[list[Completion]] = []
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
                    pad_token_id=self.tokenizer.pad_token_id,
                )  # fmt: skip
            new = gen.sequences[:, enc["input_ids"].shape[1] :]
            logps = torch.stack(gen.scores, dim=1).log_softmax(-1) if gen.scores else None
            for i in range(len(batch)):
                group = []
                for j in range(params.n):
                    row = i * params.n + j
                    ids = new[row].tolist()
                    eos = self.tokenizer.eos_token_id
                    if eos in ids:
                        ids = ids[: ids.index(eos)]
                    text, stopped = _truncate_at_stop(
                        self.tokenizer.decode(ids, skip_special_tokens=True), params.stop
                    )
                    lp = (
                        [float(logps[row, t, tok]) for t, tok in enumerate(ids)]
                        if logps is not None
                        else None
                    )
                    finished = stopped or len(ids) < params.max_new_tokens
                    group.append(Completion(text, ids, lp, "stop" if finished else "length"))
                out.append(group)
        return out


class VLLMEngine:
    """vLLM on GPU (imported lazily; the `rollout` extra)."""

    def __init__(self, model_dir: str | Path, **kwargs):
        from vllm import LLM

        self.llm = LLM(model=str(model_dir), **kwargs)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VParams

        vparams = VParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                          max_tokens=params.max_new_tokens, stop=list(params.stop) or None, seed=params.seed,
                          logprobs=0)  # fmt: skip
        results = self.llm.generate(prompts, vparams)
        out = []
        for res in results:
            group = []
            for c in res.outputs:
                lps = [next(iter(d.values())).logprob for d in c.logprobs] if c.logprobs else None
                group.append(
                    Completion(c.text, list(c.token_ids), lps, c.finish_reason or "length")
                )
            out.append(group)
        return out


def make_engine(model_dir: str | Path, backend: str = "auto", **kwargs) -> GenerationEngine:
    """vLLM when installed with a GPU (or asked for), transformers otherwise."""
    import torch

    if backend == "auto":
        backend = (
            "vllm"
            if torch.cuda.is_available() and importlib.util.find_spec("vllm")
            else "transformers"
        )
    if backend == "vllm":
        return VLLMEngine(model_dir, **kwargs)
    if backend == "transformers":
        return TransformersEngine(model_dir, **kwargs)
    raise ValueError(f"unknown engine backend {backend!r} (auto, vllm, transformers)")
