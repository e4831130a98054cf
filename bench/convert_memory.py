"""Peak memory of `qmath convert` on a 1.5B-shaped random model vs a straightforward converter.

Writes a random bf16 HF checkpoint with Qwen2.5-1.5B's shapes (3.1 GB), then measures the
peak proportional set size (PSS) of the whole process tree (sampled every 20 ms) for:
  - ours:     `qmath convert hf-to-mcore --tp 1` and `qmath convert mcore-to-hf`
  - baseline: load every HF tensor, build every Megatron tensor in a second dict, save it
              (what a converter that does not stream does), same process isolation.
Prints each peak in GB, as a multiple of the model size, and ours/baseline.

    python bench/convert_memory.py [--flavor qwen2.5-1.5b] [--workdir /tmp/qmath-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from qmath_megatron.convert.commands import expected_hf_shapes
from qmath_megatron.convert.hf_io import write_safetensors_shards
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.models.hf_config import hf_config_from_flavor

BASELINE = r"""
import sys, torch
from safetensors.torch import load_file
from pathlib import Path
from qmath_megatron.convert import mapping
from qmath_megatron.convert.hf_io import SafetensorsReader, flavor_from_hf_config, read_hf_config
from qmath_megatron.models.builder import padded_vocab_size
hf, out = Path(sys.argv[1]), sys.argv[2]
flavor = flavor_from_hf_config(read_hf_config(hf))
reader = SafetensorsReader(hf)
state = {n: reader.get(n) for n in reader.names()}          # copy 1: the HF model
padded = padded_vocab_size(flavor.vocab_size, 1)
converted = {}
for rule in mapping.RULES:                                   # copy 2: the Megatron model
    for layer in (range(flavor.num_layers) if rule.per_layer else [None]):
        names = mapping.hf_names(rule, layer, flavor)
        converted[rule.mcore.format(i=layer)] = mapping.to_mcore_shard(
            rule, [state[n] for n in names], flavor, padded_vocab=padded, tp_rank=0, tp_size=1
        ).clone()
torch.save(converted, out)
"""


def peak_tree_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak summed PSS of the process and all its descendants in bytes, seconds)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            # PSS, not RSS: forked writer processes share the parent's pages, and summing
            # RSS would count those pages once per process.
            rss = sum(p.memory_full_info().pss for p in procs if p.is_running())
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return peak, time.time() - start


def write_random_hf(flavor_name: str, out: Path) -> int:
    flavor = get_flavor(flavor_name)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    total = 0

    def tensors():
        nonlocal total
        for name, shape in expected_hf_shapes(flavor).items():
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            total += t.numel() * 2
            yield name, t

    write_safetensors_shards(out, tensors(), max_shard_bytes=2 * 1024**3)
    (out / "config.json").write_text(json.dumps(hf_config_from_flavor(flavor, torch.bfloat16)))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavor", default="qwen2.5-1.5b")
    parser.add_argument("--workdir", default="/tmp/qmath-bench-convert")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    print(f"writing a random {args.flavor} HF checkpoint (bf16) ...", flush=True)
    model_bytes = write_random_hf(args.flavor, work / "hf")
    write_random_hf("tiny-untied", work / "tiny")  # the same commands on ~nothing: fixed cost
    gb = 1024**3
    qmath = [sys.executable, "-m", "qmath_megatron", "convert"]

    def commands(hf: Path, tag: str) -> dict[str, list[str]]:
        mcore, back = work / f"mcore-{tag}", work / f"back-{tag}"
        return {
            "ours hf-to-mcore (TP=1)": qmath
            + ["hf-to-mcore", "--hf", str(hf), "--out", str(mcore)],
            "ours mcore-to-hf": qmath + ["mcore-to-hf", "--ckpt", str(mcore), "--out", str(back)],
            "baseline (load all, convert, save)": [
                sys.executable,
                "-c",
                BASELINE,
                str(hf),
                str(work / f"{tag}.pt"),
            ],
        }

    fixed = {label: peak_tree_rss(cmd)[0] for label, cmd in commands(work / "tiny", "tiny").items()}
    results = {}
    print(
        f"{'':<36} {'peak PSS':>9} {'x model':>8} {'fixed':>7} "
        f"{'(peak-fixed)/model':>19} {'time':>7}"
    )
    for label, cmd in commands(work / "hf", "big").items():
        peak, seconds = peak_tree_rss(cmd)
        results[label] = peak
        above = (peak - fixed[label]) / model_bytes
        print(
            f"{label:<36} {peak / gb:7.2f}GB {peak / model_bytes:7.2f}x {fixed[label] / gb:5.2f}GB "
            f"{above:18.2f}x {seconds:6.1f}s",
            flush=True,
        )
    print(
        f"model size {model_bytes / gb:.2f} GB ({args.flavor}, bf16); "
        "fixed = same command, tiny model"
    )
    base = results["baseline (load all, convert, save)"]
    for label in list(results)[:2]:
        print(f"ratio {label} / baseline peak: {results[label] / base:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
