"""The data path end to end: read rows, normalise their format, tokenize, truncate, and drop-and-count pairs
that cannot teach a preference."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.examples import prepare_examples
from dpo_scale.data.filters import filter_pairs
from dpo_scale.data.formats import read_examples
from dpo_scale.data.pairs import PreparedData

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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


def check_not_empty(config: DataConfig, summary: str, kept: int) -> None:
    if not kept:
        raise DataError(
            f"{config.path}: no pair is left to train on ({summary}). "
            "Fix: check that chosen and rejected differ, and raise data.max_length if truncation emptied them"
        )


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
