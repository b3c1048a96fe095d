"""One streaming pass over a token store: per kept pair, the few numbers the report needs (lengths, tokens cut,
span hashes, where it came from), and the eval prompts' n-grams found in the training prompts.

A shard at a time, memory-mapped and released after use, so resident memory is the per-pair arrays (56 bytes a
pair: 56 MB at a million pairs, allocated once at their full size and filled shard by shard, never concatenated)
plus one shard's pages and the hashing's fixed-size chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpo_scale.data.contamination import EvalPrompts
from dpo_scale.data.filters import block_hashes
from dpo_scale.data.store import TokenStore


@dataclass
class PairTable:
    """Every kept pair of the store, in input (= prepared) order."""

    location: np.ndarray  # (n,) int64 line (or row) number in its source
    lengths: np.ndarray  # (n, 3) int32 prompt, chosen, rejected tokens as stored
    cut: np.ndarray  # (n, 3) int32 tokens truncation removed
    hashes: np.ndarray  # (n, 3) uint64

    @classmethod
    def empty(cls, n: int) -> PairTable:
        """Arrays for n pairs, filled by the scan."""
        return cls(np.empty(n, np.int64), *(np.empty((n, 3), dtype) for dtype in (np.int32, np.int32, np.uint64)))

    def __len__(self) -> int:
        return len(self.location)


@dataclass
class Overlap:
    """The eval prompts' n-grams seen in the training prompts (pairs not held out)."""

    found: np.ndarray  # (k,) bool over EvalPrompts.ngram_hash
    best_share: np.ndarray  # (E,) the largest share one training prompt holds
    best_train: np.ndarray  # (E,) that training pair's position (-1: none)
    train_prompts: list[np.ndarray] = field(default_factory=list)  # whole-prompt hashes of the training pairs


def scan(store: TokenStore, evals: EvalPrompts | None, held_out: np.ndarray | None) -> tuple[PairTable, Overlap | None]:
    """`held_out`: positions of pairs that are the eval set themselves (not training), or None."""
    from tqdm import tqdm

    table = PairTable.empty(len(store.pairs))
    overlap = None
    if evals is not None:
        overlap = Overlap(np.zeros(len(evals.ngram_hash), bool), np.zeros(len(evals)), np.full(len(evals), -1))
    is_held = np.zeros(len(store.pairs), bool)
    if held_out is not None:
        is_held[held_out] = True
    first = 0
    shards = store.manifest["shards"]
    with tqdm(total=len(store.pairs), desc="data-report", unit="pair", mininterval=1.0) as progress:
        for shard, entry in enumerate(shards):
            store.verify_shard(shard)
            tokens, rows = store.shard_arrays(shard)
            kept = np.asarray(rows[: entry["pairs"]])
            block = slice(first, first + len(kept))
            table.location[block] = kept[:, 1]
            table.lengths[block] = kept[:, 4:7]
            table.cut[block] = kept[:, 7:10]
            table.hashes[block] = block_hashes(tokens, kept[:, 3], kept[:, 4:7])
            if overlap is not None:
                training = np.flatnonzero(~is_held[first : first + len(kept)])
                _overlap_block(evals, overlap, tokens, kept[training], first + training)
            first += len(kept)
            progress.update(len(kept))
            del tokens, rows, kept  # unmaps the shard before the next one is read
    return table, overlap


def _overlap_block(evals: EvalPrompts, overlap: Overlap, tokens, kept: np.ndarray, positions: np.ndarray) -> None:
    hits = evals.hits(tokens, kept[:, 3], kept[:, 4])
    overlap.found[hits.entries] = True
    overlap.train_prompts.append(hits.whole)
    train, evaluated, shares = evals.shares(hits, len(kept))
    if not len(shares):
        return
    order = np.lexsort((-shares, evaluated))  # per eval prompt, its best match in this block first
    first = np.ones(len(order), bool)
    first[1:] = evaluated[order][1:] != evaluated[order][:-1]
    best = order[first]
    better = shares[best] > overlap.best_share[evaluated[best]]
    overlap.best_share[evaluated[best][better]] = shares[best][better]
    overlap.best_train[evaluated[best][better]] = positions[train[best][better]]
