"""The micro-batch plan under a token budget: every pair of the step once, every micro-batch within the budget as the
layout counts it, equal counts on every replica, the same plan in every process; the refusal of a pair too long for
the budget; and the configuration that selects it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpo_scale.config import ConfigError, LogpsConfig, TrainConfig, build
from dpo_scale.data.pairs import Pair, lengths_of
from dpo_scale.loss import sft_loss
from dpo_scale.model.layout import collate, layout_positions
from dpo_scale.training.batch_plan import CostModel, FixedCount, TokenBudget, check_pairs_fit, scored_chosen_tokens
from dpo_scale.training.sampler import StepSampler

LAYOUTS = {
    "prefix_shared_packed": LogpsConfig(),
    "prefix_shared": LogpsConfig(packing=False),
    "padded": LogpsConfig(prefix_sharing=False, packing=False),
    "packed": LogpsConfig(prefix_sharing=False),
    "packed_to_length": LogpsConfig(pack_length=700),
}


def _long_tailed_lengths(count: int, seed: int = 0) -> np.ndarray:
    """(count, 3) prompt / chosen / rejected lengths, log-normal like preference data (p50 ~250, a tail past 1,500)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal([4.5, 4.0, 4.0], 0.8, size=(count, 3))).astype(np.int64)
    return np.clip(lengths, 1, 900)


def _pairs(lengths: np.ndarray) -> list[Pair]:
    return [Pair(i, f"row {i}", [5] * p, [6] * c, [7] * r) for i, (p, c, r) in enumerate(lengths.tolist())]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_layout_positions_count_what_collate_lays_out(layout, multiple):
    """The budget counts positions from lengths alone; collate builds the rows: the two agree for every layout."""
    lengths = _long_tailed_lengths(40, seed=multiple)
    for start, size in ((0, 1), (1, 3), (4, 9), (13, 27)):
        chunk = lengths[start : start + size]
        batch = collate(_pairs(chunk), LAYOUTS[layout], pad_token_id=0, length_multiple=multiple)
        assert layout_positions([tuple(r) for r in chunk.tolist()], LAYOUTS[layout], multiple) == batch.tokens


@pytest.mark.parametrize("layout", ["prefix_shared_packed", "padded", "packed"])
@pytest.mark.parametrize("replicas, sp, budget", [(1, 1, 3000), (2, 1, 2500), (4, 2, 1000), (8, 1, 6000)])
def test_every_pair_once_within_budget_with_equal_counts(layout, replicas, sp, budget):
    config = LAYOUTS[layout]
    lengths = _long_tailed_lengths(500)
    sampler = StepSampler(len(lengths), 64, seed=3)
    multiple = sp
    check_pairs_fit(lengths, budget, config, multiple, sp)
    planner = TokenBudget(lengths, budget, replicas, config, multiple, sp, CostModel(1e-4), sampler)
    counts = set()
    for step in range(sampler.steps_per_epoch):
        plan = planner.plan(step)
        drawn = sampler.step_pairs(step)
        placed = [i for replica in plan.micro_batches for micro in replica for i in micro]
        assert sorted(placed) == sorted(drawn) and plan.num_pairs == len(drawn) == 64
        assert len({len(replica) for replica in plan.micro_batches}) == 1 and len(plan.micro_batches) == replicas
        for replica in plan.micro_batches:
            for micro in replica:
                if micro:  # positions per rank: the group's over SP, rows padded to the SP multiple
                    positions = collate(_pairs(lengths[micro]), config, 0, multiple).tokens
                    assert positions / sp <= budget
        assert plan.costs.shape == (plan.rounds, replicas) and plan.balance >= 1.0
        # one round fewer does not fit: a pair finds no room, or a micro-batch laid out goes past the budget
        if plan.rounds > 1:
            longest_first = sorted(drawn, key=lambda i: -planner._costs[i])
            assert planner._fill_rounds(np.asarray(longest_first), plan.rounds - 1) is None
        counts.add(plan.rounds)
    assert len(counts) > 1 or replicas == 8  # the count of micro-batches follows the step's tokens


