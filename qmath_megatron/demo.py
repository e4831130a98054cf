"""``qmath demo``: the whole foundation on a tiny built-in default, on CPU, in a few minutes.

1. build the real Qwen2.5 tokenizer offline;
2. generate a small math corpus and tokenize it;
3. make a random tiny Qwen2 HF model that uses the full Qwen vocabulary;
4. convert it to Megatron at TP=2 and check logit parity;
5. train a few steps at TP=2 (Megatron DDP + distributed optimizer, gloo on CPU);
6. export the trained checkpoint back to HF and check parity again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _train_worker(
    init_ckpt: str,
    out_root: str,
    tokens_file: str,
    tp: int,
    steps: int,
    seq: int,
    batch: int,
    lr: float,
) -> list[float]:
    from qmath_megatron.checkpoint.model_checkpoint import (
        iteration_dirname,
        load_model,
        resolve_checkpoint,
        save_model,
        write_tracker,
    )
    from qmath_megatron.config.optimizer import OptimConfig
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_model, build_transformer_config
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.training.step import build_optimizer, lm_microbatch, train_step, wrap_ddp

    iter_dir, meta = resolve_checkpoint(init_ckpt)
    parallel = ParallelConfig(tp=tp)
    ctx = initialize(parallel, seed=1234)
    precision = PrecisionConfig(dtype=meta.dtype)
    config = build_transformer_config(meta.flavor, parallel, precision)
    chunks = build_model(meta.flavor, config, padded_vocab=meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    optim = OptimConfig(lr=lr, min_lr=0.0, weight_decay=0.0)
    ddp = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(ddp, optim, precision)

    stream = torch.from_numpy(np.load(tokens_file).astype(np.int64))
    n_seq = (len(stream) - 1) // seq
    sequences = torch.stack([stream[i * seq : i * seq + seq + 1] for i in range(n_seq)])
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % n_seq]
        result = train_step(ddp, optimizer, [lm_microbatch(sequences[idx])], seq)
        losses.append(result.loss)
        if ctx.is_main:
            print(
                f"  step {step + 1:3d}/{steps}  loss {result.loss:.4f}  grad norm "
                f"{result.grad_norm:.3f}  tokens {result.tokens}",
                flush=True,
            )
    meta.iteration, meta.tp, meta.pp, meta.source = steps, tp, 1, init_ckpt
    save_model(chunks, Path(out_root) / iteration_dirname(steps), meta)
    if ctx.is_main:
        write_tracker(out_root, steps)
    return losses


def run_demo(out: Path, *, steps: int = 30, tp: int = 2, seq: int = 128, batch: int = 8) -> dict:
    from qmath_megatron.convert.commands import hf_to_mcore, mcore_to_hf, verify
    from qmath_megatron.data.synthetic import write_jsonl
    from qmath_megatron.models.flavors import count_parameters, get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.parallel.runtime import launch
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer, load_tokenizer

    t0 = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary: dict = {}

    print("[1/6] building the Qwen2.5 tokenizer offline", flush=True)
    tok_dir = build_qwen25_tokenizer(out / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    summary["tokenizer"] = {
        "dir": str(tok_dir),
        "size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
    }

    print("[2/6] generating and tokenizing a math corpus", flush=True)
    corpus = write_jsonl(out / "corpus.jsonl", n=400, seed=0)
    texts = [json.loads(line)["text"] for line in corpus.open()]
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)  # end-of-document, as in pretraining data
    np.save(out / "tokens.npy", np.asarray(ids, dtype=np.int32))
    summary["corpus"] = {"documents": len(texts), "tokens": len(ids)}

    print("[3/6] random tiny Qwen2 model with the full Qwen vocabulary", flush=True)
    flavor = get_flavor("tiny-qwen-vocab")
    hf_init = make_random_hf_model(flavor, out / "hf_init", seed=0)
    summary["model"] = {"flavor": flavor.name, "params": count_parameters(flavor)}

    print(f"[4/6] converting HF -> Megatron at TP={tp}", flush=True)
    conv = hf_to_mcore(hf_init, out / "mcore_init", tp=tp)
    parity_init = verify(hf_init, out / "mcore_init", seq=64)
    summary["convert_hf_to_mcore_s"] = round(conv.seconds, 2)
    summary["parity_init"] = _parity(parity_init)
    print(f"  parity: {summary['parity_init']}", flush=True)

    print(f"[5/6] training {steps} steps at TP={tp} on CPU (gloo)", flush=True)
    losses = launch(
        _train_worker, tp, str(out / "mcore_init"), str(out / "mcore_trained"),
        str(out / "tokens.npy"), tp, steps, seq, batch, 3e-3,
    )[0]  # fmt: skip
    summary["train"] = {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}

    print("[6/6] exporting Megatron -> HF and checking parity", flush=True)
    export = mcore_to_hf(out / "mcore_trained", out / "hf_trained", tokenizer=tok_dir)
    parity_trained = verify(out / "hf_trained", out / "mcore_trained", tp=tp, seq=64)
    summary["convert_mcore_to_hf_s"] = round(export.seconds, 2)
    summary["parity_trained"] = _parity(parity_trained)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _parity(result) -> dict:
    return {
        "max_abs_logit_diff": float(f"{result.max_abs_diff:.3e}"),
        "top1_agreement": round(result.top1_agreement, 4),
        "tp": result.tp,
        "pp": result.pp,
    }


def _run(args: argparse.Namespace) -> int:
    summary = run_demo(Path(args.out), steps=args.steps, tp=args.tp)
    train = summary["train"]
    print("\n== demo summary ==")
    print(
        f"tokenizer        {summary['tokenizer']['size']} tokens, eos id {summary['tokenizer']['eos_id']}"
    )
    print(
        f"corpus           {summary['corpus']['documents']} documents, {summary['corpus']['tokens']} tokens"
    )
    print(
        f"model            {summary['model']['flavor']} ({summary['model']['params']:,} parameters)"
    )
    print(f"parity (init)    {summary['parity_init']}")
    print(
        f"training         loss {train['first_loss']:.3f} -> {train['last_loss']:.3f} in {train['steps']} steps"
    )
    print(f"parity (trained) {summary['parity_trained']}")
    print(f"total            {summary['seconds']} s; outputs in {args.out}/ (summary.json)")
    ok = (
        summary["parity_init"]["max_abs_logit_diff"] <= 1e-4
        and summary["parity_trained"]["max_abs_logit_diff"] <= 1e-4
        and train["last_loss"] < train["first_loss"]
    )
    print("demo", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the tiny end-to-end demo on CPU")
    p.add_argument("--out", default="demo_out", help="output directory (replaced)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tp", type=int, default=2)
    p.set_defaults(func=_run)
