"""The reference cache: precompute-ref writes it (1 or 2 ranks, resumable), training reads it, mismatches are refused."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tracemalloc

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dpo_scale.commands.demo import write_demo_material
from dpo_scale.config import ConfigError, DataConfig, LogpsConfig, ModelConfig
from dpo_scale.data import Pair, load_tokenizer, prepare
from dpo_scale.model.layout import collate
from dpo_scale.model.wrapper import PairLogpsModel
from dpo_scale.reference.cache import (
    FIELDS, INDEX_KEYS, INDEX_ROWS, CacheReader, open_cache, read_manifest, write_manifest, write_shard,
)  # fmt: skip
from launch import DPO_SCALE, base_config, free_port, train, train_metrics

SHARD, BATCH = 16, 4


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=96)


def _tree(material, tmp_path, cache, **extra):
    tree = base_config(material, tmp_path / "run", **extra)
    tree["reference"] = {"cache_dir": str(cache), "shard_size": SHARD, "precompute_batch_size": BATCH}
    return tree


def _precompute(tree, tmp_path, ranks=1, **popen):
    config = tmp_path / f"pre-{ranks}-{time.time_ns()}.yaml"
    config.write_text(yaml.safe_dump(tree))
    command = [DPO_SCALE, "precompute-ref", "--config", str(config)]
    if ranks > 1:
        command = [shutil.which("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def cache(material, tmp_path_factory):
    """One cache made by one process, shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("cache")
    _ok(_precompute(_tree(material, tmp_path, tmp_path / "cache"), tmp_path))
    return tmp_path / "cache"


@pytest.mark.slow
def test_round_trip_is_bitwise(material, cache):
    """Every pair's cached values are exactly what the log-prob stage computes for it with the same batches (the
    precompute's batches: BATCH pairs at a time within each shard, one pair per row)."""
    model_dir, data_path = material
    tokenizer = load_tokenizer(str(model_dir))
    pairs = prepare(DataConfig(str(data_path)), tokenizer).pairs
    reader = open_cache(cache, ModelConfig(str(model_dir)), DataConfig(str(data_path)), tokenizer)
    assert len(pairs) == len(reader) == 96
    model = PairLogpsModel(AutoModelForCausalLM.from_pretrained(model_dir).eval(), LogpsConfig())
    for start in range(0, len(pairs), BATCH):
        batch = pairs[start : start + BATCH]
        with torch.no_grad():
            expected = model(collate(batch, LogpsConfig(), tokenizer.pad_token_id))
        chosen, rejected, chosen_shared, rejected_shared = reader.lookup(batch, FIELDS)
        assert torch.equal(chosen, expected.chosen_logps) and torch.equal(rejected, expected.rejected_logps)
        assert torch.equal(chosen_shared, expected.chosen_shared_logps)  # LD-DPO's shared part (loss.ld_alpha)
        assert torch.equal(rejected_shared, expected.rejected_shared_logps)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["pairs"] for s in manifest["shards"]] == [SHARD] * 6
    assert sum((cache / s["name"]).stat().st_size for s in manifest["shards"]) / 96 < 200  # bytes per pair, headers in


@pytest.mark.slow
@pytest.mark.parametrize("loss", [{}, {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5}], ids=["dpo", "ld_alpha"])
def test_training_from_the_cache_follows_the_online_reference(material, cache, tmp_path, loss):
    """Same run, reference from the cache vs a frozen copy: the values differ only by batch composition (fp32
    rounding, ~1e-6 nats), so per-step losses agree within 1e-5. With LD-DPO the cache's shared-part sums stand in
    for the copy's."""
    online = base_config(material, tmp_path / "online", loss=loss)
    cached = _tree(material, tmp_path, cache, loss=loss)
    cached["run_dir"] = str(tmp_path / "cached")
    cached["reference"]["source"] = "cache"
    _ok(train(online))
    _ok(train(cached))
    losses = [r["loss"] for r in train_metrics(tmp_path / "online")]
    assert [r["loss"] for r in train_metrics(tmp_path / "cached")] == pytest.approx(losses, abs=1e-5)
    assert len(set(losses)) > 2