def test_the_plan_is_the_same_in_another_process():
    """Every rank computes the plan alone: a fresh interpreter (its own hash seed) gets the same micro-batches."""
    code = (
        "import json, sys, numpy as np\n"
        "from dpo_scale.config import LogpsConfig\n"
        "from dpo_scale.training.batch_plan import CostModel, TokenBudget\n"
        "from dpo_scale.training.sampler import StepSampler\n"
        "lengths = np.array(json.loads(sys.stdin.read()), np.int64)\n"
        "planner = TokenBudget(lengths, 2500, 4, LogpsConfig(), 1, 1, CostModel(1e-4),\n"
        "                      StepSampler(len(lengths), 64, 3))\n"
        "print(json.dumps([planner.plan(s).micro_batches for s in range(7)]))\n"
    )
    lengths = _long_tailed_lengths(500)
    here = TokenBudget(lengths, 2500, 4, LogpsConfig(), 1, 1, CostModel(1e-4), StepSampler(500, 64, 3))
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(lengths.tolist()), capture_output=True,
                            text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})  # fmt: skip
    assert json.loads(result.stdout) == [here.plan(s).micro_batches for s in range(7)]


def test_balance_beats_a_fixed_count_on_the_same_draws():
    """At 8 replicas and 256 pairs a step, a fixed 4 pairs per micro-batch leaves the most loaded replica far above
    the mean; the budget's split brings every step within 10% (the counted costs of the same pairs)."""
    lengths = _long_tailed_lengths(4096)
    sampler = StepSampler(len(lengths), 256, seed=0)
    cost = CostModel(1e-4)
    fixed = FixedCount(lengths, 4, 8, LogpsConfig(), cost, sampler)
    budget = TokenBudget(lengths, 8192, 8, LogpsConfig(), 1, 1, cost, sampler)
    fixed_balance = [fixed.plan(s).balance for s in range(8)]
    budget_balance = [budget.plan(s).balance for s in range(8)]
    assert min(fixed_balance) > 1.3 and max(budget_balance) < 1.1


def test_a_step_with_fewer_pairs_than_micro_batches_leaves_some_empty():
    """One long pair needs a micro-batch to itself; the replicas still run as many micro-batches each."""
    lengths = np.array([[400, 300, 290], [5, 5, 5], [5, 5, 5]], np.int64)
    planner = TokenBudget(lengths, 1000, 2, LogpsConfig(), 1, 1, CostModel(0.0))
    plan = planner.split([0, 1, 2])
    assert plan.rounds == 1 and sorted(map(len, [m for r in plan.micro_batches for m in r])) == [1, 2]
    wide = TokenBudget(lengths, 990, 4, LogpsConfig(), 1, 1, CostModel(0.0)).split([0, 1, 2])
    assert [len(m) for r in wide.micro_batches for m in r].count(0) == 1 and wide.first_pair in ([0], [1], [2])


def test_a_pair_over_the_budget_is_refused_with_the_ways_out():
    lengths = np.array([[100, 50, 60], [900, 200, 300], [1000, 600, 10], [20, 20, 20]], np.int64)
    with pytest.raises(ConfigError) as refused:
        check_pairs_fit(lengths, 1200, LogpsConfig(), 1, 1)
    assert str(refused.value) == (
        "2 of 4 training pairs need more than 1200 positions per rank on their own (micro_batch_tokens; the longest "
        "1610): raise micro_batch_tokens to 1610 or more, raise sequence_parallel_size (each rank of a group holds "
        "1/SP of every row), or lower data.max_length"
    )
    check_pairs_fit(lengths, 1610, LogpsConfig(), 1, 1)
    check_pairs_fit(lengths, 806, LogpsConfig(), 2, 2)  # SP 2: each rank holds half of every (even-padded) row
    with pytest.raises(ConfigError, match="1 of 4 held-out pairs need more than 1600 positions per rank on their own "
                                          r"\(2 x micro_batch_tokens; the longest 1610\): raise micro_batch_tokens to 805"):
        check_pairs_fit(lengths, 1600, LogpsConfig(), 1, 1, "held-out pairs", 2)


