"""Launch `qmath train pretrain` with nemo-run (Slurm or local), resources only.

    # render the sbatch script without submitting:
    python examples/nemo_run_pretrain.py --recipe qwen25_math_7b_cpt --executor slurm \
        --nodes 4 --account ACCT --partition batch --container-image IMG --dryrun -- parallel.tp=4
    # run locally with torchrun on 2 processes (CPU: gloo):
    python examples/nemo_run_pretrain.py --recipe tiny_cpu --executor local --gpus-per-node 2

Everything after `--` is passed to the trainer verbatim (key.sub=value overrides); this
file never reads the training configuration. Needs the `launch` extra (nemo-run).
"""

from __future__ import annotations

import argparse
import sys


def build(args: argparse.Namespace):
    import nemo_run as run

    script = run.Script(
        path="qmath_megatron",
        args=["train", "pretrain", "--recipe", args.recipe, *args.overrides],
        m=True,
        entrypoint="python",
    )
    if args.executor == "local":
        executor = run.LocalExecutor(ntasks_per_node=args.gpus_per_node, launcher="torchrun")
    else:
        if not args.account:
            raise SystemExit("--account is required for --executor slurm")
        executor = run.SlurmExecutor(
            account=args.account,
            partition=args.partition,
            nodes=args.nodes,
            ntasks_per_node=args.gpus_per_node,
            gpus_per_node=args.gpus_per_node,
            time=args.time,
            container_image=args.container_image,
            container_mounts=args.container_mounts,
            exclusive=True,
            launcher="torchrun",
            env_vars={"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_TIMEOUT": "22"},
            retries=args.retries,
        )
        executor.tunnel = run.LocalTunnel(job_dir=args.job_dir)
    return script, executor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--account", default=None)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--container-image", default=None)
    parser.add_argument("--container-mounts", nargs="*", default=[])
    parser.add_argument("--job-dir", default="nemo_run_jobs")
    parser.add_argument(
        "--retries", type=int, default=3, help="Slurm requeues after a failure/preemption"
    )
    parser.add_argument("--dryrun", action="store_true", help="print the job (sbatch script) only")
    parser.add_argument("overrides", nargs="*", help="trainer overrides, after --")
    args = parser.parse_args(argv)

    import nemo_run as run

    script, executor = build(args)
    with run.Experiment(f"qmath-{args.recipe}", executor=executor) as exp:
        exp.add(script, name="pretrain")
        if args.dryrun:
            exp.dryrun()
        else:
            exp.run(detach=args.executor == "slurm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
