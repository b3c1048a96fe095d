"""Hyperparameter sweeps: a grid of config values expanded into points, each a training run in its own directory.

    dpo-scale sweep --config run.yaml [key=value ...] --grid beta=0.05,0.1,0.5 optim.lr=5e-7,1e-6
    dpo-scale sweep ... --count              # how many points (the size of a SLURM job array)
    dpo-scale sweep ... --print-point K      # point K's `dpo-scale train` arguments, one per line (slurm/sweep.sbatch)
    dpo-scale sweep ... --summarize          # the table and plot of the points' results (after a SLURM array)

A grid key is a dotted config key, or a field name found once in the config (beta -> loss.beta, lr -> optim.lr).
Point K is the K-th combination, the first key varying slowest; it trains in run_dir/<name=value_...>. Every point
is checked (built as a config) before anything runs. The points share everything else, e.g. one reference cache,
and one token store (under the cache root, data/cache.py, or data.cache_dir): the first point builds it.
After a local run, or with --summarize, run_dir/summary.csv and summary.md hold each point's final and best metrics,
best first, and run_dir/sweep.png overlays the points' curves.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
import subprocess
import sys
import typing
from pathlib import Path

from dpo_scale.config import ConfigError, TrainConfig, build, merge, parse_overrides
from dpo_scale.io import atomic_open
from dpo_scale.training.tracking import read_metrics


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    """Directory name under the sweep's run_dir, e.g. `beta=0.1_lr=1e-06`."""
    overrides: list[str]
    """`key=value` for this point's grid values and its run_dir."""
    run_dir: Path


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, sections included as their leaves."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _resolve(key: str, known: list[str]) -> str:
    if key in known:
        return key
    matches = [k for k in known if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"--grid {key}: ambiguous, it could be {', '.join(matches)}; write the dotted key")
    raise ConfigError(f"--grid {key}: no such config key (e.g. loss.beta, optim.lr, loss.loss_type)")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["beta=0.05,0.1", "optim.lr=1e-6"]` -> `{"loss.beta": ["0.05", "0.1"], "optim.lr": ["1e-6"]}`."""
    known = config_keys()
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected key=value1,value2,... e.g. loss.beta=0.05,0.1")
        full = _resolve(key, known)
        if full in grid:
            raise ConfigError(f"--grid {item!r}: {full} is already in the grid")
        grid[full] = [value.strip() for value in values.split(",")]
        if "" in grid[full] or len(set(grid[full])) != len(grid[full]):
            raise ConfigError(f"--grid {item!r}: values must be non-empty and distinct")
    if not grid:
        raise ConfigError("--grid: give at least one key=value1,value2,...")
    return grid


def expand(tree: dict, grid: dict[str, list[str]]) -> list[Point]:
    """Every combination as a Point, each checked by building its TrainConfig (errors name the point)."""
    base = build(TrainConfig, tree)
    leaves = [key.rsplit(".", 1)[-1] for key in grid]
    labels = leaves if len(set(leaves)) == len(leaves) else list(grid)
    points = []
    for values in itertools.product(*grid.values()):
        name = "_".join(f"{label}={value}" for label, value in zip(labels, values)).replace("/", "-")
        overrides = [f"{key}={value}" for key, value in zip(grid, values)]
        run_dir = Path(base.run_dir) / name
        overrides.append(f"run_dir={run_dir}")
        try:
            build(TrainConfig, merge(tree, parse_overrides(overrides)))
        except ConfigError as error:
            raise ConfigError(f"sweep point {name}: {error}") from None
        points.append(Point(name, overrides, run_dir))
    return points


def train_arguments(config_path: str | None, overrides: list[str], point: Point) -> list[str]:
    """The `dpo-scale train` arguments that run `point`: the sweep's own config and overrides, then the point's."""
    return (["--config", config_path] if config_path else []) + overrides + point.overrides


def run_points(config_path: str | None, overrides: list[str], points: list[Point], cache_dir: str | None) -> None:
    """One after another on this machine, each as its own `dpo-scale train` process (a fresh DeepSpeed state).
    A reference cache the points read (`cache_dir`) that is not complete yet is computed first, once."""
    arguments = (["--config", config_path] if config_path else []) + overrides
    if cache_dir and not (Path(cache_dir) / "manifest.json").exists():
        print(f"sweep: computing the reference cache {cache_dir} once for all points", flush=True)
        status = subprocess.run([sys.executable, "-m", "dpo_scale.cli", "precompute-ref", *arguments]).returncode
        if status != 0:
            raise SystemExit(f"sweep: the reference precompute failed (exit {status})")
    for number, point in enumerate(points):
        print(f"sweep point {number + 1}/{len(points)}: {point.name}", flush=True)
        command = [sys.executable, "-m", "dpo_scale.cli", "train", *train_arguments(config_path, overrides, point)]
        status = subprocess.run(command).returncode
        if status != 0:
            raise SystemExit(f"sweep point {point.name} failed (exit {status}); fix it and rerun the sweep: finished "
                             "points resume from their last checkpoint and end at once")


SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def summarize(base_run_dir: str | Path, points: list[Point]) -> list[Path]:
    """summary.csv, summary.md and sweep.png in the sweep's run_dir; returns their paths.

    Per point: the last logged step, the final train and eval metrics, and the best eval loss and accuracy with
    their steps. Sorted by best eval loss (by final train loss when nothing was evaluated); points without
    metrics are listed last as missing, not dropped."""
    from dpo_scale.training.plot import plot_runs

    rows = [_point_row(point) for point in points]
    has_eval = any(row.get("best eval loss") is not None for row in rows)
    key = "best eval loss" if has_eval else "final train loss"
    rows.sort(key=lambda row: (row["status"] != "done", math.inf if row.get(key) is None else row[key]))
    columns = [c for c in dict.fromkeys(c for row in rows for c in row) if any(row.get(c) is not None for row in rows)]
    base = Path(base_run_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(base / "summary.csv") as handle:
        handle.write(text.getvalue())
    lines = [f"Sweep of {len(points)} points, sorted by {key} (lower first).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]  # fmt: skip
    lines += ["| " + " | ".join(_format(row.get(column)) for column in columns) + " |" for row in rows]
    with atomic_open(base / "summary.md") as handle:
        handle.write("\n".join(lines) + "\n")
    done = [point for point in points if (point.run_dir / "metrics.jsonl").is_file()]
    written = [base / "summary.csv", base / "summary.md"]
    if done:
        written.append(plot_runs([p.run_dir for p in done], base / "sweep.png", [p.name for p in done]))
    return written


def _point_row(point: Point) -> dict:
    row: dict = {"point": point.name}
    metrics = point.run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    row["status"] = "done" if train else "missing"
    row["steps"] = train[-1]["step"] if train else None
    for prefix, rows in (("final train", train), ("final eval", evals)):
        for name in SUMMARY_METRICS:
            row[f"{prefix} {name.removeprefix('rewards/')}"] = rows[-1].get(name) if rows else None
    best_loss = min(evals, key=lambda r: r["loss"]) if evals else None
    best_accuracy = max(evals, key=lambda r: r["rewards/accuracies"]) if evals else None
    row["best eval loss"] = best_loss["loss"] if best_loss else None
    row["best eval loss step"] = best_loss["step"] if best_loss else None
    row["best eval accuracies"] = best_accuracy["rewards/accuracies"] if best_accuracy else None
    row["best eval accuracies step"] = best_accuracy["step"] if best_accuracy else None
    return row


def _format(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
