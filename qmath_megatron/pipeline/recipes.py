"""Pipeline recipes: the Qwen2.5-Math self-improvement loop as a DAG of existing commands.

The loop (Qwen2.5-Math report, arXiv 2409.12122, sections 3-4):

    SFT data -> SFT1 -> sample responses per RM problem from SFT1, label with the verifier
    -> RM1 (listwise) -> RFT with RM1 -> SFT2 (from the base checkpoint, on the RFT data)
    -> sample from SFT2 -> RM2 -> RL prompts (2..5 of 8 correct) -> GRPO from SFT2 with RM2
    -> eval (greedy, maj@8, rm@8 with the final RM) of base, SFT1, SFT2 and GRPO

Every stage is one ``qmath`` command (see :mod:`qmath_megatron.pipeline.stage` for how
settings become its command line); ``{stage.output}`` placeholders carry the paths.
"""

from __future__ import annotations

from collections.abc import Callable

from qmath_megatron.config.recipes import recipe_registry
from qmath_megatron.pipeline.stage import UNSET, Pipeline, Resources, Stage

CKPT = "ckpt"
HF = "hf"
TINY_FLAVOR = "tiny-qwen-vocab-hd32"  # Qwen vocabulary, head_dim 32: vLLM's CPU attention runs it


def _convert(name: str, ckpt: str, tokenizer: str) -> Stage:
    return Stage(
        name,
        "convert",
        ("convert", "mcore-to-hf"),
        {"ckpt": ckpt, "out": f"{{self.{HF}}}", "tokenizer": tokenizer},
        outputs={HF: HF},
    )


def _train(name: str, command: str, settings: dict, resources: Resources) -> Stage:
    return Stage(
        name,
        "train",
        ("train", command),
        {**settings, "checkpoint.save": f"{{self.{CKPT}}}"},
        outputs={CKPT: CKPT},
        resources=resources,
        resumable=True,  # the checkpoint directory is also its resume source
        metrics=f"{CKPT}/metrics.jsonl",
    )


def _rm_stages(
    prefix: str,
    policy_hf: str,
    init_ckpt: str,
    problems: list[str],
    valid_problems: list[str] | None,
    tokenizer: str,
    sample: dict,
    rm_recipe: dict,
    resources: dict[str, Resources],
) -> list[Stage]:
    """Sample from the policy and label with the verifier (``qmath data rft``'s groups),
    prepare the groups (and held-out ones: the RM's validation), train the RM from the
    policy's checkpoint, export it."""
    stages: list[Stage] = []
    train = {**rm_recipe, "model.init_from": init_ckpt}
    splits = [("", problems, "data.prefix")]
    if valid_problems:
        splits.append(("_valid", valid_problems, "data.valid_prefix"))
    for suffix, files, key in splits:
        samples, data = f"{prefix}{suffix}_samples", f"{prefix}{suffix}_data"
        stages += [
            Stage(
                samples,
                "data",
                ("data", "rft"),
                {"problems": files, "model": policy_hf, "output": "{self.out}", **sample},
                outputs={"out": "out"},
                resources=resources["sample"],
                resumable=True,
                metrics="out/report.json",
            ),
            Stage(
                data,
                "data",
                ("data", "rm-prepare"),
                {
                    "input": [f"{{{samples}.out}}/groups/*"],
                    "output_prefix": "{self.prefix}",
                    "tokenizer": tokenizer,
                    "seq_length": rm_recipe["model.seq_length"],
                },
                outputs={"prefix": "rm"},
                resources=resources["data"],
                metrics="rm.report.json",
            ),
        ]
        train[key] = f"{{{data}.prefix}}"
    stages.append(_train(prefix, "rm", train, resources["rm"]))
    stages.append(_convert(f"{prefix}_hf", f"{{{prefix}.{CKPT}}}", tokenizer))
    return stages


def _eval(model: str, hf: str, settings: dict, resources: Resources) -> Stage:
    return Stage(
        f"eval_{model}",
        "eval",
        ("eval",),
        {"model": hf, "output": "{self.out}", **settings},
        outputs={"out": "out"},
        resources=resources,
        model=model,
        metrics="out",
    )


