"""Workers for the conversion / export tests, run in spawned gloo process groups.

One spawn checks several layouts in turn (the parallel groups are rebuilt per case):
starting a process group costs more than the tiny models do.
"""

from __future__ import annotations

from typing import Any

import torch


def export_cases_worker(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each case: build the model at its layout, import the HF weights with the
    converter's import, optionally compare logits with transformers, then stream the model
    out with :func:`iter_hf_buckets` and compare every tensor with the HF safetensors.

    A case: ``hf`` (dir), ``tp``, ``pp``, ``vpp``, ``include_lm_head``, ``bucket_bytes``,
    ``dtype`` (None or "bf16"), ``parity`` (bool). Returns per case what this rank saw.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.convert.commands import load_hf_weights
    from qmath_megatron.convert.export import iter_hf_buckets
    from qmath_megatron.convert.hf_io import flavor_from_hf_config, read_hf_config
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.models.forward import forward_logits
    from qmath_megatron.parallel.runtime import init_process_group, set_parallel_layout, set_seed

    init_process_group()
    results = []
    for case in cases:
        parallel = ParallelConfig(tp=case["tp"], pp=case["pp"], vpp=case.get("vpp"))
        set_parallel_layout(parallel)
        set_seed(0)
        flavor = flavor_from_hf_config(read_hf_config(case["hf"]))
        padded = padded_vocab_size(flavor.vocab_size, parallel.tp)
        config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
        chunks = build_model(flavor, config, padded_vocab=padded, use_te=False)
        load_hf_weights(chunks, case["hf"], flavor, padded)
        result: dict[str, Any] = {"rank": dist.get_rank(), "logit_diff": None}

        if case.get("parity"):
            for chunk in chunks:
                chunk.eval()
            tokens = torch.randint(
                0, flavor.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3)
            )
            logits = forward_logits(chunks, tokens)
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                from transformers import AutoModelForCausalLM

                ref_model = AutoModelForCausalLM.from_pretrained(
                    case["hf"], dtype=torch.float32, local_files_only=True
                ).eval()
                with torch.no_grad():
                    ref = ref_model(tokens).logits
                diff = (logits[..., : flavor.vocab_size] - ref).abs().max().item()
                result["logit_diff"] = diff

        dtype = torch.bfloat16 if case.get("dtype") == "bf16" else None
        reference = load_file(f"{case['hf']}/model.safetensors")
        names: list[str] = []
        mismatched: list[str] = []
        bucket_sizes: list[tuple[int, int]] = []  # (bytes, tensors)
        for bucket in iter_hf_buckets(
            chunks,
            flavor,
            padded,
            include_lm_head=case["include_lm_head"],
            dtype=dtype,
            bucket_bytes=case["bucket_bytes"],
        ):
            size = 0
            for name, tensor in bucket:
                names.append(name)
                size += tensor.numel() * tensor.element_size()
                tied_head = name == "lm_head.weight" and name not in reference
                source = "model.embed_tokens.weight" if tied_head else name
                expected = reference[source].to(dtype) if dtype else reference[source]
                if not (tensor.dtype == expected.dtype and torch.equal(tensor, expected)):
                    mismatched.append(name)
            bucket_sizes.append((size, len(bucket)))
        result.update(names=names, mismatched=mismatched, buckets=bucket_sizes)
        results.append(result)
        del chunks
    return results
