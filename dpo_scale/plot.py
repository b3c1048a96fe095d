"""The DPO story of a run in one PNG: loss leaving ln 2, reward accuracy rising above chance, margins growing.

Drawn with matplotlib's Agg canvas directly (no pyplot): no display is needed and no global backend is switched.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dpo_scale.io import atomic_open
from dpo_scale.tracking import read_metrics

LN2 = math.log(2)  # the DPO loss -log sigmoid(0) when the policy equals the reference (DPO eq. 7, margin 0)
PANELS = ("loss", "rewards/accuracies", "rewards/margins")  # metric names, also the panel titles


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
