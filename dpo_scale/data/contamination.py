"""Train / eval contamination by token n-grams: which eval prompts' n-grams a training prompt holds.

The eval prompts' distinct n-grams are held sorted in memory (eval sets are small); training prompts stream past
them a block (a store shard) at a time, so a million training pairs cost one pass and a few arrays per block.
An eval prompt shorter than n tokens has no n-gram: it is matched only whole, by a training prompt equal to it.

Contamination is about the data, not the window: both sides are whole prompts. Eval prompts are tokenized without
data.max_length; training prompts are read with the tokens truncation cut from their start (data/prompt_heads.py).
Compared as stored instead, keep_end hides a training copy of an eval dialogue behind its cut (HH-RLHF
helpful-base as its own eval file, on stories260K's 512 positions: 1,922 of 2,352 pairs flagged, not all), and
prompts cut to the same last token count as equal. The share stays one-sided (of the eval prompt's n-grams): a short,
common training prompt found inside a long eval prompt is not flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpo_scale.data.spans import expand_ranges, ngram_hashes, span_hashes


def _expand(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every position of the ranges [low[i], high[i]): (positions, the range each came from)."""
    counts = high - low
    return expand_ranges(low, counts), np.repeat(np.arange(len(low)), counts)


@dataclass
class EvalPrompts:
    """The distinct n-grams of each eval prompt, sorted by hash; the whole-prompt hashes beside them."""

    n: int
    ngram_hash: np.ndarray  # (k,) uint64, sorted
    ngram_owner: np.ndarray  # (k,) int64: the eval prompt of each
    ngram_count: np.ndarray  # (E,) distinct n-grams per eval prompt
    prompt_hash: np.ndarray  # (E,) uint64 of each whole prompt
    prompt_length: np.ndarray  # (E,)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int) -> EvalPrompts:
        hashes, owners = ngram_hashes(tokens, starts, lengths, n)
        order = np.lexsort((owners, hashes))
        hashes, owners = hashes[order], owners[order]
        distinct = np.ones(len(hashes), bool)
        distinct[1:] = (hashes[1:] != hashes[:-1]) | (owners[1:] != owners[:-1])
        hashes, owners = hashes[distinct], owners[distinct]
        return cls(n, hashes, owners, np.bincount(owners, minlength=len(starts)),
                   span_hashes(tokens, starts, lengths), np.asarray(lengths, np.int64))  # fmt: skip

    def __len__(self) -> int:
        return len(self.prompt_hash)

    def hits(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Hits:
        """The eval n-grams each training prompt tokens[starts[i] : starts[i] + lengths[i]] holds."""
        hashes, owners = ngram_hashes(tokens, starts, lengths, self.n)
        order = np.lexsort((hashes, owners))  # distinct n-grams per training prompt: one held twice counts once
        hashes, owners = hashes[order], owners[order]
        distinct = np.ones(len(hashes), bool)
        distinct[1:] = (hashes[1:] != hashes[:-1]) | (owners[1:] != owners[:-1])
        hashes, owners = hashes[distinct], owners[distinct]
        low = np.searchsorted(self.ngram_hash, hashes, side="left")
        high = np.searchsorted(self.ngram_hash, hashes, side="right")
        entries, which = _expand(low, high)  # an n-gram several eval prompts share matches each of them
        whole = span_hashes(tokens, starts, lengths)
        short = np.flatnonzero(self.prompt_length < self.n)
        equal_short = np.isin(whole, self.prompt_hash[short])
        return Hits(entries, owners[which], whole, equal_short)

    def shares(self, hits: Hits, trains: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per (training prompt, eval prompt) that share any n-gram: (training prompt, eval prompt, the share of
        the eval prompt's distinct n-grams the training prompt holds). Short eval prompts equal to a training
        prompt count as a share of 1."""
        evals = self.ngram_owner[hits.entries]
        key = hits.train * len(self) + evals
        unique, counts = np.unique(key, return_counts=True)
        train, evaluated = unique // len(self), unique % len(self)
        shares = counts / np.maximum(self.ngram_count[evaluated], 1)
        short = np.flatnonzero(self.prompt_length < self.n)
        equal = np.flatnonzero(hits.equal_short)
        if len(equal):
            by_hash = dict(zip(self.prompt_hash[short].tolist(), short.tolist()))
            pairs = [(t, by_hash[h]) for t, h in zip(equal.tolist(), hits.whole[equal].tolist())]
            train = np.concatenate([train, [t for t, _ in pairs]]).astype(np.int64)
            evaluated = np.concatenate([evaluated, [e for _, e in pairs]]).astype(np.int64)
            shares = np.concatenate([shares, np.ones(len(pairs))])
        return train, evaluated, shares


@dataclass
class Hits:
    """What one block of training prompts matched."""

    entries: np.ndarray  # positions in EvalPrompts.ngram_hash of each matched (training prompt, eval n-gram)
    train: np.ndarray  # the training prompt (position in the block) of each entry
    whole: np.ndarray  # (block,) uint64 whole-prompt hashes
    equal_short: np.ndarray  # (block,) bool: equal to an eval prompt shorter than n
