"""The token store's default place: a directory named for the data and settings under a cache root every run shares,
the root's fallbacks, and the listing."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from dpo_scale.cli import main
from dpo_scale.config import ConfigError, DataConfig
from dpo_scale.data import load_prepared, store_directory
from dpo_scale.data.cache import cache_roots, list_stores, store_name
from dpo_scale.data.store import is_shared
from dpo_scale.commands.demo import preference_rows, write_tokenizer
from launch import DPO_SCALE

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
    assert is_shared(first) and not is_shared(tmp_path / "mine")
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


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_an_unusable_dpo_scale_cache_is_an_error_naming_it(data_file, tmp_path, byte_tokenizer, monkeypatch, kind):
    """A root chosen on purpose is never replaced by a fallback that hides it: the error says what it is."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    chosen = blocker if kind == "file" else blocker / "cache"  # under a file: cannot be created, even by root
    monkeypatch.setenv("DPO_SCALE_CACHE", str(chosen))
    problem = "is a file, not a directory" if kind == "file" else "cannot be created (Not a directory)"
    with pytest.raises(ConfigError, match=rf"^DPO_SCALE_CACHE={chosen}: {re.escape(problem)}, so no token store can "
                                          "be kept there. Fix: set DPO_SCALE_CACHE to a writable directory"):
        store_directory(DataConfig(path=str(data_file)), byte_tokenizer, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _no_writable_root(tmp_path, monkeypatch) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("DPO_SCALE_CACHE")
    monkeypatch.setattr(constants, "HF_HOME", str(blocker / "hf"))
    monkeypatch.setenv("HOME", str(blocker / "home"))
    return blocker


def test_with_no_writable_root_the_run_directory_holds_stores_by_name(data_file, tmp_path, byte_tokenizer,
                                                                      monkeypatch, capsys):  # fmt: skip
    """The run directory's token-stores is the root: another data or setting gets a store of its own there, so a
    later run in the same directory never opens (or replaces) the earlier run's store with its own data."""
    blocker = _no_writable_root(tmp_path, monkeypatch)
    config = DataConfig(path=str(data_file))
    directory = store_directory(config, byte_tokenizer, tmp_path / "run")
    assert directory == tmp_path / "run" / "token-stores" / store_name(config, byte_tokenizer)
    assert capsys.readouterr().out.strip() == (
        f"token store: no writable cache root ({blocker / 'hf' / 'dpo_scale'}: cannot be created (Not a directory); "
        f"{blocker / 'home' / '.cache' / 'dpo_scale'}: cannot be created (Not a directory)); using "
        f"{directory.parent}, which other runs do not find. Fix: set DPO_SCALE_CACHE to a writable directory to "
        "share it"
    )
    other = store_directory(DataConfig(path=str(data_file), max_length=8), byte_tokenizer, tmp_path / "run")
    assert other.parent == directory.parent and other != directory
    with pytest.raises(ConfigError, match="no writable cache root .* Fix: set DPO_SCALE_CACHE to a writable"):
        store_directory(config, byte_tokenizer, None)  # prepare-data, data-report: no run directory to fall back on


def test_paths_are_recorded_absolute(data_file, tmp_path, byte_tokenizer, monkeypatch):
    """A relative DPO_SCALE_CACHE, data.cache_dir or run_dir names the store from the directory the run started
    in, so the path saved in the run's config finds it from any other directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPO_SCALE_CACHE", "relcache")
    config = DataConfig(path=str(data_file))
    assert store_directory(config, byte_tokenizer, "run") == tmp_path / "relcache" / store_name(config, byte_tokenizer)
    mine = DataConfig(path=str(data_file), cache_dir="stores/mine")
    assert store_directory(mine, byte_tokenizer, "run") == tmp_path / "stores" / "mine"
    _no_writable_root(tmp_path, monkeypatch)
    assert store_directory(config, byte_tokenizer, "run").parent == tmp_path / "run" / "token-stores"


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


def test_the_listing_says_what_a_root_is_when_it_is_no_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_SCALE_CACHE", str(tmp_path / "missing"))
    assert list_stores() == f"{tmp_path / 'missing'}: does not exist (DPO_SCALE_CACHE names it)"
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DPO_SCALE_CACHE", str(tmp_path / "a-file"))
    assert list_stores() == f"{tmp_path / 'a-file'}: is a file, not a directory (DPO_SCALE_CACHE names it)"


@pytest.mark.slow
def test_prepare_data_names_a_dpo_scale_cache_that_is_a_file(data_file, tmp_path):
    """At the shell: `--list` says the root is a file, and building a store there exits 2 naming DPO_SCALE_CACHE
    (not a store made elsewhere that other runs would not find)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DPO_SCALE_CACHE": str(blocker)}
    listing = subprocess.run([DPO_SCALE, "prepare-data", "--list"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0 and listing.stdout.strip() == (
        f"{blocker}: is a file, not a directory (DPO_SCALE_CACHE names it)"
    ), listing.stdout + listing.stderr
    model = tmp_path / "model"
    write_tokenizer(model)
    build = _prepare_data(tmp_path, model, data_file, env)
    assert build.returncode == 2, build.stdout + build.stderr
    assert f"DPO_SCALE_CACHE={blocker}: is a file, not a directory, so no token store can be kept there" in build.stderr
    assert "Traceback" not in build.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_new_run_directory_store_never_replaces_the_earlier_runs(tmp_path):
    """At the shell, with no writable cache root: the earlier run's store in run_dir/token-stores is kept byte for
    byte when the same run_dir is used for other data; the new data gets a store of its own beside it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(blocker / "hf"), "HOME": str(blocker / "home")}
    env.pop("DPO_SCALE_CACHE")
    model = tmp_path / "model"
    write_tokenizer(model)  # the demo's word-level tokenizer: the demo's rows, two seeds for two datasets
    paths = [tmp_path / "pairs.jsonl", tmp_path / "other.jsonl"]
    for seed, path in enumerate(paths):
        path.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(8, seed)))
    stores = tmp_path / "run" / "token-stores"
    for number, path in enumerate(paths):
        result = _prepare_data(tmp_path, model, path, env)
        assert result.returncode == 0, result.stdout + result.stderr
        if number == 0:
            (first,) = stores.iterdir()
            before = _contents(first)
    assert sorted(p.name.split("-")[0] for p in stores.iterdir()) == ["other.jsonl", "pairs.jsonl"]
    assert _contents(first) == before


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _prepare_data(tmp_path, model, data, env) -> subprocess.CompletedProcess:
    """`dpo-scale prepare-data` at the shell for a training config of `model` and `data`, run_dir tmp_path/run."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "data": {"path": str(data)},
                                      "run_dir": str(tmp_path / "run")}))  # fmt: skip
    return subprocess.run([DPO_SCALE, "prepare-data", "--config", str(config)], capture_output=True, text=True, env=env)
