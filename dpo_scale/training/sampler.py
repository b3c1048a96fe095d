"""Which pairs each rank sees at each optimizer step: a pure function of (seed, step), so resuming needs only the
step number and every world size / accumulation split of the same global batch sees the same pairs.

Epoch e is a permutation of the pairs drawn from `seed + e`; optimizer step s takes the next `global_batch` of it.
The tail of an epoch that does not fill a global batch is left out of that epoch (and counted), so every update
averages the same number of pairs: that is what makes 1 rank x 4 accumulation steps, 2 ranks x 2, 4 ranks x 1 and
any token budget's split the same update.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepSampler:
    num_pairs: int
    global_batch: int
    """Pairs per optimizer step, over every rank."""
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch

    @property
    def left_out_per_epoch(self) -> int:
        return self.num_pairs - self.steps_per_epoch * self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_pairs(self, step: int) -> list[int]:
        """The pair indices of optimizer step `step`, in draw order (batch_plan.py splits them into micro-batches)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.num_pairs, self.seed, epoch)
        start = within * self.global_batch
        return order[start : start + self.global_batch].tolist()


# Drawing an epoch's permutation costs O(num_pairs) (a 1M-element randperm at 1M pairs), so it is drawn once per
# epoch, not once per step. Each entry holds num_pairs int64s (8 MB at 1M pairs); two leave room for a second
# sampler used alongside the training one without the two evicting each other on every step.
@functools.lru_cache(maxsize=2)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s order of the pairs, shared by every caller: read it, never write to it."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_pairs, generator=generator)  # (num_pairs,)
