"""Token-budgeted micro-batches train exactly as fixed ones: 1 process with micro_batch_size=4 and
gradient_accumulation_steps=2 against 2 ranks with micro_batch_tokens and global_batch_size=8, over 8 steps of real
HH-RLHF pairs of unequal length under the real stories260K (so the budget's micro-batch counts differ between steps
and between ranks' neighbours): losses, final weights and Adam's moments, for every reference source, LoRA, a loss
with an SFT term and WPO weighting, ZeRO-2, ZeRO-3 with offload, ZeRO-3 with SP 2 x DP 2 on 4 ranks, and a resume of a budgeted 2-rank run as one
process with another budget. The launches are shared (one module fixture) and marked slow."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from dpo_scale.ds_config import DS_CONFIGS
from launch import adam_moments, base_config, final_weights, precompute, train, train_metrics
from tiny import shared_path

STEPS = 8
BUDGET = 1024
"""Positions per rank: 4 pairs of these run 850-2,000 positions, so a replica runs 1 to 3 micro-batches a step."""


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _material(root: Path) -> tuple[Path, Path]:
    """stories260K and the first 120 rows of HH-RLHF helpful-base (97 pairs at max_length 512: 83 to 858 tokens)."""
    model = shared_path("models", "stories260K")
    source = shared_path("preferences", "hh-rlhf", "helpful-base", "test.jsonl.gz")
    data = root / "hh.jsonl"
    with gzip.open(source, "rt") as rows:
        data.write_text("".join(itertools.islice(rows, 120)))
    return model, data


def _tree(material, run_dir: Path, budget: int | None, **sections) -> dict:
    """8 steps of 8 pairs; lr 1e-4 keeps Adam's amplification of fp32 order noise far below the tolerance
    (tests/distributed/test_sequence_parallel.py, _tree). Evaluation every 4 steps on 15% held out."""
    split = {"micro_batch_tokens": budget} if budget else {"micro_batch_size": 4, "gradient_accumulation_steps": 2}
    tree = base_config(material, run_dir, global_batch_size=8, max_steps=STEPS, optim={"lr": 1e-4, "warmup_steps": 2},
                       checkpoint={"every": 4}, eval={"every": 4, "fraction": 0.15}, **split)  # fmt: skip
    tree["data"]["max_length"] = 512
    tree.update(sections)
    if budget is None:
        del tree["global_batch_size"]
    return tree


SETTINGS = {
    "copy": {},
    "cache": "the precomputed cache (filled in by the fixture)",
    "nf4_sft_wpo": {"reference": {"source": "nf4"},
                    "loss": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "use_weighting": True}},
    "lora": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}, "reference": {"source": "lora"}},
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    material = _material(root)
    cache = root / "cache"
    _ok(precompute(_tree(material, root / "precompute", None, reference={"cache_dir": str(cache)}), ranks=1))
    settings = {**SETTINGS, "cache": {"reference": {"source": "cache", "cache_dir": str(cache)}}}
    done = {}
    for name, sections in settings.items():
        if name != "cache":  # the cache holds the frozen copy's log-probs: its fixed side is the copy's
            _ok(train(_tree(material, root / f"{name}-fixed", None, **sections), ranks=1, timeout=600))
        budgeted = root / f"{name}-budget"
        _ok(train(_tree(material, budgeted, BUDGET, **sections), ranks=2, timeout=600))
    done_dirs = {name: (root / f"{'copy' if name == 'cache' else name}-fixed", root / f"{name}-budget")
                 for name in settings}  # fmt: skip
    # the other ZeRO stages: 2, and 3 with optimizer and parameters offloaded to the CPU (with torch's AdamW, as in
    # tests/training/test_checkpoint.py: DeepSpeedCPUAdam's C++ build would cost CI a minute)
    offload = json.loads((DS_CONFIGS / "zero3_offload.json").read_text())
    offload["optimizer"]["params"]["torch_adam"] = True
    (root / "zero3_offload.json").write_text(json.dumps(offload))
    for name, ds_config in (("zero2", "zero2"), ("zero3_offload", str(root / "zero3_offload.json"))):
        _ok(train(_tree(material, root / f"{name}-budget", BUDGET, deepspeed={"config": ds_config}), ranks=2,
                  timeout=600))  # fmt: skip
        done_dirs[name] = (root / "copy-fixed", root / f"{name}-budget")
    sliced = root / "copy-budget-sp2"
    _ok(train(_tree(material, sliced, BUDGET // 2, sequence_parallel_size=2), ranks=4, timeout=600))
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "copy-budget" / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    (resumed / "checkpoints" / "latest").write_text("step-00000004\n")
    resume = train(_tree(material, resumed, 1536), ranks=1, timeout=600)
    _ok(resume)
    done.update(dirs=done_dirs, sliced=sliced, resumed=(resumed, resume.stdout))
    return done


def _assert_close_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], together: float = 1e-5) -> None:
    """Weights, or Adam's first or second moments: over all of them together within 1e-5 relative (the norm of the
    difference over the norm), and each tensor within 1e-4 of its own largest value. fp32 sums in another order
    set the floor: the shipped fixed split, 1 process x 2 accumulations against 2 ranks x 1, differs by 7.6e-6
    (first moments, together) and by up to 4.1e-5 of a tensor's largest value (a layer norm's first moment, whose
    gradient is a sum of cancelling terms; LoRA's B, all of whose value is updates, alike). A micro-batch counted
    twice, a loss divided by its own pairs instead of the step's, or DeepSpeed's averaging left in is off by 10% or
    more."""
    assert set(got) == set(want) and want
    for name in want:
        scale = max(want[name].abs().max().item(), 1e-30)
        assert (got[name] - want[name]).abs().max().item() <= 1e-4 * scale, name
    difference = torch.cat([(got[name] - want[name]).flatten() for name in want]).norm()
    assert difference <= together * torch.cat([want[name].flatten() for name in want]).norm()


def _assert_close_state(got_dir: Path, want_dir: Path, together: float = 1e-5) -> None:
    _assert_close_tensors(final_weights(got_dir, STEPS), final_weights(want_dir, STEPS), together)
    got, want = adam_moments(got_dir, STEPS), adam_moments(want_dir, STEPS)
    for moment in ("exp_avg", "exp_avg_sq"):
        names = [name for name in want if name.endswith(moment)]
        _assert_close_tensors({name: got[name] for name in names}, {name: want[name] for name in names}, together)


def _assert_same_training(fixed_dir: Path, budget_dir: Path, together: float = 1e-5) -> None:
    fixed, budget = train_metrics(fixed_dir), train_metrics(budget_dir)
    assert [r["step"] for r in budget] == list(range(1, STEPS + 1)) and [r["pairs"] for r in budget] == [8.0] * STEPS
    assert [r["loss"] for r in budget] == pytest.approx([r["loss"] for r in fixed], rel=1e-5, abs=1e-5)
    assert len({round(r["loss"], 5) for r in fixed}) > 2  # the weights did move
    assert [r["logps/chosen"] for r in budget] == pytest.approx([r["logps/chosen"] for r in fixed], rel=1e-5)
    # a margin is beta x a difference of log-prob sums of hundreds of nats: fp32 order noise of those sums (~1e-5
    # nats seen) is its absolute error, not a relative one
    margins = [r["rewards/margins"] for r in fixed]
    assert [r["rewards/margins"] for r in budget] == pytest.approx(margins, abs=1e-4)
    evaluated, fixed_eval = train_metrics(budget_dir, "eval"), train_metrics(fixed_dir, "eval")
    assert [r["step"] for r in evaluated] == [4, 8] and [r["pairs"] for r in evaluated] == [r["pairs"] for r in fixed_eval]
    assert [r["loss"] for r in evaluated] == pytest.approx([r["loss"] for r in fixed_eval], rel=1e-5)
    _assert_close_state(budget_dir, fixed_dir, together)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_token_budget_trains_as_fixed_micro_batches(runs, setting):
    fixed_dir, budget_dir = runs["dirs"][setting]
    _assert_same_training(fixed_dir, budget_dir)
    counts = [r["micro_batches"] for r in train_metrics(budget_dir)]
    assert len(set(counts)) > 1, counts  # the steps' micro-batch counts differ: the split follows the tokens
    assert [r["micro_batches"] for r in train_metrics(fixed_dir)] == [2.0] * STEPS
    for row in train_metrics(budget_dir):
        assert row["balance"] >= 1.0 and row["tokens_per_second"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3_offload"])
def test_a_token_budget_trains_as_fixed_micro_batches_under_other_zero_stages(runs, stage):
    """The loop's accumulation boundary and loss share hold where DeepSpeed reduces differently: ZeRO-2 (gradients
    partitioned as they are reduced) and ZeRO-3 with offload (gradients accumulated on the CPU), against the one
    process without ZeRO."""
    _assert_same_training(*runs["dirs"][stage])


@pytest.mark.slow
def test_sequence_parallel_groups_under_a_budget_train_as_fixed_micro_batches(runs):
    """4 ranks as SP 2 x DP 2, micro_batch_tokens 512 per rank (1,024 per group), against the one process. The
    groups attend through the dense mask over gathered rows (the one process: per unit), another kernel's fp32
    rounding: the moments together within 5e-5 (1.6e-5 seen for the first moments)."""
    _assert_same_training(runs["dirs"]["copy"][0], runs["sliced"], together=5e-5)


@pytest.mark.slow
def test_a_budgeted_run_resumes_as_one_process_with_another_budget(runs):
    """Saved at step 4 by 2 ranks under 1,024 positions, resumed by one process under 1,536: steps 5-8 and the
    final state are the uninterrupted run's (the plan is a function of seed, step, world and budget)."""
    resumed, log = runs["resumed"]
    assert "resumed from" in log and "at step 4" in log
    straight = runs["dirs"]["copy"][1]
    rows = train_metrics(resumed)
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in train_metrics(straight)][4:], rel=1e-5,
                                                      abs=1e-5)  # fmt: skip
    _assert_close_state(resumed, straight)
