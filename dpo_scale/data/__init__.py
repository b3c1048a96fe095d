"""Preference data: read, normalise, tokenize (as TRL 1.16 does), truncate, drop-and-count, store once on disk.

Importing this package loads neither transformers nor datasets; they are imported when first needed.
"""

from dpo_scale.data.errors import DataError
from dpo_scale.data.formats import Example, normalise, read_examples, split_transcripts
from dpo_scale.data.build import load_prepared
from dpo_scale.data.cache import store_directory
from dpo_scale.data.pairs import Dropped, Pair, PairView, PreparedData, lengths_of
from dpo_scale.data.prepare import prepare, split_held_out
from dpo_scale.data.sources import Row, read_rows
from dpo_scale.data.tokenizer import load_tokenizer, padding_id, run_tokenizer

__all__ = [
    "DataError",
    "Dropped",
    "Example",
    "Pair",
    "PairView",
    "PreparedData",
    "Row",
    "load_prepared",
    "lengths_of",
    "load_tokenizer",
    "normalise",
    "padding_id",
    "prepare",
    "read_examples",
    "read_rows",
    "run_tokenizer",
    "split_held_out",
    "split_transcripts",
    "store_directory",
]
