"""Forward-only batches under a token budget (batch_plan.forward_batches): every pair once and in order, each batch
within the budget as `collate` lays it out, none that could have taken its next pair, at most max_pairs pairs; and a
pair too long for the budget refused alone before any batch is made (check_pairs_fit)."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_scale.config import ConfigError, LogpsConfig
from dpo_scale.data.pairs import Pair
from dpo_scale.model.layout import collate, layout_positions
from dpo_scale.training.batch_plan import check_pairs_fit, forward_batches

LAYOUTS = {
    "prefix_shared_packed": LogpsConfig(),
    "prefix_shared": LogpsConfig(packing=False),
    "padded": LogpsConfig(prefix_sharing=False, packing=False),
    "packed_to_length": LogpsConfig(pack_length=200),
}


def _lengths(count: int, seed: int = 0) -> np.ndarray:
    """(count, 3) prompt / chosen / rejected lengths, long-tailed like preference data, small enough to collate."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal([3.0, 2.5, 2.5], 0.8, size=(count, 3))).astype(np.int64), 1, 80)


def _pairs(lengths: np.ndarray) -> list[Pair]:
    return [Pair(i, f"row {i}", [5] * p, [6] * c, [7] * r) for i, (p, c, r) in enumerate(lengths.tolist())]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length_multiple", [1, 4])
@pytest.mark.parametrize(("budget", "max_pairs"), [(300, None), (700, 6), (None, 5)])
def test_every_pair_once_in_order_within_the_budget(layout, length_multiple, budget, max_pairs):
    config, lengths = LAYOUTS[layout], _lengths(120)
    pairs = _pairs(lengths)
    if budget is not None:
        check_pairs_fit(lengths, budget, config, length_multiple, 1, "pairs")
    batches = forward_batches(lengths, budget, config, length_multiple, max_pairs)
    assert [i for batch in batches for i in batch] == list(range(len(pairs)))
    for batch, following in zip(batches, batches[1:] + [None]):
        assert batch == list(range(batch[0], batch[-1] + 1))
        if max_pairs is not None:
            assert len(batch) <= max_pairs
        if budget is not None:
            assert collate([pairs[i] for i in batch], config, 0, length_multiple).tokens <= budget
        if following is not None and (max_pairs is None or len(batch) < max_pairs):
            # greedy: the batch could not have taken the next pair too
            grown = [pairs[i] for i in [*batch, following[0]]]
            assert budget is not None and collate(grown, config, 0, length_multiple).tokens > budget


def test_without_a_budget_batches_are_fixed_counts():
    """budget=None, max_pairs=k: the plain `range(0, n, k)` slices the commands used before budgets."""
    batches = forward_batches(_lengths(23), None, LogpsConfig(), max_pairs=5)
    assert batches == [list(range(start, min(start + 5, 23))) for start in range(0, 23, 5)]


def test_a_pair_alone_over_the_budget_is_refused_first():
    config = LogpsConfig(packing=False)
    lengths = np.array([[10, 5, 5], [60, 30, 30], [10, 5, 5]], np.int64)
    longest = layout_positions([(60, 30, 30)], config)
    check_pairs_fit(lengths, longest, config, 1, 1, "pairs")
    with pytest.raises(ConfigError, match=rf"^1 of 3 pairs need more than {longest - 1} positions per rank on their "
                                          rf"own \(micro_batch_tokens; the longest {longest}\)"):  # fmt: skip
        check_pairs_fit(lengths, longest - 1, config, 1, 1, "pairs")
    assert forward_batches(lengths, longest, config) == [[0], [1], [2]]
