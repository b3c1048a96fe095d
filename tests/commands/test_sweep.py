"""Sweep grids: keys resolved against the config, every point checked before anything runs, one run_dir per point."""

import csv
import json

import pytest
import yaml

from dpo_scale.cli import main
from dpo_scale.commands.demo import write_demo_material
from dpo_scale.commands.sweep import expand, parse_grid, summarize
from dpo_scale.config import ConfigError
from launch import base_config


BASE = {"model": {"path": "m"}, "data": {"path": "d"}, "run_dir": "runs/sweep"}


def test_grid_keys_resolve_and_points_are_the_product():
    grid = parse_grid(["beta=0.05,0.1,0.5", "optim.lr=5e-7,1e-6", "loss_type=sigmoid,ipo"])
    assert list(grid) == ["loss.beta", "optim.lr", "loss.loss_type"]
    points = expand(BASE, grid)
    assert len(points) == 12 and len({p.name for p in points}) == 12
    assert points[0].name == "beta=0.05_lr=5e-7_loss_type=sigmoid"
    assert points[-1].overrides == [
        "loss.beta=0.5", "optim.lr=1e-6", "loss.loss_type=ipo", "run_dir=runs/sweep/beta=0.5_lr=1e-6_loss_type=ipo",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "items,message",
    [
        (["path=a,b"], "ambiguous, it could be model.path, data.path"),
        (["betta=0.1"], "no such config key"),
        (["beta"], "expected key=value1,value2"),
        (["beta=0.1,0.1"], "non-empty and distinct"),
        (["beta=0.1", "loss.beta=0.2"], "loss.beta is already in the grid"),
    ],
)
def test_bad_grids_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_every_point_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="sweep point beta=-1: loss.beta=-1.0: must be positive"):
        expand(BASE, parse_grid(["beta=0.1,-1"]))


def test_print_point_gives_train_arguments(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: m}\ndata: {path: d}\nrun_dir: runs/s\n")
    args = ["sweep", "--config", str(config), "max_steps=3", "--grid", "beta=0.1,0.2", "lr=1e-6,2e-6"]
    assert main([*args, "--count"]) == 0
    assert capsys.readouterr().out == "4\n"
    assert main([*args, "--print-point", "1"]) == 0
    point = ["loss.beta=0.1", "optim.lr=2e-6", "run_dir=runs/s/beta=0.1_lr=2e-6"]
    expected = ["--config", str(config), "max_steps=3", *point]
    assert capsys.readouterr().out.splitlines() == expected
    assert main([*args, "--print-point", "4"]) == 2
    assert "the grid has points 0 to 3" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_every_point_on_this_machine(tmp_path, capfd):
    """The reference cache computed once, then two points one after another, each its own run directory with its
    own beta in the saved config, both reading that cache; then the summary."""
    material = write_demo_material(tmp_path / "demo", rows=32)
    tree = base_config(material, tmp_path / "sweep", max_steps=2)
    tree["reference"] = {"source": "cache", "cache_dir": str(tmp_path / "cache")}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["sweep", "--config", str(config), "--grid", "beta=0.1,0.5"]) == 0
    assert (tmp_path / "cache" / "manifest.json").exists()  # computed once, before the points
    for beta in ("0.1", "0.5"):
        saved = yaml.safe_load((tmp_path / "sweep" / f"beta={beta}" / "config.yaml").read_text())
        assert saved["loss"]["beta"] == float(beta)
        assert (tmp_path / "sweep" / f"beta={beta}" / "metrics.jsonl").exists()
    summary = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert sorted(row["point"] for row in summary) == ["beta=0.1", "beta=0.5"]
    assert all(row["status"] == "done" and row["steps"] == "2" for row in summary)
    losses = [float(row["final train loss"]) for row in summary]
    assert losses == sorted(losses)  # no eval: sorted by final train loss
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "sorted by final train loss" in (tmp_path / "sweep" / "summary.md").read_text()
    printed = capfd.readouterr().out
    assert printed.count("computing the reference cache") == 1
    assert printed.count(f"reference log-probs from the cache {tmp_path / 'cache'}") == 2


def test_summary_sorts_by_best_eval_loss_and_lists_missing_points(tmp_path):
    base = {**BASE, "run_dir": str(tmp_path)}
    points = expand(base, parse_grid(["beta=0.1,0.2,0.3"]))
    for point, losses in zip(points[:2], ([0.6, 0.5, 0.55], [0.65, 0.4, 0.45])):
        point.run_dir.mkdir()
        rows = [{"step": 1, "split": "train", "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0}]
        rows += [{"step": 10 * (i + 1), "split": "eval", "loss": loss, "rewards/accuracies": 1 - loss,
                  "rewards/margins": 0.1} for i, loss in enumerate(losses)]  # fmt: skip
        (point.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summarize(tmp_path, points)
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [row["point"] for row in summary] == ["beta=0.2", "beta=0.1", "beta=0.3"]
    assert [row["status"] for row in summary] == ["done", "done", "missing"]
    assert (summary[0]["best eval loss"], summary[0]["best eval loss step"]) == ("0.4", "20")
    assert summary[0]["final eval loss"] == "0.45"

