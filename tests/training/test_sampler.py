"""The step sampler: a pure function of (seed, step) that splits each global batch the same way for any world size."""

import pytest
import torch

import dpo_scale.training.sampler as sampler_module
from fixed_split import Split


def _global_batch(sampler: Split, step: int) -> list[int]:
    return sorted(i for rank in range(sampler.world_size) for micro in sampler.micro_batches(step, rank) for i in micro)


def test_every_split_of_the_global_batch_sees_the_same_pairs():
    """1 rank x 4 accumulation, 2 x 2 and 4 x 1 (micro-batch 2): each optimizer step covers the same 8 pairs."""
    splits = [Split(50, 2, accumulation, world, seed=3) for accumulation, world in ((4, 1), (2, 2), (1, 4))]
    for step in range(12):
        batches = [_global_batch(s, step) for s in splits]
        assert batches[0] == batches[1] == batches[2]
        assert len(batches[0]) == 8 and len(set(batches[0])) == 8


def test_an_epoch_visits_each_pair_once_and_counts_the_rest():
    sampler = Split(50, 2, 2, 2, seed=0)
    assert (sampler.global_batch, sampler.steps_per_epoch, sampler.left_out_per_epoch) == (8, 6, 2)
    seen = [i for step in range(6) for i in _global_batch(sampler, step)]
    assert len(seen) == len(set(seen)) == 48


def test_epochs_reshuffle_and_the_order_is_reproducible():
    sampler = Split(40, 4, 1, 1, seed=7)
    first_epoch = [sampler.micro_batches(step, 0) for step in range(10)]
    second_epoch = [sampler.micro_batches(step, 0) for step in range(10, 20)]
    assert first_epoch != second_epoch
    assert first_epoch == [Split(40, 4, 1, 1, seed=7).micro_batches(step, 0) for step in range(10)]
    assert sampler.epoch_of(9) == 0 and sampler.epoch_of(10) == 1
    assert first_epoch != [Split(40, 4, 1, 1, seed=8).micro_batches(step, 0) for step in range(10)]


def _old_micro_batches(sampler: Split, step: int, rank: int) -> list[list[int]]:
    """The sampler as first written: a fresh permutation from seed + epoch on every call."""
    epoch, within = divmod(step, sampler.steps_per_epoch)
    order = torch.randperm(sampler.num_pairs, generator=torch.Generator().manual_seed(sampler.seed + epoch))
    batch = order[within * sampler.global_batch : (within + 1) * sampler.global_batch].tolist()
    size, world = sampler.micro_batch_size, sampler.world_size
    slices = [a * world + rank for a in range(sampler.gradient_accumulation_steps)]
    return [batch[i * size : (i + 1) * size] for i in slices]


@pytest.mark.parametrize("accumulation, world", [(1, 1), (4, 1), (2, 2), (1, 4), (3, 2)])
def test_the_cached_epoch_order_gives_the_same_pairs_as_drawing_it_every_step(accumulation, world):
    """Exact equality with the per-call permutation, for every rank over 3 epochs: resumed runs see the same pairs."""
    sampler = Split(61, 2, accumulation, world, seed=11)
    for step in range(3 * sampler.steps_per_epoch):
        for rank in range(world):
            assert sampler.micro_batches(step, rank) == _old_micro_batches(sampler, step, rank)


def test_the_permutation_is_drawn_once_per_epoch_not_once_per_step(monkeypatch):
    calls = []
    randperm = torch.randperm

    def counting_randperm(*args, **kwargs):
        calls.append(args[0])
        return randperm(*args, **kwargs)

    monkeypatch.setattr(sampler_module.torch, "randperm", counting_randperm)
    sampler_module._epoch_order.cache_clear()  # an order cached by another test would hide the draw
    sampler = Split(1000, 4, 2, 2, seed=5)  # 62 steps an epoch
    for step in range(3 * sampler.steps_per_epoch):
        for rank in range(sampler.world_size):
            sampler.micro_batches(step, rank)
    assert calls == [1000, 1000, 1000]
