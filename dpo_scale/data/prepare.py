"""The data path end to end: read rows, normalise their format, tokenize, truncate, and drop-and-count pairs
that cannot teach a preference."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.filters import filter_pairs
from dpo_scale.data.formats import Example, read_examples
from dpo_scale.data.pairs import Dropped, DropReason, Pair, PreparedData
from dpo_scale.data.tokenize import tokenize_examples
from dpo_scale.data.truncation import missing_signal, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SIDES = ("prompt_ids", "chosen_ids", "rejected_ids")
# Examples tokenized per call: large enough for a fast tokenizer's parallel batch encoding to pay off.
BATCH_SIZE = 1024


def prepare(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized pairs of `config.path`, in input order, and the pairs dropped for having no signal or by
    `config.filters`, in memory.

    Raises DataError on bad input, on a pair without signal when `config.strict`, and when no pair is left.
    """
    pairs, dropped, _ = prepare_examples(read_examples(config), config, tokenizer)
    prepared = PreparedData(*filter_pairs(pairs, dropped, config, tokenizer))
    check_not_empty(config, prepared.summary(), len(prepared.pairs))
    logger.info("%s: %s", config.path, prepared.summary())
    return prepared


def prepare_examples(
    examples: Iterable[Example], config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Pair], list[Dropped], list[tuple[int, int, int]]]:
    """Tokenize, truncate and drop-and-count: (kept pairs, dropped pairs, the prompt, chosen and rejected tokens
    truncation cut from each kept pair), in input order. `config.filters` are not applied: they look at every
    pair at once (filters.py)."""
    pairs: list[Pair] = []
    dropped: list[Dropped] = []
    cut: list[tuple[int, int, int]] = []
    for batch in _batches(examples, BATCH_SIZE):
        for whole in tokenize_examples(batch, tokenizer):
            pair = truncate(whole, config.max_length, config.truncation_mode)
            reason = missing_signal(pair)
            if reason is None:
                pairs.append(pair)
                cut.append(tuple(len(getattr(whole, side)) - len(getattr(pair, side)) for side in SIDES))
            elif config.strict:
                raise no_signal_error(pair.source, reason, config.max_length)
            else:
                dropped.append(Dropped(pair.index, pair.source, reason))
    return pairs, dropped, cut


def check_not_empty(config: DataConfig, summary: str, kept: int) -> None:
    if not kept:
        raise DataError(
            f"{config.path}: no pair is left to train on ({summary}). "
            "Fix: check that chosen and rejected differ, and raise data.max_length if truncation emptied them"
        )


def no_signal_error(source: str, reason: DropReason, max_length: int | None) -> DataError:
    truncated = f" after truncation to data.max_length={max_length}" if max_length is not None else ""
    if reason == "empty_completion":
        problem = f"a completion has no tokens left{truncated}"
        fix = "raise data.max_length, set data.truncation_mode=keep_end, or shorten the prompt"
    else:
        problem = f"chosen and rejected have the same tokens{truncated}"
        fix = "remove the row" + (", or raise data.max_length if truncation made the two equal" if truncated else "")
    return DataError(
        f"{source}, fields 'chosen' and 'rejected': {reason}: {problem}. "
        f"Fix: {fix}; or set data.strict=false to drop and count such pairs"
    )


def _batches(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    iterator = iter(examples)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def split_held_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out) positions among `count` prepared pairs, each in input order: `fraction` of them held out
    for evaluation, the same ones for every rank, every resume and `dpo-scale eval` of the run. Positions, not
    pairs: a million-pair split costs two index arrays (8 bytes a pair), and no pair is read to make it."""
    import torch

    held = math.floor(count * fraction)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 10_007)).numpy()
    is_held = np.zeros(count, dtype=bool)
    is_held[order[:held]] = True
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)
