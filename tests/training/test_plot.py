"""The training PNG: written whole, three panels holding the logged numbers, the ln 2 line, a clear error without
train rows."""

from __future__ import annotations

import json
import math
import struct

import pytest

from dpo_scale.training.plot import comparison_figure, plot_runs, plot_training, training_figure
from dpo_scale.training.tracking import read_metrics

TRAIN = [
    {"step": 1, "split": "train", "loss": 0.6931, "rewards/accuracies": 0.5, "rewards/margins": 0.0},
    {"step": 2, "split": "train", "loss": 0.65, "rewards/accuracies": 0.625, "rewards/margins": 0.1},
    {"step": 3, "split": "train", "loss": 0.6, "rewards/accuracies": 0.75, "rewards/margins": 0.25},
]
EVAL = [{"step": 2, "split": "eval", "loss": 0.67, "rewards/accuracies": 0.55, "rewards/margins": 0.05}]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_png_is_written_whole(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", TRAIN + EVAL)
    out = plot_training(metrics, tmp_path / "plots" / "training.png")

    assert out == tmp_path / "plots" / "training.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk: figsize (15, 4) inches at 100 dpi
    assert (width, height) == (1500, 400)
    assert 20_000 < len(data) < 500_000
    assert [p.name for p in out.parent.iterdir()] == ["training.png"]  # no temporary file left beside it


def test_panels_hold_the_logged_numbers():
    figure = training_figure(TRAIN + EVAL)
    loss, accuracy, margin = figure.axes

    assert [axes.get_title() for axes in figure.axes] == ["loss", "rewards/accuracies", "rewards/margins"]
    train_line, eval_markers, ln2_line = loss.get_lines()
    assert list(train_line.get_xdata()) == [1, 2, 3]
    assert list(train_line.get_ydata()) == [0.6931, 0.65, 0.6]
    assert (list(eval_markers.get_xdata()), list(eval_markers.get_ydata())) == ([2], [0.67])
    assert (eval_markers.get_marker(), eval_markers.get_linestyle()) == ("o", "None")
    assert ln2_line.get_label() == "ln 2 (policy = reference)"
    assert ln2_line.get_linestyle() == "--"
    assert list(ln2_line.get_ydata()) == [math.log(2), math.log(2)]  # 0.693147...
    assert list(accuracy.get_lines()[0].get_ydata()) == [0.5, 0.625, 0.75]
    assert list(accuracy.get_lines()[1].get_ydata()) == [0.55]
    assert list(margin.get_lines()[0].get_ydata()) == [0.0, 0.1, 0.25]
    assert list(margin.get_lines()[1].get_ydata()) == [0.05]


def test_without_eval_rows_each_panel_has_only_the_train_line():
    figure = training_figure(TRAIN)
    assert [len(axes.get_lines()) for axes in figure.axes] == [2, 1, 1]  # train on all three, ln 2 on the loss


def test_no_train_rows_is_a_clear_error(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", EVAL)
    with pytest.raises(ValueError, match="metrics.jsonl: no train rows to plot"):
        plot_training(metrics, tmp_path / "training.png")
    assert not (tmp_path / "training.png").exists()
    assert read_metrics(metrics) == EVAL


def test_runs_overlay_one_colour_per_run(tmp_path):
    for name, shift in (("beta=0.1", 0.0), ("beta=0.5", 0.1)):
        rows = [{**row, "loss": row["loss"] + shift, "rewards/chosen": 0.1, "rewards/rejected": -0.1} for row in TRAIN]
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "metrics.jsonl", rows + EVAL)
    out = plot_runs([tmp_path / "beta=0.1", tmp_path / "beta=0.5"], tmp_path / "compare.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = comparison_figure({"a": TRAIN + EVAL, "b": TRAIN})
    assert [axes.get_title() for axes in figure.axes] == [
        "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"
    ]  # fmt: skip
    loss = figure.axes[0]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["a", "b"]
    a_train, a_eval, b_train, _ln2 = loss.get_lines()
    assert a_eval.get_color() == a_train.get_color() != b_train.get_color()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "x.png")
