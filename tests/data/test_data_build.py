"""Building the token store as users run it: `dpo-scale prepare-data`, killed and restarted, two jobs at once, and a
2-rank `deepspeed` launch whose store a second launch and a sweep reuse without tokenizing."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dpo_scale.commands.demo import write_demo_material
from launch import DPO_SCALE, base_config, train, train_metrics

ROWS = 12_000
SHARD_ROWS = 400
SHARDS = ROWS // SHARD_ROWS


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=ROWS)


def _config(material, directory: Path, store: Path, **data) -> Path:
    model_dir, data_path = material
    config = directory / f"{store.name}.yaml"
    data = {"path": str(data_path), "cache_dir": str(store), "shard_rows": SHARD_ROWS, "num_workers": 1, **data}
    config.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": data, "run_dir": str(directory)}))
    return config


def _prepare_data(config: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([DPO_SCALE, "prepare-data", "--config", str(config)], text=True, env=env, **popen)


def _run(config: Path) -> str:
    process = _prepare_data(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out + err
    return out


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store: not the hidden ones (the empty lock files, and the aside copy of a file a killed
    process was writing, which no reader opens)."""
    return {path.name: path.read_bytes() for path in sorted(store.iterdir()) if not path.name.startswith(".")}


def _built(output: str) -> int:
    return sum(int(n) for n in re.findall(r"rank \d+ built (\d+) of \d+ shards", output))


@pytest.fixture(scope="module")
def reference_store(material, tmp_path_factory):
    """The store built once, start to finish, by one process."""
    directory = tmp_path_factory.mktemp("reference")
    output = _run(_config(material, directory, directory / "store"))
    assert _built(output) == SHARDS and f"{ROWS} rows: " in output
    return _files(directory / "store")


@pytest.mark.slow
def test_killed_during_the_build_the_same_command_finishes_it_with_identical_files(material, reference_store, tmp_path):
    """SIGKILL once two shards exist; the same command then builds only what is missing, and every file of the
    store (shards, build claim, manifest) is byte for byte the uninterrupted build's."""
    config = _config(material, tmp_path, tmp_path / "store")
    process = _prepare_data(config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list((tmp_path / "store").glob("shard-*.rows.npy"))) < 2:
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((tmp_path / "store").glob("shard-*.rows.npy")))
    assert 2 <= finished < SHARDS and not (tmp_path / "store" / "manifest.json").exists()
    output = _run(config)
    assert _built(output) == SHARDS - finished
    assert _files(tmp_path / "store") == reference_store


@pytest.mark.slow
def test_two_jobs_started_together_split_the_work_and_agree(material, reference_store, tmp_path):
    """Two `prepare-data` processes at once on an empty directory (the points of a SLURM sweep array): each shard
    is tokenized by exactly one of them (per-shard locks), both end with the complete store, the reference's files."""
    config = _config(material, tmp_path, tmp_path / "store")
    processes = [_prepare_data(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, out + err
        outputs.append(out)
    assert sum(_built(output) for output in outputs) == SHARDS, outputs
    assert _files(tmp_path / "store") == reference_store


@pytest.mark.slow
def test_a_two_rank_launch_builds_once_and_a_second_launch_and_a_sweep_reuse_it(material, tmp_path):
    """The deepspeed launcher's 2 ranks split the shards (their counts add up to the shard count: no row tokenized
    twice) and both train from the store; a second launch and both points of a sweep find it and tokenize nothing."""
    store = tmp_path / "store"
    data = {"path": str(material[1]), "cache_dir": str(store), "shard_rows": SHARD_ROWS}
    first = train(base_config(material, tmp_path / "first", data=data, max_steps=2), ranks=2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    built = [int(n) for n in re.findall(r"rank \d built (\d+) of 30 shards", first.stdout)]
    assert len(built) == 2 and sum(built) == SHARDS and min(built) > 0, first.stdout
    assert len(train_metrics(tmp_path / "first")) == 2

    second = train(base_config(material, tmp_path / "second", data=data, max_steps=2), ranks=2)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reusing it" in second.stdout and _built(second.stdout) == 0 and "tokenizing" not in second.stderr

    sweep_config = tmp_path / "sweep.yaml"
    sweep_config.write_text(yaml.safe_dump(base_config(material, tmp_path / "sweep", data=data, max_steps=1)))
    sweep = subprocess.run(
        [DPO_SCALE, "sweep", "--config", str(sweep_config), "--grid", "beta=0.1,0.2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert sweep.stdout.count("reusing it") == 2 and not re.search(r"rank \d+ built", sweep.stdout)
    assert [len(train_metrics(tmp_path / "sweep" / f"beta={beta}")) for beta in (0.1, 0.2)] == [1, 1]


@pytest.mark.slow
def test_runs_and_sweep_points_share_one_store_under_the_cache_root(material, tmp_path):
    """Without data.cache_dir, a run builds the store under the cache root ($DPO_SCALE_CACHE), named for the data,
    and records it (path in config.yaml, path and fingerprint in token-store.json); the points of a sweep, in other
    run directories, find it and tokenize nothing."""
    cache = tmp_path / "cache"
    data = {"path": str(material[1]), "shard_rows": 4096}
    tree = base_config(material, tmp_path / "first", data=data, max_steps=1)
    first = train(tree, env_extra={"DPO_SCALE_CACHE": str(cache)})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _built(first.stdout) == 3, first.stdout
    (store,) = cache.iterdir()
    assert store.name.startswith("preferences.jsonl-")
    assert yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())["data"]["cache_dir"] == str(store)
    fingerprint = json.loads((store / "manifest.json").read_text())["fingerprint"]
    recorded = json.loads((tmp_path / "first" / "token-store.json").read_text())
    assert recorded == {"path": str(store), "fingerprint": fingerprint}

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(base_config(material, tmp_path / "sweep", data=data, max_steps=1)))
    sweep = subprocess.run(
        [DPO_SCALE, "sweep", "--config", str(config), "--grid", "beta=0.1,0.2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "DPO_SCALE_CACHE": str(cache)},
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert _built(sweep.stdout) == 0 and sweep.stdout.count(f"token store {store}: reusing it") == 2, sweep.stdout
    assert list(cache.iterdir()) == [store]


@pytest.mark.slow
def test_prepare_data_reports_a_bad_row_without_a_traceback(material, tmp_path):
    """A user mistake in the data: exit 2, one message naming file, line and field, and no store made visible."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    config = _config(material, tmp_path, tmp_path / "store", path=str(data))
    process = _prepare_data(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, out + err
    assert f"dpo-scale prepare-data: error: {data} line 2, field 'rejected': missing (or null)" in err
    assert "Traceback" not in err and not (tmp_path / "store" / "manifest.json").exists()
