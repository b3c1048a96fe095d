"""Hyperparameter sweeps: a grid of config values expanded into points, each a training run in its own directory.

    dpo-scale sweep --config run.yaml [key=value ...] --grid beta=0.05,0.1,0.5 optim.lr=5e-7,1e-6
    dpo-scale sweep ... --count              # how many points (the size of a SLURM job array)
    dpo-scale sweep ... --print-point K      # point K's `dpo-scale train` arguments, one per line (slurm/sweep.sbatch)

A grid key is a dotted config key, or a field name found once in the config (beta -> loss.beta, lr -> optim.lr).
Point K is the K-th combination, the first key varying slowest; it trains in run_dir/<name=value_...>. Every point
is checked (built as a config) before anything runs. The points share everything else, e.g. one reference cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import typing
from pathlib import Path

from dpo_scale.config import ConfigError, TrainConfig, build, merge, parse_overrides


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    """Directory name under the sweep's run_dir, e.g. `beta=0.1_lr=1e-06`."""
    overrides: list[str]
    """`key=value` for this point's grid values and its run_dir."""


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
        overrides.append(f"run_dir={Path(base.run_dir) / name}")
        try:
            build(TrainConfig, merge(tree, parse_overrides(overrides)))
        except ConfigError as error:
            raise ConfigError(f"sweep point {name}: {error}") from None
        points.append(Point(name, overrides))
    return points


def train_arguments(config_path: str | None, overrides: list[str], point: Point) -> list[str]:
    """The `dpo-scale train` arguments that run `point`: the sweep's own config and overrides, then the point's."""
    return (["--config", config_path] if config_path else []) + overrides + point.overrides


def run_points(config_path: str | None, overrides: list[str], points: list[Point]) -> None:
    """One after another on this machine, each as its own `dpo-scale train` process (a fresh DeepSpeed state)."""
    for number, point in enumerate(points):
        print(f"sweep point {number + 1}/{len(points)}: {point.name}", flush=True)
        command = [sys.executable, "-m", "dpo_scale.cli", "train", *train_arguments(config_path, overrides, point)]
        status = subprocess.run(command).returncode
        if status != 0:
            raise SystemExit(f"sweep point {point.name} failed (exit {status}); fix it and rerun the sweep: finished "
                             "points resume from their last checkpoint and end at once")
