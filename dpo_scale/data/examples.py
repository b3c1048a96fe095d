"""Examples to pairs, one at a time: tokenize, truncate, and drop-and-count a pair that cannot teach a preference.

The step every data path shares: `prepare` (in memory) and the token store's workers (build.py) run it before
the filters, and the filters run it on the eval file whose prompts contamination looks for (filters.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.formats import Example
from dpo_scale.data.pairs import Dropped, DropReason, Pair
from dpo_scale.data.tokenize import tokenize_examples
from dpo_scale.data.truncation import missing_signal, prompt_head, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SIDES = ("prompt_ids", "chosen_ids", "rejected_ids")
# Examples tokenized per call: large enough for a fast tokenizer's parallel batch encoding to pay off.
BATCH_SIZE = 1024


@dataclass
class PreparedBatch:
    """What preparation keeps and drops of some examples, in input order, before `config.filters`."""

    pairs: list[Pair] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    cut: list[tuple[int, int, int]] = field(default_factory=list)
    """The prompt, chosen and rejected tokens truncation cut from each kept pair."""
    prompt_heads: list[list[int]] = field(default_factory=list)
    """The prompt tokens truncation cut from the start of each kept pair's prompt: head + prompt_ids is the whole
    prompt, which contamination compares (truncation.prompt_head)."""


def prepare_examples(
    examples: Iterable[Example], config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> PreparedBatch:
    """Tokenize, truncate and drop-and-count. `config.filters` are not applied: they look at every pair at once
    (filters.py)."""
    prepared = PreparedBatch()
    for batch in _batches(examples, BATCH_SIZE):
        for whole in tokenize_examples(batch, tokenizer):
            pair = truncate(whole, config.max_length, config.truncation_mode)
            reason = missing_signal(pair)
            if reason is None:
                prepared.pairs.append(pair)
                prepared.cut.append(tuple(len(getattr(whole, side)) - len(getattr(pair, side)) for side in SIDES))
                prepared.prompt_heads.append(prompt_head(whole, pair))
            elif config.strict:
                raise no_signal_error(pair.source, reason, config.max_length)
            else:
                prepared.dropped.append(Dropped(pair.index, pair.source, reason))
    return prepared


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
