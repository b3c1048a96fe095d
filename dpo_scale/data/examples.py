"""Examples to pairs, one at a time: tokenize, truncate, and drop-and-count a pair that cannot teach a preference.

The step every data path shares: `prepare` (in memory) and the token store's workers (build.py) run it before
the filters, and the filters run it on the eval file whose prompts contamination looks for (filters.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.formats import Example
from dpo_scale.data.pairs import Dropped, DropReason, Pair
from dpo_scale.data.tokenize import tokenize_examples
from dpo_scale.data.truncation import missing_signal, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SIDES = ("prompt_ids", "chosen_ids", "rejected_ids")
# Examples tokenized per call: large enough for a fast tokenizer's parallel batch encoding to pay off.
BATCH_SIZE = 1024


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
