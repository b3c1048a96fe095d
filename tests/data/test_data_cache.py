"""The token store's default place: a directory named for the data and settings under a cache root every run shares,
the root's fallbacks, and the listing."""

import json
import os

import pytest
from huggingface_hub import constants

from dpo_scale.cli import main
from dpo_scale.config import DataConfig
from dpo_scale.data import load_prepared, store_directory
from dpo_scale.data.cache import cache_roots, list_stores, store_name

ROWS = [{"prompt": f"question {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(5)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_the_root_is_dpo_scale_cache_else_the_hf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_SCALE_CACHE", str(tmp_path / "mine"))
    assert cache_roots() == [tmp_path / "mine"]
    monkeypatch.delenv("DPO_SCALE_CACHE")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_roots() == [tmp_path / "hf" / "dpo_scale", tmp_path / "home" / ".cache" / "dpo_scale"]


def test_runs_with_the_same_data_and_settings_share_one_store(data_file, tmp_path, byte_tokenizer, capsys):
    """Two run directories, one store, built once; other settings get a store of their own beside it."""
    config = DataConfig(path=str(data_file))
    first = store_directory(config, byte_tokenizer, tmp_path / "run-a")
    assert first.parent == cache_roots()[0]  # the session's DPO_SCALE_CACHE (tests/conftest.py)
    assert first.name == store_name(config, byte_tokenizer) and first.name.startswith("pairs.jsonl-")
    assert len(load_prepared(config, byte_tokenizer, first).pairs) == 5
    assert "tokenizing" in capsys.readouterr().out
    assert store_directory(config, byte_tokenizer, tmp_path / "run-b") == first
    load_prepared(config, byte_tokenizer, first)
    assert f"token store {first}: reusing it" in capsys.readouterr().out
    other = store_directory(DataConfig(path=str(data_file), max_length=8), byte_tokenizer, tmp_path / "run-a")
    assert other.parent == first.parent and other != first
    assert store_directory(DataConfig(path=str(data_file), cache_dir=str(tmp_path / "mine")), byte_tokenizer,
                           tmp_path / "run-a") == tmp_path / "mine"  # fmt: skip


def test_a_changed_data_file_gets_a_new_store(data_file, tmp_path, byte_tokenizer):
    """The name covers the data file's path, size and modification time (nothing is read to find the store)."""
    config = DataConfig(path=str(data_file))
    before = store_name(config, byte_tokenizer)
    stat = data_file.stat()
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert store_name(config, byte_tokenizer) != before
    copy = tmp_path / "copy" / "pairs.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data_file.read_bytes())
    assert store_name(DataConfig(path=str(copy)), byte_tokenizer) != store_name(config, byte_tokenizer)


def test_an_unwritable_root_falls_back_to_the_run_directory(data_file, tmp_path, byte_tokenizer, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DPO_SCALE_CACHE", str(blocker / "cache"))  # under a file: cannot be created, even by root
    directory = store_directory(DataConfig(path=str(data_file)), byte_tokenizer, tmp_path / "run")
    assert directory == tmp_path / "run" / "token-store"
    assert capsys.readouterr().out.strip() == (
        f"token store: no writable cache root ({blocker / 'cache'}: Not a directory); using {directory}, which other "
        "runs do not find. Fix: set DPO_SCALE_CACHE to a writable directory to share it"
    )


def test_an_unwritable_hf_home_falls_back_to_the_user_cache(tmp_path, monkeypatch, byte_tokenizer):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("DPO_SCALE_CACHE")
    monkeypatch.setattr(constants, "HF_HOME", str(blocker))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    directory = store_directory(DataConfig(path="org/dataset"), byte_tokenizer, tmp_path / "run")
    assert directory.parent == tmp_path / "home" / ".cache" / "dpo_scale" and directory.name.startswith("dataset-")


def test_the_listing_shows_data_settings_pairs_size_and_last_use(data_file, tmp_path, byte_tokenizer, monkeypatch,
                                                                 capsys):  # fmt: skip
    monkeypatch.setenv("DPO_SCALE_CACHE", str(tmp_path / "cache"))
    config = DataConfig(path=str(data_file), max_length=64)
    store = store_directory(config, byte_tokenizer, tmp_path / "run")
    load_prepared(config, byte_tokenizer, store)
    (tmp_path / "cache" / "unfinished-0123").mkdir()
    capsys.readouterr()
    assert main(["prepare-data", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path / 'cache'}: 2 token store(s)"
    assert lines[1] == f"  {store}"
    assert lines[2] == f"    data: {data_file} (1 file(s), {data_file.stat().st_size:,} bytes)"
    assert lines[3].startswith('    settings: split="train" format="auto" columns={} max_length=64 '
                               'truncation_mode="keep_start" filters.drop_duplicates=false')  # fmt: skip
    assert "filters.max_length_ratio=null tokenizer=" in lines[3]
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20
    assert lines[4].startswith(f"    5 pairs, 0 dropped; {size:,.1f} MiB; last used ")
    assert lines[5:7] == [f"  {tmp_path / 'cache' / 'unfinished-0123'}", "    data: ?"]
    assert list_stores() == "\n".join(lines)