def _sft_round(
    n: str, data: dict, recipe: dict, init: str, tokenizer: str, resources: dict[str, Resources]
) -> list[Stage]:
    """SFT round ``n``: prepare its data (``sft_data`` for round 1, ``sft<n>_data`` after),
    train ``sft<n>`` from ``init``, export ``sft<n>_hf``."""
    data_stage = "sft_data" if n == "1" else f"sft{n}_data"
    return [
        Stage(
            data_stage,
            "data",
            ("data", "sft-prepare"),
            {
                **data,
                "output_prefix": "{self.prefix}",
                "tokenizer": tokenizer,
                "seq_length": recipe["model.seq_length"],
            },
            outputs={"prefix": "sft"},
            resources=resources["data"],
            metrics="sft.report.json",
        ),
        _train(
            f"sft{n}",
            "sft",
            {**recipe, "model.init_from": init, "data.prefix": f"{{{data_stage}.prefix}}"},
            resources["sft"],
        ),
        _convert(f"sft{n}_hf", f"{{sft{n}.ckpt}}", tokenizer),
    ]


def loop_stages(
    *,
    tokenizer: str,
    base_ckpt: str,
    base_hf: str,
    sft_data: dict,
    sft_recipe: dict,
    sft2_extra_input: list[str] | None = None,
    sft2_settings: dict | None = None,
    rm_problems: list[str],
    rm_valid_problems: list[str] | None,
    rft_problems: list[str],
    rl_problems: list[str],
    rm_sample: dict,
    rft_sample: dict,
    rl_prompts: dict,
    rm_recipe: dict,
    grpo_recipe: dict,
    eval_settings: dict,
    resources: dict[str, Resources],
) -> list[Stage]:
    """The loop after the base model (shared by every recipe; paths may be placeholders)."""
    stages = _sft_round("1", sft_data, sft_recipe, base_ckpt, tokenizer, resources)
    stages += _rm_stages(
        "rm1",
        "{sft1_hf.hf}",
        "{sft1.ckpt}",
        rm_problems,
        rm_valid_problems,
        tokenizer,
        rm_sample,
        rm_recipe,
        resources,
    )
    stages += [
        Stage(
            "rft",
            "data",
            ("data", "rft"),
            {
                "problems": rft_problems,
                "model": "{sft1_hf.hf}",
                "scorer": "{rm1_hf.hf}",
                "output": "{self.out}",
                **rft_sample,
            },
            outputs={"out": "out"},
            resources=resources["sample"],
            resumable=True,
            metrics="out/report.json",
        ),
    ]
    # SFT2 starts again from the base checkpoint, on the RFT data (the report's round 2).
    round2 = {**sft_data, "input": [*(sft2_extra_input or []), "{rft.out}/sft/*"]}
    stages += _sft_round(
        "2", round2, {**sft_recipe, **(sft2_settings or {})}, base_ckpt, tokenizer, resources
    )
    stages += _rm_stages(
        "rm2",
        "{sft2_hf.hf}",
        "{sft2.ckpt}",
        rm_problems,
        rm_valid_problems,
        tokenizer,
        rm_sample,
        rm_recipe,
        resources,
    )
    stages += [
        Stage(
            "rl_prompts",
            "data",
            ("data", "rl-prompts"),
            {
                "problems": rl_problems,
                "model": "{sft2_hf.hf}",
                "output": "{self.prompts}",
                **rl_prompts,
            },
            outputs={"prompts": "prompts.jsonl"},
            resources=resources["sample"],
            resumable=True,
            metrics="prompts.report.json",
        ),
        _train(
            "grpo",
            "grpo",
            {
                **grpo_recipe,
                "model.init_from": "{sft2.ckpt}",
                "rl.engine_model": "{sft2_hf.hf}",
                "rl.rm_model": "{rm2_hf.hf}",
                "data.prompts": "{rl_prompts.prompts}",
            },
            resources["grpo"],
        ),
        _convert("grpo_hf", "{grpo.ckpt}", tokenizer),
    ]
    final_rm = {"rm": "{rm2_hf.hf}"} if eval_settings.pop("rm_at_k", True) else {}
    for model, hf in (
        ("base", base_hf),
        ("sft1", "{sft1_hf.hf}"),
        ("sft2", "{sft2_hf.hf}"),
        ("grpo", "{grpo_hf.hf}"),
    ):
        stages.append(_eval(model, hf, {**eval_settings, **final_rm}, resources["eval"]))
    return stages


# --------------------------------------------------------------------------- recipes


