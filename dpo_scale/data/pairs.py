"""What data preparation hands to the rest of the system: tokenized pairs, and the pairs it dropped."""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np

DropReason = str
"""`empty_completion` (nothing left to score after truncation) or `identical_completions` (chosen == rejected): no
signal; or a filter of data.filters: `contradictory`, `duplicate`, `contaminated`, `length_ratio`."""
SIGNAL_REASONS: tuple[DropReason, ...] = ("empty_completion", "identical_completions")
FILTER_REASONS: tuple[DropReason, ...] = ("contradictory", "duplicate", "contaminated", "length_ratio")
DROP_REASONS: tuple[DropReason, ...] = SIGNAL_REASONS + FILTER_REASONS


@dataclass(frozen=True)
class Pair:
    index: int
    """Position of the row in the input, counted from 0 over every row read."""
    source: str
    """Where the row came from, e.g. `data/train.jsonl line 12`."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class Dropped:
    index: int
    source: str
    reason: DropReason


def summary_line(kept: int, drop_counts: dict[DropReason, int]) -> str:
    """One line for the end of data preparation, e.g. `2354 rows: 2352 pairs kept, 2 dropped (identical_completions: 2)`."""
    dropped = sum(drop_counts.values())
    line = f"{kept + dropped} rows: {kept} pairs kept, {dropped} dropped"
    if dropped:
        line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(drop_counts.items()) if n) + ")"
    return line


@dataclass
class PreparedData:
    """Prepared in memory: for small inputs and one-off commands (the token store is the same, on disk)."""

    pairs: list[Pair]
    dropped: list[Dropped] = field(default_factory=list)

    def drop_counts(self) -> dict[DropReason, int]:
        return dict(Counter(d.reason for d in self.dropped))

    def summary(self) -> str:
        return summary_line(len(self.pairs), self.drop_counts())

    def pair_lengths(self) -> np.ndarray:
        """(pairs, 3) prompt, chosen and rejected lengths, as `TokenStore.pair_lengths` gives them."""
        return lengths_of(self.pairs)


def lengths_of(pairs: Sequence[Pair]) -> np.ndarray:
    """(len(pairs), 3) prompt, chosen and rejected lengths."""
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    return np.array(lengths, np.int64).reshape(-1, 3)


class LazyPairs(Sequence[Pair]):
    """Pairs read only when asked for; a subclass gives `__len__` and `_read(position)` for 0 <= position < len."""

    @abstractmethod
    def _read(self, position: int) -> Pair: ...

    @overload
    def __getitem__(self, item: int) -> Pair: ...

    @overload
    def __getitem__(self, item: slice) -> list[Pair]: ...

    def __getitem__(self, item: int | slice) -> Pair | list[Pair]:
        if isinstance(item, slice):
            return [self._read(position) for position in range(*item.indices(len(self)))]
        position = item + len(self) if item < 0 else item
        if not 0 <= position < len(self):
            raise IndexError(f"pair {item} of {len(self)}")
        return self._read(position)


class PairView(LazyPairs):
    """The pairs of `pairs` at `positions` (an index array), in that order: a view of a million stored pairs costs
    its index array, not the pairs."""

    def __init__(self, pairs: Sequence[Pair], positions: np.ndarray):
        self._pairs = pairs
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def _read(self, position: int) -> Pair:
        return self._pairs[int(self._positions[position])]
