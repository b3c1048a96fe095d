"""How one optimizer step's pairs become micro-batches: a fixed number of pairs each (`micro_batch_size`), or as
many as fit a token budget (`micro_batch_tokens`), balanced across the data-parallel replicas by their cost.

Either way the step's pairs are the sampler's (sampler.py: a pure function of seed and step), so the plan is a pure
function of (seed, step, replicas, budget) that every rank computes alike from the pairs' lengths, with no
communication and nothing to save for a resume. Every replica gets the same number of micro-batches (ZeRO-3's
collectives need equal counts); a pair is never split (its prompt is shared by its two completions).

The budget split: the smallest M for which the step's pairs fit replicas x M micro-batches of at most the budget's
positions each (counted as `layout_positions` lays them out: a shared prompt once, rows padded to the sequence-
parallel multiple, padding included), filled longest-first into the least costly micro-batch that has room (LPT),
then dealt into M accumulation rounds of `replicas` micro-batches of similar cost. A micro-batch may be empty where a
step holds fewer pairs than replicas x M: its replica runs a forward that counts for nothing (train.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpo_scale.config import ConfigError, LogpsConfig, TrainConfig
from dpo_scale.model.layout import layout_positions
from dpo_scale.training.sampler import StepSampler

# The cost of a pair for balancing: its positions plus ATTENTION_PER_HIDDEN / hidden_size per (query, key) pair of
# its units' attention (sum of squared unit lengths). Projections and MLP cost ~24 h^2 FLOPs per position per layer
# and attention ~4 h per (query, key) pair, so the attention term per position pair is ~1/(6 h) of a position;
# measured on this project's CPU (bench/attention_cost.py, BENCHMARKS.md: the 16M and 117M Llamas' forward and
# backward at unit lengths 128-2,048) the fitted weight is ATTENTION_PER_HIDDEN / h.
ATTENTION_PER_HIDDEN = 0.17


@dataclass(frozen=True)
class CostModel:
    """cost = positions + attention_weight x sum of squared unit lengths (see ATTENTION_PER_HIDDEN)."""

    attention_weight: float

    @classmethod
    def for_hidden_size(cls, hidden_size: int) -> CostModel:
        return cls(ATTENTION_PER_HIDDEN / hidden_size)

    def pair_costs(self, lengths: np.ndarray, config: LogpsConfig) -> np.ndarray:
        """(n,) cost of each pair of `lengths` (n, 3) as the layout computes it (units of `unit_sizes`)."""
        prompt, chosen, rejected = lengths[:, 0], lengths[:, 1], lengths[:, 2]
        if config.prefix_sharing:
            units = [prompt + chosen + rejected]
        else:
            units = [prompt + chosen, prompt + rejected]
        tokens = sum(units).astype(np.float64)
        squares = sum(u.astype(np.float64) ** 2 for u in units)
        return tokens + self.attention_weight * squares


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step's micro-batches: `micro_batches[replica][m]` the pair indices replica `replica` runs in
    its m-th micro-batch (possibly empty); `costs[m, replica]` their cost."""

    micro_batches: list[list[list[int]]]
    costs: np.ndarray
    num_pairs: int

    @property
    def rounds(self) -> int:
        return self.costs.shape[0]

    @property
    def balance(self) -> float:
        """How long the step takes against perfect balance: the sum over accumulation rounds of the most loaded
        replica's cost, over the sum of the mean replica's (1.0: no replica waits)."""
        mean = self.costs.mean(axis=1).sum()
        return float(self.costs.max(axis=1).sum() / mean) if mean > 0 else 1.0

    @property
    def first_pair(self) -> list[int]:
        """One pair of the step: what a replica with an empty micro-batch runs a forward on."""
        return next([micro[0]] for replica in self.micro_batches for micro in replica if micro)


