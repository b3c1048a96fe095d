"""Failure-sign warnings: each fires on its pattern, once, and stays quiet on a healthy run."""

from pathlib import Path

import pytest

from dpo_scale.commands.demo import write_demo_material
from dpo_scale.training.failure_signs import FailureSigns
from launch import base_config, train, train_metrics


def _metrics(chosen=-10.0, margin=0.0, accuracy=0.5):
    return {"logps/chosen": chosen, "rewards/margins": margin, "rewards/accuracies": accuracy}


def test_chosen_falling_while_margin_rises_warns_once():
    signs = FailureSigns()
    assert signs.train(1, _metrics(), 8) == []
    assert signs.train(2, _metrics(chosen=-10.5, margin=0.3), 400) == []  # fell, but by less than a nat
    [warning] = signs.train(3, _metrics(chosen=-12.0, margin=0.5), 500)
    assert "chosen log-probs fell from -10.00 to -12.00 while the margin rose from 0.000 to 0.500" in warning
    assert signs.train(4, _metrics(chosen=-13.0, margin=0.9), 600) == []  # once
    assert FailureSigns().train(1, _metrics(), 8) == [] and FailureSigns().train(9, _metrics(chosen=-15.0), 900) == []
    long_answers = FailureSigns()  # 10% of 80 nats: a fall of 5 is within what healthy runs show
    long_answers.train(1, _metrics(chosen=-80.0), 8)
    assert long_answers.train(9, _metrics(chosen=-85.0, margin=0.4), 900) == []
    assert "fell from -80.00 to -90.00" in long_answers.train(10, _metrics(chosen=-90.0, margin=0.5), 1000)[0]


def test_perfect_accuracy_early_warns_but_not_late():
    early = FailureSigns()
    [warning] = early.train(2, _metrics(accuracy=1.0), 64)
    assert "accuracy is 1.00 after only 64 pairs" in warning
    late = FailureSigns()
    late.train(1, _metrics(), 8)
    assert late.train(40, _metrics(accuracy=1.0), 1280) == []


def test_diversity_collapse_warns():
    signs = FailureSigns()
    assert signs.eval(10, {"loss": 0.6}) == []  # no generations logged: nothing to judge
    assert signs.eval(10, {"generations/distinct_2": 0.8}) == []
    assert signs.eval(20, {"generations/distinct_2": 0.5}) == []
    [warning] = signs.eval(30, {"generations/distinct_2": 0.3})
    assert "distinct-2 fell from 0.800 to 0.300" in warning


@pytest.mark.slow
def test_two_rank_run_logs_generation_diversity_and_warns_on_easy_pairs(tmp_path):
    """ZeRO-3 generation on 2 ranks at each eval (collective: both ranks sample 3 prompts); the demo's pairs are
    easy, so a high learning rate reaches accuracy 1.0 within the first pairs and the run says so."""
    material = write_demo_material(tmp_path / "demo", rows=96)
    tree = base_config(material, tmp_path / "run", max_steps=6, micro_batch_size=2)
    tree["optim"]["lr"] = 0.01
    tree["eval"] = {"every": 3, "fraction": 0.25, "generate_prompts": 6, "generate_max_new_tokens": 8}
    shared_memory = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    result = train(tree, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_memory  # no buffer left behind
    evals = train_metrics(tmp_path / "run", split="eval")
    assert [row["step"] for row in evals] == [3, 6]
    for row in evals:
        assert 0 < row["generations/distinct_2"] <= 1 and 1 <= row["generations/mean_length"] <= 8
    assert result.stdout.count("training reward accuracy is 1.00 after only") == 1  # once, from rank 0
