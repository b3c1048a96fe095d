"""Read preference rows from wherever they live, each tagged with where it came from.

Every row is a plain dict of column -> value plus a `source` string (`train.jsonl line 12`, `pairs.parquet row 5`)
that every later error message quotes, so a bad row can be found in the file without counting.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_scale.data.errors import DataError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")

# owner/name or name, as the hub spells ids; anything else that does not exist locally is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def must_be_local(path: str) -> bool:
    """Whether `path`, found on no local disk, cannot be a hub dataset id either (a data file's suffix, or a name
    the hub would not take): a mistyped path, refused without asking the hub."""
    return path.lower().endswith(FILE_SUFFIXES) or not _HUB_ID.match(path)


_ROW_EXAMPLE = '{"prompt": ..., "chosen": ..., "rejected": ...}'


@dataclass(frozen=True)
class Row:
    index: int
    """Position in the input, counted from 0 over every row read."""
    source: str
    """Where the row came from, e.g. `train.jsonl line 12`."""
    fields: dict[str, Any]


def read_rows(path: str, split: str) -> Iterator[Row]:
    """Rows of a .jsonl / .jsonl.gz / .json / .parquet file, a local dataset directory, or a hub dataset `split`."""
    local = Path(path)
    if local.is_dir():
        return _read_directory(local, path, split)
    if local.is_file():
        name = local.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(local, path)
        if name.endswith(".json"):
            return _read_json(local, path)
        if name.endswith(".parquet"):
            return _read_parquet(local, path)
        raise DataError(
            f"{path}: unknown file type. Fix: give a file ending in {', '.join(FILE_SUFFIXES)}, "
            "a datasets save_to_disk directory, or a hub dataset id"
        )
    if must_be_local(path):
        raise DataError(
            f"{path}: no such file or directory. Fix: check data.path (relative paths start from the working directory)"
        )
    return _load_dataset(path, split, "no such local file or directory, and loading it as a hub dataset failed")


def _read_jsonl(file: Path, path: str) -> Iterator[Row]:
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    index = 0
    with opener(file, "rb") as lines:
        # Decode line by line (not the whole file) so a bad byte or a bad line is reported with its line number.
        for number, raw in enumerate(_gzip_safe(lines, path), start=1):
            source = f"{path} line {number}"
            if number == 1:
                raw = _strip_bom(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{source}: invalid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}). "
                    "Fix: re-encode the file as UTF-8"
                ) from None
            if not text.strip():
                continue  # blank lines carry no row, as in datasets' JSON reader
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{source}: malformed JSON ({error.msg} at column {error.colno}). "
                    "Fix: each line must hold one complete JSON object"
                ) from None
            if not isinstance(fields, dict):
                raise DataError(
                    f"{source}: expected a JSON object with the row's fields, got {type(fields).__name__}. "
                    f"Fix: each line must hold one JSON object, e.g. {_ROW_EXAMPLE}"
                )
            yield Row(index, source, fields)
            index += 1


def _strip_bom(start: bytes) -> bytes:
    """The start of a file without the UTF-8 byte-order mark that Windows tools often write there.

    The mark names the encoding and is no part of the text. Elsewhere in a file it stays, and JSON rejects it as before.
    """
    return start.removeprefix(codecs.BOM_UTF8)


def _gzip_safe(lines: Any, path: str) -> Iterator[bytes]:
    try:
        yield from lines
    except (gzip.BadGzipFile, EOFError) as error:
        raise DataError(
            f"{path}: not a readable gzip file ({error}). "
            "Fix: recompress it, or drop the .gz suffix if it is plain text"
        ) from None


def _read_json(file: Path, path: str) -> Iterator[Row]:
    data = _strip_bom(file.read_bytes())
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path} line {line}: invalid UTF-8 (byte {data[error.start]:#04x}). Fix: re-encode the file as UTF-8"
        ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} line {error.lineno}: malformed JSON ({error.msg} at column {error.colno}). "
            "Fix: a .json file must hold one JSON list of row objects; "
            "rename it to .jsonl if it holds one object per line"
        ) from None
    if not isinstance(rows, list):
        raise DataError(
            f"{path}: expected a JSON list of row objects, got {type(rows).__name__}. "
            "Fix: put the rows in a top-level list [{...}, {...}], or write one object per line to a .jsonl file"
        )
    for index, fields in enumerate(rows):
        source = f"{path} row {index}"
        if not isinstance(fields, dict):
            raise DataError(
                f"{source}: expected a JSON object with the row's fields, got {type(fields).__name__}. "
                f"Fix: every element of the list must be an object, e.g. {_ROW_EXAMPLE}"
            )
        yield Row(index, source, fields)


def _read_parquet(file: Path, path: str) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(file)
    except pyarrow.ArrowException as error:
        raise DataError(
            f"{path}: not a readable Parquet file ({error}). Fix: rewrite it with pyarrow or datasets' to_parquet"
        ) from None
    index = 0
    for batch in parquet.iter_batches():
        for fields in batch.to_pylist():
            yield Row(index, f"{path} row {index}", fields)
            index += 1


def _read_directory(directory: Path, path: str, split: str) -> Iterator[Row]:
    import datasets

    if not ((directory / "dataset_dict.json").exists() or (directory / "state.json").exists()):
        # Not a save_to_disk directory: a folder of data files, which datasets reads like a hub dataset.
        return _load_dataset(path, split, "datasets cannot read this directory")
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as error:  # datasets raises several unrelated types for a damaged directory
        raise DataError(
            f"{path}: cannot load this save_to_disk directory ({error}). Fix: save it again with Dataset.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r}; it has {', '.join(loaded)}. Fix: set data.split to one of them"
            )
        return _dataset_rows(loaded[split], f"{path} [{split}]")
    return _dataset_rows(loaded, path)


def _load_dataset(path: str, split: str, failure: str) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as error:  # network, missing split, unknown id: datasets raises many types
        raise DataError(
            f"{path} [{split}]: {failure} ({type(error).__name__}: {error}). "
            "Fix: check the path, or the hub dataset id and data.split"
        ) from None
    return _dataset_rows(dataset, f"{path} [{split}]")


def _dataset_rows(dataset: Any, name: str) -> Iterator[Row]:
    for index, fields in enumerate(dataset):
        yield Row(index, f"{name} row {index}", fields)
