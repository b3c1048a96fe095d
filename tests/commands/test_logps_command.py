"""`dpo-scale logps` under `batch_tokens`: the same values as fixed batches, in input order; a pair over the budget
refused in one line; the key its own, not training's micro_batch_tokens. (The command's other behaviour is tested in
tests/test_cli.py.)"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from dpo_scale.cli import main
from dpo_scale.config import ConfigError, DataConfig, LogpsConfig, LogpsRunConfig, ModelConfig, build
from dpo_scale.data import load_tokenizer, prepare
from dpo_scale.model.layout import layout_positions
from dpo_scale.training.batch_plan import forward_batches
from launch import DPO_SCALE
from uneven_pairs import write_uneven_material


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_uneven_material(tmp_path_factory.mktemp("demo"), rows=40)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_batch_tokens_gives_the_values_of_fixed_batches_in_input_order(material, tmp_path):
    """Forwards of as many consecutive pairs as fit 40 positions (1 to 2 of these, unpacked so that padding varies
    with the batch) against fixed forwards of 8: every row the same, in order, the sums within fp32 rounding (1e-5);
    the positions computed are those of the budget's batches, as the layout counts them."""
    model_dir, data_path = material
    common = [DPO_SCALE, "logps", "--model", str(model_dir), "--data", str(data_path), "logps.packing=false"]
    printed = {}
    for name, options in {"fixed": ["batch_size=8"], "budget": ["batch_tokens=40", "batch_size=8"]}.items():
        result = subprocess.run([*common, "--out", str(tmp_path / f"{name}.jsonl"), *options], capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        printed[name] = result.stdout
    fixed, budget = _records(tmp_path / "fixed.jsonl"), _records(tmp_path / "budget.jsonl")
    assert [r["index"] for r in budget] == [r["index"] for r in fixed] == list(range(40))
    for a, b in zip(fixed, budget, strict=True):
        assert (a["chosen_tokens"], a["rejected_tokens"]) == (b["chosen_tokens"], b["rejected_tokens"])
        assert b["chosen_logps"] == pytest.approx(a["chosen_logps"], abs=1e-5)
        assert b["rejected_logps"] == pytest.approx(a["rejected_logps"], abs=1e-5)
    config = LogpsConfig(packing=False)
    lengths = prepare(DataConfig(path=str(data_path)), load_tokenizer(str(model_dir))).pair_lengths()
    batches = forward_batches(lengths, 40, config, max_pairs=8)
    positions = sum(layout_positions([tuple(row) for row in lengths[batch].tolist()], config) for batch in batches)
    assert f"{positions} tokens computed" in printed["budget"] and f"{positions} tokens" not in printed["fixed"]


@pytest.mark.slow
def test_a_pair_over_batch_tokens_is_refused_in_one_line(material, tmp_path):
    model_dir, data_path = material
    out = tmp_path / "logps.jsonl"
    result = subprocess.run([DPO_SCALE, "logps", "--model", str(model_dir), "--data", str(data_path), "--out",
                             str(out), "batch_tokens=20"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "of 40 pairs need more than batch_tokens=20 positions on their own (the longest 34, as the layout computes "
        "them): raise batch_tokens to 34 or more, or lower data.max_length"
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()


def test_micro_batch_tokens_of_a_training_config_is_not_the_logps_budget(material, tmp_path):
    """logps reads a training config's model, data and logps sections only: its micro_batch_tokens (training's
    per-rank budget, far too small here) is left alone; the command's own key is batch_tokens."""
    model_dir, data_path = material
    training = tmp_path / "run.yaml"
    training.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": {"path": str(data_path)},
                                        "run_dir": str(tmp_path / "run"), "micro_batch_tokens": 4,
                                        "global_batch_size": 8}))  # fmt: skip
    assert main(["logps", "--config", str(training), "--out", str(tmp_path / "a.jsonl")]) == 0
    assert len(_records(tmp_path / "a.jsonl")) == 40


def test_batch_tokens_must_be_positive():
    with pytest.raises(ConfigError, match=r"^batch_tokens=0: must be at least 1"):
        build(LogpsRunConfig, {"model": {"path": "m"}, "data": {"path": "d"}, "out": "o", "batch_tokens": 0})
    assert LogpsRunConfig(ModelConfig("m"), DataConfig("d"), "o").batch_tokens is None
