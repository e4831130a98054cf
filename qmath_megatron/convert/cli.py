"""``qmath convert {hf-to-mcore, mcore-to-hf, verify}``."""

from __future__ import annotations

import argparse
import json


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from qmath_megatron.convert.commands import hf_to_mcore

    print(
        f"converting {args.hf} -> {args.out} at TP={args.tp} PP={args.pp} VPP={args.vpp}",
        flush=True,
    )
    result = hf_to_mcore(
        args.hf,
        args.out,
        tp=args.tp,
        pp=args.pp,
        vpp=args.vpp,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(
        f"wrote Megatron torch_dist checkpoint {result.out} ({result.tensors} parameter shards, "
        f"{result.seconds:.1f}s)"
    )
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from qmath_megatron.convert.commands import mcore_to_hf

    print(f"converting {args.ckpt} -> {args.out}", flush=True)
    result = mcore_to_hf(
        args.ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer, overwrite=args.overwrite
    )
    print(
        f"wrote Hugging Face model {result.out} ({result.tensors} tensors, {result.seconds:.1f}s)"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from qmath_megatron.convert.commands import verify
    from qmath_megatron.reward_model.convert import is_reward_model_checkpoint

    if is_reward_model_checkpoint(args.ckpt):  # compares scores instead of logits
        from qmath_megatron.reward_model.convert import verify_command

        return verify_command(args)

    result = verify(
        args.hf,
        args.ckpt,
        tp=args.tp,
        pp=args.pp,
        vpp=args.vpp,
        batch=args.batch,
        seq=args.seq,
        seed=args.seed,
    )
    ok = result.passed(args.atol)
    report = {**vars(result), "atol": args.atol, "passed": ok}
    report.pop("logits")
    print(
        json.dumps(report)
        if args.json
        else (
            f"TP={result.tp} PP={result.pp}: max |logit diff| {result.max_abs_diff:.3e} "
            f"(mean {result.mean_abs_diff:.3e}), top-1 agreement {result.top1_agreement:.2%} over "
            f"{result.tokens} tokens -> {'PASS' if ok else 'FAIL'} (atol {args.atol:g})"
        )
    )
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser("convert", help="Hugging Face <-> Megatron checkpoints")
    sub = convert.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    p = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> Megatron torch_dist checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="parameter dtype of the checkpoint (auto: the HF config's dtype)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_hf_to_mcore)

    p = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory")
    p.add_argument("--ckpt", required=True, help="checkpoint root or iteration directory")
    p.add_argument("--out", required=True, help="HF directory to create")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the HF tensors (default: the checkpoint's)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy alongside")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_mcore_to_hf)

    p = sub.add_parser("verify", help="compare HF and Megatron logits on random tokens")
    p.add_argument("--hf", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tp", type=int, default=None, help="TP to run at (default: as saved)")
    p.add_argument("--pp", type=int, default=None, help="PP to run at (default: as saved)")
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="max allowed |logit difference| (fp32 on CPU; exit 1 above it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_verify)
