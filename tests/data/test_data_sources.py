"""Every source type yields the same rows, in order, each tagged with where it came from."""

import gzip
import json

import pytest

from dpo_scale.data.errors import DataError
from dpo_scale.data.sources import read_rows

ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two and two make", "chosen": " four.", "rejected": " five."},
    {"prompt": "Water boils at", "chosen": " 100 C.", "rejected": " 10 C."},
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_parquet(path, rows):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    rows = list(read_rows(str(path), "train"))
    assert [r.fields for r in rows] == ROWS
    assert [r.index for r in rows] == [0, 1, 2]
    assert rows[2].source == f"{path} line 3"


def test_jsonl_gz(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl.gz", ROWS, opener=gzip.open)
    rows = list(read_rows(str(path), "train"))
    assert [r.fields for r in rows] == ROWS
    assert rows[0].source.endswith("train.jsonl.gz line 1")


def test_jsonl_blank_lines_are_skipped_but_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    rows = list(read_rows(str(path), "train"))
    assert [r.index for r in rows] == [0, 1]
    assert [r.source.rsplit(" ", 1)[1] for r in rows] == ["2", "5"]


def test_json_list(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    rows = list(read_rows(str(path), "train"))
    assert [r.fields for r in rows] == ROWS
    assert rows[1].source == f"{path} row 1"


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", ROWS)
    rows = list(read_rows(str(path), "train"))
    assert [r.fields for r in rows] == ROWS
    assert rows[2].source == f"{path} row 2"


def test_save_to_disk_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    rows = list(read_rows(str(tmp_path / "ds"), "train"))
    assert [r.fields for r in rows] == ROWS
    assert rows[1].source == f"{tmp_path / 'ds'} row 1"


def test_save_to_disk_dataset_dict_reads_the_split(tmp_path):
    import datasets

    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    rows = list(read_rows(str(tmp_path / "dd"), "test"))
    assert [r.fields for r in rows] == ROWS[:1]
    assert rows[0].source == f"{tmp_path / 'dd'} [test] row 0"
    with pytest.raises(DataError, match=r"no split 'validation'; it has train, test\. Fix: set data.split"):
        read_rows(str(tmp_path / "dd"), "validation")


def test_directory_of_data_files_goes_through_load_dataset(tmp_path, monkeypatch):
    """A folder that is not a save_to_disk directory is read by datasets.load_dataset, as a hub dataset would be."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not the user's cache
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS)
    rows = list(read_rows(str(tmp_path / "folder"), "train"))
    assert [r.fields for r in rows] == ROWS
    assert rows[0].source == f"{tmp_path / 'folder'} [train] row 0"


@pytest.mark.parametrize("path", ["missing.jsonl", "data/missing.parquet", "./missing", "/no/such/dir"])
def test_a_missing_local_path_is_no_such_file(path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_rows(path, "train")


def test_a_hub_id_goes_to_load_dataset_with_the_split(monkeypatch):
    """The ordinary hub path, with datasets.load_dataset stubbed: nothing is downloaded."""
    import datasets

    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = list(read_rows("someone/prefs", "test"))
    assert calls == [("someone/prefs", "test")]
    assert [r.fields for r in rows] == ROWS
    assert rows[1].source == "someone/prefs [test] row 1"


def test_a_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(path, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"someone/prefs \[train\]: no such local file .* \(ConnectionError: offline\)"):
        read_rows("someone/prefs", "train")


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows tools write at the start of a file


@pytest.mark.parametrize("name, opener", [("train.jsonl", open), ("train.jsonl.gz", gzip.open)])
def test_jsonl_starting_with_a_byte_order_mark(tmp_path, name, opener):
    path = tmp_path / name
    with opener(path, "wb") as f:
        f.write(BOM + "".join(json.dumps(row) + "\n" for row in ROWS).encode("utf-8"))
    rows = list(read_rows(str(path), "train"))
    assert [r.fields for r in rows] == ROWS
    assert rows[0].source == f"{path} line 1"


def test_json_starting_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(BOM + json.dumps(ROWS).encode("utf-8"))
    assert [r.fields for r in read_rows(str(path), "train")] == ROWS


def test_a_byte_order_mark_after_the_start_is_still_malformed(tmp_path):
    lines = tmp_path / "train.jsonl"
    lines.write_bytes(json.dumps(ROWS[0]).encode("utf-8") + b"\n" + BOM + json.dumps(ROWS[1]).encode("utf-8"))
    with pytest.raises(DataError, match=r"train\.jsonl line 2: malformed JSON \(Unexpected UTF-8 BOM"):
        list(read_rows(str(lines), "train"))
    listed = tmp_path / "pairs.json"
    listed.write_bytes(b"[" + BOM + json.dumps(ROWS[0]).encode("utf-8") + b"]")
    with pytest.raises(DataError, match=r"pairs\.json line 1: malformed JSON \(Expecting value at column 2\)"):
        list(read_rows(str(listed), "train"))
