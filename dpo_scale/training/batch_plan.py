"""How one optimizer step's pairs become micro-batches: a fixed number of pairs each (`micro_batch_size`), or as
many as fit a token budget (`micro_batch_tokens`), balanced across the data-parallel replicas by their cost.

Either way the step's pairs are the sampler's (sampler.py: a pure function of seed and step), so the plan is a pure
function of (seed, step, replicas, budget) that every rank computes alike from the pairs' lengths, with no
communication and nothing to save for a resume. Every replica gets the same number of micro-batches (ZeRO-3's
collectives need equal counts); a pair is never split (its prompt is shared by its two completions).

The budget split: M accumulation rounds of `replicas` micro-batches of at most the budget's positions each (counted
as `layout_positions` lays them out: a shared prompt once, rows padded to the sequence-parallel multiple, padding
included), M the fewest the fill below fits in (bisected). The fill goes round by round, costliest pairs first, each
into the least loaded micro-batch of the round that stays under the round's level (`TokenBudget._fill_rounds`), so
the replicas of a round carry about the same cost. A micro-batch may be empty where a step holds fewer pairs than
replicas x M: its replica runs a forward that counts for nothing (train.py). Measured on real length distributions
in BENCHMARKS.md ("Token budgets: the straggler ratio").
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpo_scale.config import ConfigError, LogpsConfig, TrainConfig
from dpo_scale.model.layout import layout_positions
from dpo_scale.training.sampler import StepSampler

# How much costlier attention is on this project's CPU than its FLOPs say (bench/attention_cost.py, BENCHMARKS.md
# "Token budgets: the cost model"): 0.91 at the 16M Llama, 1.43 at 117M; their mean.
ATTENTION_EFFICIENCY = 1.17


@dataclass(frozen=True)
class CostModel:
    """The cost of a pair for balancing, in positions: its positions plus `attention_weight` per (query, key) pair of
    its units' attention (the sum of their squared lengths)."""

    attention_weight: float

    @classmethod
    def for_model(cls, config, efficiency: float = ATTENTION_EFFICIENCY) -> CostModel:
        """From a transformers text config's shape. Per layer, a position costs 2 x (4 h^2 + 3 h i) FLOPs in its
        projections and MLP (h hidden, i intermediate) and a (query, key) pair 4 h in attention; the LM head adds
        2 h V per position, V / layers per layer. So one (query, key) pair costs 2 / (4 h + 3 i + V / layers)
        positions, times the efficiency measured for attention against the rest. A config without these sizes
        (an architecture naming them otherwise) gets positions alone: balance by tokens."""
        hidden = _field(config, "hidden_size", "n_embd", "d_model")
        layers = _field(config, "num_hidden_layers", "n_layer", "num_layers")
        vocabulary = _field(config, "vocab_size")
        if not (hidden and layers and vocabulary):
            return cls(0.0)
        intermediate = _field(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
        return cls(efficiency * 2 / (4 * hidden + 3 * intermediate + vocabulary / layers))

    def pair_costs(self, lengths: np.ndarray, config: LogpsConfig) -> np.ndarray:
        """(n,) cost of each pair of `lengths` (n, 3) as the layout computes it (units of `unit_sizes`)."""
        prompt, chosen, rejected = lengths[:, 0], lengths[:, 1], lengths[:, 2]
        units = [prompt + chosen + rejected] if config.prefix_sharing else [prompt + chosen, prompt + rejected]
        squares = sum(u.astype(np.float64) ** 2 for u in units)
        return _unit_tokens(lengths, config) + self.attention_weight * squares


def _field(config, *names: str) -> int | None:
    """The first of `names` the config sets (architectures name their sizes differently), or None."""
    return next((getattr(config, name) for name in names if getattr(config, name, None)), None)


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step's micro-batches: `micro_batches[replica][m]` the pair indices replica `replica` runs in
    its m-th micro-batch (possibly empty); `costs[m, replica]` their cost."""

    micro_batches: list[list[list[int]]]
    costs: np.ndarray

    @property
    def pairs(self) -> list[int]:
        """Every pair of the step, whichever replica runs it."""
        return [pair for replica in self.micro_batches for micro in replica for pair in micro]

    @property
    def num_pairs(self) -> int:
        return sum(len(micro) for replica in self.micro_batches for micro in replica)

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
        return StepPlan(micro_batches, costs.reshape(-1, self.replicas))


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
        longest_first = np.asarray(batch, np.int64)[np.argsort(-self._costs[batch], kind="stable")]
        # The fewest rounds the fill fits in: doubled from the least the summed tokens allow, then bisected between
        # a count that failed and one that fits (the fill is greedy: "fewest" is the fewest it finds this way).
        cannot = max(0, -(-int(self._tokens[longest_first].sum()) // (self.replicas * self.group_budget)) - 1)
        rounds = cannot + 1
        found = self._fill_rounds(longest_first, rounds)
        while found is None and rounds < len(longest_first):
            cannot, rounds = rounds, min(2 * rounds, len(longest_first))
            found = self._fill_rounds(longest_first, rounds)
        if found is None:  # every pair fits alone (check_pairs_fit): one per micro-batch
            pairs = longest_first.tolist() + [None] * (-len(longest_first) % self.replicas)
            found = [[[] if p is None else [p] for p in pairs[a : a + self.replicas]]
                     for a in range(0, len(pairs), self.replicas)]  # fmt: skip
            rounds = len(found)
        while rounds - cannot > 1:
            middle = (cannot + rounds) // 2
            filled = self._fill_rounds(longest_first, middle)
            if filled is None:
                cannot = middle
            else:
                rounds, found = middle, filled
        return self._plan([[found[a][r] for a in range(len(found))] for r in range(self.replicas)])

    def _fill_rounds(self, longest_first: np.ndarray, rounds: int) -> list[list[list[int]]] | None:
        """The pairs (costliest first) in `rounds` accumulation rounds of `replicas` micro-batches, or None where
        they do not fit. Round by round, the least loaded micro-batch takes the costliest pair that keeps it within
        the round's level (and its summed unit tokens within the budget), until none can take one. The level is the
        costlier of the round's costliest pair and the mean a micro-batch still has to carry, so that a long pair's
        round gives the other replicas as much work (rather than one long pair beside short ones); the last round's
        is unbounded (everything left, within the budget). Summed unit tokens are a lower bound of the positions: a
        micro-batch whose exact positions go past the budget gives its last pairs back to the rounds after."""
        costs, tokens, budget = self._costs, self._tokens, self.group_budget
        ascending = longest_first[::-1].tolist()  # (pairs left,) cheapest first, for bisection on their costs
        keys = costs[ascending].tolist()
        filled: list[list[list[int]]] = []
        for a in range(rounds):
            if not ascending:
                break
            last = a == rounds - 1
            level = math.inf if last else max(keys[-1], sum(keys) / (self.replicas * (rounds - a)))
            micro_batches: list[list[int]] = [[] for _ in range(self.replicas)]
            open_batches = [(0.0, 0, r) for r in range(self.replicas)]  # (load, tokens, replica): a heap
            while open_batches and ascending:
                load, used, replica = heapq.heappop(open_batches)
                position = bisect.bisect_right(keys, level - load) - 1
                while position >= 0 and used + tokens[ascending[position]] > budget:
                    position -= 1
                if position < 0:
                    continue  # full for this round
                pair = ascending.pop(position)
                del keys[position]
                micro_batches[replica].append(pair)
                heapq.heappush(open_batches, (load + costs[pair], used + tokens[pair], replica))
            for micro_batch in micro_batches:  # padding can lay out more than the summed tokens: give pairs back
                while len(micro_batch) > 1 and self.positions(micro_batch) > budget:
                    pair = micro_batch.pop()
                    position = bisect.bisect_left(keys, costs[pair])
                    ascending.insert(position, pair)
                    keys.insert(position, costs[pair])
            if last and ascending:
                return None
            filled.append(micro_batches)
        return None if ascending else filled


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
# peaks far lower than a training micro-batch: measured here (bench/attention_cost.py, BENCHMARKS.md "Token budgets:
# the cost model"), a training micro-batch of 2,048 positions peaks 375 MiB above the 16M Llama and 2,147 MiB above
# the 117M one, a forward of 4 x 2,048 240 MiB and 429 MiB. Forward-only work (evaluation during training,
# precompute-ref) therefore packs FORWARD_BUDGET_FACTOR x micro_batch_tokens positions per rank.
FORWARD_BUDGET_FACTOR = 4


def forward_budget(config: TrainConfig) -> int | None:
    """The positions per rank of a forward-only micro-batch during training (None without a token budget)."""
    return config.micro_batch_tokens * FORWARD_BUDGET_FACTOR if config.micro_batch_tokens else None


def check_pairs_fit(lengths: np.ndarray, budget: int, config: LogpsConfig, length_multiple: int,
                    sequence_parallel_size: int, what: str = "training pairs", factor: int = 1) -> None:  # fmt: skip
    """Refuse `what` (pairs of these lengths) that alone need more positions per rank than `budget`, which is `factor`
    x micro_batch_tokens: in one line, before any model loads."""
    if not len(lengths):
        return
    per_rank = -(-positions_alone(lengths, config, length_multiple) // sequence_parallel_size)
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


def check_batch_tokens(lengths: np.ndarray, batch_tokens: int | None, config: LogpsConfig, what: str,
                       max_length_key: str | None = "data.max_length") -> None:  # fmt: skip
    """`batch_tokens`, the budget of the forward-only commands `logps` and `eval` (one process, no ranks): refuse
    `what` (pairs of these lengths) that alone need more, in one line naming how many, the longest and the fix
    (`max_length_key`: the setting that shortens them, if the command has one), before any model loads."""
    if batch_tokens is None or not len(lengths):
        return
    positions = positions_alone(lengths, config)
    over = positions > batch_tokens
    if not over.any():
        return
    longest = int(positions.max())
    shorter = f", or lower {max_length_key}" if max_length_key else ""
    raise ConfigError(
        f"{int(over.sum())} of {len(lengths)} {what} need more than batch_tokens={batch_tokens} positions on their own "
        f"(the longest {longest}, as the layout computes them): raise batch_tokens to {longest} or more{shorter}"
    )


def positions_alone(lengths: np.ndarray, config: LogpsConfig, length_multiple: int = 1) -> np.ndarray:
    """(n,) the positions each pair of these (n, 3) lengths needs in a micro-batch of its own (`layout_positions`),
    computed once per distinct length triple."""
    unique, inverse = np.unique(lengths, axis=0, return_inverse=True)
    alone = np.array([layout_positions([tuple(row)], config, length_multiple) for row in unique.tolist()], np.int64)
    return alone[inverse.reshape(-1)]
