"""The DPO story of a run in one PNG: loss leaving ln 2, reward accuracy rising above chance, margins growing;
and several runs overlaid (`dpo-scale plot RUN_DIR...`, e.g. a beta comparison).

Drawn with matplotlib's Agg canvas directly (no pyplot): no display is needed and no global backend is switched.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dpo_scale.io import atomic_open
from dpo_scale.training.tracking import read_metrics

LN2 = math.log(2)  # the DPO loss -log sigmoid(0) when the policy equals the reference (DPO eq. 7, margin 0)
PANELS = ("loss", "rewards/accuracies", "rewards/margins")  # metric names, also the panel titles
COMPARE_PANELS = PANELS + ("rewards/chosen", "rewards/rejected")


def plot_training(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Draw run_dir/metrics.jsonl into `out_png`, written whole or not at all."""
    figure = training_figure(read_metrics(metrics_path), source=str(metrics_path))
    out_png = Path(out_png)
    with atomic_open(out_png, "wb") as handle:
        figure.savefig(handle, format="png")
    return out_png


def training_figure(rows: list[dict], source: str = "metrics") -> Figure:
    """Three panels against the optimizer step: train as a line, eval as markers when there are eval rows."""
    train = [row for row in rows if row["split"] == "train"]
    evals = [row for row in rows if row["split"] == "eval"]
    if not train:
        raise ValueError(f"{source}: no train rows to plot (is it the metrics.jsonl of a run that logged a step?)")
    figure = Figure(figsize=(15, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(PANELS)), PANELS):
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.25 ticks on short runs
        axes.plot(*_series(train, name), label="train")
        if evals:
            axes.plot(*_series(evals, name), marker="o", linestyle="none", label="eval")
        if name == "loss":
            axes.axhline(LN2, color="gray", linestyle="--", label="ln 2 (policy = reference)")
        axes.legend()
    return figure


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold `name`."""
    kept = [row for row in rows if name in row]
    return [row["step"] for row in kept], [row[name] for row in kept]


def plot_runs(run_dirs: list[str | Path], out_png: str | Path, labels: list[str] | None = None) -> Path:
    """Overlay the runs' metrics.jsonl in one PNG: a panel per metric, a colour per run (train line, eval markers).
    Labels default to the run directories' names (a sweep's point names, e.g. beta=0.1)."""
    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = {}
    for label, run_dir in zip(labels, run_dirs):
        metrics = Path(run_dir) / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run directory that logged a step?)")
        runs[label] = read_metrics(metrics)
    figure = comparison_figure(runs)
    out_png = Path(out_png)
    with atomic_open(out_png, "wb") as handle:
        figure.savefig(handle, format="png")
    return out_png


def comparison_figure(runs: dict[str, list[dict]]) -> Figure:
    figure = Figure(figsize=(5 * len(COMPARE_PANELS), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(COMPARE_PANELS)), COMPARE_PANELS):
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        for label, rows in runs.items():
            (line,) = axes.plot(*_series([r for r in rows if r["split"] == "train"], name), label=label)
            evals = [r for r in rows if r["split"] == "eval"]
            if evals:
                axes.plot(*_series(evals, name), marker="o", linestyle="none", color=line.get_color())
        if name == "loss":
            axes.axhline(LN2, color="gray", linestyle="--", linewidth=0.8)
        axes.legend(fontsize="small")
    return figure
