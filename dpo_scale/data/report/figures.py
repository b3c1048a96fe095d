"""The report's PNGs, drawn on matplotlib's Agg canvas directly (no pyplot, no display) and written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpo_scale.data.report.scan import PairTable
from dpo_scale.data.report.stats import SIDES
from dpo_scale.io import atomic_open


def _save(figure: Figure, path: Path) -> str:
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")
    return path.name


def _figure(panels: int) -> tuple[Figure, list]:
    figure = Figure(figsize=(5 * panels, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels)
    return figure, list(np.atleast_1d(axes))


def draw(table: PairTable, margins: tuple[np.ndarray, np.ndarray] | None, out: Path) -> list[str]:
    """lengths.png, length_ratio.png and, with reference log-probs, margins.png; returns the file names."""
    figure, axes = _figure(3)
    for ax, side, values in zip(axes, SIDES, table.lengths.T):
        ax.hist(values, bins=60, log=True)
        ax.set_title(f"{side} tokens")
        ax.set_xlabel("tokens")
        ax.set_ylabel("pairs")
    names = [_save(figure, out / "lengths.png")]

    figure, (ax,) = _figure(1)
    ratio = np.log2(np.maximum(table.lengths[:, 1], 1) / np.maximum(table.lengths[:, 2], 1))
    ax.hist(ratio, bins=80, log=True)
    ax.axvline(0, color="gray", linestyle="--")
    ax.set_title("log2(chosen tokens / rejected tokens): right of 0, chosen is longer")
    ax.set_ylabel("pairs")
    names.append(_save(figure, out / "length_ratio.png"))

    if margins is not None:
        chosen, rejected = margins
        figure, axes = _figure(2)
        per_token = chosen / np.maximum(table.lengths[:, 1], 1) - rejected / np.maximum(table.lengths[:, 2], 1)
        for ax, values, title in zip(axes, (chosen - rejected, per_token), ("reference margin", "margin per token")):
            ax.hist(values, bins=80, log=True)
            ax.axvline(0, color="gray", linestyle="--")
            ax.set_title(f"{title}: log p(chosen) - log p(rejected)")
            ax.set_ylabel("pairs")
        names.append(_save(figure, out / "margins.png"))
    return names
