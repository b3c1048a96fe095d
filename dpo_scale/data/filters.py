"""data.filters: drop pairs for their content (duplicates, contradictions, eval contamination, length ratio).

Unlike the no-signal drops, which look at one pair, these look at every pair at once, so they run after
preparation: over the pairs in memory (`prepare`), or, for the token store, in one pass over the finished shards
that writes each shard's rows again with the filters' drops (`shard-k.filtered.npy`) before the manifest. Both go
through `filter_reasons` on the same per-pair hashes, so the store and the in-memory path drop the same pairs. The
shards' own files are never rewritten: a pass killed half-way is redone from them whole.

Duplicates, contradictions and the length ratio look at the pairs as stored (what training sees); contamination
looks at each prompt whole, before truncation (prompt_heads.py): it is about the data, not the window.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpo_scale.config import DataConfig, FilterConfig
from dpo_scale.data.contamination import EvalPrompts
from dpo_scale.data.examples import prepare_examples
from dpo_scale.data.formats import read_examples
from dpo_scale.data.pairs import DROP_REASONS, Dropped, Pair
from dpo_scale.data.prompt_heads import read_heads, whole_prompts
from dpo_scale.data.spans import mix, span_hashes, span_starts
from dpo_scale.data.store import KEPT, filtered_name, rows_name, tokens_name
from dpo_scale.io import atomic_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONTRADICTORY, DUPLICATE, CONTAMINATED, LENGTH_RATIO = (
    1 + DROP_REASONS.index(name) for name in ("contradictory", "duplicate", "contaminated", "length_ratio")
)
FILTER_SETTINGS = {
    "contradictory": "drop_contradictory", "duplicate": "drop_duplicates", "contaminated": "drop_contaminated",
    "length_ratio": "max_length_ratio",
}  # fmt: skip
"""The data.filters setting behind each filter's drop reason."""


def pair_keys(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) prompt, chosen, rejected hashes -> (n,) keys of each pair as it is, and with its preference reversed:
    a pair's reversed key equals another's key exactly when the other has the same prompt with chosen and
    rejected swapped."""
    with np.errstate(over="ignore"):

        def key(prompt, first, second):
            return mix(prompt ^ mix(first ^ mix(second.copy()) * np.uint64(3)) * np.uint64(5))

        return key(hashes[:, 0], hashes[:, 1], hashes[:, 2]), key(hashes[:, 0], hashes[:, 2], hashes[:, 1])


@dataclasses.dataclass(frozen=True)
class KeyIndex:
    """Keys sorted once, stably (equal keys keep their input order), shared by the duplicate and contradiction masks
    and the report's groups: one argsort where each of them would otherwise sort the keys again."""

    order: np.ndarray  # (n,) int64 positions, by key
    ordered: np.ndarray  # (n,) uint64 keys[order]

    @classmethod
    def of(cls, keys: np.ndarray) -> KeyIndex:
        order = np.argsort(keys, kind="stable")
        return cls(order, keys[order])

    def starts(self) -> np.ndarray:
        """(n,) bool over sorted places: True where a key differs from the one before (the first of its group)."""
        starts = np.ones(len(self.ordered), bool)
        np.not_equal(self.ordered[1:], self.ordered[:-1], out=starts[1:])
        return starts

    def find(self, wanted: np.ndarray) -> np.ndarray:
        """(m,) the first position whose key is wanted[i], or -1 where no key is."""
        if not len(self.ordered):
            return np.full(len(wanted), -1, np.int64)
        place = np.minimum(np.searchsorted(self.ordered, wanted), len(self.ordered) - 1)
        return np.where(self.ordered[place] == wanted, self.order[place], -1)


def duplicate_mask(index: KeyIndex) -> np.ndarray:
    """True for every pair whose key an earlier pair has (the first of each kept)."""
    repeated = np.empty(len(index.order), bool)
    repeated[index.order] = ~index.starts()
    return repeated


def contradictory_mask(index: KeyIndex, reversed_keys: np.ndarray) -> np.ndarray:
    """True for every pair whose reversed preference is also in the data."""
    return index.find(reversed_keys) >= 0


def length_ratio_mask(lengths: np.ndarray, max_ratio: float) -> np.ndarray:
    """True where the longer completion has more than max_ratio times the tokens of the shorter."""
    longer, shorter = lengths[:, 1:].max(axis=1), lengths[:, 1:].min(axis=1)
    return longer > max_ratio * np.maximum(shorter, 1)


def filter_reasons(hashes: np.ndarray, lengths: np.ndarray, contaminated: np.ndarray, filters: FilterConfig) -> np.ndarray:
    """(n,) reason codes of the store's rows (0: kept, else 1 + position in DROP_REASONS) for n prepared pairs in
    input order: their (n, 3) span hashes and lengths and whether each prompt is contaminated. A pair several
    filters drop gets the first reason in DROP_REASONS' order."""
    keys, reversed_keys = pair_keys(hashes)
    index = KeyIndex.of(keys)
    masks = [
        (CONTRADICTORY, filters.drop_contradictory and contradictory_mask(index, reversed_keys)),
        (DUPLICATE, filters.drop_duplicates and duplicate_mask(index)),
        (CONTAMINATED, filters.drop_contaminated and contaminated),
        (LENGTH_RATIO, filters.max_length_ratio is not None and length_ratio_mask(lengths, filters.max_length_ratio)),
    ]
    reasons = np.zeros(len(hashes), np.int64)
    for code, mask in masks:
        if mask is not False:
            reasons[(reasons == KEPT) & mask] = code
    return reasons


