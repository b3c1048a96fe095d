"""`dpo-scale precompute-ref --config run.yaml`: the reference log-probs of every pair, once, into a disk cache.

The same data path and log-prob stage as training (prefix sharing, streaming head), with the reference model in
place of the policy and no gradients. Each rank computes the shards whose number is its rank modulo the world size;
a shard already on disk is complete (see reference/cache.py), so a job killed at any point and started again
computes only what is missing, and the finished cache is the same files.

By default each rank holds the whole reference (plain data parallel, no communication). With
`sequence_parallel_size` > 1, groups of that many consecutive ranks score each batch together, one slice of every
row each (as training does): shards go to groups rather than ranks, and the group's first rank writes them; the
values are those of one process (tests/distributed/test_sequence_parallel.py). With
`reference.precompute_sharded` the reference is a ZeRO-3 inference engine split across the ranks, for one that does
not fit a device: every forward then gathers each layer from all ranks, so all ranks must run the same number of
forwards. A rank with fewer batches left runs throw-away forwards of one pair until the busiest rank is done.

A forward holds `reference.precompute_batch_size` pairs, or under `micro_batch_tokens` as many consecutive pairs as
fit FORWARD_BUDGET_FACTOR x micro_batch_tokens positions per rank (training's forward-only budget, batch_plan.py: a
forward without backward keeps no activations between layers). Each pair's values are its own (no packing), so the
cache is the same files whichever batching made it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_scale import distributed
from dpo_scale.config import ConfigError, LogpsConfig, TrainConfig
from dpo_scale.data import Pair, load_prepared, padding_id, run_tokenizer, store_directory
from dpo_scale.distributed.sequence_parallel import check_sequence_parallel
from dpo_scale.ds_config import AUTO, resolve_deepspeed_config
from dpo_scale.io import atomic_open
from dpo_scale.model.layout import collate, sequence_parallel_multiple
from dpo_scale.model.positions import position_limit
from dpo_scale.model.wrapper import PairLogpsModel, check_attention_device, load_causal_lm
from dpo_scale.reference.cache import (
    FIELDS, MANIFEST, differences, fingerprint, shard_name, write_manifest, write_shard,
)  # fmt: skip
from dpo_scale.training.batch_plan import FORWARD_BUDGET_FACTOR, check_pairs_fit, forward_batches, forward_budget
from dpo_scale.training.tracking import ProgressBar, print0, print_line

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
    check_attention_device(config.logps, world.device)
    check_sequence_parallel(config, world.size)
    positions = position_limit(config.model)
    positions.check_max_length(config.data.max_length)
    directory = Path(config.reference.cache_dir)
    replicas = config.data_parallel_size(world.size)
    sequence = distributed.init_groups(config.sequence_parallel_size)
    replica = world.rank // sequence.size
    ds_config = _sharded_deepspeed_config(config, world) if config.reference.precompute_sharded else None
    tokenizer = run_tokenizer(config.data, config.model.path)
    data = load_prepared(config.data, tokenizer, store_directory(config.data, tokenizer, config.run_dir))
    print0(data.summary())
    positions.check_prepared(data)
    scoring = _scoring(config.logps)
    lengths = data.pair_lengths()  # (pairs, 3)
    # refused before anything is written or loaded; checked again with the loaded model's row multiple
    early_multiple = sequence_parallel_multiple(config.sequence_parallel_size, scoring.attention)
    _check_pairs_fit(config, scoring, lengths, early_multiple)
    made_for = fingerprint(config.model, config.data, tokenizer)
    if world.is_main:
        _claim(directory, made_for)
    torch.distributed.barrier()

    shard_size = config.reference.shard_size
    num_shards = math.ceil(len(data.pairs) / shard_size)
    mine = [i for i in range(replica, num_shards, replicas) if not (directory / shard_name(i)).exists()]
    print0(f"{num_shards} shards of up to {shard_size} pairs; {num_shards - _done(directory, num_shards)} to compute")
    model, length_multiple = _reference(config, scoring, ds_config, world, sequence)
    if length_multiple != early_multiple:  # the loaded model pads rows otherwise (FlexAttention's whole blocks)
        _check_pairs_fit(config, scoring, lengths, length_multiple)
    batches = {i: _forward_batches(config, scoring, lengths[i * shard_size : (i + 1) * shard_size], length_multiple)
               for i in mine}  # fmt: skip
    pad_token_id = padding_id(tokenizer)

    def score(pairs: list[Pair]) -> dict[str, torch.Tensor]:
        out = model(collate(pairs, scoring, pad_token_id, length_multiple).to(world.device))
        return {
            "chosen": out.chosen_logps.cpu(), "rejected": out.rejected_logps.cpu(),
            "chosen_shared": out.chosen_shared_logps.cpu(), "rejected_shared": out.rejected_shared_logps.cpu(),
        }  # fmt: skip

    forwards = sum(len(shard) for shard in batches.values())
    if config.uses_token_budget:
        print_line(f"rank {world.rank}: {forwards} forwards of at most {forward_budget(config)} positions per rank "
                   f"({FORWARD_BUDGET_FACTOR} x micro_batch_tokens)")  # fmt: skip
    progress = ProgressBar(len(mine), 0, config.logging.progress_bar, label="precompute-ref", unit="shard")
    with torch.no_grad():
        for done, index in enumerate(mine, start=1):
            pairs = _shard(data.pairs, index, shard_size)
            scored = [score(pairs[batch[0] : batch[-1] + 1]) for batch in batches[index]]
            if sequence.rank == 0:  # the group's ranks hold the same values
                write_shard(directory, index, pairs, {name: torch.cat([v[name] for v in scored]) for name in FIELDS})
            progress.update(done, {})
        if ds_config is not None:
            for _ in range(_most_forwards(forwards, world.device) - forwards):
                score(data.pairs[:1])
    progress.close()
    torch.distributed.barrier()
    if world.is_main:
        write_manifest(directory, made_for, num_shards, shard_size)
        print0(f"wrote {directory / MANIFEST}: {len(data.pairs)} pairs in {num_shards} shards")
    return directory


def _sharded_deepspeed_config(config: TrainConfig, world: distributed.World) -> dict:
    """The ZeRO-3 inference config of a sharded precompute, checked before anything is loaded or written."""
    section = config.deepspeed
    if section.config == AUTO:  # sharding is the point here, whatever the number of ranks
        section = dataclasses.replace(section, config="zero3")
    ds_config = resolve_deepspeed_config(
        section, config.optim, config.reference.precompute_batch_size, 1, world.size, total_steps=1,
        sequence_parallel_size=config.sequence_parallel_size,
    )
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(
            f"reference.precompute_sharded needs a ZeRO stage 3 deepspeed.config; {config.deepspeed.config} is not"
        )
    computes_in = {"fp32": config.model.dtype, "bf16": "bfloat16", "fp16": "float16"}[config.deepspeed.precision]
    if computes_in != config.model.dtype:  # the fingerprint records model.dtype as the values' dtype
        raise ConfigError(
            f"reference.precompute_sharded with deepspeed.precision={config.deepspeed.precision} computes in "
            f"{computes_in}, but model.dtype={config.model.dtype}; set model.dtype={computes_in} (here and in the "
            "training runs that read this cache)"
        )
    return ds_config


def _check_pairs_fit(config: TrainConfig, scoring: LogpsConfig, lengths: np.ndarray, length_multiple: int) -> None:
    """Under micro_batch_tokens, refuse pairs that alone exceed a forward's budget (one line)."""
    if config.uses_token_budget:
        check_pairs_fit(lengths, forward_budget(config), scoring, length_multiple, config.sequence_parallel_size,
                        "pairs to score", FORWARD_BUDGET_FACTOR)  # fmt: skip


