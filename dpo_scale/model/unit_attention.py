"""Attention over each packed unit alone: the dense mask's values at the cost of the units' own lengths.

A packed row's dense mask (layout.dense_mask) is block-diagonal: a unit attends only within itself. sdpa and eager
attention compute every (query, key) pair of the row whatever the mask says, so four HH-RLHF pairs packed into one
1,650-token row cost 1,650² per head and layer where the units need the sum of their own lengths squared (about a
quarter of it). Here the model's own kernel runs once per unit, on that unit's queries, keys and values with the
unit's (L, L) mask; padding positions get zeros (nothing attends to them and they are never scored).

The route is registered with transformers per model, like sequence parallelism's Ulysses routing. The units come
in as the `unit_spans` keyword, which the model hands down to attention with its other keywords, so activation
checkpointing's recompute sees them too; a call without them (generation) runs the model's own kernel and mask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from dpo_scale.model.layout import PairBatch, additive_mask, may_attend


class ModelKernel:
    """A model's own attention kernel by its transformers name, called as transformers calls attention functions;
    what the routes that wrap attention (units here, Ulysses under sequence parallelism) run inside."""

    def __init__(self, inner: str):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.function = None if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]

    def __call__(self, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        # eager attention is each model's own function (Gemma's soft-capping, ...), found beside its attention class
        function = self.function or sys.modules[type(module).__module__].eager_attention_forward
        return function(module, query, key, value, attention_mask, *args, **kwargs)


@dataclass(frozen=True)
class UnitSpan:
    start: int
    stop: int
    mask: torch.Tensor  # (1, 1, L, L) additive: 0 where the unit's layout lets a query see a key, the dtype's min elsewhere


def unit_spans(batch: PairBatch, dtype: torch.dtype) -> list[list[UnitSpan]]:
    """Each row's units in order, with their masks: built once per batch, read by every layer."""
    rows = []
    for r in range(batch.unit_ids.shape[0]):
        units, lengths = torch.unique_consecutive(batch.unit_ids[r], return_counts=True)
        spans, start = [], 0
        for unit, length in zip(units.tolist(), lengths.tolist()):
            if unit < 0:  # padding: only at the row's end
                break
            window = slice(start, start + length)
            q = torch.arange(length, device=batch.unit_ids.device)
            allowed = may_attend(batch.unit_ids[r : r + 1, window], batch.branches[r : r + 1, window])(
                0, None, q[:, None], q[None, :]
            )
            spans.append(UnitSpan(start, start + length, additive_mask(allowed[None, None], dtype)))
            start += length
        rows.append(spans)
    return rows


class _UnitAttention:
    """A transformers attention function: the model's own kernel once per unit."""

    def __init__(self, inner: str):
        self.kernel = ModelKernel(inner)

    def __call__(self, module, query, key, value, attention_mask, *args, unit_spans=None, **kwargs):
        if unit_spans is None:
            return self.kernel(module, query, key, value, attention_mask, *args, **kwargs)
        rows, heads, length, head_dim = query.shape  # key and value: (rows, kv heads, length, head_dim)
        outputs = []
        for r, spans in enumerate(unit_spans):
            pieces = []
            for span in spans:
                window = slice(span.start, span.stop)
                q, k, v = (t[r : r + 1, :, window] for t in (query, key, value))
                out, _ = self.kernel(module, q, k, v, span.mask, *args, **kwargs)  # (1, L, heads, head_dim)
                pieces.append(out)
            padding = length - (spans[-1].stop if spans else 0)
            if padding:
                pieces.append(query.new_zeros(1, padding, heads, head_dim))
            outputs.append(torch.cat(pieces, dim=1))
        return torch.cat(outputs, dim=0), None


_PREFIX = "dpo_scale_units_"


def kernel_of(implementation: str) -> str:
    """The model's own kernel behind a name `route_units` registered (a second scorer of the same model reads it)."""
    return implementation[len(_PREFIX) :].rsplit("_", 1)[0] if implementation.startswith(_PREFIX) else implementation


def route_units(model: nn.Module) -> None:
    """Route `model`'s attention (sdpa or eager) through `_UnitAttention` under a name of its own, so other models in
    the process are untouched; its mask step stays the kernel's own, for calls without `unit_spans`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    inner = model.config._attn_implementation
    if inner.startswith(_PREFIX):
        return
    name = f"{_PREFIX}{inner}_{id(model)}"
    AttentionInterface.register(name, _UnitAttention(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    model.set_attn_implementation(name)