def test_the_sft_term_is_the_step_mean_however_it_is_split():
    """SFT's NLL per chosen token over the step: the micro-batches' per-pair terms, summed and divided by the step's
    pairs, give it for any grouping (they would not with each micro-batch's own token mean)."""
    torch.manual_seed(0)
    logps, tokens = -torch.rand(12, dtype=torch.float64) * 50, torch.randint(1, 30, (12,)).double()
    whole = (-logps.sum() / tokens.sum()).item()
    per_pair = tokens.mean().item()
    for groups in ([range(0, 12)], [range(0, 5), range(5, 12)], [range(0, 1), range(1, 4), range(4, 12)]):
        split = sum(sft_loss(logps[list(g)], tokens[list(g)], per_pair).sum() for g in groups) / 12
        assert split.item() == pytest.approx(whole, rel=1e-12)
    assert sft_loss(logps, tokens).mean().item() == pytest.approx(whole, rel=1e-12)
    lengths = np.array([[0, 4, 2], [3, 4, 2]])
    assert scored_chosen_tokens(lengths).tolist() == [3, 4]  # an empty prompt's first token is not scored
    pairs = _pairs(lengths)
    assert lengths_of(pairs).tolist() == lengths.tolist()


def _config(**top) -> TrainConfig:
    return build(TrainConfig, {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "run_dir": "r", **top})


def test_the_budget_configuration_and_its_refusals():
    config = _config(micro_batch_tokens=4096, global_batch_size=64)
    assert config.micro_batch_size is None and config.for_world(8).global_batch(8) == 64
    assert _config().micro_batch_size == 4 and _config().global_batch(2) == 8
    refusals = [
        (dict(micro_batch_tokens=4096), "micro_batch_tokens=4096 needs global_batch_size"),
        (dict(micro_batch_tokens=4096, global_batch_size=64, micro_batch_size=4),
         "micro_batch_size=4 and micro_batch_tokens=4096 are both set: with a token budget the micro-batches are sized "
         "in tokens; drop micro_batch_size"),
        (dict(micro_batch_tokens=4096, global_batch_size=64, gradient_accumulation_steps=2),
         "drop gradient_accumulation_steps"),
        (dict(micro_batch_tokens=0, global_batch_size=64), "micro_batch_tokens=0: must be at least 1"),
        (dict(micro_batch_tokens=4096, global_batch_size=64, loss={"loss_type": "aot"}),
         "loss.loss_type=aot sorts log-ratios over each micro-batch"),
    ]  # fmt: skip
    for top, message in refusals:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _config(**top)
    with pytest.raises(ConfigError, match="global_batch_size=4 gives fewer pairs than the 8 data-parallel replicas"):
        _config(micro_batch_tokens=4096, global_batch_size=4).for_world(8)


def test_the_cost_model_reads_the_model_shape():
    """2 / (4 h + 3 i + V / layers) per (query, key) pair times the measured efficiency, for Llama and GPT-2 names."""
    from transformers import GPT2Config, LlamaConfig

    llama = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    assert CostModel.for_model(llama, efficiency=1.0).attention_weight == pytest.approx(2 / (16384 + 43008 + 4008))
    gpt2 = GPT2Config(n_embd=768, n_layer=12, vocab_size=50257)  # n_inner unset: 4 h
    assert CostModel.for_model(gpt2, efficiency=2.0).attention_weight == pytest.approx(4 / (3072 + 9216 + 50257 / 12))
    assert CostModel.for_model(object()).attention_weight == 0.0  # sizes under other names: tokens alone
    lengths = np.array([[10, 5, 5], [100, 50, 50]])
    costs = CostModel(0.01).pair_costs(lengths, LogpsConfig())
    assert costs.tolist() == pytest.approx([20 + 0.01 * 400, 200 + 0.01 * 40000])
    separate = CostModel(0.01).pair_costs(lengths, LogpsConfig(prefix_sharing=False))
    assert separate.tolist() == pytest.approx([30 + 0.01 * 450, 300 + 0.01 * 45000])