def _forward_batches(config: TrainConfig, scoring: LogpsConfig, lengths: np.ndarray,
                     length_multiple: int) -> list[list[int]]:  # fmt: skip
    """One shard's forwards, each a run of consecutive positions in the shard (`lengths`: its pairs' (n, 3)):
    reference.precompute_batch_size pairs, or under micro_batch_tokens as many as fit the forward budget (a
    sequence-parallel group computes SP x the budget of a rank)."""
    if not config.uses_token_budget:
        return forward_batches(lengths, None, scoring, max_pairs=config.reference.precompute_batch_size)
    return forward_batches(lengths, forward_budget(config) * config.sequence_parallel_size, scoring, length_multiple)


def _reference(
    config: TrainConfig, scoring: LogpsConfig, ds_config: dict | None, world, sequence: distributed.SequenceGroup
) -> tuple[torch.nn.Module, int]:
    """The scoring module and the multiple its rows' length must be padded to (PairLogpsModel.length_multiple)."""
    if ds_config is None:
        reference = load_causal_lm(config.model)
    else:
        reference = distributed.load_model(config.model, ds_config)
        held, total = distributed.held_parameters(reference)
        print_line(f"rank {world.rank}: holds {held:,} of the reference's {total:,} parameters")
    module = PairLogpsModel(reference, scoring, sequence=sequence)
    if ds_config is None:
        return module.to(world.device).eval(), module.length_multiple
    distributed.register_lm_head(module, reference)
    return distributed.inference_engine(module, ds_config, sequence), module.length_multiple


def _shard(pairs: Sequence[Pair], index: int, shard_size: int) -> list[Pair]:
    return pairs[index * shard_size : (index + 1) * shard_size]


def _most_forwards(forwards: int, device: torch.device) -> int:
    count = torch.tensor([forwards], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def _scoring(logps: LogpsConfig) -> LogpsConfig:
    """Training's log-prob settings, minus packing: one pair per row keeps every pair's value independent of its
    neighbours' lengths, the same whichever shard boundaries and batches the job used."""
    return dataclasses.replace(logps, packing=False, pack_length=None)


def _claim(directory: Path, made_for: dict[str, Any]) -> None:
    """Mark the directory with what its shards are made from; refuse to mix shards of different origins."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / FINGERPRINT
    if marker.exists():
        different = differences(json.loads(marker.read_text()), made_for)
        if different:
            raise ConfigError(
                f"reference.cache_dir={directory} holds shards made for other weights, data or settings "
                f"({'; '.join(different)}). Fix: choose an empty directory for this config"
            )
        return
    with atomic_open(marker) as handle:
        json.dump(made_for, handle, indent=2)


def _done(directory: Path, num_shards: int) -> int:
    return sum((directory / shard_name(i)).exists() for i in range(num_shards))