def tiny_cpu() -> Pipeline:
    """The whole loop on a CPU, on the project's toy domain (``What is 3 + 5?``: sums of two
    numbers below ten with a worked answer in ``\\boxed{}``, :func:`qmath_megatron.data.
    synthetic.generate_toy_problems`; held-out problems from another seed): a tiny model with the
    Qwen vocabulary (``tiny-qwen-vocab-hd32``), pretrained briefly on the generated math
    corpus (the base), then SFT1, RM1, RFT, SFT2, RM2, RL prompts, GRPO, and greedy /
    maj@4 / rm@4 evaluation (CoT) of every model on the held-out problems. Sampling
    stages use the transformers engine (vLLM's start-up on two cores costs more than the
    tiny generation: ``STAGE.engine=vllm`` switches)."""
    cpu = Resources(cpus_per_task=2, time="00:30:00")
    res = {k: cpu for k in ("data", "sample", "sft", "rm", "grpo", "eval")}
    tok = "{tokenizer.dir}"
    gen = [
        Stage(
            "tokenizer",
            "data",
            ("tokenizer", "build"),
            {"out": "{self.dir}"},
            outputs={"dir": "tok"},
        ),
    ]
    for name, kind, n, seed in (
        ("toy_sft", "toy-sft", 4096, 0),
        ("toy_problems", "toy-problems", 48, 1),
        ("toy_rm_valid", "toy-problems", 16, 3),
        ("toy_heldout", "toy-problems", 32, 2),
    ):
        gen.append(
            Stage(
                name,
                "data",
                ("data", "generate"),
                {"kind": kind, "n": n, "seed": seed, "output": "{self.file}"},
                outputs={"file": f"{name}.jsonl"},
            )
        )
    model = {"model.flavor": TINY_FLAVOR}
    base = [
        _train(
            "base",
            "pretrain",
            {"recipe": "tiny_cpu", **model, "train.train_iters": 20, "data.tokenizer": tok},
            cpu,
        ),
        _convert("base_hf", "{base.ckpt}", tok),
    ]
    sample = {"engine": "transformers", "max_new_tokens": 24, "temperature": 1.0, "batch_size": 16}
    stages = loop_stages(
        tokenizer=tok,
        base_ckpt="{base.ckpt}",
        base_hf="{base_hf.hf}",
        sft_data={"input": ["{toy_sft.file}"]},
        # Round 2 trains on the SFT data plus the RFT responses RM1 picked.
        sft2_extra_input=["{toy_sft.file}"],
        sft_recipe={
            "recipe": "tiny_cpu_sft",
            **model,
            "model.seq_length": 96,
            "data.tokenizer": tok,
            "train.train_iters": 150,
            "data.global_batch_size": 16,
            "data.micro_batch_size": 4,
            "optim.lr": 3e-3,
            "optim.min_lr": 1e-3,
            "scheduler.warmup_iters": 10,
        },
        # Round 2 has more data (the SFT data and RM1's picks): more steps at the same rate.
        sft2_settings={"train.train_iters": 250},
        rm_problems=["{toy_problems.file}"],
        rm_valid_problems=["{toy_rm_valid.file}"],
        rft_problems=["{toy_problems.file}"],
        rl_problems=["{toy_problems.file}"],
        # The toy problems carry worked solutions: each RM group gets one as a positive, so
        # a group has a pair to train on even while the tiny policy solves little.
        rm_sample={**sample, "n": 6, "k": 1, "reference_solution_key": "solution"},
        rft_sample={**sample, "n": 4, "k": 2},
        rl_prompts={**sample, "n": 8},
        rm_recipe={
            "recipe": "tiny_cpu_rm",
            **model,
            "model.seq_length": 96,
            "data.tokenizer": tok,
            "data.synthetic_groups": 0,
            "data.synthetic_valid_groups": 0,
            "train.train_iters": 20,
        },
        grpo_recipe={
            "recipe": "tiny_cpu_grpo_math",
            **model,
            "model.seq_length": 96,
            "rl.max_new_tokens": 24,
            "train.train_iters": 8,
        },
        eval_settings={
            "benchmark": (
                "name=toy,path={toy_heldout.file},problem=problem,answer=answer,format=plain"
            ),
            "benchmarks": "toy",
            "modes": "cot",
            "n": 4,
            "temperature": 0.7,
            "max_new_tokens": 24,
            "engine": "transformers",
        },
        resources=res,
    )
    return Pipeline("tiny_cpu", gen + base + stages)