@pytest.mark.slow
def test_two_ranks_train_from_a_one_rank_cache_and_make_the_same_cache(material, cache, tmp_path):
    """A cache does not depend on the world size that made it (shards are assigned by number), and any world size
    reads it: 2 ranks train from the 1-process cache, and a 2-rank precompute writes byte-identical files."""
    two = _tree(material, tmp_path, tmp_path / "two-rank-cache")
    _ok(_precompute(two, tmp_path, ranks=2))
    assert _files(tmp_path / "two-rank-cache") == _files(cache)

    trained = _tree(material, tmp_path, cache, micro_batch_size=2)
    trained["reference"]["source"] = "cache"
    _ok(train(trained, ranks=2))
    rows = train_metrics(tmp_path / "run")
    assert len(rows) == 6 and rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_files(material, cache, tmp_path):
    """Killed after a few shards and started again, the job computes only the missing shards; the finished cache is
    byte for byte the uninterrupted one (same shard boundaries, same batches, deterministic fp32 on CPU)."""
    directory = tmp_path / "resumed"
    tree = _tree(material, tmp_path, directory)
    tree["reference"]["precompute_batch_size"] = 1  # slow enough to be killed half way
    tree["reference"]["shard_size"] = SHARD
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(tree))
    job = subprocess.Popen(
        [DPO_SCALE, "precompute-ref", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(list(directory.glob("shard-*"))) < 2 and time.time() < deadline and job.poll() is None:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert not (directory / "manifest.json").exists() and 2 <= len(list(directory.glob("shard-*"))) < 6

    result = _precompute(tree, tmp_path)
    _ok(result)
    assert "to compute" in result.stdout
    files = _files(directory)
    assert not [name for name in files if name.startswith(".")]  # no partial shard left visible
    # precompute_batch_size differs from the reference cache's, so compare with a straight run of this config
    straight = tmp_path / "straight"
    tree["reference"]["cache_dir"] = str(straight)
    _ok(_precompute(tree, tmp_path))
    assert files == _files(straight)


@pytest.mark.slow
def test_refusals_name_what_differs(material, cache, tmp_path, monkeypatch):
    """Every fingerprint field that differs is named with both values; a changed file by name, size and hash."""
    model_dir, data_path = material
    tokenizer = load_tokenizer(str(model_dir))
    model, data = ModelConfig(str(model_dir)), DataConfig(str(data_path))

    with pytest.raises(ConfigError, match="data.max_length: cache null, this run 10"):
        open_cache(cache, model, DataConfig(str(data_path), max_length=10), tokenizer)
    with pytest.raises(ConfigError, match="reference_dtype: cache float32, this run bfloat16"):
        open_cache(cache, ModelConfig(str(model_dir), dtype="bfloat16"), data, tokenizer)

    edited_data = tmp_path / "data" / data_path.name
    edited_data.parent.mkdir()
    lines = data_path.read_text().splitlines(keepends=True)
    edited_data.write_text("".join(lines[1:] + lines[:1]))  # same bytes, another order
    size = f"{data_path.stat().st_size:,} bytes"
    with pytest.raises(ConfigError, match=rf"data file {data_path.name}: its content differs \(cache {size}, sha256 "
                                          rf"[0-9a-f]{{12}}; this run {size}, sha256 [0-9a-f]{{12}}\)"):  # fmt: skip
        open_cache(cache, model, DataConfig(str(edited_data)), tokenizer)

    edited_model = tmp_path / "model"
    shutil.copytree(model_dir, edited_model)
    (edited_model / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()),
                                                          "rope_theta": 500000.0}))  # fmt: skip
    with pytest.raises(ConfigError, match="reference_weights file config.json: its content differs") as refused:
        open_cache(cache, ModelConfig(str(edited_model)), data, tokenizer)
    assert "model.safetensors" not in str(refused.value)  # the unchanged file is not named

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="chat_template: cache null, this run [0-9a-f]{12}"):
        open_cache(cache, model, data, templated)
    monkeypatch.setattr("dpo_scale.data.build.__version__", "0.0.1")
    with pytest.raises(ConfigError, match=r"dpo_scale_version: cache \S+, this run 0.0.1"):
        open_cache(cache, model, data, tokenizer)
    monkeypatch.undo()

    pair = Pair(0, "made-up row 1", [1, 2], [3, 4], [5])
    with pytest.raises(ConfigError, match="made-up row 1: this pair is not in the reference cache"):
        open_cache(cache, model, data, tokenizer).lookup([pair])

    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    shard = damaged / "shard-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="shard-00002.safetensors fails its checksum"):
        open_cache(damaged, model, data, tokenizer)
    shard.unlink()
    with pytest.raises(ConfigError, match="shard-00002.safetensors is missing"):
        open_cache(damaged, model, data, tokenizer)

    # precompute into a directory of another configuration's shards is refused, not mixed
    result = _precompute(_tree(material, tmp_path, cache, data={"path": str(data_path), "max_length": 10}), tmp_path)
    assert result.returncode == 2 and "holds shards made for other weights, data or settings" in result.stderr
    assert "data.max_length: cache null, this run 10" in result.stderr


