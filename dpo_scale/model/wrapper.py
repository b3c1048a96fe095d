"""A causal LM as a function from a `PairBatch` to per-pair log-prob sums.

`PairLogpsModel.forward` runs the backbone and the LM head inside one module forward, which is where ZeRO-3 can
gather the head's weight for the streaming stage (training registers it as an external parameter of this module).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from dpo_scale.config import ConfigError, LogpsConfig, LoraConfig, ModelConfig
from dpo_scale.hub import check_model_source
from dpo_scale.loss import PairLogps
from dpo_scale.model.layout import (
    PairBatch, additive_mask, block_mask, dense_mask, padding_mask, sequence_parallel_multiple,
)  # fmt: skip
from dpo_scale.model.streaming_logps import (
    LMHead,
    full_logits_log_sum_sq,
    full_logits_token_logps,
    streaming_token_logps,
    streaming_token_logps_and_log_sum_sq,
)
from dpo_scale.model.unit_attention import kernel_of, route_units, unit_spans


def load_causal_lm(config: ModelConfig) -> nn.Module:
    """`from_pretrained` with safetensors only (no pickle from a shared cluster) and remote code off by default."""
    from transformers import AutoModelForCausalLM

    check_model_source(config.path, "model.path", "point model.path at a model directory or a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.path,
            dtype=getattr(torch, config.dtype),
            use_safetensors=True,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.path={config.path}: cannot load a causal LM with safetensors weights ({error}). Point model.path "
            "at a directory holding config.json and *.safetensors, or a hub id"
        ) from None
    return model


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """The peft model with fresh adapters (B = 0, so it starts equal to `model`) on `config.target_modules`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adapters = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; the warning is about peft's code
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, adapters)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (torch's non-reentrant checkpoint). transformers 5
    renamed the method; the old name is a deprecated alias that warns on every run."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# Config attributes that change logits in ways the streaming head does not reproduce.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("dim_model_base",)


def lm_head_of(model: nn.Module) -> LMHead:
    """The LM head of a transformers causal LM with the logit transforms its config declares.

    Supported: a Linear head (tied or not, with or without bias), `logit_scale` (Cohere), `logits_scaling`
    (Granite), `output_multiplier` and `final_logit_softcapping` (Gemma 2/3). Anything else is refused with a
    message rather than scored wrongly.
    """
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}: its LM head is a {type(head).__name__}, not a Linear layer, so streaming "
            "log-probs cannot reproduce it; set logps.streaming=false"
        )
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"{type(model).__name__}: config.{name} rescales the logits in a way streaming log-probs do not "
                "reproduce; set logps.streaming=false"
            )
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        scale /= config.logits_scaling
    if getattr(config, "output_multiplier", None) is not None:
        scale *= config.output_multiplier
    return LMHead(head.weight, head.bias, scale, getattr(config, "final_logit_softcapping", None))


def tied_input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The input embedding of a transformers causal LM when it is a trainable nn.Embedding whose weight is the LM
    head's (Llama with tie_word_embeddings, Gemma, small Qwen); None when untied, frozen (LoRA) or another module."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embedding, nn.Embedding) and head is not None and embedding.weight is head.weight
    return embedding if tied and embedding.weight.requires_grad else None


class _HeadGradientAfterLookup(torch.autograd.Function):
    """A path from the streaming head back to a tied weight that autograd takes after the embedding lookup's backward.

    Why: a tied weight gets two gradients, the head's (V, H) and the lookup's, which torch makes dense: a (V, H) of
    zeros with the looked-up rows added. Both are alive while autograd sums them (51 MiB each at a 16M Llama over
    GPT-2's vocabulary, BENCHMARKS.md). Made sparse (`nn.Embedding.sparse`), the lookup's gradient is its rows only,
    and autograd adds sparse rows into a dense gradient in place, but only when the rows arrive first (torch's
    autograd/input_buffer.cpp; arriving second, they are summed into a new (V, H)). The head runs last in forward, so
    its gradient would arrive first. Among nodes ready at once, autograd runs the one made latest first; made before
    the backbone runs, this node hands the head's gradient on after every node the backbone made, the lookup
    included. Only where the sum is made depends on that order, never its value, and the sum is dense: `.grad`,
    DeepSpeed's gradient hooks and the optimizer see what they saw before (tests/model/test_tied_embedding.py)."""

    @staticmethod
    def forward(ctx, weight):
        return weight.new_zeros(()).expand_as(weight)  # (V, H) over one element: the gradient's shape, no copy

    @staticmethod
    def backward(ctx, grad):
        return grad