def _qwen(size: str, train: Resources, grpo: Resources, engine_tp: int) -> Pipeline:
    """The loop at scale from a Qwen2.5(-Math) base model in HF format (``inputs.base_hf``:
    the released base model, or the export of a CPT run), with the stage recipes of the
    same size (their docstrings cite the report where it gives a value). What the pipeline
    adds, from the Qwen2.5-Math report (arXiv 2409.12122, sections 4.1-4.3) as read for
    this project: 6 responses per RM problem from the SFT model; RL prompts kept at 2..5
    correct of 8; evaluation with 8 samples at temperature 0.7, top-p 0.8, rm@8 with the
    final RM, CoT and TIR (up to 4 executions). Not given by the report, ours: 8 samples
    per RFT problem keeping 4, 2048 new tokens when sampling, TP for the vLLM engines."""
    tok = "{tokenizer.dir}"
    cpu = Resources(cpus_per_task=32, time="04:00:00")
    one_gpu = Resources(gpus_per_node=1, cpus_per_task=16, time="12:00:00")
    engines = Resources(gpus_per_node=8, cpus_per_task=64, time="24:00:00")
    res = {"data": cpu, "sample": engines, "sft": train, "rm": train, "grpo": grpo, "eval": one_gpu}
    sample = {
        "engine": "vllm",
        "tensor_parallel_size": engine_tp,
        "temperature": 0.7,
        "max_new_tokens": 2048,
    }
    base = [
        Stage(
            "tokenizer",
            "data",
            ("tokenizer", "build"),
            {"out": "{self.dir}"},
            outputs={"dir": "tok"},
        ),
        Stage(
            "base",
            "convert",
            ("convert", "hf-to-mcore"),
            {"hf": "{inputs.base_hf}", "out": f"{{self.{CKPT}}}"},
            outputs={CKPT: CKPT},
            resources=Resources(cpus_per_task=32, mem="512G", time="04:00:00"),
        ),
    ]
    stages = loop_stages(
        tokenizer=tok,
        base_ckpt="{base.ckpt}",
        base_hf="{inputs.base_hf}",
        sft_data={"input": ["{inputs.sft_data}"], "workers": 16},
        sft_recipe={"recipe": f"qwen25_math_{size}_sft", "model.seq_length": 4096},
        rm_problems=["{inputs.rm_problems}"],
        rm_valid_problems=["{inputs.rm_valid_problems}"],
        rft_problems=["{inputs.rft_problems}"],
        rl_problems=["{inputs.rl_problems}"],
        rm_sample={**sample, "n": 6, "k": 1},
        rft_sample={**sample, "n": 8, "k": 4},
        rl_prompts={**{k: v for k, v in sample.items() if k != "tensor_parallel_size"}, "n": 8},
        rm_recipe={"recipe": f"qwen25_math_rm_{size}", "model.seq_length": 4096},
        grpo_recipe={"recipe": f"qwen25_math_{size}_grpo"},
        eval_settings={
            "benchmarks": "gsm8k,math500",
            "benchmark_dir": "{inputs.benchmark_dir}",
            "modes": "cot,tir",
            "n": 8,
            "temperature": 0.7,
            "top_p": 0.8,
            "tir_max_executions": 4,
            "engine": "vllm",
            "tensor_parallel_size": engine_tp,
        },
        resources=res,
    )
    inputs = {
        k: UNSET
        for k in (
            "base_hf",
            "sft_data",
            "rm_problems",
            "rm_valid_problems",
            "rft_problems",
            "rl_problems",
            "benchmark_dir",
        )
    }
    return Pipeline(f"qwen25_math_{size}", base + stages, inputs)


def qwen25_math_7b() -> Pipeline:
    """7B: SFT, RM and GRPO on one 8-GPU node each (the stage recipes' layouts: SFT TP=2,
    GRPO colocated TP=2 x DP=4 with four engines); sampling with vLLM at TP=1."""
    node = Resources(gpus_per_node=8, tasks_per_node=8, cpus_per_task=96, time="48:00:00")
    return _qwen("7b", node, node, 1)


def qwen25_math_72b() -> Pipeline:
    """72B: SFT and RM at TP=8 x PP=4 on 4 nodes; GRPO's trainer at TP=8 x PP=4 x DP=2 on
    8 nodes, rolling out on the external vLLM engines of ``qwen25_math_72b_grpo``
    (``rl.engine_handles``: start them with ``qmath engine serve --handle-dir engines``
    before the grpo stage); sampling and evaluation with vLLM at TP=8."""
    train = Resources(nodes=4, gpus_per_node=8, tasks_per_node=8, cpus_per_task=96, time="72:00:00")
    grpo = Resources(nodes=8, gpus_per_node=8, tasks_per_node=8, cpus_per_task=96, time="72:00:00")
    return _qwen("72b", train, grpo, 8)


RECIPES: dict[str, Callable[[], Pipeline]] = recipe_registry(
    tiny_cpu, qwen25_math_7b, qwen25_math_72b
)


def get_pipeline(name: str) -> Pipeline:
    if name not in RECIPES:
        raise ValueError(f"unknown pipeline recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
