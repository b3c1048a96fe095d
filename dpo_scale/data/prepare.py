"""The data path end to end: read rows, normalise their format, tokenize, truncate, and drop-and-count pairs
that cannot teach a preference."""

from __future__ import annotations

import itertools
import math
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.formats import Example, read_examples
from dpo_scale.data.pairs import Dropped, DropReason, Pair, PreparedData
from dpo_scale.data.tokenize import tokenize_examples
from dpo_scale.data.truncation import missing_signal, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Examples tokenized per call: large enough for a fast tokenizer's parallel batch encoding to pay off.
BATCH_SIZE = 1024


def prepare(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized pairs of `config.path`, in input order, and the pairs dropped for having no signal.

    Raises DataError on bad input, on a dropped pair when `config.strict`, and when no pair is left.
    """
    pairs: list[Pair] = []
    dropped: list[Dropped] = []
    for batch in _batches(read_examples(config), BATCH_SIZE):
        for pair in tokenize_examples(batch, tokenizer):
            pair = truncate(pair, config.max_length, config.truncation_mode)
            reason = missing_signal(pair)
            if reason is None:
                pairs.append(pair)
            elif config.strict:
                raise _no_signal_error(pair.source, reason, config.max_length)
            else:
                dropped.append(Dropped(pair.index, pair.source, reason))
    prepared = PreparedData(pairs, dropped)
    if not pairs:
        raise DataError(
            f"{config.path}: no pair is left to train on ({prepared.summary()}). "
            "Fix: check that chosen and rejected differ, and raise data.max_length if truncation emptied them"
        )
    logger.info("%s: %s", config.path, prepared.summary())
    return prepared


def _no_signal_error(source: str, reason: DropReason, max_length: int | None) -> DataError:
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


def split_held_out(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): `fraction` of the pairs held out for evaluation, the same ones for every rank, every resume
    and `dpo-scale eval` of the run."""
    import torch

    count = math.floor(len(pairs) * fraction)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + 10_007)).tolist()
    held_out = set(order[:count])
    return [p for i, p in enumerate(pairs) if i not in held_out], [p for i, p in enumerate(pairs) if i in held_out]
