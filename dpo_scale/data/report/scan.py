"""One streaming pass over a token store: per kept pair, the few numbers the report needs (lengths, tokens cut,
span hashes, where it came from), and the eval prompts' n-grams found in the training prompts, each read whole
(its prompt head and stored prompt: data/prompt_heads.py).

A shard at a time, memory-mapped and released after use, so resident memory is the per-pair arrays (56 bytes a
pair: 56 MB at a million pairs, allocated once at their full size and filled shard by shard, never concatenated)
plus one shard's pages and the hashing's fixed-size chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpo_scale.data.contamination import EvalPrompts
from dpo_scale.data.filters import block_hashes
from dpo_scale.data.prompt_heads import read_heads, whole_prompts
from dpo_scale.data.spans import expand_ranges, span_starts
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


def held_out_prompts(store: TokenStore, positions: np.ndarray, n: int) -> tuple[EvalPrompts, list[str]]:
    """The whole prompts of the store's pairs at `positions` (sorted) as eval prompts, and where each came from."""
    tokens_read, lengths, sources, first = [], [], [], 0
    for shard, entry in enumerate(store.manifest["shards"]):
        inside = positions[(positions >= first) & (positions < first + entry["pairs"])] - first
        if len(inside):
            tokens, rows = store.shard_arrays(shard)
            prompts, starts, spans = whole_prompts(tokens, read_heads(store.directory, shard), rows, inside)
            tokens_read.append(np.asarray(prompts)[expand_ranges(starts, spans)].astype(np.int64))
            lengths.append(spans)
            sources += [f"{store.manifest['source_prefix']} {location}" for location in rows[inside, 1].tolist()]
            del tokens, rows, prompts  # unmaps the shard
        first += entry["pairs"]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    tokens = np.concatenate(tokens_read) if tokens_read else np.zeros(0, np.int64)
    return EvalPrompts.from_tokens(tokens, span_starts(lengths), lengths, n), sources


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
                prompts = whole_prompts(tokens, read_heads(store.directory, shard), rows, training)
                _overlap_block(evals, overlap, prompts, first + training)
                del prompts
            first += len(kept)
            progress.update(len(kept))
            del tokens, rows, kept  # unmaps the shard before the next one is read
    return table, overlap


def _overlap_block(evals: EvalPrompts, overlap: Overlap, prompts: tuple, positions: np.ndarray) -> None:
    """`prompts`: (tokens, starts, lengths) spans of the block's whole training prompts, at store `positions`."""
    hits = evals.hits(*prompts)
    overlap.found[hits.entries] = True
    overlap.train_prompts.append(hits.whole)
    train, evaluated, shares = evals.shares(hits, len(positions))
    if not len(shares):
        return
    order = np.lexsort((-shares, evaluated))  # per eval prompt, its best match in this block first
    first = np.ones(len(order), bool)
    first[1:] = evaluated[order][1:] != evaluated[order][:-1]
    best = order[first]
    better = shares[best] > overlap.best_share[evaluated[best]]
    overlap.best_share[evaluated[best][better]] = shares[best][better]
    overlap.best_train[evaluated[best][better]] = positions[train[best][better]]
