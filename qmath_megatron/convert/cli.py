"""``qmath convert {hf-to-mcore, mcore-to-hf, verify}``.

Each direction's settings are one dataclass below; its flags, ``--config FILE.yaml`` and
``key=value`` overrides set it (:mod:`qmath_megatron.config.cli`). The converters (torch,
Megatron) are imported inside the run functions, so that ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass
from typing import Literal

from qmath_megatron.config.cli import ConfigArgs, build_config


@dataclass
class HfToMcoreConfig:
    hf: str  # HF model directory (config.json + safetensors)
    out: str  # checkpoint directory to create
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per PP rank
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: the HF config's dtype
    overwrite: bool = False


@dataclass
class McoreToHfConfig:
    ckpt: str  # checkpoint root or iteration directory
    out: str  # HF directory to create
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # default: the checkpoint's
    tokenizer: str | None = None  # tokenizer directory to copy alongside
    overwrite: bool = False


@dataclass
class VerifyConfig:
    hf: str
    ckpt: str
    tp: int | None = None  # default: as saved
    pp: int | None = None
    vpp: int | None = None
    batch: int = 2
    seq: int = 64
    seed: int = 0
    atol: float = 1e-3  # max allowed |logit difference| (fp32 on CPU)


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from qmath_megatron.convert.commands import hf_to_mcore

    cfg = build_config(args)
    print(
        f"converting {cfg.hf} -> {cfg.out} at TP={cfg.tp} PP={cfg.pp} VPP={cfg.vpp}",
        flush=True,
    )
    result = hf_to_mcore(
        cfg.hf,
        cfg.out,
        tp=cfg.tp,
        pp=cfg.pp,
        vpp=cfg.vpp,
        dtype=cfg.dtype,
        overwrite=cfg.overwrite,
    )
    print(
        f"wrote Megatron torch_dist checkpoint {result.out} ({result.tensors} parameter shards, "
        f"{result.seconds:.1f}s)"
    )
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from qmath_megatron.convert.commands import mcore_to_hf

    cfg = build_config(args)
    print(f"converting {cfg.ckpt} -> {cfg.out}", flush=True)
    result = mcore_to_hf(
        cfg.ckpt, cfg.out, dtype=cfg.dtype, tokenizer=cfg.tokenizer, overwrite=cfg.overwrite
    )
    print(
        f"wrote Hugging Face model {result.out} ({result.tensors} tensors, {result.seconds:.1f}s)"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from qmath_megatron.convert.commands import verify

    cfg = build_config(args)
    # A checkpoint of another head (a reward model) verifies through its head's converter
    # and compares what that head outputs (scores instead of logits).
    result = verify(
        cfg.hf,
        cfg.ckpt,
        tp=cfg.tp,
        pp=cfg.pp,
        vpp=cfg.vpp,
        batch=cfg.batch,
        seq=cfg.seq,
        seed=cfg.seed,
    )
    print(json.dumps(result.report(cfg.atol)) if args.json else result.summary(cfg.atol))
    return 0 if result.passed(cfg.atol) else 1


# The stage packages whose models have a head of their own: importing one registers its
# head with convert/heads.py (light: plain data). `qmath` builds only the parser of the
# command it runs, so `qmath convert` imports them itself.
HEAD_PACKAGES = ("qmath_megatron.reward_model",)


def register(subparsers: argparse._SubParsersAction) -> None:
    for package in HEAD_PACKAGES:
        importlib.import_module(package)
    convert = subparsers.add_parser("convert", help="Hugging Face <-> Megatron checkpoints")
    sub = convert.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    p = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> Megatron torch_dist checkpoint")
    a = ConfigArgs(p, HfToMcoreConfig)
    a.add("hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add("out", required=True, help="checkpoint directory to create")
    a.add("tp", help="tensor-parallel size")
    a.add("pp", help="pipeline-parallel size")
    a.add("vpp", help="virtual pipeline stages per PP rank")
    a.add(
        "dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="parameter dtype of the checkpoint (auto: the HF config's dtype)",
    )
    a.add("overwrite", help="replace an existing --out")
    a.finish()
    p.set_defaults(func=_hf_to_mcore)

    p = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory")
    a = ConfigArgs(p, McoreToHfConfig)
    a.add("ckpt", required=True, help="checkpoint root or iteration directory")
    a.add("out", required=True, help="HF directory to create")
    a.add(
        "dtype",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the HF tensors (default: the checkpoint's)",
    )
    a.add("tokenizer", help="tokenizer directory to copy alongside")
    a.add("overwrite", help="replace an existing --out")
    a.finish()
    p.set_defaults(func=_mcore_to_hf)

    p = sub.add_parser("verify", help="compare HF and Megatron logits on random tokens")
    a = ConfigArgs(p, VerifyConfig)
    a.add("hf", required=True)
    a.add("ckpt", required=True)
    a.add("tp", help="TP to run at (default: as saved)")
    a.add("pp", help="PP to run at (default: as saved)")
    a.add("vpp")
    a.add("batch")
    a.add("seq")
    a.add("seed")
    a.add("atol", help="max allowed |logit difference| (fp32 on CPU; exit 1 above it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a.finish()
    p.set_defaults(func=_verify)
