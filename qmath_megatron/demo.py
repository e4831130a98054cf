"""``qmath demo``: the whole foundation on a tiny built-in default, on CPU, in a few minutes.

1. build the real Qwen2.5 tokenizer offline;
2. generate a small math corpus and tokenize it into a Megatron indexed dataset;
3. make a random tiny Qwen2 HF model that uses the full Qwen vocabulary;
4. convert it to Megatron at TP=2 and check logit parity;
5. continue pretraining it at TP=2 with the `tiny_cpu` recipe (the real trainer: Megatron
   GPTDataset, DDP, distributed optimizer, checkpoints; gloo on CPU);
6. export the trained checkpoint back to HF and check parity again;
7. the sandbox self-test (hostile programs: 0 escapes, 0 hangs), then ``qmath eval`` of the
   exported model on a generated benchmark, CoT and TIR. A barely trained tiny model's
   accuracy is near 0: the step shows the pipeline (prompts, generation, TIR loop, answer
   checking, metrics), not skill.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qmath_megatron.config.cli import ConfigArgs, build_config


def _pretrain_worker(overrides: list[str]) -> list[dict]:
    from qmath_megatron.pretrain.task import pretrain
    from qmath_megatron.training.cli import resolve_job

    return pretrain(resolve_job("tiny_cpu", None, overrides))


def run_demo(out: Path, *, steps: int = 30, tp: int = 2, seq: int = 128, batch: int = 8) -> dict:
    from qmath_megatron.convert.commands import hf_to_mcore, mcore_to_hf, verify
    from qmath_megatron.data.synthetic import write_jsonl
    from qmath_megatron.data.tokenize import TokenizeConfig, tokenize_corpus
    from qmath_megatron.models.flavors import count_parameters, get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.parallel.runtime import launch
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer, load_tokenizer

    t0 = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary: dict = {}

    print("[1/7] building the Qwen2.5 tokenizer offline", flush=True)
    tok_dir = build_qwen25_tokenizer(out / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    summary["tokenizer"] = {
        "dir": str(tok_dir),
        "size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
    }

    print(
        "[2/7] generating a math corpus; qmath data tokenize -> Megatron indexed dataset",
        flush=True,
    )
    corpus = write_jsonl(out / "corpus.jsonl", n=400, seed=0)
    tokenized = tokenize_corpus(
        TokenizeConfig(
            inputs=[str(corpus)],
            output_prefix=str(out / "data" / "math"),
            tokenizer=str(tok_dir),
            workers=2,
            progress=False,
        )
    )
    summary["corpus"] = {"documents": tokenized["documents"], "tokens": tokenized["tokens"]}

    print("[3/7] random tiny Qwen2 model with the full Qwen vocabulary", flush=True)
    flavor = get_flavor("tiny-qwen-vocab")
    hf_init = make_random_hf_model(flavor, out / "hf_init", seed=0)
    summary["model"] = {"flavor": flavor.name, "params": count_parameters(flavor)}

    print(f"[4/7] converting HF -> Megatron at TP={tp}", flush=True)
    conv = hf_to_mcore(hf_init, out / "mcore_init", tp=tp)
    parity_init = verify(hf_init, out / "mcore_init", seq=64)
    summary["convert_hf_to_mcore_s"] = round(conv.seconds, 2)
    summary["parity_init"] = _parity(parity_init)
    print(f"  parity: {summary['parity_init']}", flush=True)

    print(
        f"[5/7] qmath train pretrain --recipe tiny_cpu at TP={tp}, from the converted model",
        flush=True,
    )
    overrides = [
        f"parallel.tp={tp}",
        f"model.init_from={out / 'mcore_init'}",
        f"model.seq_length={seq}",
        f"data.blend={json.dumps([str(out / 'data' / 'math')])}",
        f"data.tokenizer={tok_dir}",
        f"data.cache_dir={out / 'data' / 'cache'}",
        f"data.global_batch_size={batch}",
        "data.micro_batch_size=2",
        f"train.train_iters={steps}",
        f"checkpoint.save={out / 'mcore_trained'}",
        f"checkpoint.save_interval={steps}",
        f"train.eval_interval={steps}",
    ]
    history = launch(_pretrain_worker, tp, overrides)[0]
    losses = [h["loss"] for h in history]
    summary["train"] = {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}

    print("[6/7] exporting Megatron -> HF and checking parity", flush=True)
    export = mcore_to_hf(out / "mcore_trained", out / "hf_trained", tokenizer=tok_dir)
    parity_trained = verify(out / "hf_trained", out / "mcore_trained", tp=tp, seq=64)
    summary["convert_mcore_to_hf_s"] = round(export.seconds, 2)
    summary["parity_trained"] = _parity(parity_trained)

    print(
        "[7/7] qmath eval of the exported model (CoT and TIR) on a generated benchmark", flush=True
    )
    summary["eval"] = _evaluate(out, out / "hf_trained")
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _evaluate(out: Path, model_dir: Path, problems: int = 6) -> dict:
    from qmath_megatron.data.synthetic import write_benchmark_jsonl
    from qmath_megatron.evaluation.config import EvalJob, EvalModelConfig, SamplingConfig
    from qmath_megatron.evaluation.runner import run_eval
    from qmath_megatron.sandbox import SandboxConfig
    from qmath_megatron.sandbox.hostile import self_test

    # The sandbox that will run model-written code is checked against the hostile corpus.
    report = self_test()
    print(
        f"  sandbox self-test: {report['attempts']} hostile programs, {report['escapes']} "
        f"escapes, {report['hangs']} hangs ({report['isolation']['backend']} isolation)",
        flush=True,
    )
    bench = write_benchmark_jsonl(out / "bench" / "synthetic.jsonl", n=problems, seed=1)
    spec = f"name=synthetic,path={bench},problem=problem,answer=solution,format=boxed,id=id"
    job = EvalJob(
        model=EvalModelConfig(path=str(model_dir), engine="transformers", batch_size=6),
        benchmarks=["synthetic"],
        benchmark_specs=[spec],
        output=str(out / "eval"),
        modes=["cot", "tir"],
        sampling=SamplingConfig(n=2, temperature=0.8, max_new_tokens=24),
        sandbox=SandboxConfig(workers=2, timeout_s=10.0),
        overwrite=True,
    )
    summary = run_eval(job, log=lambda msg: print(f"  {msg}", flush=True))
    return {
        "problems": problems,
        "results": summary["results"],
        "sandbox_self_test": {k: report[k] for k in ("attempts", "escapes", "hangs")},
        "sandbox": summary["sandbox"]["backend"],
        "sandbox_strong": summary["sandbox"]["strong"],
    }


def _parity(result) -> dict:
    return {
        "max_abs_logit_diff": float(f"{result.max_abs_diff:.3e}"),
        "top1_agreement": round(result.top1_agreement, 4),
        "tp": result.tp,
        "pp": result.pp,
    }


def _run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    summary = run_demo(Path(cfg.out), steps=cfg.steps, tp=cfg.tp)
    train = summary["train"]
    print("\n== demo summary ==")
    print(
        f"tokenizer        {summary['tokenizer']['size']} tokens, "
        f"eos id {summary['tokenizer']['eos_id']}"
    )
    print(
        f"corpus           {summary['corpus']['documents']} documents, "
        f"{summary['corpus']['tokens']} tokens"
    )
    print(
        f"model            {summary['model']['flavor']} ({summary['model']['params']:,} parameters)"
    )
    print(f"parity (init)    {summary['parity_init']}")
    print(
        f"training         loss {train['first_loss']:.3f} -> {train['last_loss']:.3f} "
        f"in {train['steps']} steps"
    )
    print(f"parity (trained) {summary['parity_trained']}")
    ev = summary["eval"]
    st = ev["sandbox_self_test"]
    print(
        f"sandbox          {ev['sandbox']}{' (strong)' if ev['sandbox_strong'] else ' (WEAK)'}; "
        f"self-test {st['attempts']} hostile programs, {st['escapes']} escapes, {st['hangs']} hangs"
    )
    for name, metrics in ev["results"].items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if v is not None)
        print(f"  {name:<15} {shown}  (random tiny model: near 0 expected)")
    print(f"total            {summary['seconds']} s; outputs in {cfg.out}/ (summary.json)")
    ok = (
        summary["parity_init"]["max_abs_logit_diff"] <= 1e-4
        and summary["parity_trained"]["max_abs_logit_diff"] <= 1e-4
        and train["last_loss"] < train["first_loss"]
        and ev["sandbox_self_test"]["escapes"] == 0
        and ev["sandbox_self_test"]["hangs"] == 0
        and set(ev["results"]) == {"synthetic/cot", "synthetic/tir"}
    )
    print("demo", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


@dataclass
class DemoConfig:
    out: str = "demo_out"  # output directory (replaced)
    steps: int = 30  # pretraining steps
    tp: int = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the tiny end-to-end demo on CPU")
    a = ConfigArgs(p, DemoConfig)
    a.add("out", help="output directory (replaced)")
    a.add("steps")
    a.add("tp")
    a.finish()
    p.set_defaults(func=_run)
