"""What data preparation hands to the rest of the system: tokenized pairs, and the pairs it dropped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DropReason = str
"""`empty_completion` (nothing left to score after truncation) or `identical_completions` (chosen == rejected)."""


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


@dataclass
class PreparedData:
    pairs: list[Pair]
    dropped: list[Dropped] = field(default_factory=list)

    def drop_counts(self) -> dict[DropReason, int]:
        return dict(Counter(d.reason for d in self.dropped))

    def summary(self) -> str:
        """One line for the end of data preparation, e.g. `2354 rows: 2352 pairs kept, 2 dropped (identical_completions: 2)`."""
        total = len(self.pairs) + len(self.dropped)
        line = f"{total} rows: {len(self.pairs)} pairs kept, {len(self.dropped)} dropped"
        if self.dropped:
            line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.drop_counts().items())) + ")"
        return line
