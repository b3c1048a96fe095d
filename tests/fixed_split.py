"""The sampler split as `micro_batch_size` runs split it (batch_plan.FixedCount), under the names tests use."""

from dataclasses import dataclass

import numpy as np

from dpo_scale.config import LogpsConfig
from dpo_scale.training.batch_plan import CostModel, FixedCount
from dpo_scale.training.sampler import StepSampler


@dataclass
class Split:
    """The sampler with micro_batch_size x gradient_accumulation_steps x world_size pairs a step, split by FixedCount."""

    num_pairs: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    seed: int

    def __post_init__(self):
        self.sampler = StepSampler(self.num_pairs, self.micro_batch_size * self.gradient_accumulation_steps *
                                   self.world_size, self.seed)  # fmt: skip
        lengths = np.ones((self.num_pairs, 3), np.int64)
        self.planner = FixedCount(lengths, self.micro_batch_size, self.world_size, LogpsConfig(), CostModel(0.0),
                                  self.sampler)  # fmt: skip
        self.global_batch, self.steps_per_epoch = self.sampler.global_batch, self.sampler.steps_per_epoch
        self.left_out_per_epoch, self.epoch_of = self.sampler.left_out_per_epoch, self.sampler.epoch_of

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        return self.planner.plan(step).micro_batches[rank]
