"""`dpo-scale precompute-ref --config run.yaml`: the reference log-probs of every pair, once, into a disk cache.

The same data path and log-prob stage as training (prefix sharing, streaming head), with the reference model in
place of the policy and no gradients. Each rank holds the whole reference (plain data parallel) and computes the
shards whose number is its rank modulo the world size; a shard already on disk is complete (see ref_cache.py), so
a job killed at any point and started again computes only what is missing, and the finished cache is the same files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dpo_scale import distributed
from dpo_scale.config import ConfigError, LogpsConfig, TrainConfig
from dpo_scale.data import load_tokenizer, padding_id, prepare
from dpo_scale.io import atomic_open
from dpo_scale.layout import collate
from dpo_scale.model import PairLogpsModel, load_causal_lm
from dpo_scale.ref_cache import MANIFEST, fingerprint, shard_name, write_manifest, write_shard
from dpo_scale.tracking import ProgressBar, print0

FINGERPRINT = "fingerprint.json"


def precompute(config: TrainConfig) -> Path:
    if not config.reference.cache_dir:
        raise ConfigError("reference.cache_dir is required: where precompute-ref writes the cache")
    world = distributed.init(config.deepspeed.timeout_s)
    try:
        return _precompute(config, world)
    except BaseException:
        distributed.abort()
        raise
    finally:
        distributed.close()


def _precompute(config: TrainConfig, world: distributed.World) -> Path:
    directory = Path(config.reference.cache_dir)
    tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
    data = prepare(config.data, tokenizer)
    print0(data.summary())
    made_for = fingerprint(config.model, config.data, tokenizer)
    if world.is_main:
        _claim(directory, made_for)
    torch.distributed.barrier()

    shard_size = config.reference.shard_size
    num_shards = math.ceil(len(data.pairs) / shard_size)
    mine = [i for i in range(world.rank, num_shards, world.size) if not (directory / shard_name(i)).exists()]
    print0(f"{num_shards} shards of up to {shard_size} pairs; {num_shards - _done(directory, num_shards)} to compute")
    model = PairLogpsModel(load_causal_lm(config.model), _scoring(config.logps)).to(world.device).eval()
    pad_token_id = padding_id(tokenizer)
    progress = ProgressBar(len(mine), 0, config.logging.progress_bar)
    with torch.no_grad():
        for done, index in enumerate(mine, start=1):
            pairs = data.pairs[index * shard_size : (index + 1) * shard_size]
            chosen, rejected = [], []
            for start in range(0, len(pairs), config.reference.precompute_batch_size):
                batch = collate(pairs[start : start + config.reference.precompute_batch_size], model.config, pad_token_id)
                out = model(batch.to(world.device))
                chosen.append(out.chosen_logps.cpu())
                rejected.append(out.rejected_logps.cpu())
            write_shard(directory, index, pairs, torch.cat(chosen), torch.cat(rejected))
            progress.update(done, {})
    progress.close()
    torch.distributed.barrier()
    if world.is_main:
        write_manifest(directory, made_for, num_shards, shard_size)
        print0(f"wrote {directory / MANIFEST}: {len(data.pairs)} pairs in {num_shards} shards")
    return directory


def _scoring(logps: LogpsConfig) -> LogpsConfig:
    """Training's log-prob settings, minus packing: one pair per row keeps every pair's value independent of its
    neighbours' lengths, the same whichever shard boundaries and batches the job used."""
    return LogpsConfig(prefix_sharing=logps.prefix_sharing, streaming=logps.streaming, chunk_size=logps.chunk_size)


def _claim(directory: Path, made_for: dict[str, str]) -> None:
    """Mark the directory with what its shards are made from; refuse to mix shards of different origins."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / FINGERPRINT
    if marker.exists():
        found = json.loads(marker.read_text())
        different = sorted(k for k in made_for if found.get(k) != made_for[k])
        if different:
            raise ConfigError(
                f"reference.cache_dir={directory} holds shards made for another {', '.join(different)}; "
                "choose an empty directory for this config"
            )
        return
    with atomic_open(marker) as handle:
        json.dump(made_for, handle, indent=2)


def _done(directory: Path, num_shards: int) -> int:
    return sum((directory / shard_name(i)).exists() for i in range(num_shards))