@pytest.mark.slow
def test_zero3_sharded_precompute_writes_the_same_cache(material, tmp_path):
    """A reference split across 2 ranks by ZeRO-3 (each holds half, forwards gather the layers) gives byte-identical
    files to one whole reference in one process: the gathered weights are the same fp32 values. 3 shards over 2
    ranks: rank 1 has one shard fewer and keeps running throw-away forwards until rank 0 is done (without them rank
    0's last forwards would wait for it forever)."""
    whole = _tree(material, tmp_path, tmp_path / "whole")
    whole["reference"]["shard_size"] = 32
    _ok(_precompute(whole, tmp_path))
    sharded = copy.deepcopy(whole)
    sharded["reference"].update(cache_dir=str(tmp_path / "sharded"), precompute_sharded=True)
    result = _precompute(sharded, tmp_path, ranks=2)
    _ok(result)
    held = re.findall(r"rank (\d): holds ([\d,]+) of the reference's ([\d,]+) parameters", result.stdout)
    assert sorted(rank for rank, _, _ in held) == ["0", "1"]
    for _, part, total in held:
        assert int(part.replace(",", "")) <= int(total.replace(",", "")) // 2 + 64
    files = _files(tmp_path / "sharded")
    assert len([name for name in files if name.startswith("shard-")]) == 3
    assert files == _files(tmp_path / "whole")


@pytest.mark.slow
def test_sharded_precompute_refusals(material, tmp_path):
    tree = _tree(material, tmp_path, tmp_path / "refused", deepspeed={"config": "zero2"})
    tree["reference"]["precompute_sharded"] = True
    result = _precompute(tree, tmp_path)
    assert result.returncode == 2 and "needs a ZeRO stage 3 deepspeed.config; zero2 is not" in result.stderr
    tree["deepspeed"] = {"precision": "bf16"}
    result = _precompute(tree, tmp_path)
    assert result.returncode == 2 and "set model.dtype=bfloat16" in result.stderr
    assert not (tmp_path / "refused").exists()  # refused before anything was written


@pytest.mark.slow
def test_reader_holds_neither_keys_nor_values_in_memory(tmp_path):
    """Out of core: an open reader of a 100k-pair cache holds a small fraction of the index's bytes, and a lookup
    allocates as little (tracemalloc counts numpy and torch CPU allocations); the keys are binary-searched in the
    memory-mapped index. (Opening reads every file once for its checksum, 1 MiB at a time.)"""
    pairs = [Pair(i, f"row {i}", [i % 1000, i // 1000], [7], [9, i % 5]) for i in range(100_000)]
    chosen, rejected = torch.arange(100_000.0), -torch.arange(100_000.0)
    for index in range(4):
        rows = slice(index * 25_000, (index + 1) * 25_000)
        values = {"chosen": chosen[rows], "rejected": rejected[rows]}
        shared = {"chosen_shared": chosen[rows].clone(), "rejected_shared": rejected[rows].clone()}
        write_shard(tmp_path, index, pairs[rows], {**values, **shared})
    write_manifest(tmp_path, {}, num_shards=4, shard_size=25_000)
    index_bytes = (tmp_path / INDEX_KEYS).stat().st_size + (tmp_path / INDEX_ROWS).stat().st_size
    assert index_bytes > 100_000 * 24

    tracemalloc.start()
    reader = CacheReader(tmp_path, read_manifest(tmp_path))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    sample = pairs[99_990:] + pairs[:3] + pairs[51_234:51_240]
    found_chosen, found_rejected = reader.lookup(sample)
    _, lookup_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < index_bytes / 20 and lookup_peak - held < index_bytes / 20, (held, lookup_peak, index_bytes)
    expected = torch.tensor([float(p.index) for p in sample])
    assert torch.equal(found_chosen, expected) and torch.equal(found_rejected, -expected)
    assert len(reader) == 100_000


def test_a_cache_without_the_shared_sums_is_refused_for_ld_alpha_only(tmp_path):
    """Caches written before the LD-DPO fields existed (no "fields" in the manifest) still serve the plain sums;
    a run with loss.ld_alpha is refused when it is built, naming what is missing and the fix."""
    from dpo_scale.reference.sources import CachedReference

    pairs = [Pair(i, f"row {i}", [1, i], [7], [9]) for i in range(4)]
    write_shard(tmp_path, 0, pairs, {name: torch.arange(4.0) for name in FIELDS})
    write_manifest(tmp_path, {}, num_shards=1, shard_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["fields"] == list(FIELDS)
    del manifest["fields"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    reader = CacheReader(tmp_path, read_manifest(tmp_path))
    assert CachedReference(reader).reader is reader
    with pytest.raises(ConfigError, match="not chosen_shared, rejected_shared, which loss.ld_alpha needs .* recompute"):
        CachedReference(reader, shared_sums=True)
