"""The data path end to end: read rows, normalise their format, tokenize, truncate, and drop-and-count pairs
that cannot teach a preference."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.examples import prepare_examples
from dpo_scale.data.filters import FILTER_SETTINGS, filter_pairs
from dpo_scale.data.formats import read_examples
from dpo_scale.data.pairs import FILTER_REASONS, DropReason, PreparedData
from dpo_scale.data.sources import must_be_local

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def prepare(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized pairs of `config.path`, in input order, and the pairs dropped for having no signal or by
    `config.filters`, in memory.

    Raises DataError on a missing input file, bad input, on a pair without signal when `config.strict`, and when no
    pair is left.
    """
    check_input_paths(input_paths(config))
    batch = prepare_examples(read_examples(config), config, tokenizer)
    prepared = PreparedData(*filter_pairs(batch.pairs, batch.dropped, batch.prompt_heads, config, tokenizer))
    check_not_empty(config, prepared.summary(), len(prepared.pairs), prepared.drop_counts())
    logger.info("%s: %s", config.path, prepared.summary())
    return prepared


def input_paths(config: DataConfig) -> dict[str, str]:
    """The files preparing `config` reads, by the setting that names each."""
    paths = {"data.path": config.path}
    if config.filters.drop_contaminated:
        paths["data.filters.eval_path"] = config.filters.eval_path
    return paths


def check_input_paths(paths: Mapping[str, str]) -> None:
    """Refuse a path that is neither a local file or directory nor a hub dataset id, naming the setting or flag
    that holds it: checked before anything is tokenized or a store directory made, so a typo in the last file read
    costs nothing. The test is read_rows' own (`must_be_local`)."""
    for key, path in paths.items():
        if not Path(path).exists() and must_be_local(path):
            raise DataError(
                f"{key}={path}: no such file or directory. Fix: check {key} (relative paths start from the working "
                "directory)"
            )


def check_not_empty(config: DataConfig, summary: str, kept: int, drop_counts: Mapping[DropReason, int]) -> None:
    """Refuse data with no pair left, naming the cause: the filters when they dropped any pair (every pair that
    preparation kept, then), else the pairs' missing signal."""
    if kept:
        return
    filtered = {reason: drop_counts[reason] for reason in FILTER_REASONS if drop_counts.get(reason)}
    if filtered:
        counts = ", ".join(f"{reason}: {count}" for reason, count in filtered.items())
        settings = " and ".join(f"data.filters.{FILTER_SETTINGS[reason]}" for reason in filtered)
        raise DataError(
            f"{config.path}: no pair is left to train on ({summary}): data.filters dropped all "
            f"{sum(filtered.values())} pairs that preparation kept ({counts}). Fix: check or turn off {settings}"
        )
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