def _make_lookup_gradient_sparse(embedding: nn.Embedding) -> None:
    """The lookup's gradient as the rows it read (_HeadGradientAfterLookup), summed per token before autograd adds
    them into the head's gradient. Unsummed, CUDA would add each row with an atomic add: in bf16 one rounding per
    occurrence of a token, in no fixed order, where torch's dense lookup gradient sums a token's rows in fp32 first
    and in a fixed order, as `coalesce` does (its CUDA kernel accumulates in fp32 after a sort)."""
    embedding.sparse = True
    embedding.register_forward_hook(_sum_lookup_rows_per_token)


def _sum_lookup_rows_per_token(module: nn.Embedding, args, output: torch.Tensor) -> None:
    node = output.grad_fn  # the lookup's backward, under the module's own elementwise steps (Gemma 3's scale)
    while node is not None and node.name() != "EmbeddingBackward0":
        node = node.next_functions[0][0] if node.next_functions else None
    if node is not None:  # None without gradients (a no_grad forward, a frozen reference)
        node.register_hook(lambda grad_weight, grad_output: (grad_weight[0].coalesce(),))


# Attention implementations that honour an arbitrary additive 4D mask with explicit position ids.
_MASKABLE_ATTENTION = ("sdpa", "eager")
# ... and those that take packed units as position ids restarting per unit, with no mask: flash-attention's varlen
# kernels; sdpa and eager build the equivalent mask inside transformers (masking_utils.find_packed_sequence_indices).
_VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa", "eager")


def check_attention_device(config: LogpsConfig, device: torch.device) -> None:
    """Refuse logps.attention=flex off CUDA, before any model is loaded. transformers runs FlexAttention through
    torch.compile, whose CPU kernel does not build for some inputs (torch 2.13: inductor's C++ fails with
    `'cur_kvSplitSize8' was not declared` for a Llama at Phi-3's vocabulary on 32 Chinese ShareGPT pairs, a
    1,300-line traceback; the demo model compiles) and whose backward needs a GPU. dense gives the same log-probs
    (tests/model/test_attention.py)."""
    if config.attention == "flex" and device.type != "cuda":
        raise ConfigError(
            f"logps.attention=flex runs on CUDA only, and this command computes on {device.type}: use "
            "logps.attention=dense (the same log-probs) or auto"
        )


def resolve_attention(config: LogpsConfig, model: nn.Module, cuda: bool, sequence_parallel: bool = False) -> str:
    """logps.attention for this model and device: "padded" (the padded layout's 2D mask), "dense", "units", "flex"
    or "varlen". Refuses a choice the model's attention implementation cannot run, when the run is built."""
    implementation = kernel_of(model.config._attn_implementation)
    if not (config.prefix_sharing or config.packing) and config.attention in ("auto", "dense", "units"):
        return "padded"
    supports_flex = getattr(model, "_supports_flex_attn", False)
    choice = config.attention
    if choice == "auto":
        if not cuda:
            # Ulysses attends over whole rows gathered from every rank: units would need their spans there too
            choice = "dense" if sequence_parallel or implementation not in _MASKABLE_ATTENTION else "units"
        elif not config.prefix_sharing and implementation.startswith("flash_attention"):
            choice = "varlen"
        else:
            choice = "flex" if supports_flex else "dense"
    if choice == "units" and sequence_parallel:
        raise ConfigError(
            "logps.attention=units runs each unit on one rank, but sequence_parallel_size > 1 splits rows over "
            "ranks: use logps.attention=dense (or flex on CUDA), or auto"
        )
    if choice in ("dense", "units") and implementation not in _MASKABLE_ATTENTION:
        raise ConfigError(
            f"logps.prefix_sharing / logps.packing with logps.attention={choice} need a 4D attention mask, which "
            f"attn_implementation={implementation!r} does not take; load the model with sdpa or eager attention, use "
            "logps.attention=flex (or varlen without prefix sharing), or set logps.prefix_sharing=false "
            "logps.packing=false"
        )
    if choice == "flex" and not supports_flex:
        raise ConfigError(
            f"logps.attention=flex: {type(model).__name__} does not support transformers' flex_attention; use "
            "logps.attention=dense (or varlen without prefix sharing)"
        )
    if choice == "varlen" and implementation not in _VARLEN_ATTENTION:
        raise ConfigError(
            f"logps.attention=varlen: attn_implementation={implementation!r} does not take packed position ids; "
            "load the model with flash_attention_2 or sdpa, or use logps.attention=dense"
        )
    return choice


