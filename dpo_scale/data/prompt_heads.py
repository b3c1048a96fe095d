"""The prompt tokens truncation cut from each stored pair, kept beside its shard so that contamination compares the
data, not the window.

data.truncation_mode=keep_end cuts a long prompt's start (truncation.py): HH-RLHF's dialogues on a 512-position
model keep their last turns, some a single token. Compared as stored, a training copy of an eval dialogue holds
too few of the eval prompt's n-grams to count, and prompts cut to the same few tokens look like one prompt. So the
store keeps each kept pair's cut tokens (its prompt head), and contamination, in data.filters and in
`dpo-scale data-report`, reads every prompt whole: head + stored prompt.

    shard-00000.prompt-heads.npy  (H,) the shard's token dtype: the heads of the shard's kept pairs (before the
                                  filters) end to end in input order, each its row's prompt_cut tokens long

Written before the shard's rows file, which marks a shard complete, so every complete shard has one. It costs the
tokens truncation cut from prompts: nothing where no prompt is cut; HH-RLHF helpful-base at data.max_length=512
under stories260K's tokenizer, 27% more tokens (0.29M beside 1.06M).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from dpo_scale.config import ConfigError
from dpo_scale.data.spans import expand_ranges, span_starts
from dpo_scale.data.store import ROW_FIELDS, heads_name
from dpo_scale.io import atomic_open

INDEX, START, PROMPT, PROMPT_CUT = (ROW_FIELDS.index(name) for name in ("index", "start", "prompt", "prompt_cut"))
"""The columns of a store's rows file that locate a prompt and its head."""


def write_heads(directory: Path, shard: int, heads: list[list[int]], dtype: np.dtype) -> None:
    """The shard's heads file, written aside and renamed; byte-identical whichever process writes it."""
    flat = np.array(list(itertools.chain.from_iterable(heads)), dtype=dtype)
    with atomic_open(directory / heads_name(shard), "wb") as handle:
        np.save(handle, flat, allow_pickle=False)


def read_heads(directory: Path, shard: int) -> np.ndarray:
    """The shard's heads, memory-mapped."""
    path = directory / heads_name(shard)
    if not path.exists():
        raise ConfigError(
            f"token store {directory}: {path.name} is missing, so the store is damaged (every complete shard has one, "
            "checksummed in the manifest). Fix: delete the directory, or add data.rebuild=true to the train, "
            "prepare-data or precompute-ref command, which rebuilds a damaged store of the same data"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)


def head_starts(rows: np.ndarray) -> np.ndarray:
    """(rows,) int64: where each row's head begins in the shard's heads file. Either rows file of the shard serves
    (the filtered one holds the same rows in another order): heads lie in input order, and a row dropped for want
    of signal has none (its prompt_cut is 0)."""
    order = np.argsort(np.asarray(rows[:, INDEX]), kind="stable")
    starts = np.empty(len(rows), np.int64)
    starts[order] = span_starts(np.asarray(rows[order, PROMPT_CUT]))
    return starts


def whole_prompts(
    tokens: np.ndarray, heads: np.ndarray, rows: np.ndarray, selected: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole prompts of the shard's kept rows `rows[selected]`, as (tokens, starts, lengths) spans for spans.py:
    the stored prompts in place when truncation cut none of them, else each head and stored prompt gathered end to
    end (a copy of those prompts' tokens)."""
    picked = np.asarray(rows[selected])
    starts, stored, cut = picked[:, START], picked[:, PROMPT], picked[:, PROMPT_CUT]
    if not cut.any():
        return tokens, starts, stored
    lengths = cut + stored
    begins = span_starts(lengths)
    whole = np.empty(int(lengths.sum()), tokens.dtype)
    whole[expand_ranges(begins, cut)] = heads[expand_ranges(head_starts(rows)[selected], cut)]
    whole[expand_ranges(begins + cut, stored)] = tokens[expand_ranges(starts, stored)]
    return whole, begins, lengths
