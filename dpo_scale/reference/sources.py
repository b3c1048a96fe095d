"""Where reference log-probs come from: an object with one method, `logps(batch) -> PairLogps`, that the loop calls.

- `FrozenCopy`: a frozen full copy of the starting policy, run as a ZeRO-3 inference engine (no optimizer state).
- `AdaptersDisabled`: a LoRA policy with its adapters switched off, i.e. the base model, at no extra memory.
- `CachedReference`: values precomputed once by `dpo-scale precompute-ref` (cache.py), no model at all.
- `NF4Reference` (nf4.py): a bitsandbytes 4-bit copy, whole on every rank.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dpo_scale.loss import PairLogps
from dpo_scale.model.layout import PairBatch
from dpo_scale.reference.cache import CacheReader


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


class CachedReference:
    def __init__(self, reader: CacheReader, shared_sums: bool = False):
        """`shared_sums`: also read the sums over each pair's shared part (LD-DPO, loss.ld_alpha)."""
        self.reader = reader
        self.fields = ("chosen", "rejected", "chosen_shared", "rejected_shared")[: 4 if shared_sums else 2]
        reader.require(self.fields, "loss.ld_alpha")  # refused when the run is built, not at its first step

    def logps(self, batch: PairBatch) -> PairLogps:
        device = batch.score_slots.device
        values = [v.to(device) for v in self.reader.lookup(list(batch.pairs), self.fields)]  # each (B,) fp32
        counts = torch.bincount(batch.score_slots, minlength=2 * batch.num_pairs).float()  # scored tokens per slot
        b = batch.num_pairs
        return PairLogps(values[0], values[1], counts[:b], counts[b:], *values[2:])
