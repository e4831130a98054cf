"""``qmath info``: flavors, parameter counts and the software environment."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from dataclasses import dataclass

from qmath_megatron.config.cli import ConfigArgs, build_config
from qmath_megatron.models.flavors import (
    CARD_DISCREPANCIES,
    FLAVORS,
    count_parameters,
    format_billions,
    get_flavor,
    matches_published,
)


@dataclass
class InfoConfig:
    flavor: str | None = None  # one flavor's architecture and size (None: all, briefly)
    tp: int = 1  # TP used for the padded vocab size


def flavor_info(name: str, tp: int = 1) -> dict:
    from qmath_megatron.models.builder import padded_vocab_size

    flavor = get_flavor(name)
    total = count_parameters(flavor)
    embedding = flavor.vocab_size * flavor.hidden_size * (1 if flavor.tie_word_embeddings else 2)
    return {
        **flavor.to_dict(),
        "head_dim": flavor.head_dim,
        "params": total,
        "params_billions": format_billions(total),
        "non_embedding_params_billions": format_billions(total - embedding),
        "matches_model_card": (
            matches_published(total, flavor.published_params) if flavor.published_params else None
        ),
        "model_card_note": CARD_DISCREPANCIES.get(flavor.name),
        "padded_vocab_size": padded_vocab_size(flavor.vocab_size, tp),
        "tp": tp,
    }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in (
        "qmath_megatron",
        "torch",
        "megatron-core",
        "transformers",
        "transformer-engine",
        "vllm",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if cfg.flavor:
        info = flavor_info(cfg.flavor, cfg.tp)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
        return 0
    import torch

    env = {**_versions(), "cuda_available": torch.cuda.is_available()}
    if args.json:
        print(json.dumps({"environment": env, "flavors": list(FLAVORS)}, indent=2))
        return 0
    print("environment:")
    for key, value in env.items():
        print(f"  {key:<20} {value}")
    print("flavors (layers x hidden, heads/kv groups, params; published):")
    for f in FLAVORS.values():
        params = format_billions(count_parameters(f))
        print(
            f"  {f.name:<20} {f.num_layers:>3} x {f.hidden_size:<5} {f.num_attention_heads:>3}/"
            f"{f.num_query_groups:<2} {params:>8}  {f.published_params or '-'}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="flavors, parameter counts, environment")
    a = ConfigArgs(p, InfoConfig)
    a.add("flavor", help="print one flavor's architecture and size")
    a.add("tp", help="TP used for the padded vocab size")
    p.add_argument("--json", action="store_true")
    a.finish()
    p.set_defaults(func=_run)