def side_spans(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) pair starts and (n, 3) lengths -> (n, 3) starts of prompt, chosen, rejected, laid end to end."""
    offsets = np.concatenate([np.zeros((len(lengths), 1), np.int64), np.cumsum(lengths, axis=1)[:, :2]], axis=1)
    return starts[:, None] + offsets, lengths


def block_hashes(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n, 3) uint64 hashes of the prompt, chosen and rejected of n pairs stored as [prompt | chosen | rejected]."""
    side_starts, side_lengths = side_spans(starts, lengths)
    return span_hashes(tokens, side_starts.reshape(-1), side_lengths.reshape(-1)).reshape(-1, 3)


def read_eval_prompts(config: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str, n: int) -> tuple[EvalPrompts, list[str]]:
    """The prompts of the preference file `path`, read and tokenized as data.path is but whole (no max_length),
    and each one's source (`eval.jsonl line 3`)."""
    settings = dataclasses.replace(config, path=path, max_length=None, strict=False, filters=FilterConfig())
    pairs = prepare_examples(read_examples(settings), settings, tokenizer).pairs
    lengths = np.array([len(p.prompt_ids) for p in pairs], np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(p.prompt_ids for p in pairs), np.int64, int(lengths.sum()))
    return EvalPrompts.from_tokens(tokens, span_starts(lengths), lengths, n), [p.source for p in pairs]


def contaminated_mask(evals: EvalPrompts, tokens, prompt_starts, prompt_lengths, threshold: float) -> np.ndarray:
    """(n,) True for each training prompt holding at least `threshold` of some eval prompt's n-grams."""
    hits = evals.hits(tokens, prompt_starts, prompt_lengths)
    train, _, shares = evals.shares(hits, len(prompt_starts))
    mask = np.zeros(len(prompt_starts), bool)
    mask[train[shares >= threshold]] = True
    return mask


def filter_pairs(
    pairs: list[Pair], dropped: list[Dropped], prompt_heads: list[list[int]], config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[Pair], list[Dropped]]:
    """The in-memory path: (pairs the filters keep, every dropped pair in input order). `prompt_heads`: the tokens
    truncation cut from the start of each pair's prompt."""
    if not config.filters.any or not pairs:
        return pairs, dropped
    lengths = np.array([[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], np.int64)
    sequences = (ids for p in pairs for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids))
    tokens = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, int(lengths.sum()))
    starts = span_starts(lengths.sum(axis=1))
    contaminated = np.zeros(len(pairs), bool)
    if config.filters.drop_contaminated:
        evals, _ = read_eval_prompts(config, tokenizer, config.filters.eval_path, config.filters.ngram)
        whole = [head + pair.prompt_ids for head, pair in zip(prompt_heads, pairs)]
        whole_lengths = np.array([len(ids) for ids in whole], np.int64)
        whole_tokens = np.fromiter(itertools.chain.from_iterable(whole), np.int64, int(whole_lengths.sum()))
        contaminated = contaminated_mask(
            evals, whole_tokens, span_starts(whole_lengths), whole_lengths, config.filters.ngram_threshold
        )
    reasons = filter_reasons(block_hashes(tokens, starts, lengths), lengths, contaminated, config.filters)
    kept = [pair for pair, reason in zip(pairs, reasons) if reason == KEPT]
    filtered = [Dropped(p.index, p.source, DROP_REASONS[r - 1]) for p, r in zip(pairs, reasons) if r != KEPT]
    return kept, sorted(dropped + filtered, key=lambda d: d.index)


def filter_store(config: DataConfig, tokenizer: PreTrainedTokenizerBase, directory: Path, num_shards: int) -> None:
    """Write `filtered_name(k)` for every shard: its rows with the filters' drops, kept pairs first in input order,
    then every dropped row in input order. Two passes over the shards' rows, one over their tokens (and prompt
    heads, for contamination); holds 56 bytes per pair (three hashes, three lengths and the contamination flag)."""
    from tqdm import tqdm

    evals = None
    if config.filters.drop_contaminated:
        evals, _ = read_eval_prompts(config, tokenizer, config.filters.eval_path, config.filters.ngram)
    hashes, lengths, contaminated = [], [], []
    for shard in tqdm(range(num_shards), desc="filtering", unit="shard", mininterval=1.0):
        tokens, rows = _load(directory, shard)
        kept = np.asarray(rows[rows[:, 2] == KEPT])
        hashes.append(block_hashes(tokens, kept[:, 3], kept[:, 4:7]))
        lengths.append(kept[:, 4:7])
        if evals is not None:
            prompts = whole_prompts(tokens, read_heads(directory, shard), rows, np.flatnonzero(rows[:, 2] == KEPT))
            mask = contaminated_mask(evals, *prompts, config.filters.ngram_threshold)
            del prompts  # may be views of the shard's mapped tokens
        else:
            mask = np.zeros(len(kept), bool)
        contaminated.append(mask)
        del tokens, rows  # unmaps the shard: memory stays flat over the pass
    reasons = filter_reasons(np.concatenate(hashes), np.concatenate(lengths), np.concatenate(contaminated), config.filters)
    first = 0
    for shard in range(num_shards):
        rows = np.load(directory / rows_name(shard), allow_pickle=False)
        kept = rows[rows[:, 2] == KEPT].copy()
        kept[:, 2] = reasons[first : first + len(kept)]
        first += len(kept)
        dropped = np.concatenate([rows[rows[:, 2] != KEPT], kept[kept[:, 2] != KEPT]])
        ordered = np.concatenate([kept[kept[:, 2] == KEPT], dropped[np.argsort(dropped[:, 0], kind="stable")]])
        with atomic_open(directory / filtered_name(shard), "wb") as handle:
            np.save(handle, ordered, allow_pickle=False)


def _load(directory: Path, shard: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(  # type: ignore[return-value]
        np.load(directory / name(shard), mmap_mode="r", allow_pickle=False) for name in (tokens_name, rows_name)
    )
