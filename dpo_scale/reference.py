"""Where reference log-probs come from: an object with one method, `logps(batch) -> PairLogps`, that the loop calls.

- `FrozenCopy`: a frozen full copy of the starting policy, run as a ZeRO-3 inference engine (no optimizer state).
- `AdaptersDisabled`: a LoRA policy with its adapters switched off, i.e. the base model, at no extra memory.
The disk cache and the 4-bit copy come behind the same method.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dpo_scale.layout import PairBatch
from dpo_scale.loss import PairLogps


class ReferenceSource(Protocol):
    def logps(self, batch: PairBatch) -> PairLogps: ...


class FrozenCopy:
    def __init__(self, engine):
        self.engine = engine

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> PairLogps:
        return self.engine(batch)


class AdaptersDisabled:
    def __init__(self, policy_engine, peft_model):
        self.engine = policy_engine
        self.peft_model = peft_model

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> PairLogps:
        with self.peft_model.disable_adapter():
            return self.engine(batch)
