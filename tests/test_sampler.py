"""The step sampler: a pure function of (seed, step) that splits each global batch the same way for any world size."""

from dpo_scale.sampler import StepSampler


def _global_batch(sampler: StepSampler, step: int) -> list[int]:
    return sorted(i for rank in range(sampler.world_size) for micro in sampler.micro_batches(step, rank) for i in micro)


def test_every_split_of_the_global_batch_sees_the_same_pairs():
    """1 rank x 4 accumulation, 2 x 2 and 4 x 1 (micro-batch 2): each optimizer step covers the same 8 pairs."""
    splits = [StepSampler(50, 2, accumulation, world, seed=3) for accumulation, world in ((4, 1), (2, 2), (1, 4))]
    for step in range(12):
        batches = [_global_batch(s, step) for s in splits]
        assert batches[0] == batches[1] == batches[2]
        assert len(batches[0]) == 8 and len(set(batches[0])) == 8


def test_an_epoch_visits_each_pair_once_and_counts_the_rest():
    sampler = StepSampler(50, 2, 2, 2, seed=0)
    assert (sampler.global_batch, sampler.steps_per_epoch, sampler.left_out_per_epoch) == (8, 6, 2)
    seen = [i for step in range(6) for i in _global_batch(sampler, step)]
    assert len(seen) == len(set(seen)) == 48


def test_epochs_reshuffle_and_the_order_is_reproducible():
    sampler = StepSampler(40, 4, 1, 1, seed=7)
    first_epoch = [sampler.micro_batches(step, 0) for step in range(10)]
    second_epoch = [sampler.micro_batches(step, 0) for step in range(10, 20)]
    assert first_epoch != second_epoch
    assert first_epoch == [StepSampler(40, 4, 1, 1, seed=7).micro_batches(step, 0) for step in range(10)]
    assert sampler.epoch_of(9) == 0 and sampler.epoch_of(10) == 1
    assert first_epoch != [StepSampler(40, 4, 1, 1, seed=8).micro_batches(step, 0) for step in range(10)]
