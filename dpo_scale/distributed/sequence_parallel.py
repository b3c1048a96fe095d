"""Sequence parallelism (DeepSpeed Ulysses, arXiv:2309.14509; Arctic Long Sequence Training, arXiv:2506.13996).

Groups of `sequence_parallel_size` consecutive ranks share each micro-batch; rank r of a group runs the model on the
contiguous slice [r T/SP, (r+1) T/SP) of every row. Everything outside attention works token by token, so it runs
on the slice as it is; attention needs the whole row, and there DeepSpeed's `UlyssesSPAttentionHF` all-to-alls
(T/SP tokens, all heads) -> (T tokens, heads/SP), runs the attention kernel, and all-to-alls back. Consecutive
ranks sit on one node under the launchers' rank order, so the all-to-alls stay inside a node and only the
data-parallel gradient reduction crosses nodes.

What DeepSpeed's transformers wrapper (`register_with_transformers`) does not do for us: it throws 4D masks away
and attends causally over the gathered row, which is wrong for prefix-shared and packed rows. Here the kernel
after the all-to-all gets the structure of the WHOLE row instead (the dense mask, the FlexAttention BlockMask or,
for the padded layout, plain causal attention), built once per batch by `PairLogpsModel` from the full layout that
every rank of the group holds; the model's own mask-building step is told to build nothing.

Costs per layer and rank (bytes, activations of dtype d): two all-to-alls forward of q, k, v and the attention
output, each moving (SP-1)/SP of R x T/SP x heads x head_dim x d, and the same again in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed.runtime.sequence_parallel.parallel_state_sp as sequence_parallel_state
import torch
from deepspeed.module_inject.layers import ColumnParallel, RowParallel
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from torch import nn

from dpo_scale.config import ConfigError, TrainConfig
from dpo_scale.model.positions import read_text_config
from dpo_scale.model.unit_attention import ModelKernel


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's place in its sequence-parallel group. `size` 1: no sequence parallelism (the whole row here)."""

    size: int = 1
    rank: int = 0
    group: object = None
    gradient_sums: bool = False
    """Whether the sum's backward adds the group's gradients (SP x each rank's, every rank holding the same loss)
    instead of passing each rank its own: what ZeRO-3's reduce-scatter needs (see `init_groups`)."""

    def bounds(self, length: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice of a row of `length` tokens (a multiple of `size`: see collate)."""
        share = length // self.size
        return self.rank * share, (self.rank + 1) * share

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The group's sum of `tensor` on every rank of the group, differentiable. Every rank computes the same loss
        from the sum, so the group's parameter gradients are the whole sequence's once its ranks' are added:
        DeepSpeed's RowParallel passes each rank the gradient of its own term (all-reduce forward, identity
        backward); with `gradient_sums`, its ColumnParallel in front (identity forward, all-reduce backward) makes
        that SP times the gradient. The clone is RowParallel's to reduce in place."""
        if self.size == 1:
            return tensor
        if self.gradient_sums:
            tensor = ColumnParallel.apply(self.group, tensor)
        return RowParallel.apply(self.group, tensor.clone(), False)

    def route_attention(self, model: nn.Module) -> None:
        """Route `model`'s attention through Ulysses over this group (PairLogpsModel calls it once it has read the
        model's kernel): `install_ulysses`."""
        install_ulysses(model, self)


def init_groups(size: int, ds_config: dict | None = None) -> SequenceGroup:
    """Create the sequence-parallel groups (consecutive ranks) and DeepSpeed's data x sequence group; after
    `distributed.init` (and `check_sequence_parallel`: `size` divides the world and splits the model's heads),
    before any engine. `size` 1 creates nothing. `ds_config`: the training engine's, whose gradient reduction the
    group's sum must match (None: forward only).

    DeepSpeed 0.19.8 divides the gradients it reduces by the data-parallel degree (ranks / SP) in stages 0-2 and
    in ZeRO-3's all-reduce path, but by all ranks in ZeRO-3's reduce-scatter (its default): there the group's
    gradients must arrive SP times larger (tests/distributed/test_sequence_parallel.py compares the Adam moments
    with SP=1)."""
    if size == 1:
        return SequenceGroup()
    zero = (ds_config or {}).get("zero_optimization") or {}
    sequence_parallel_state.initialize_sequence_parallel(size)
    return SequenceGroup(
        size, sequence_parallel_state.get_sequence_parallel_rank(), sequence_parallel_state.get_sequence_parallel_group(),
        gradient_sums=zero.get("stage") == 3 and zero.get("reduce_scatter", True),
    )  # fmt: skip


def engine_groups(sequence: SequenceGroup):
    """What `deepspeed.initialize` takes as `mpu`: with it, ZeRO partitions and averages gradients over the data x
    sequence group and divides by the data-parallel degree only. None without sequence parallelism."""
    return sequence_parallel_state if sequence.size > 1 else None


def release_groups() -> None:
    """Forget the groups after the process group is destroyed (a later init in this process makes new ones)."""
    sequence_parallel_state._release_sequence_parallel_groups()


def splits_heads(config, size: int) -> bool:
    """Whether Ulysses can split the heads of `config` (a transformers text config) over `size` ranks: each rank gets
    heads/SP query heads; key/value heads split the same way or, fewer than SP, are replicated."""
    heads, kv_heads = _head_counts(config)
    return heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def check_sequence_parallel(config: TrainConfig, ranks: int) -> None:
    """Refuse, before any model loads (its config.json is read, not its weights), a sequence_parallel_size that does
    not divide this launch's ranks or whose heads Ulysses cannot split, naming the sizes that pass both."""
    if config.sequence_parallel_size == 1:
        return
    model = read_text_config(config.model)
    config.data_parallel_size(ranks, allowed={size for size in range(1, ranks + 1) if splits_heads(model, size)})
    check_heads(model, config.sequence_parallel_size, ranks)


def check_heads(config, size: int, ranks: int) -> None:
    """Refuse a `size` whose heads Ulysses cannot split (see `splits_heads`), naming the sizes that can and that
    divide the `ranks` of this launch."""
    if splits_heads(config, size):
        return
    heads, kv_heads = _head_counts(config)
    fits = [s for s in range(1, ranks + 1) if ranks % s == 0 and splits_heads(config, s)]
    raise ConfigError(
        f"sequence_parallel_size={size}: the model ({config.model_type}) has {heads} query heads and {kv_heads} "
        "key/value heads; Ulysses needs the query heads divisible by it and the key/value heads divisible by it or "
        f"dividing it. Sizes that work for this model on {ranks} ranks: {', '.join(map(str, fits))}"
    )


def _head_counts(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _no_mask(*args, **kwargs) -> None:
    """The model's own mask step under sequence parallelism: it would build a mask for the local slice, which is
    never right after the all-to-all; the full row's structure comes in as the attention mask instead."""
    return None


class _UlyssesAttention:
    """A transformers attention function: DeepSpeed's all-to-alls around the model's own kernel (`inner`), given
    the attention mask the forward was called with: the whole row's structure."""

    def __init__(self, model: nn.Module, inner: str, sequence: SequenceGroup):
        config = model.config.get_text_config()
        self.ulysses = UlyssesSPAttentionHF(
            attn=ModelKernel(inner), batch_size=1, attn_head_count=config.num_attention_heads,
            attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            kv_head_count=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            num_hidden_layers=config.num_hidden_layers, process_group=sequence.group, seq_length_is_variable=True,
        )  # fmt: skip

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        self._fit_rows(query.shape[0])
        return self.ulysses(module, query, key, value, attention_mask, *args, **kwargs)

    def _fit_rows(self, rows: int) -> None:
        """DeepSpeed fixes the rows of a micro-batch when the module is built (its shape checks hold it in dim 1);
        ours vary from batch to batch (packing, the padded layout's 2 rows per pair)."""
        ulysses = self.ulysses
        if ulysses.batch_size == rows:
            return
        ulysses.batch_size = rows
        for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
            shape = list(getattr(ulysses, name))
            shape[1] = rows
            setattr(ulysses, name, torch.Size(shape))


def install_ulysses(model: nn.Module, sequence: SequenceGroup) -> None:
    """Route `model`'s attention through Ulysses over `sequence`'s group, keeping its kernel (sdpa, eager, flex,
    flash): registered with transformers under a name of its own, so other models in the process are untouched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_heads(model.config.get_text_config(), sequence.size, torch.distributed.get_world_size())
    inner = model.config._attn_implementation
    name = f"dpo_scale_ulysses_{inner}_{id(model)}"
    AttentionInterface.register(name, _UlyssesAttention(model, inner, sequence))
    AttentionMaskInterface.register(name, _no_mask)
    model.set_attn_implementation(name)