class _Planner:
    """Pairs' lengths and costs, and the sampler whose steps `plan` splits (None: only `split` is used)."""

    def __init__(self, lengths: np.ndarray, replicas: int, config: LogpsConfig, cost_model: CostModel,
                 sampler: StepSampler | None):  # fmt: skip
        self.lengths, self.replicas, self.config, self.sampler = lengths, replicas, config, sampler
        self.cost_model = cost_model
        self._costs = cost_model.pair_costs(lengths, config)

    def plan(self, step: int) -> StepPlan:
        """The micro-batches of optimizer step `step`."""
        return self.split(self.sampler.step_pairs(step))

    def split(self, batch: Sequence[int]) -> StepPlan:
        raise NotImplementedError

    def _plan(self, micro_batches: list[list[list[int]]]) -> StepPlan:
        costs = np.array([[self._costs[m].sum() if m else 0.0 for m in replica] for replica in micro_batches]).T
        return StepPlan(micro_batches, costs.reshape(-1, self.replicas), sum(len(m) for r in micro_batches for m in r))


class FixedCount(_Planner):
    """micro_batch_size pairs per micro-batch: micro-batch a of replica r is the (a x replicas + r)-th slice of the
    pairs, so any split of the same global batch sees the same micro-batches. A batch that does not fill the last
    round (the held-out pairs) leaves its last slices short or empty."""

    def __init__(self, lengths: np.ndarray, micro_batch_size: int, replicas: int, config: LogpsConfig,
                 cost_model: CostModel, sampler: StepSampler | None = None):  # fmt: skip
        super().__init__(lengths, replicas, config, cost_model, sampler)
        self.micro_batch_size = micro_batch_size

    def split(self, batch: Sequence[int]) -> StepPlan:
        batch, size, replicas = list(batch), self.micro_batch_size, self.replicas
        rounds = max(1, -(-len(batch) // (size * replicas)))
        return self._plan([[batch[(a * replicas + r) * size : (a * replicas + r + 1) * size] for a in range(rounds)]
                           for r in range(replicas)])  # fmt: skip


class TokenBudget(_Planner):
    """Micro-batches of at most `budget` positions per rank (a sequence-parallel group computes `budget` x SP: each
    rank holds 1/SP of every row), split as the module docstring says."""

    def __init__(
        self, lengths: np.ndarray, budget: int, replicas: int, config: LogpsConfig, length_multiple: int,
        sequence_parallel_size: int, cost_model: CostModel, sampler: StepSampler | None = None,
    ):  # fmt: skip
        super().__init__(lengths, replicas, config, cost_model, sampler)
        self.budget, self.length_multiple = budget, length_multiple
        self.group_budget = budget * sequence_parallel_size
        self._tokens = _unit_tokens(lengths, config)

    def positions(self, indices: Sequence[int]) -> int:
        """The positions a sequence-parallel group (or a rank without SP) computes for these pairs."""
        return layout_positions([tuple(row) for row in self.lengths[list(indices)].tolist()], self.config,
                                self.length_multiple)  # fmt: skip

    def split(self, batch: Sequence[int]) -> StepPlan:
        batch = np.asarray(batch, np.int64)
        rounds = max(1, -(-int(self._tokens[batch].sum()) // (self.replicas * self.group_budget)))
        while True:
            bins = self._fill(batch, self.replicas * rounds)
            if bins is not None and all(not b or self.positions(b) <= self.group_budget for b in bins):
                break
            rounds += 1  # ends: one pair per micro-batch fits (`check_pairs_fit`), at worst at len(batch) rounds
        costs = np.array([self._costs[b].sum() if b else 0.0 for b in bins])
        order = np.argsort(-costs, kind="stable")  # rounds of similar cost, the costliest first
        return self._plan([[bins[order[a * self.replicas + r]] for a in range(rounds)] for r in range(self.replicas)])

    def _fill(self, batch: np.ndarray, count: int) -> list[list[int]] | None:
        """Longest-processing-time first into `count` micro-batches, each pair into the least costly one whose summed
        unit tokens stay within the budget (a lower bound of its positions: the exact count is checked after);
        None when a pair finds no room."""
        load, tokens = np.zeros(count), np.zeros(count, np.int64)
        bins: list[list[int]] = [[] for _ in range(count)]
        for pair in batch[np.argsort(-self._costs[batch], kind="stable")].tolist():
            room = tokens + self._tokens[pair] <= self.group_budget
            if not room.any():
                return None
            target = int(np.flatnonzero(room)[np.argmin(load[room])])
            bins[target].append(pair)
            load[target] += self._costs[pair]
            tokens[target] += self._tokens[pair]
        return bins


def forward_batches(lengths: np.ndarray, budget: int | None, config: LogpsConfig, length_multiple: int = 1,
                    max_pairs: int | None = None) -> list[list[int]]:  # fmt: skip
    """Consecutive pairs of these (n, 3) lengths in forward-only batches (scoring keeps input order): each as many
    pairs as fit `budget` positions as the layout counts them (None: no budget) and at most `max_pairs` (None: no
    cap). A batch grows while its summed unit tokens (a lower bound of its positions) fit, then gives back pairs
    until the layout's exact count does: one packing per batch, not one per pair. A pair alone over the budget is
    refused first by `check_pairs_fit`."""
    rows = [tuple(row) for row in lengths.tolist()]
    tokens = _unit_tokens(lengths, config).tolist()
    batches: list[list[int]] = []
    start = 0
    while start < len(rows):
        end, total = start + 1, tokens[start]
        while (end < len(rows) and (max_pairs is None or end - start < max_pairs)
               and (budget is None or total + tokens[end] <= budget)):  # fmt: skip
            total += tokens[end]
            end += 1
        while budget is not None and end - start > 1 and layout_positions(rows[start:end], config, length_multiple) > budget:
            end -= 1
        batches.append(list(range(start, end)))
        start = end
    return batches


def _unit_tokens(lengths: np.ndarray, config: LogpsConfig) -> np.ndarray:
    """(n,) the summed unit sizes of each pair: prompt once with prefix sharing, twice without."""
    return lengths.sum(axis=1) + (0 if config.prefix_sharing else lengths[:, 0])


def scored_chosen_tokens(lengths: np.ndarray) -> np.ndarray:
    """(n,) chosen tokens scored per pair: all of them, but the first when the prompt is empty (nothing predicts it)."""
    return lengths[:, 1] - (lengths[:, 0] == 0)


# A forward without backward keeps no layer's activations once the next layer has run, so at the same positions it
# peaks far lower than a training micro-batch; evaluation during training therefore packs FORWARD_BUDGET_FACTOR x
# micro_batch_tokens (measured: BENCHMARKS.md, "Token budgets", forward-only peak memory).
FORWARD_BUDGET_FACTOR = 2


def forward_budget(config: TrainConfig) -> int | None:
    """The positions per rank of a forward-only micro-batch during training (None without a token budget)."""
    return config.micro_batch_tokens * FORWARD_BUDGET_FACTOR if config.micro_batch_tokens else None


def check_pairs_fit(lengths: np.ndarray, budget: int, config: LogpsConfig, length_multiple: int,
                    sequence_parallel_size: int, what: str = "training pairs", factor: int = 1) -> None:  # fmt: skip
    """Refuse `what` (pairs of these lengths) that alone need more positions per rank than `budget`, which is `factor`
    x micro_batch_tokens: in one line, before any model loads."""
    if not len(lengths):
        return
    unique, inverse = np.unique(lengths, axis=0, return_inverse=True)
    alone = np.array([layout_positions([tuple(row)], config, length_multiple) for row in unique.tolist()], np.int64)
    per_rank = -(-alone[inverse.reshape(-1)] // sequence_parallel_size)
    over = per_rank > budget
    if not over.any():
        return
    longest = int(per_rank.max())
    sp = sequence_parallel_size
    share = f"{factor} x " if factor > 1 else ""
    raise ConfigError(
        f"{int(over.sum())} of {len(lengths)} {what} need more than {budget} positions per rank on their own "
        f"({share}micro_batch_tokens; the longest {longest}{f' with sequence_parallel_size={sp}' if sp > 1 else ''}): "
        f"raise micro_batch_tokens to {-(-longest // factor)} or more, raise sequence_parallel_size (each rank of a "
        "group holds 1/SP of every row), or lower data.max_length"
    )
