"""``qmath pipeline status`` and ``qmath pipeline report``: what a run did, per stage.

``status`` reads ``RUN/pipeline.json`` and the done markers: each stage's state, outputs,
wall time and headline metrics, and the eval table ``{model: {"benchmark/mode":
metrics}}``. ``report`` writes ``RUN/report.md`` and PNG plots (training curves per
stage and step; eval accuracy after every model-producing stage) and prints the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qmath_megatron.pipeline.runner import TRAIN_KEYS, read_jsonl, series
from qmath_megatron.pipeline.state import MARKER, RunState, read_marker, stage_is_running

# Report numbers that describe the settings, not the result.
_NOT_HEADLINE = {
    "seconds",
    "version",
    "vocab_size",
    "pad_id",
    "seq_length",
    "n",
    "k",
    "resumed_shards",
    "max_line_bytes",
}


def collect_status(run: Path) -> dict[str, Any]:
    """``{"run", "recipe", "stages": [{"name", "state", "seconds", "outputs", "metrics",
    "log", "error", "job_id"}], "eval": {model: {"benchmark/mode": metrics}}}``."""
    data = RunState(run).read()
    records = data.get("stages", {})
    stages = []
    evals: dict[str, dict] = {}
    for node in data.get("dag", []):
        name = node["name"]
        rec = records.get(name, {})
        marker = read_marker(run, name)
        if marker is not None:
            state, seconds, metrics, error = "done", marker["seconds"], marker["metrics"], None
        else:
            state = rec.get("state", "pending")
            seconds, metrics, error = rec.get("seconds"), {}, rec.get("error")
            local = rec.get("host") in (None, os.uname().nodename)
            if state == "running" and local and not stage_is_running(run, name):
                state = "failed"
                error = "interrupted: no process runs it any more; rerun to resume"
        entry = {
            "name": name,
            "state": state,
            "seconds": seconds,
            "kind": node.get("kind"),
            "outputs": node.get("paths", {}),
            "metrics": metrics,
            "log": str(run / name / "log.txt"),
            "error": error,
            "job_id": rec.get("job_id"),
        }
        if node.get("model"):
            entry["model"] = node["model"]
            if marker is not None:
                evals[node["model"]] = metrics
        stages.append(entry)
    return {"run": str(run), "recipe": data.get("recipe"), "stages": stages, "eval": evals}


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}m"


def headline(entry: dict) -> str:
    m = entry.get("metrics") or {}
    if entry.get("kind") == "train":
        return ", ".join(
            f"{k} {v['first']:.4g} -> {v['last']:.4g}" for k, v in m.items() if k in TRAIN_KEYS
        )
    if entry.get("kind") == "eval":
        parts = []
        for bench, vals in m.items():
            shown = ", ".join(f"{k} {v:.1f}" for k, v in vals.items() if isinstance(v, int | float))
            parts.append(f"{bench}: {shown}")
        return "; ".join(parts)
    keys = [k for k in m if k not in _NOT_HEADLINE][:4]
    return ", ".join(f"{k} {m[k]:,}" if isinstance(m[k], int) else f"{k} {m[k]:.4g}" for k in keys)


def status_table(status: dict) -> str:
    rows = [("stage", "state", "time", "headline")]
    for e in status["stages"]:
        rows.append((e["name"], e["state"], _fmt_seconds(e["seconds"]), headline(e)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:>{width[2]}}  {r[3]}" for r in rows]
    for e in status["stages"]:
        if e["state"] == "failed" and e["error"]:
            lines.append(f"{e['name']} failed: {e['error']}\n  log: {e['log']}")
    return "\n".join(lines)


def eval_table(status: dict) -> str:
    """Markdown table: one row per model (in DAG order), one column per benchmark/mode and
    metric."""
    evals = status["eval"]
    if not evals:
        return "(no evaluation done yet)"
    cols: list[tuple[str, str]] = []
    for metrics in evals.values():
        for bench, vals in metrics.items():
            for k in vals:
                if isinstance(vals[k], int | float) and (bench, k) not in cols:
                    cols.append((bench, k))
    head = "| model | " + " | ".join(f"{b} {k}" for b, k in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    rows = [head, sep]
    for model, metrics in evals.items():
        cells = [
            f"{metrics[b][k]:.1f}" if b in metrics and k in metrics[b] else "-" for b, k in cols
        ]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(run: Path) -> tuple[Path, list[Path]]:
    """``RUN/report.md`` and the PNG plots beside it (``RUN/plots/``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    status = collect_status(run)
    plots_dir = run / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots: list[Path] = []
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for e in status["stages"]:
        if e["kind"] != "train" or e["state"] != "done":
            continue
        marker = read_marker(run, e["name"])
        ckpt = (
            Path(next(iter(marker["outputs"].values()))) if marker and marker["outputs"] else None
        )
        rows = read_jsonl(ckpt / "metrics.jsonl") if ckpt else []
        curves[e["name"]] = {k: s for k in TRAIN_KEYS if (s := series(rows, k))}
    for key, title in (
        ("loss", "training loss"),
        ("reward", "GRPO reward"),
        ("accuracy", "GRPO rollout accuracy"),
        ("val_pairwise_accuracy", "RM held-out pairwise accuracy"),
    ):
        stages = {n: c[key] for n, c in curves.items() if key in c}
        if not stages:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, pts in stages.items():
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="." if len(pts) < 40 else None,
                label=name,
            )
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.set_title(f"{title} per stage")
        ax.legend()
        path = plots_dir / f"{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append(path)
    if status["eval"]:
        models = list(status["eval"])
        series_by: dict[str, list[float | None]] = {}
        for i, model in enumerate(models):
            for bench, vals in status["eval"][model].items():
                for k, v in vals.items():
                    if isinstance(v, int | float):
                        series_by.setdefault(f"{bench} {k}", [None] * len(models))[i] = v
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, ys in series_by.items():
            ax.plot(models, [float("nan") if y is None else y for y in ys], marker="o", label=label)
        ax.set_ylabel("accuracy (%)")
        ax.set_title("evaluation after each model-producing stage")
        ax.legend(fontsize="small")
        path = plots_dir / "eval_accuracy.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append(path)
    lines = [
        f"# Pipeline run `{run}` (recipe `{status['recipe']}`)",
        "",
        "## Stages",
        "",
        "| stage | state | time | headline |",
        "|---|---|---|---|",
    ]
    for e in status["stages"]:
        lines.append(
            f"| {e['name']} | {e['state']} | {_fmt_seconds(e['seconds'])} | {headline(e)} |"
        )
    lines += ["", "## Evaluation", "", eval_table(status), "", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] or ["(none yet)"]
    report = run / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, plots


__all__ = ["MARKER", "collect_status", "eval_table", "status_table", "write_report", "json"]