class RowSlice(Protocol):
    """Sequence parallelism as the model sees it (distributed.SequenceGroup): which slice of every row this rank
    runs, the group's sum of per-pair values, and the attention that sees the whole row."""

    size: int

    def bounds(self, length: int) -> tuple[int, int]: ...

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def route_attention(self, model: nn.Module) -> None: ...


# Kernels that attend causally when given no mask, so a right-padded row of one unit needs none
_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


class PairLogpsModel(nn.Module):
    def __init__(
        self, model: nn.Module, config: LogpsConfig, weighting: bool = False, sequence: RowSlice | None = None
    ):
        """`weighting`: also WPO's per-completion Σ (log p − log Σ p²) (loss.use_weighting), from the same pass.
        `sequence`: run only this rank's slice of every row, with the model's attention routed through Ulysses
        over its group, and sum the per-pair values over the group; None: the whole row here."""
        super().__init__()
        self.model = model
        self.config = config
        self.weighting = weighting
        self.sequence = sequence if sequence is not None and sequence.size > 1 else None
        # refuse what cannot be computed exactly when the run is built, not at the first step
        if config.streaming:
            lm_head_of(_unwrap_peft(model))
        causal_lm = _unwrap_peft(model)
        tied = tied_input_embedding(causal_lm) if config.streaming else None
        if tied is not None and not tied.sparse:  # once per model, however many modules wrap it
            _make_lookup_gradient_sparse(tied)
        self.tied_head = tied is not None
        self.attention = resolve_attention(config, causal_lm, torch.cuda.is_available(), self.sequence is not None)
        if self.attention == "flex":
            causal_lm.set_attn_implementation("flex_attention")
        kernel = kernel_of(causal_lm.config._attn_implementation)
        # Under sequence parallelism the model's own mask step sees one slice only and is switched off, so the
        # kernel must get the whole row's structure unless it needs none: position ids carry the units for flash
        # (Ulysses gathers them), and causal attention is exact for a right-padded row of one unit.
        self.positions_suffice = self.sequence is None or kernel.startswith("flash_attention")
        self.causal_suffices = self.sequence is None or kernel in _CAUSAL_WITHOUT_MASK
        self.length_multiple = sequence_parallel_multiple(self.sequence.size if self.sequence else 1, self.attention)
        """What `collate` must pad every row's length to a multiple of for this module."""
        if self.sequence is not None:
            self.sequence.route_attention(causal_lm)  # after the kernel is read: routing renames it
        if self.attention == "units":
            route_units(causal_lm)

    def _attention_mask(self, batch: PairBatch):
        """The whole row's structure for the attention kernel: the padded layout's 2D mask (or nothing, causal, under
        sequence parallelism); a FlexAttention BlockMask; None for varlen (position ids carry the units); all ones
        for units (they come as `unit_spans`); or the dense mask, additive in the model's dtype, which costs
        R x T x T x dtype bytes, on every rank of a sequence-parallel group."""
        if self.attention == "padded" and self.causal_suffices:
            return None if self.sequence is not None else padding_mask(batch)
        if self.attention == "flex":
            return block_mask(batch)
        if self.attention == "varlen" and self.positions_suffice:
            return None
        if self.attention == "units":  # all ones: sdpa's mask step then attends causally and builds no T x T mask
            return torch.ones_like(batch.input_ids)
        return additive_mask(dense_mask(batch), self.model.dtype)

    def forward(self, batch: PairBatch) -> PairLogps:
        length = batch.input_ids.shape[1]
        start, stop = self.sequence.bounds(length) if self.sequence is not None else (0, length)
        inputs = dict(
            input_ids=batch.input_ids[:, start:stop], attention_mask=self._attention_mask(batch),
            position_ids=batch.position_ids[:, start:stop], use_cache=False,
        )  # fmt: skip
        if self.attention == "units":
            inputs["unit_spans"] = unit_spans(batch, self.model.dtype)
        # the scored tokens whose predicting hidden state is in this slice: the label is the token after it, which
        # for the slice's last position is the next slice's first token (the layout stores labels, not shifts)
        here = None if self.sequence is None else (batch.score_cols >= start) & (batch.score_cols < stop)
        rows, cols, labels = (
            (batch.score_rows, batch.score_cols, batch.score_labels) if here is None
            else (batch.score_rows[here], batch.score_cols[here] - start, batch.score_labels[here])
        )  # fmt: skip
        log_sum_sq = None
        if self.config.streaming:
            causal_lm = _unwrap_peft(self.model)
            backbone = getattr(causal_lm, causal_lm.base_model_prefix)
            head, chunk_size = lm_head_of(causal_lm), self.config.chunk_size
            if self.tied_head:  # made before the backbone runs, for autograd to take after the lookup's backward
                head.weight_grad_via = _HeadGradientAfterLookup.apply(head.weight)
            hidden = backbone(**inputs).last_hidden_state  # (R, T or T/SP, H)
            scored = hidden[rows, cols]  # (N, H): completion positions only
            if self.weighting:
                token_logps, log_sum_sq = streaming_token_logps_and_log_sum_sq(scored, head, labels, chunk_size)
            else:
                token_logps = streaming_token_logps(scored, head, labels, chunk_size)
        else:
            logits = self.model(**inputs).logits  # (R, T or T/SP, V): the tensor streaming avoids
            scored_logits = logits[rows, cols]  # (N, V)
            token_logps = full_logits_token_logps(scored_logits, labels)
            if self.weighting:
                log_sum_sq = full_logits_log_sum_sq(scored_logits)
        group_sum = self.sequence.sum if self.sequence is not None else None
        return sum_by_slot(token_logps, batch, log_sum_sq, here, group_sum)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """A peft model's underlying transformers model (its LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sum_by_slot(
    token_logps: torch.Tensor,
    batch: PairBatch,
    log_sum_sq: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
    group_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PairLogps:
    """Token log-probs -> per-pair chosen / rejected sums, scored-token counts and the sums over the tokens both
    completions have (LD-DPO's shared part); with `log_sum_sq`, WPO's Σ (log p − log Σ p²) too.

    `token_logps` (and `log_sum_sq`) hold the batch's scored tokens, or under sequence parallelism those that
    `scored` (N,) bool selects, and `group_sum` adds the sums of the group's ranks (differentiably, one collective
    for all of them). Counts come from the layout, which every rank has whole."""
    slots, b = 2 * batch.num_pairs, batch.num_pairs
    score_slots = batch.score_slots if scored is None else batch.score_slots[scored]
    score_positions = batch.score_positions if scored is None else batch.score_positions[scored]

    def by_slot(values: torch.Tensor, into: torch.Tensor = score_slots) -> torch.Tensor:
        return torch.zeros(slots, dtype=torch.float32, device=values.device).index_add(0, into, values)

    counts = by_slot(torch.ones_like(batch.score_slots, dtype=torch.float32), batch.score_slots)
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)  # (2B,) min(|y_w|, |y_l|) for both slots of a pair
    in_shared = score_positions < shared[score_slots]  # (n,)
    sums = [by_slot(token_logps), by_slot(token_logps * in_shared)]
    if log_sum_sq is not None:
        sums.append(by_slot((token_logps - log_sum_sq).detach()))
    if group_sum is not None:
        sums = list(group_sum(torch.stack(sums)))  # (2 or 3, 2B)
    sums, shared_sums, weighting = sums[0], sums[1], (sums[2] if log_sum_sq is not None else None)
    return PairLogps(
        chosen_logps=sums[:b], rejected_logps=sums[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:],
        chosen_shared_logps=shared_sums[:b], rejected_shared_logps=shared_sums[b:],
        chosen_weighting_logps=None if weighting is None else weighting[:b],
        rejected_weighting_logps=None if weighting is None else weighting[b:],
    )  # fmt: skip
